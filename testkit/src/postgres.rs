//! [`Postgres`]: a throwaway PostgreSQL cluster made by `initdb` in a temp dir.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use anyhow::{Context as _, bail};
use rand::Rng as _;
use tempfile::TempDir;

use crate::free_port;

/// Settings appended to `postgresql.conf`: small, so that many clusters can run at once, and fast.
const CONF: &str = "
listen_addresses = '127.0.0.1'
password_encryption = 'scram-sha-256'
shared_buffers = 16MB
max_connections = 100
max_wal_senders = 0
wal_level = minimal
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
log_connections = off
";

/// A PostgreSQL cluster on 127.0.0.1 with SCRAM-SHA-256 authentication, stopped and removed on `Drop`.
///
/// The superuser is `postgres` with a random password. When the tests run as root (PostgreSQL refuses
/// to), `initdb`, `pg_ctl` and the server run as the `postgres` OS user through `runuser`.
#[derive(Debug)]
pub struct Postgres {
    /// Always `127.0.0.1`.
    pub host: String,
    /// The TCP port.
    pub port: u16,
    /// The superuser role, `postgres`.
    pub superuser: String,
    /// The superuser's password (alphanumeric, so it needs no escaping in URLs).
    pub password: String,
    bindir: PathBuf,
    as_postgres_user: bool,
    running: bool,
    dir: TempDir,
}

impl Postgres {
    /// Runs `initdb --auth=scram-sha-256` in a temp dir and starts the server on a free port.
    pub fn start() -> anyhow::Result<Postgres> {
        let bindir = bindir()?;
        let as_postgres_user = running_as_root();
        let dir = tempfile::Builder::new().prefix("testkit-pg-").tempdir().context("creating a temp dir")?;
        let password: String =
            rand::rng().sample_iter(rand::distr::Alphanumeric).take(24).map(char::from).collect();
        std::fs::write(dir.path().join("pwfile"), format!("{password}\n")).context("writing pwfile")?;
        let mut pg = Postgres {
            host: "127.0.0.1".to_owned(),
            port: 0,
            superuser: "postgres".to_owned(),
            password,
            bindir,
            as_postgres_user,
            running: false,
            dir,
        };
        if as_postgres_user {
            let out = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .output()
                .context("running chown")?;
            check(&out, "chown -R postgres:postgres")?;
        }
        let mut initdb = pg.command("initdb");
        initdb
            .arg("-D")
            .arg(pg.data_dir())
            .args(["-U", "postgres", "--auth=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync"])
            .arg(format!("--pwfile={}", pg.dir.path().join("pwfile").display()));
        let out = initdb.output().context("running initdb")?;
        check(&out, "initdb")?;
        let conf = pg.data_dir().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).context("reading postgresql.conf")?;
        text.push_str(CONF);
        text.push_str(&format!("unix_socket_directories = '{}'\n", pg.dir.path().display()));
        std::fs::write(&conf, text).context("writing postgresql.conf")?;

        let mut last_err = None;
        // A free port can be taken before the server binds it: retry with another one.
        for _ in 0..3 {
            pg.port = free_port();
            match pg.start_again() {
                Ok(()) => return Ok(pg),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt was made"))
    }

    /// Turns TLS on (`ssl = on`) with the given PEM certificate chain and private key, and
    /// restarts the server on the same port. Clients may still connect without TLS.
    pub fn enable_ssl(&mut self, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let data = self.data_dir();
        for (name, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = data.join(name);
            std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
            // The server refuses a key that others can read.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("chmod 600 {}", path.display()))?;
            if self.as_postgres_user {
                let out = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&path)
                    .output()
                    .context("running chown")?;
                check(&out, "chown postgres:postgres")?;
            }
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).context("reading postgresql.conf")?;
        text.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).context("writing postgresql.conf")?;
        self.start_again()
    }

    /// `postgres://postgres:PASSWORD@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{}:{}@{}:{}/{db}", self.superuser, self.password, self.host, self.port)
    }

    /// Connects as the superuser without TLS; the connection task is spawned on the current runtime.
    pub async fn connect(&self, db: &str) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to postgres on port {} db {db}", self.port))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "testkit postgres connection ended");
            }
        });
        Ok(client)
    }

    /// Runs `sql` with `psql -X -At -v ON_ERROR_STOP=1` as the superuser; returns stdout, trimmed.
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(self.bindir.join("psql"))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", &self.host, "-U", &self.superuser])
            .args(["-p", &self.port.to_string(), "-d", db, "-c", sql])
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .context("running psql")?;
        check(&out, &format!("psql -c {sql:?}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`, like a crash); the data dir is kept.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let stopped = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !stopped {
            // Fall back to killing the postmaster; its children exit when it dies.
            let pidfile = self.data_dir().join("postmaster.pid");
            if let Some(pid) = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i64>().ok()))
            {
                crate::send_signal("KILL", pid);
            }
        }
    }

    /// Starts the server again on the same port with the same data dir.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.stop();
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-o", &format!("-p {}", self.port), "-w", "-t", "60", "start"])
            .output()
            .context("running pg_ctl start")?;
        if let Err(e) = check(&out, "pg_ctl start") {
            return Err(e.context(format!("server log:\n{}", self.log())));
        }
        self.running = true;
        Ok(())
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read(self.log_path()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A command for one of the server binaries, run as the `postgres` OS user when we are root.
    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        if self.as_postgres_user {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("----- last {} lines of postgres (port {}) -----", tail.len(), self.port);
            for line in tail {
                eprintln!("{line}");
            }
            eprintln!("----- end of postgres log -----");
        }
        self.stop();
    }
}

fn check(out: &Output, what: &str) -> anyhow::Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The PostgreSQL server binaries: `pg_config --bindir`, else the highest `/usr/lib/postgresql/*/bin`,
/// else whatever directory on `PATH` has `initdb`.
fn bindir() -> anyhow::Result<PathBuf> {
    static BINDIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    BINDIR
        .get_or_init(find_bindir)
        .clone()
        .context("PostgreSQL server binaries (initdb, pg_ctl) not found; run scripts/test.sh to install them")
}

fn find_bindir() -> Option<PathBuf> {
    let has_initdb = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_initdb(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_initdb(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Some(dir);
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| has_initdb(d))
}
