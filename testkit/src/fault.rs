//! [`FaultProxy`]: a TCP relay between a test and a server that can cut and heal the link.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::Context as _;

/// Relays TCP connections from `127.0.0.1:listen_port` to `target`, until told to [`cut`].
///
/// `cut()` closes every relayed connection and refuses new ones (accepted, then closed at once),
/// as a network partition would look to both sides; `heal()` relays again. Everything stops on
/// `Drop`. Relaying uses plain threads, so it works from sync and async tests alike.
///
/// [`cut`]: FaultProxy::cut
pub struct FaultProxy {
    listen: SocketAddr,
    target: SocketAddr,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    cut: AtomicBool,
    stopped: AtomicBool,
    next_id: AtomicU64,
    /// Both ends of every relayed connection, by id, so `cut` can close them.
    open: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
}

impl State {
    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (TcpStream, TcpStream)>> {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn close_all(&self) {
        for (_, (a, b)) in self.open().drain() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

impl FaultProxy {
    /// Listen on 127.0.0.1:`listen_port` (0 = any free port) and relay to `target`.
    pub fn start(listen_port: u16, target: SocketAddr) -> anyhow::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", listen_port))
            .with_context(|| format!("binding the fault proxy on port {listen_port}"))?;
        let listen = listener.local_addr()?;
        let state = Arc::new(State::default());
        let accepting = state.clone();
        thread::Builder::new()
            .name(format!("fault-proxy-{}", listen.port()))
            .spawn(move || accept_loop(listener, target, accepting))
            .context("spawning the fault proxy thread")?;
        Ok(FaultProxy { listen, target, state })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// Where connections are relayed to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Drop every open connection and refuse new ones until [`FaultProxy::heal`].
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.state.close_all();
    }

    /// Relay new connections again.
    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        self.state.cut.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.state.close_all();
        // Wake the accept loop so it sees `stopped`.
        let _ = TcpStream::connect(self.listen);
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, state: Arc<State>) {
    for incoming in listener.incoming() {
        if state.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = incoming else { continue };
        if state.cut.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect(target) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) =
            (client.try_clone(), server.try_clone(), client.try_clone(), server.try_clone())
        else {
            continue;
        };
        let id = state.next_id.fetch_add(1, Ordering::Relaxed);
        state.open().insert(id, (c3, s3));
        let done = state.clone();
        thread::spawn(move || pipe(client, server));
        thread::spawn(move || {
            pipe(s2, c2);
            done.open().remove(&id);
        });
    }
}

/// Copy `from` into `to` until either side closes, then close both.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        thread::spawn(move || {
            for s in l.incoming().flatten() {
                thread::spawn(move || {
                    let mut r = s.try_clone().expect("clone");
                    let mut w = s;
                    let _ = std::io::copy(&mut r, &mut w);
                });
            }
        });
        addr
    }

    fn roundtrip(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        s.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)?;
        Ok(buf.to_vec())
    }

    #[test]
    fn relays_until_cut_and_again_after_heal() {
        let proxy = FaultProxy::start(0, echo_server()).expect("start");
        assert_eq!(roundtrip(proxy.addr()).expect("relayed"), b"ping");

        let mut open = TcpStream::connect(proxy.addr()).expect("connect");
        open.write_all(b"ping").expect("write");
        let mut buf = [0u8; 4];
        open.read_exact(&mut buf).expect("echo");
        proxy.cut();
        assert!(proxy.is_cut());
        assert_eq!(open.read(&mut buf).unwrap_or(0), 0, "a cut connection is closed");
        assert!(roundtrip(proxy.addr()).is_err(), "new connections are refused while cut");

        proxy.heal();
        assert_eq!(roundtrip(proxy.addr()).expect("relayed after heal"), b"ping");
    }
}
