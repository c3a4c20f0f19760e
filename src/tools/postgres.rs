//! A throw-away PostgreSQL server for tests, benchmarks and the demo: Debian's binaries
//! (`initdb`, `pg_ctl`), a cluster in a new temporary directory, listening on 127.0.0.1
//! and a free port, stopped and removed when dropped. As root, the server runs as the
//! `postgres` user (PostgreSQL refuses root).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where Debian installs the server: the newest `/usr/lib/postgresql/<major>/bin`, unless
/// `PG_BIN` names another directory.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors.pop().map(|(_, bin)| bin)
}

/// A running throw-away cluster.
#[derive(Debug)]
pub struct TestPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// `Some` when running as root: the server's user.
    run_as: Option<&'static str>,
    stopped: bool,
}

impl TestPostgres {
    /// A server shared by every caller in this process while any holds it: started by the
    /// first, stopped when the last lets go. Callers keep apart with [`Self::new_schema_url`].
    pub fn shared() -> anyhow::Result<std::sync::Arc<TestPostgres>> {
        static SHARED: std::sync::Mutex<std::sync::Weak<TestPostgres>> =
            std::sync::Mutex::new(std::sync::Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(pg) = slot.upgrade() {
            return Ok(pg);
        }
        let pg = std::sync::Arc::new(TestPostgres::start()?);
        *slot = std::sync::Arc::downgrade(&pg);
        Ok(pg)
    }

    /// A connection string to a new, empty schema of its own.
    pub fn new_schema_url(&self) -> anyhow::Result<String> {
        static N: AtomicU64 = AtomicU64::new(0);
        self.schema_url(&format!("ledger{}", N.fetch_add(1, Ordering::SeqCst)))
    }

    /// Creates and starts a cluster (trust authentication on 127.0.0.1 only, fsync on).
    pub fn start() -> anyhow::Result<TestPostgres> {
        Self::start_with(&[])
    }

    /// As [`Self::start`], with extra `postgresql.conf` lines.
    pub fn start_with(settings: &[&str]) -> anyhow::Result<TestPostgres> {
        let mut pg = Self::init(settings)?;
        pg.start_server()?;
        Ok(pg)
    }

    /// As [`Self::start`], serving TLS (`ssl = on`) with this certificate chain and key
    /// (PEM); plaintext connections are still accepted.
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> anyhow::Result<TestPostgres> {
        let mut pg =
            Self::init(&["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"])?;
        for (name, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = Path::new(&pg.data()).join(name);
            std::fs::write(&path, pem)?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            if let Some(user) = pg.run_as {
                chown(&path, user)?;
            }
        }
        pg.start_server()?;
        Ok(pg)
    }

    /// A cluster made by `initdb` with `settings` added to its configuration, not started.
    fn init(settings: &[&str]) -> anyhow::Result<TestPostgres> {
        let bin = bin_dir().ok_or_else(|| {
            anyhow::anyhow!("PostgreSQL server not found under /usr/lib/postgresql (run ops/setup.sh)")
        })?;
        let dir = unique_dir()?;
        let run_as = is_root().then_some("postgres");
        if let Some(user) = run_as {
            chown(&dir, user)?;
        }
        let mut pg = TestPostgres { bin, dir, port: 0, run_as, stopped: true };
        pg.run("initdb", &["-D", &pg.data(), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])?;
        let mut conf = String::from("listen_addresses = '127.0.0.1'\nfsync = on\n");
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        let conf_path = Path::new(&pg.data()).join("postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap_or_default();
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing)?;
        pg.port = free_port()?;
        Ok(pg)
    }

    /// A streaming standby of this server named `name`, made by `pg_basebackup -R`, started
    /// on its own port, and made synchronous (`synchronous_standby_names = 'ANY 1 (name)'`):
    /// from when this returns, a commit on this server returns only once the standby has
    /// it on disk.
    pub fn add_sync_standby(&self, name: &str) -> anyhow::Result<TestPostgres> {
        let dir = unique_dir()?;
        if let Some(user) = self.run_as {
            chown(&dir, user)?;
        }
        let mut pg = TestPostgres { bin: self.bin.clone(), dir, port: 0, run_as: self.run_as, stopped: true };
        let conninfo = format!("host=127.0.0.1 port={} user=postgres application_name={name}", self.port);
        pg.run("pg_basebackup", &["-D", &pg.data(), "-d", &conninfo, "-R", "-X", "stream", "--no-sync"])?;
        let auto = Path::new(&pg.data()).join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&auto)?;
        conf.push_str(&format!("primary_conninfo = '{conninfo}'\n"));
        std::fs::write(&auto, conf)?;
        pg.port = free_port()?;
        pg.start_server()?;
        self.sql(&format!("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 ({name})'"))?;
        self.sql("SELECT pg_reload_conf()")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let query = format!("SELECT sync_state FROM pg_stat_replication WHERE application_name = '{name}'");
        loop {
            let state = self.sql(&query)?;
            if state == "quorum" || state == "sync" {
                return Ok(pg);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "standby {name} not synchronous: {state:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn start_server(&mut self) -> anyhow::Result<()> {
        let opts = format!("-p {} -k {}", self.port, self.dir.display());
        let log = self.dir.join("log").display().to_string();
        self.run("pg_ctl", &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "-t", "60", "start"])
            .map_err(|e| anyhow::anyhow!("{e}; server log:\n{}", self.log()))?;
        self.stopped = false;
        Ok(())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// A connection string to database `postgres` as user `postgres`.
    pub fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    /// A connection string whose tables live in a new schema `name` (one server, many
    /// independent ledgers).
    pub fn schema_url(&self, name: &str) -> anyhow::Result<String> {
        self.sql(&format!("CREATE SCHEMA IF NOT EXISTS {name}"))?;
        Ok(format!("{} options='-c search_path={name}'", self.url()))
    }

    /// Runs SQL with `psql`; returns what it printed (unaligned, tuples only).
    pub fn sql(&self, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &self.url(), "-c", sql])
            .stdin(Stdio::null())
            .output()?;
        anyhow::ensure!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Stops the server: `fast` (a clean shutdown) or `immediate` (a crash: no checkpoint,
    /// recovery at the next start).
    pub fn stop(&mut self, mode: &str) -> anyhow::Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.run("pg_ctl", &["-D", &self.data(), "-m", mode, "-w", "-t", "60", "stop"])?;
        self.stopped = true;
        Ok(())
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    pub fn promote(&self) -> anyhow::Result<()> {
        self.run("pg_ctl", &["-D", &self.data(), "-w", "-t", "60", "promote"])
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let program = self.bin.join(tool);
        let mut cmd = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let out = cmd.args(args).stdin(Stdio::null()).output()?;
        anyhow::ensure!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = self.stop("immediate");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unique_dir() -> anyhow::Result<PathBuf> {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "x402-pg-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        nanos % 1_000_000_000
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn chown(dir: &Path, user: &str) -> anyhow::Result<()> {
    let status = Command::new("chown").arg(format!("{user}:")).arg(dir).status()?;
    anyhow::ensure!(status.success(), "chown {user} {} failed", dir.display());
    Ok(())
}
