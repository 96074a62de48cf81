//! [`Proc`]: a child process that is killed on `Drop`, with its output in a log file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tempfile::TempDir;

/// How many log lines [`Proc`] prints when dropped during a panic.
const TAIL_LINES: usize = 60;

/// A child process that is killed (SIGKILL) on `Drop`; stdout and stderr go to a log file in a temp dir.
///
/// If the current thread is panicking when the `Proc` is dropped, the last 60 lines of the log are
/// printed to stderr, so a failed test shows what the server said.
pub struct Proc {
    name: String,
    child: Child,
    exited: Option<ExitStatus>,
    log_path: PathBuf,
    _dir: TempDir,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to `<tempdir>/<name>.log`.
    pub fn spawn(mut cmd: Command, name: &str) -> anyhow::Result<Proc> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("testkit-{name}-log-"))
            .tempdir()
            .context("creating a temp dir for a process log")?;
        let log_path = dir.path().join(format!("{name}.log"));
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let log2 = log.try_clone().context("cloning the log file handle")?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let child = cmd.spawn().with_context(|| format!("spawning {name}: {cmd:?}"))?;
        tracing::debug!(name, pid = child.id(), log = %log_path.display(), "spawned test process");
        Ok(Proc { name: name.to_owned(), child, exited: None, log_path, _dir: dir })
    }

    /// Sends SIGKILL and waits for the process to exit.
    pub fn kill9(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        let _ = self.child.kill();
        if let Ok(status) = self.child.wait() {
            self.exited = Some(status);
        }
    }

    /// Sends SIGTERM, waits up to 5 s for the process to exit, then sends SIGKILL.
    pub fn terminate(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        crate::send_signal("TERM", i64::from(self.child.id()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.try_wait().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }

    /// The whole log so far (stdout and stderr interleaved), lossily decoded as UTF-8.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The OS process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The name given to [`Proc::spawn`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the log file is.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The exit status, if the process has exited (does not block).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .field("log", &self.log_path)
            .finish()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(TAIL_LINES)..];
            eprintln!("----- last {} lines of {} (pid {}) -----", tail.len(), self.name, self.child.id());
            for line in tail {
                eprintln!("{line}");
            }
            eprintln!("----- end of {} log -----", self.name);
        }
    }
}
