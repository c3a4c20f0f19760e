//! The daemon binary as a child process, over a config file (for crash, signal and
//! metrics tests).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use x402_batcher::tools::devnet::Devnet;

pub struct Daemon {
    pub child: Child,
    pub url: String,
    /// The Admin listener's.
    pub admin_url: String,
    /// The lines the daemon printed on stdout, as they come.
    lines: Receiver<String>,
    /// Lines read while looking for another one.
    seen: Vec<String>,
    /// Its log lines (stderr, at `warn`), also echoed to the test's stderr.
    logs: Receiver<String>,
}

/// Starts `x402-batcher run --config CONFIG` and waits until it prints its address.
pub fn start(config: &std::path::Path) -> Daemon {
    let mut command = Command::new(env!("CARGO_BIN_EXE_x402-batcher"));
    command.args(["run", "--config"]).arg(config);
    spawn(command)
}

/// [`start`] with an open-file limit of `files` (soft and hard: the daemon cannot raise it).
pub fn start_with_open_files(config: &std::path::Path, files: u64) -> Daemon {
    let mut command = Command::new("sh");
    command
        .args(["-c", &format!(r#"ulimit -n {files} && exec "$0" run --config "$1""#)])
        .arg(env!("CARGO_BIN_EXE_x402-batcher"))
        .arg(config);
    spawn(command)
}

fn spawn(mut command: Command) -> Daemon {
    let mut child = command
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon binary starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = child.stderr.take().unwrap();
    let (log_tx, logs) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            let _ = log_tx.send(line);
        }
    });
    let mut daemon =
        Daemon { child, url: String::new(), admin_url: String::new(), lines: rx, seen: Vec::new(), logs };
    daemon.url = format!("http://{}", daemon.line_after("listening on "));
    daemon.admin_url = format!("http://{}", daemon.line_after("admin on "));
    daemon
}

impl Daemon {
    /// The rest of the first stdout line starting with `prefix` (waits up to 60 s).
    pub fn line_after(&mut self, prefix: &str) -> String {
        if let Some(i) = self.seen.iter().position(|l| l.starts_with(prefix)) {
            return self.seen.remove(i)[prefix.len()..].to_owned();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line =
                self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("daemon printed no {prefix:?}"));
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.to_owned();
            }
            self.seen.push(line);
        }
    }

    /// Puts a line back for a later [`Self::line_after`].
    pub fn remember(&mut self, line: String) {
        self.seen.push(line);
    }

    /// The first log line from now on containing every one of `needles` (waits up to 30 s).
    pub fn log_with(&self, needles: &[&str]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .logs
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("daemon logged no line with {needles:?}"));
            if needles.iter().all(|n| line.contains(n)) {
                return line;
            }
        }
    }

    /// The log lines written since the last look (without waiting).
    pub fn logs_so_far(&self) -> Vec<String> {
        self.logs.try_iter().collect()
    }

    /// Sends `signal` (a `kill` name such as `TERM` or `HUP`).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap().success());
    }
}

/// A test that fails midway must not leave its daemon running.
impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A config file for the daemon binary over `net`, with `extra` TOML appended.
pub fn write_config(dir: &std::path::Path, net: &Devnet, extra: &str) -> std::path::PathBuf {
    let ledger = format!("path = \"{}\"", dir.join("ledger").display());
    write_config_with_ledger(dir, net, &ledger, extra)
}

/// As [`write_config`], with `ledger` as the body of the `[ledger]` section.
pub fn write_config_with_ledger(
    dir: &std::path::Path,
    net: &Devnet,
    ledger: &str,
    extra: &str,
) -> std::path::PathBuf {
    let config = dir.join("config.toml");
    let t = net.token_config();
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[ledger]\n{ledger}\n\
             [[chains]]\nchain_id = {}\nrpc_url = \"{}\"\n\
             [[tokens]]\nchain_id = {}\naddress = \"{}\"\neip712_name = \"{}\"\neip712_version = \"{}\"\ndecimals = 6\n{extra}",
            net.chain_id(),
            net.rpc_url(),
            t.chain_id,
            t.address,
            t.eip712_name,
            t.eip712_version
        ),
    )
    .unwrap();
    config
}

/// A config for the daemon binary that settles with `settler` (its key written to a
/// private file in `dir`): 50 ms rounds, 1 s max wait, no periodic nonce audit. `settlement`
/// continues the `[settlement]` section and may open other sections after it.
pub fn settling_config(
    dir: &std::path::Path,
    net: &Devnet,
    settler: &alloy::signers::local::PrivateKeySigner,
    settlement: &str,
) -> std::path::PathBuf {
    let keys = dir.join("settler.keys");
    x402_batcher::settle::write_key_file(&keys, std::slice::from_ref(settler)).unwrap();
    let extra = format!(
        "[audit]\nnonce_interval_ms = 0\n[settlement]\nsettler_keys_file = \"{}\"\n\
         poll_interval_ms = 50\nmax_wait_secs = 1\n{settlement}",
        keys.display()
    );
    write_config(dir, net, &extra)
}
