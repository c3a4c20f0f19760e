//! `x402-batcher loadgen`: the load against a daemon at a URL, a facilitator, or a devnet
//! and daemons of its own (in this process, or processes capped at a share of the CPU),
//! with the recovery ceiling measured before and after and the machine's CPU use.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::Address;

use crate::client::Client;
use crate::tools::testkit::{self};
use crate::x402::eip712::TokenDomain;

use super::{LoadOptions, presign, presign_facilitator, run_spread, run_verify};

/// Why `x402-batcher loadgen` could not run.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error(transparent)]
    Devnet(#[from] crate::tools::devnet::DevnetError),
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error("cannot bind the in-process daemon's listeners")]
    Bind(#[source] std::io::Error),
    #[error("the benchmark's PostgreSQL: {0}")]
    Postgres(#[source] anyhow::Error),
    #[error("the in-process daemon's task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error("cannot start a daemon process (its config in {dir})")]
    Spawn {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a daemon process printed no address within {0:?} (its log is on stderr)")]
    DaemonStart(Duration),
    #[error(transparent)]
    CpuCap(#[from] crate::tools::cpu_cap::CpuCapError),
}

/// Where `x402-batcher loadgen` sends its load.
#[derive(Debug, Clone)]
pub enum Target {
    /// A devnet and in-process daemons of its own, its payers funded.
    Devnet(OwnLedger),
    /// A daemon's gRPC API at this URL, for this token.
    Grpc { url: String, domain: TokenDomain, auth: crate::client::ClientAuth },
    /// A facilitator's `POST /verify` (and `/settle` if `settle`) at this URL.
    Facilitator { url: String, domain: TokenDomain, token: Option<String>, concurrency: usize, settle: bool },
}

/// The ledger of the in-process daemons of [`Target::Devnet`].
#[derive(Debug, Clone, Copy)]
pub struct OwnLedger {
    pub backend: crate::config::LedgerBackend,
    /// PostgreSQL only: a synchronous standby on this machine.
    pub sync_standby: bool,
    /// Daemons sharing the ledger (more than one: PostgreSQL only); the streams are spread
    /// over them.
    pub daemons: usize,
    /// Each daemon a process of its own capped at this many cores of CPU (a cgroup), as if
    /// on a machine of its own; in the load generator's process when `None`.
    pub daemon_cpu: Option<f64>,
}

/// What `x402-batcher loadgen` runs.
#[derive(Debug, Clone)]
pub struct Command {
    pub target: Target,
    /// Seed of the payer keys ([`crate::tools::devnet::payer_keys`]).
    pub seed: String,
    pub payments: usize,
    pub payers: usize,
    pub rate: Option<f64>,
    pub streams: usize,
    /// Seconds spent measuring the raw recovery ceiling before and after the load (0: skip).
    pub ceiling_seconds: f64,
}

/// Prints a load's throughput over the raw recovery ceiling measured before and after it
/// (their mean: on a shared VM the CPU available drifts during a run).
fn print_over_ceiling(what: &str, throughput: f64, before: Option<f64>, after: Option<f64>, cores: usize) {
    if let (Some(before), Some(after)) = (before, after) {
        let mean = (before + after) / 2.0;
        println!(
            "{what} over the raw recovery ceiling of {cores} cores (mean of before and after, {mean:.0}/s): {:.1}%",
            100.0 * throughput / mean
        );
    }
}

/// The machine's CPU time in clock ticks, from the `cpu` line of `/proc/stat`: busy (user,
/// nice, system, irq, softirq) and in all (busy, idle, iowait, and steal: time the
/// hypervisor gave to other machines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuTicks {
    busy: u64,
    total: u64,
}

impl CpuTicks {
    /// Now (Linux; `None` where `/proc/stat` is not there).
    fn now() -> Option<CpuTicks> {
        CpuTicks::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    fn parse(proc_stat: &str) -> Option<CpuTicks> {
        let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
        let fields: Vec<u64> =
            line.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
        let at = |i: usize| fields.get(i).copied().unwrap_or(0);
        let busy = at(0) + at(1) + at(2) + at(5) + at(6);
        Some(CpuTicks { busy, total: busy + at(3) + at(4) + at(7) })
    }

    /// The share of the machine's CPU busy from `self` to `later` (`None` if no time passed).
    fn busy_since(self, later: CpuTicks) -> Option<f64> {
        let total = later.total.checked_sub(self.total).filter(|&t| t > 0)?;
        Some(later.busy.saturating_sub(self.busy) as f64 / total as f64)
    }
}

/// Prints how busy the machine's CPU was during a load and what that is per answer (every
/// process on the machine: with `--devnet`, the daemons, the database and the chain too).
/// A load that keeps the CPU busy is bounded by CPU per answer, not by waiting.
fn print_cpu(what: &str, answers: usize, elapsed: Duration, busy: Option<f64>, cores: usize) {
    if let Some(busy) = busy.filter(|_| answers > 0) {
        let per = busy * cores as f64 * elapsed.as_secs_f64() / answers as f64;
        println!(
            "machine CPU during the load: {:.0}% busy of {cores} cores, {:.1} µs per {what}",
            100.0 * busy,
            per * 1e6
        );
    }
}

/// Runs the `loadgen` command: the ceiling, pre-signing, the load, the report.
pub async fn command(cmd: Command) -> Result<(), LoadgenError> {
    use crate::clock::{Clock as _, SystemClock};
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let ceiling = || {
        (cmd.ceiling_seconds > 0.0).then(|| {
            let c =
                crate::verify::measure_recovery_ceiling(cores, Duration::from_secs_f64(cmd.ceiling_seconds));
            println!("raw libsecp256k1 recovery ceiling: {c:.0}/s on {cores} cores");
            c
        })
    };
    let before = ceiling();
    let payers = crate::tools::devnet::payer_keys(&cmd.seed, cmd.payers.max(1));
    let value = 1_000u64;
    let opts = LoadOptions {
        payments: cmd.payments,
        payers,
        rate: cmd.rate,
        streams: cmd.streams,
        value,
        payees: vec![testkit::DEFAULT_PAYEE],
        run_id: u64::from(std::process::id()),
    };
    let signing = Instant::now();
    let now = SystemClock.now_unix();
    let (url, domain, auth, own) = match cmd.target {
        Target::Facilitator { url, domain, token, concurrency, settle } => {
            let bodies = presign_facilitator(&domain, &opts, now);
            println!(
                "pre-signed {} x402 v2 bodies in {:.1} s",
                bodies.len(),
                signing.elapsed().as_secs_f64()
            );
            let cpu = CpuTicks::now();
            let report = run_verify(&url, bodies, concurrency, token.as_deref(), settle).await;
            let busy = cpu.zip(CpuTicks::now()).and_then(|(a, b)| a.busy_since(b));
            println!("{}", report.summary());
            print_cpu("valid answer", report.valid, report.elapsed, busy, cores);
            print_over_ceiling("answers/s", report.throughput(), before, ceiling(), cores);
            return Ok(());
        }
        Target::Grpc { url, domain, auth } => (vec![url], domain, auth, None),
        Target::Devnet(ledger) => {
            let own = OwnDaemon::start(&opts, ledger).await?;
            (own.urls.clone(), own.domain.clone(), crate::client::ClientAuth::default(), Some(own))
        }
    };
    let requests = presign(&domain, &opts, now);
    println!(
        "pre-signed {} payments from {} payers in {:.1} s",
        requests.len(),
        opts.payers.len(),
        signing.elapsed().as_secs_f64()
    );
    let mut clients = Vec::new();
    for url in url {
        clients.push(Client::connect_with(url, &auth).await?);
    }
    let cpu = CpuTicks::now();
    let report = run_spread(&clients, requests, opts.rate, opts.streams).await;
    let busy = cpu.zip(CpuTicks::now()).and_then(|(a, b)| a.busy_since(b));
    println!("{}", report.summary());
    print_cpu("ack", report.acked.len(), report.elapsed, busy, cores);
    print_over_ceiling("acks/s", report.throughput(), before, ceiling(), cores);
    if let Some(own) = own {
        own.stop().await?;
    }
    Ok(())
}

/// How long a daemon process may take to print its address.
const DAEMON_START: Duration = Duration::from_secs(60);

/// How long a daemon process may take to stop after SIGTERM before it is killed.
const DAEMON_STOP: Duration = Duration::from_secs(30);

/// A daemon of [`OwnDaemon`] as a process of its own (`x402-batcher run`) in a CPU cap.
struct ChildDaemon {
    child: std::process::Child,
    /// Removed after the process ended (fields drop after [`Drop::drop`]).
    cap: crate::tools::cpu_cap::CpuCap,
}

impl ChildDaemon {
    /// Starts this binary's `run --config FILE` in `cap`; its address once it listens.
    async fn start(
        file: &std::path::Path,
        cap: crate::tools::cpu_cap::CpuCap,
    ) -> Result<(ChildDaemon, String), LoadgenError> {
        use std::io::BufRead as _;
        let spawn_err =
            |source| LoadgenError::Spawn { dir: file.parent().unwrap_or(file).to_path_buf(), source };
        let exe = std::env::current_exe().map_err(spawn_err)?;
        let child = std::process::Command::new(exe)
            .arg("run")
            .arg("--config")
            .arg(file)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .map_err(spawn_err)?;
        let mut daemon = ChildDaemon { child, cap };
        daemon.cap.add(daemon.child.id())?;
        // Its stdout, read to the end so the daemon never blocks on a full pipe.
        let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        if let Some(stdout) = daemon.child.stdout.take() {
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let listening = async {
            while let Some(line) = lines.recv().await {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    return Some(format!("http://{addr}"));
                }
            }
            None
        };
        match tokio::time::timeout(DAEMON_START, listening).await {
            Ok(Some(url)) => Ok((daemon, url)),
            _ => Err(LoadgenError::DaemonStart(DAEMON_START)),
        }
    }

    /// SIGTERM (the daemon drains and stops), then a kill if it has not ended in time.
    async fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = tokio::time::Instant::now() + DAEMON_STOP;
        while matches!(self.child.try_wait(), Ok(None)) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A daemon left running (an error midway, or one that did not stop) is killed.
impl Drop for ChildDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// An in-process daemon's task.
type DaemonTask = tokio::task::JoinHandle<Result<(), crate::daemon::DaemonError>>;

/// A devnet and in-process daemons over it (the benchmark set-up), its payers funded.
struct OwnDaemon {
    urls: Vec<String>,
    domain: TokenDomain,
    _net: crate::tools::devnet::Devnet,
    dir: std::path::PathBuf,
    servers: Vec<(tokio::sync::oneshot::Sender<()>, DaemonTask)>,
    /// The daemons running as processes ([`OwnLedger::daemon_cpu`]).
    children: Vec<ChildDaemon>,
    /// The PostgreSQL server (and standby), stopped after the daemons.
    pg: Vec<crate::tools::postgres::TestPostgres>,
}

impl OwnDaemon {
    async fn start(opts: &LoadOptions, ledger: OwnLedger) -> Result<OwnDaemon, LoadgenError> {
        use crate::config::{Config, LedgerBackend};
        let net = crate::tools::devnet::Devnet::start().await?;
        let per_payer = opts.value * (opts.payments / opts.payers.len() + 1) as u64;
        let addrs: Vec<Address> = opts.payers.iter().map(|p| p.address()).collect();
        net.fund(&addrs, alloy::primitives::U256::from(per_payer)).await?;
        let dir = std::env::temp_dir().join(format!("x402-loadgen-{}", std::process::id()));
        let mut config = Config::parse("")?;
        config.tokens.push(net.token_config());
        config.chains.push(net.chain_config());
        let mut pg = Vec::new();
        let ledger_toml = match ledger.backend {
            LedgerBackend::Rocksdb => {
                let path = dir.join("ledger");
                let toml = format!("path = \"{}\"", path.display());
                config.ledger.path = Some(path);
                toml
            }
            LedgerBackend::Postgres => {
                let primary =
                    crate::tools::postgres::TestPostgres::start().map_err(LoadgenError::Postgres)?;
                config.ledger.backend = LedgerBackend::Postgres;
                config.ledger.url = Some(primary.url());
                println!("ledger on PostgreSQL at 127.0.0.1:{}", primary.port());
                if ledger.sync_standby {
                    let standby = primary.add_sync_standby("replica1").map_err(LoadgenError::Postgres)?;
                    println!("with a synchronous standby at 127.0.0.1:{}", standby.port());
                    pg.push(standby);
                }
                let toml = format!("backend = \"postgres\"\nurl = \"{}\"", primary.url());
                pg.insert(0, primary);
                toml
            }
        };
        let mut urls = Vec::new();
        let mut servers = Vec::new();
        let mut children = Vec::new();
        if let Some(cores) = ledger.daemon_cpu {
            // The same config as the in-process daemons' (the defaults, this devnet, this
            // ledger), every listener on a port of its own.
            let file = dir.join("daemon.toml");
            let toml = format!(
                "{}\n[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[ledger]\n{ledger_toml}\n",
                net.token_and_chain_toml()
            );
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(&file, toml))
                .map_err(|source| LoadgenError::Spawn { dir: dir.clone(), source })?;
            for i in 0..ledger.daemons.max(1) {
                let cap = crate::tools::cpu_cap::CpuCap::new(
                    &format!("x402-loadgen-{}-{i}", std::process::id()),
                    cores,
                )?;
                let (child, url) = ChildDaemon::start(&file, cap).await?;
                println!("daemon {i}: a process of its own at {url}, capped at {cores} cores of CPU");
                urls.push(url);
                children.push(child);
            }
            return Ok(OwnDaemon { urls, domain: net.token_domain(), _net: net, dir, servers, children, pg });
        }
        for _ in 0..ledger.daemons.max(1) {
            let listeners = crate::daemon::Listeners::loopback().await.map_err(LoadgenError::Bind)?;
            urls.push(format!("http://{}", listeners.api.local_addr().map_err(LoadgenError::Bind)?));
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let clock = Arc::new(crate::clock::SystemClock);
            let server = tokio::spawn(crate::daemon::serve(config.clone(), listeners, clock, async {
                let _ = stopped.await;
            }));
            servers.push((stop, server));
        }
        Ok(OwnDaemon { urls, domain: net.token_domain(), _net: net, dir, servers, children, pg })
    }

    async fn stop(self) -> Result<(), LoadgenError> {
        for child in self.children {
            child.stop().await;
        }
        for (stop, server) in self.servers {
            let _ = stop.send(());
            server.await??;
        }
        drop(self.pg);
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_cpu_is_read_from_the_cpu_line_of_proc_stat() {
        let stat = "cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 50 2 25 400 10 1 1 5 0 0\nintr 1 2\n";
        assert_eq!(CpuTicks::parse(stat), Some(CpuTicks { busy: 160, total: 990 }));
        let later = CpuTicks { busy: 250, total: 1090 };
        assert_eq!(CpuTicks { busy: 160, total: 990 }.busy_since(later), Some(0.9));
        assert_eq!(later.busy_since(later), None, "no time passed");
        assert_eq!(CpuTicks::parse("cpu  1 x 3\n"), None, "a field that is not a number");
        assert_eq!(CpuTicks::parse("intr 1 2\n"), None, "no cpu line");
    }
}
