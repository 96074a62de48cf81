//! [`S3`]: an S3-compatible server (`moto_server`) on a free loopback port, with a bucket.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tempfile::TempDir;

use crate::{Proc, free_port, wait_for_proc_port};

/// How long the server may take to accept connections (moto imports a lot of Python at start-up).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// An S3-compatible server (`moto_server`, from the pip package `moto[server]`), killed on `Drop`.
///
/// moto keeps its data in memory. To survive [`S3::stop`] + [`S3::start_again`], it runs with
/// moto's request recorder on (`MOTO_ENABLE_RECORDING`, file in the temp dir), and `start_again`
/// replays the recording, so objects written before the outage are there again afterwards
/// (requests made *while* stopped failed, so they are not in the recording).
#[derive(Debug)]
pub struct S3 {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The bucket created at start, `airlock-test`.
    pub bucket: String,
    /// `us-east-1`.
    pub region: String,
    /// `testing`.
    pub access_key_id: String,
    /// `testing`.
    pub secret_access_key: String,
    port: u16,
    proc: Option<Proc>,
    dir: TempDir,
}

impl S3 {
    /// Starts `moto_server -H 127.0.0.1 -p PORT` and creates the bucket with a plain HTTP PUT.
    pub fn start() -> anyhow::Result<S3> {
        let mut last_err = None;
        for _ in 0..3 {
            let dir =
                tempfile::Builder::new().prefix("testkit-s3-").tempdir().context("creating temp dir")?;
            let port = free_port();
            let mut s3 = S3 {
                endpoint: format!("http://127.0.0.1:{port}"),
                bucket: "airlock-test".to_owned(),
                region: "us-east-1".to_owned(),
                access_key_id: "testing".to_owned(),
                secret_access_key: "testing".to_owned(),
                port,
                proc: None,
                dir,
            };
            if let Err(e) = s3.spawn() {
                last_err = Some(e);
                continue;
            }
            let (status, body) = http(port, "PUT", &format!("/{}", s3.bucket))?;
            if status != 200 {
                bail!("creating bucket {}: HTTP {status}: {body}", s3.bucket);
            }
            return Ok(s3);
        }
        Err(last_err.expect("at least one attempt was made"))
    }

    /// Kills the server (SIGKILL, to simulate an outage).
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill9();
        }
    }

    /// Starts the server again on the same port and replays what was recorded before the stop.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        let (status, body) = http(self.port, "POST", "/moto-api/recorder/replay-recording")?;
        if status != 200 {
            bail!("replaying the moto recording: HTTP {status}: {body}");
        }
        Ok(())
    }

    /// The server's log so far (empty while stopped).
    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        self.stop();
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .env("MOTO_ENABLE_RECORDING", "True")
            .env("MOTO_RECORDER_FILEPATH", self.dir.path().join("recording.jsonl"))
            .env("AWS_ACCESS_KEY_ID", &self.access_key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_access_key)
            .env("AWS_DEFAULT_REGION", &self.region);
        let mut proc = Proc::spawn(cmd, "moto_server")
            .context("is moto_server installed? (pip install 'moto[server]')")?;
        wait_for_proc_port(&mut proc, self.port, START_TIMEOUT)?;
        self.proc = Some(proc);
        Ok(())
    }
}

/// A minimal HTTP/1.1 request with an empty body; returns the status code and the body text.
fn http(port: u16, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).context("connecting to moto_server")?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).context("reading moto_server's response")?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("bad HTTP response from moto_server: {text}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default().to_owned();
    Ok((status, body))
}
