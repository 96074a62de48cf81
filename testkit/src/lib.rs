//! Test support for Airlock: starts real servers on free loopback ports for integration tests.
//!
//! There is no Docker engine on the machines that run these tests, so every helper spawns a real
//! binary (or, for the OIDC issuer, a small in-process axum server) and tears it down on `Drop`,
//! removing its temporary directory. `scripts/test.sh` installs the binaries on a fresh machine.
//!
//! # Layout
//!
//! - [`fault`]: [`FaultProxy`], a TCP relay that can cut and heal a link (partition tests).
//! - [`proc`]: [`Proc`], a child process killed on `Drop` whose output goes to a log file.
//! - [`nats`]: [`Nats`], a `nats-server` with JetStream enabled.
//! - [`postgres`]: [`Postgres`], a throwaway PostgreSQL cluster made by `initdb` (SCRAM-SHA-256 auth).
//! - [`s3`]: [`S3`], an S3-compatible server (`moto_server`) with a bucket already created.
//! - [`oidc`]: [`OidcIssuer`], an OIDC discovery + JWKS endpoint and token minting (ES256, RS256).
//! - [`pgwire`]: a raw PostgreSQL wire client, for tests that check every byte a proxy sends.
//! - this file: [`free_port`], [`init_crypto`], [`wait_for_port`].

pub mod fault;
pub mod nats;
pub mod oidc;
pub mod pgwire;
pub mod pki;
pub mod postgres;
pub mod proc;
pub mod s3;
pub mod sessions;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::bail;

pub use fault::FaultProxy;
pub use nats::Nats;
pub use oidc::OidcIssuer;
pub use postgres::Postgres;
pub use proc::Proc;
pub use s3::S3;

/// A TCP port that was free on 127.0.0.1 a moment ago, and that nothing else will be handed soon.
///
/// Binding port 0 would pick from the kernel's ephemeral range, the same range every outgoing
/// connection takes its local port from: a child process connecting to NATS between our pick and
/// its own bind could then take the very port it was told to listen on ("Address already in use").
/// So ports come from below (or above) `ip_local_port_range`, starting at a random place, and are
/// never handed out twice by one test process.
pub fn free_port() -> u16 {
    static HANDED: Mutex<Option<(u16, BTreeSet<u16>)>> = Mutex::new(None);
    let (lo, hi) = listen_window();
    let mut guard = HANDED.lock().unwrap_or_else(|e| e.into_inner());
    let (next, handed) = guard.get_or_insert_with(|| (rand::random_range(lo..hi), BTreeSet::new()));
    for _ in 0..(hi - lo) {
        let port = *next;
        *next = if port + 1 >= hi { lo } else { port + 1 };
        if handed.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed.insert(port);
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}

/// Ports for listeners: the larger gap outside the kernel's ephemeral port range.
fn listen_window() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|s| {
        let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
        Some((it.next()??, it.next()??))
    });
    let (eph_lo, eph_hi) = range.unwrap_or((32768, 60999));
    let below = (10_000u16, eph_lo.max(10_000));
    let above = (eph_hi.saturating_add(1).max(10_000), u16::MAX);
    let width = |w: (u16, u16)| w.1.saturating_sub(w.0);
    if width(below) >= width(above) && width(below) >= 1000 {
        below
    } else if width(above) >= 1000 {
        above
    } else {
        (10_000, u16::MAX)
    }
}

/// Installs the aws-lc-rs crypto provider for rustls (and for jsonwebtoken) as the process default.
///
/// async-nats enables ring while object_store/reqwest enable aws-lc-rs, so rustls cannot pick one by
/// itself. Idempotent: later calls (and calls after someone else installed a provider) do nothing.
pub fn init_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("nothing accepted connections on {addr} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Like [`wait_for_port`], but fails early (with the log) when the process exits first.
pub(crate) fn wait_for_proc_port(proc: &mut Proc, port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if let Some(status) = proc.try_wait() {
            bail!("{} exited ({status}) before listening on {addr}; log:\n{}", proc.name(), proc.log());
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{} did not listen on {addr} within {timeout:?}; log:\n{}", proc.name(), proc.log());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Runs `kill -SIGNAL -- PID` (no unsafe code needed); errors are ignored.
pub(crate) fn send_signal(signal: &str, pid: i64) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_outside_the_ephemeral_range() {
        let (lo, hi) = listen_window();
        let ports: BTreeSet<u16> = (0..200).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 200, "a port was handed out twice");
        assert!(ports.iter().all(|p| (lo..hi).contains(p)), "{ports:?} outside {lo}..{hi}");
        // An outgoing connection's local port never lands on one of them.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        for _ in 0..50 {
            let c = TcpStream::connect(addr).unwrap();
            assert!(!ports.contains(&c.local_addr().unwrap().port()));
        }
    }
}
