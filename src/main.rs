//! The `x402-batcher` command: parses flags, installs logging, and calls into the library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use std::sync::Arc;

use x402_batcher::clock::SystemClock;
use x402_batcher::{config::Config, daemon, demo, x402};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Verifies, durably records and batch-settles x402 (EIP-3009) payments")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: verify, record and (later) settle payments submitted over gRPC.
    /// Stops accepting on SIGTERM or SIGINT, answers what is in flight, and exits 0.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// The whole product on a local devnet: start anvil and the daemon, submit payments over
    /// gRPC, settle them in batches at depth, and print a summary.
    Demo {
        /// Payments to submit.
        #[arg(long, default_value_t = demo::DemoOptions::default().payments)]
        payments: usize,
        /// Distinct payers.
        #[arg(long, default_value_t = demo::DemoOptions::default().payers)]
        payers: usize,
        /// Distinct payees.
        #[arg(long, default_value_t = demo::DemoOptions::default().payees)]
        payees: usize,
        /// Settler accounts.
        #[arg(long, default_value_t = demo::DemoOptions::default().settlers)]
        settlers: usize,
        /// Submissions per second (0: flat out).
        #[arg(long, default_value_t = 1_500.0)]
        rate: f64,
        /// Confirmation depth at which a payment counts as settled.
        #[arg(long, default_value_t = demo::DemoOptions::default().confirmations)]
        confirmations: u64,
        /// Where the ledger and the CSV export are written (default: a new temp directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Paid requests each x402 client (x402-axios, @x402/fetch) makes through its
        /// middleware (x402-express, @x402/express) with the daemon as facilitator, after the
        /// gRPC load (0: skip; the flow needs Node and the packages ops/setup.sh installs).
        #[arg(long, default_value_t = demo::DemoOptions::default().http_requests)]
        http_requests: usize,
    },
    /// Start a local devnet (anvil, the test token, aggregate3) to try the daemon by hand:
    /// funds settler and payer accounts, writes DIR/config.toml and DIR/settler.keys for
    /// it, prints the commands to run the daemon and load it, and makes a block every
    /// second until Ctrl-C.
    Devnet {
        #[arg(long)]
        dir: PathBuf,
        /// Settler accounts (each given 1,000 ETH).
        #[arg(long, default_value_t = 2)]
        settlers: usize,
        /// Payers of the load generator's default seed, each given 1,000 USDC.
        #[arg(long, default_value_t = 200)]
        payers: usize,
        /// Blocks only every this many seconds, as on a real chain (anvil's interval
        /// mining); without it, a block per transaction and one more every second.
        #[arg(long)]
        block_time: Option<u64>,
    },
    /// Offer load to a daemon: pre-sign N payments from M payers, submit them over
    /// SubmitStreams, and report throughput and acknowledgement latency. With --devnet it
    /// starts its own devnet and in-process daemon first (the benchmark set-up).
    Loadgen(LoadgenArgs),
    /// Export the settlement log (settled, failed and expired payments) as CSV or JSON
    /// Lines. Reads the ledger read-only, so it runs beside the daemon. With --cursor, each
    /// run writes only what was logged since the last one (no duplicates, no gaps).
    Export(ExportArgs),
    /// Prove the settlement log against the chain for a block range: every settled payment
    /// has its AuthorizationUsed log and its Transfer, every log of our settlement
    /// transactions has its settled payment, and no recorded authorization was used by
    /// someone else. Prints each discrepancy; exits 1 if there is any.
    Reconcile {
        #[arg(long)]
        config: PathBuf,
        /// The ledger directory, if not the config's.
        #[arg(long)]
        ledger: Option<PathBuf>,
        #[arg(long)]
        from_block: u64,
        #[arg(long)]
        to_block: u64,
        /// Only this chain (default: every chain with a configured token).
        #[arg(long)]
        chain_id: Option<u64>,
    },
    /// Validate a config file and print its token table.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make a bearer token for a [[credentials]] entry: prints the token (give it to the
    /// caller, once) and the config lines holding only its SHA-256.
    NewToken {
        /// The caller's name (an API server's, or an operator's).
        #[arg(long)]
        name: String,
        /// api (Ingest and Payments) or admin (Admin).
        #[arg(long, default_value = "api")]
        role: String,
    },
    /// Decode an x402 payment header (v1 X-PAYMENT or v2 PAYMENT-SIGNATURE) and print it,
    /// or the reason code it would be refused with.
    Decode {
        /// The header value (base64).
        header: String,
    },
}

#[derive(clap::Args)]
struct ExportArgs {
    /// The daemon's config: its ledger path and its tokens (symbols, decimals).
    #[arg(long)]
    config: PathBuf,
    /// The ledger directory, if not the config's.
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// csv (RFC 4180) or jsonl.
    #[arg(long, default_value = "csv")]
    format: String,
    /// Where to write (default: stdout).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A file holding the last exported log position; read at start (missing: from the
    /// beginning), rewritten once the output is complete.
    #[arg(long)]
    cursor: Option<PathBuf>,
    /// Start after this log position (instead of a cursor file).
    #[arg(long, conflicts_with = "cursor")]
    after: Option<u64>,
    /// Only payments final at or after this time: unix seconds, YYYY-MM-DD, or
    /// YYYY-MM-DDTHH:MM:SSZ (UTC). Settled payments count at their block's time.
    #[arg(long)]
    from: Option<String>,
    /// Only payments final before this time (same forms as --from).
    #[arg(long)]
    to: Option<String>,
    #[arg(long)]
    payee: Option<alloy::primitives::Address>,
    #[arg(long)]
    payer: Option<alloy::primitives::Address>,
    /// settled, failed or expired.
    #[arg(long)]
    status: Option<String>,
    #[arg(long)]
    chain_id: Option<u64>,
    #[arg(long)]
    token: Option<alloy::primitives::Address>,
    /// Also write settled totals per payee per UTC day (CSV) to this file.
    #[arg(long)]
    totals: Option<PathBuf>,
}

#[derive(clap::Args)]
struct LoadgenArgs {
    /// Start a devnet and an in-process daemon, fund the payers, and load that.
    #[arg(long)]
    devnet: bool,
    /// The daemon's URL (without --devnet or --facilitator).
    #[arg(long, required_unless_present_any = ["devnet", "facilitator"])]
    target: Option<String>,
    /// The token's chain id, address, and EIP-712 domain (without --devnet).
    #[arg(long, required_unless_present = "devnet")]
    chain_id: Option<u64>,
    #[arg(long, required_unless_present = "devnet")]
    token: Option<alloy::primitives::Address>,
    #[arg(long, default_value = "USD Coin")]
    eip712_name: String,
    #[arg(long, default_value = "2")]
    eip712_version: String,
    /// Seed of the payer keys (devnet::payer_keys); the payers must hold funds.
    #[arg(long, default_value = "loadgen")]
    seed: String,
    #[arg(long, default_value_t = 20_000)]
    payments: usize,
    #[arg(long, default_value_t = 200)]
    payers: usize,
    /// Submissions per second; flat out if absent.
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Seconds spent measuring the raw recovery ceiling on all cores, before and after the
    /// load (0: skip).
    #[arg(long, default_value_t = 3.0)]
    ceiling_seconds: f64,
    /// TLS: the CA certificate (PEM) that issued the daemon's; use an https:// --target.
    #[arg(long, conflicts_with = "devnet")]
    ca_file: Option<PathBuf>,
    /// The name the daemon's certificate carries, if not the target's host.
    #[arg(long, requires = "ca_file")]
    server_name: Option<String>,
    /// A client certificate (PEM) for mutual TLS, with --key-file.
    #[arg(long, requires_all = ["ca_file", "key_file"])]
    cert_file: Option<PathBuf>,
    #[arg(long, requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// The environment variable holding a bearer token (not a flag: flags show in `ps`).
    #[arg(long, conflicts_with = "devnet")]
    token_env: Option<String>,
    /// Load an x402 facilitator's `POST /verify` at this URL (this daemon's, or any other
    /// facilitator's) instead of the gRPC API: pre-signed x402 v2 bodies, --concurrency
    /// calls at a time.
    #[arg(long, conflicts_with = "devnet", requires_all = ["chain_id", "token"])]
    facilitator: Option<String>,
    /// Calls in flight at once with --facilitator.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// With --facilitator: settle each payment after verifying it (the facilitator's side
    /// of a paid request), timing both calls.
    #[arg(long, requires = "facilitator")]
    settle: bool,
}

impl LoadgenArgs {
    /// The client credentials the flags name.
    fn client_auth(&self) -> anyhow::Result<x402_batcher::client::ClientAuth> {
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        let token = self
            .token_env
            .as_ref()
            .map(|var| std::env::var(var).with_context(|| format!("--token-env: {var} is not set")))
            .transpose()?;
        Ok(x402_batcher::client::ClientAuth {
            ca_pem: self.ca_file.as_ref().map(read).transpose()?,
            server_name: self.server_name.clone(),
            identity,
            token,
        })
    }
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    use x402_batcher::export::{self, Filter, Format};
    use x402_batcher::ledger::{Ledger, Status};
    let config = Config::load(&args.config).with_context(|| format!("config {}", args.config.display()))?;
    let path =
        args.ledger.or(config.ledger.path.clone()).context("no ledger: pass --ledger or set ledger.path")?;
    let format = match args.format.as_str() {
        "csv" => Format::Csv,
        "jsonl" => Format::JsonLines,
        other => anyhow::bail!("--format {other:?}: expected csv or jsonl"),
    };
    let time = |flag: &str, v: Option<String>| -> anyhow::Result<Option<u64>> {
        v.map(|t| {
            export::parse_time(&t).with_context(|| {
                format!("{flag} {t:?}: expected unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ")
            })
        })
        .transpose()
    };
    let status = match args.status.as_deref() {
        None => None,
        Some("settled") => Some(Status::Settled),
        Some("failed") => Some(Status::Failed),
        Some("expired") => Some(Status::Expired),
        Some(other) => anyhow::bail!("--status {other:?}: expected settled, failed or expired"),
    };
    let filter = Filter {
        from: time("--from", args.from)?,
        to: time("--to", args.to)?,
        payer: args.payer,
        payee: args.payee,
        status,
        chain_id: args.chain_id,
        token: args.token,
    };
    let after = match (&args.cursor, args.after) {
        (Some(c), _) => match std::fs::read_to_string(c) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .with_context(|| format!("cursor file {} does not hold a log position", c.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("cursor file {}", c.display())),
        },
        (None, a) => a.unwrap_or(0),
    };
    let ledger = Ledger::open_read_only(&path).with_context(|| format!("ledger {}", path.display()))?;
    let tokens = config.token_table();
    let summary = match &args.out {
        Some(out) => {
            let file = std::fs::File::create(out).with_context(|| format!("output {}", out.display()))?;
            let mut w = std::io::BufWriter::new(file);
            let s = export::export(&ledger, &tokens, after, &filter, format, &mut w)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            s
        }
        None => export::export(&ledger, &tokens, after, &filter, format, &mut std::io::stdout().lock())?,
    };
    if let Some(t) = &args.totals {
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(t).with_context(|| format!("totals {}", t.display()))?,
        );
        export::write_totals(&summary, &tokens, &mut w)?;
    }
    if let Some(c) = &args.cursor {
        // Written whole or not at all: a crash here repeats this export, never skips one.
        let tmp = c.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", summary.cursor))
            .with_context(|| format!("cursor {}", tmp.display()))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, c).with_context(|| format!("cursor {}", c.display()))?;
    }
    eprintln!("exported {} rows; log position {}", summary.rows, summary.cursor);
    Ok(())
}

/// Runs reconciliation per chain; `Ok(true)` when nothing differs.
async fn reconcile(
    config: PathBuf,
    ledger: Option<PathBuf>,
    from: u64,
    to: u64,
    only: Option<u64>,
) -> anyhow::Result<bool> {
    use x402_batcher::chain::RpcEndpoint;
    use x402_batcher::ledger::Ledger;
    let config = Config::load(&config).with_context(|| format!("config {}", config.display()))?;
    let path =
        ledger.or(config.ledger.path.clone()).context("no ledger: pass --ledger or set ledger.path")?;
    let ledger = Ledger::open_read_only(&path).with_context(|| format!("ledger {}", path.display()))?;
    let mut chains: Vec<u64> = config.tokens.iter().map(|t| t.chain_id).collect();
    chains.sort_unstable();
    chains.dedup();
    if let Some(c) = only {
        anyhow::ensure!(chains.contains(&c), "--chain-id {c}: no configured token on that chain");
        chains = vec![c];
    }
    let mut clean = true;
    for chain_id in chains {
        let rpc = config
            .chains
            .iter()
            .find(|c| c.chain_id == chain_id)
            .with_context(|| format!("chain {chain_id} has no [[chains]] rpc_url"))?;
        let endpoint = RpcEndpoint::connect_http(chain_id, &rpc.rpc_url)
            .with_context(|| format!("chain {chain_id}: rpc_url is not a valid URL"))?;
        let tokens: Vec<_> =
            config.tokens.iter().filter(|t| t.chain_id == chain_id).map(|t| t.address).collect();
        let report = x402_batcher::reconcile::reconcile(&ledger, &endpoint, &tokens, from, to).await?;
        for d in &report.discrepancies {
            println!("chain {chain_id}: {d}");
        }
        println!(
            "chain {chain_id}: blocks {from}..={to}: {} settled payments and {} AuthorizationUsed logs checked, {} discrepancies",
            report.settled_checked,
            report.logs_checked,
            report.discrepancies.len()
        );
        clean &= report.discrepancies.is_empty();
    }
    Ok(clean)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        // Logs go to stderr; stdout carries only what scripts read (`listening on ADDR`).
        .with_writer(std::io::stderr)
        // Colour only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Run { config } => {
            // First: from here on SIGTERM/SIGINT stop the daemon cleanly, and SIGHUP (before
            // the daemon listens for it to reload, with the config just read) is ignored
            // rather than fatal.
            let stop = shutdown_signal();
            let _hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
            let config = Config::load(&config).with_context(|| format!("config {}", config.display()))?;
            config.validate_for_run()?;
            let listeners = daemon::Listeners::bind(&config).await?;
            println!("listening on {}", listeners.api.local_addr()?);
            println!("admin on {}", listeners.admin.local_addr()?);
            if let Some(http) = &listeners.facilitator {
                println!("facilitator on {}", http.local_addr()?);
            }
            daemon::serve(config, listeners, Arc::new(SystemClock), stop).await?;
        }
        Command::Demo { payments, payers, payees, settlers, rate, confirmations, dir, http_requests } => {
            let opts = demo::DemoOptions {
                payments,
                payers,
                payees,
                settlers,
                rate: (rate > 0.0).then_some(rate),
                confirmations,
                dir,
                http_requests,
                ..Default::default()
            };
            demo::run(&opts).await.context("demo failed")?;
        }
        Command::Loadgen(args) => loadgen(args).await?,
        Command::Export(args) => export(args)?,
        Command::Devnet { dir, settlers, payers, block_time } => {
            devnet(dir, settlers, payers, block_time).await?
        }
        Command::Reconcile { config, ledger, from_block, to_block, chain_id } => {
            let clean = reconcile(config, ledger, from_block, to_block, chain_id).await?;
            if !clean {
                std::process::exit(1);
            }
        }
        Command::NewToken { name, role } => {
            anyhow::ensure!(role == "api" || role == "admin", "--role must be api or admin");
            let (token, hash) = x402_batcher::auth::new_token().context("reading /dev/urandom")?;
            println!("token (give it to {name}; it is not stored anywhere): {token}");
            println!();
            println!("[[credentials]]\nname = {name:?}\nrole = \"{role}\"\ntoken_sha256 = \"{hash}\"");
        }
        Command::CheckConfig { config } => {
            let config = Config::load(&config).with_context(|| format!("config {}", config.display()))?;
            for t in &config.tokens {
                println!(
                    "chain {:>8}  {}  {:<6} domain {:?}/{:?}  {} decimals",
                    t.chain_id, t.address, t.symbol, t.eip712_name, t.eip712_version, t.decimals
                );
            }
            println!("config is valid");
        }
        Command::Decode { header } => match x402::decode::decode_header(&header) {
            Ok(payload) => println!("{payload:#?}"),
            Err(e) => {
                println!("refused: {} ({e})", e.reason());
                std::process::exit(1);
            }
        },
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn devnet(dir: PathBuf, settlers: usize, payers: usize, block_time: Option<u64>) -> anyhow::Result<()> {
    use x402_batcher::devnet::{Devnet, DevnetOptions, X402_CHAIN_ID, payer_keys};
    std::fs::create_dir_all(&dir).with_context(|| format!("directory {}", dir.display()))?;
    let net =
        Devnet::start_with(DevnetOptions { chain_id: X402_CHAIN_ID, block_time_secs: block_time }).await?;
    let keys = net.new_settlers("devnet", settlers).await?;
    let payer_addrs: Vec<_> = payer_keys("loadgen", payers).iter().map(|p| p.address()).collect();
    net.fund(&payer_addrs, alloy::primitives::U256::from(1_000_000_000u64)).await?;
    let keys_path = dir.join("settler.keys");
    x402_batcher::settle::write_key_file(&keys_path, &keys)
        .with_context(|| format!("settler keys {}", keys_path.display()))?;
    let t = net.token_config();
    let config_path = dir.join("config.toml");
    std::fs::write(
        &config_path,
        format!(
            "# Written by `x402-batcher devnet` (see ops/config.devnet.toml).\n\
             [[tokens]]\nchain_id = {}\naddress = \"{}\"\neip712_name = \"{}\"\neip712_version = \"{}\"\n\
             decimals = 6\nsymbol = \"USDC\"\n\n[network_aliases]\ndevnet = {}\n\n\
             [server]\nlisten = \"127.0.0.1:50051\"\n\n[facilitator]\nlisten = \"127.0.0.1:8402\"\n\n\
             [ledger]\npath = \"{}\"\n\n\
             [[chains]]\nchain_id = {}\nrpc_url = \"{}\"\n\n\
             [settlement]\nsettler_keys_file = \"{}\"\nconfirmations = 3\npoll_interval_ms = 200\nmax_wait_secs = 2\n\n\
             [metrics]\nlisten = \"127.0.0.1:9464\"\n",
            t.chain_id,
            t.address,
            t.eip712_name,
            t.eip712_version,
            t.chain_id,
            dir.join("ledger").display(),
            t.chain_id,
            net.rpc_url(),
            keys_path.display(),
        ),
    )
    .with_context(|| format!("config {}", config_path.display()))?;
    println!("devnet on {} (chain {}), token {}", net.rpc_url(), t.chain_id, t.address);
    println!("  {} settlers funded; {payers} payers (seed \"loadgen\") hold 1,000 USDC each", keys.len());
    println!("  run:  x402-batcher run --config {}", config_path.display());
    println!(
        "  load: x402-batcher loadgen --target http://127.0.0.1:50051 --chain-id {} --token {} --payers {payers} --payments 2000 --rate 500",
        t.chain_id, t.address
    );
    let stop = shutdown_signal();
    tokio::pin!(stop);
    if let Some(secs) = block_time {
        println!("A block every {secs} s; Ctrl-C stops the devnet.");
        stop.await;
    } else {
        println!("A block every second (besides one per transaction); Ctrl-C stops the devnet.");
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => {
                    if let Err(e) = net.mine().await {
                        tracing::warn!("devnet block production: {e}");
                    }
                }
            }
        }
    }
    drop(net);
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when
/// it is first awaited: a signal during start-up then ends the daemon cleanly once it is up,
/// instead of killing it by the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (term, int) => {
                let e = term.err().or(int.err()).map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!("cannot watch SIGTERM/SIGINT ({e}); stop the daemon with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Prints a load's throughput over the raw recovery ceiling measured before and after it.
fn print_over_ceiling(what: &str, throughput: f64, before: Option<f64>, after: Option<f64>, cores: usize) {
    if let (Some(before), Some(after)) = (before, after) {
        let mean = (before + after) / 2.0;
        println!(
            "{what} over the raw recovery ceiling of {cores} cores (mean of before and after, {mean:.0}/s): {:.1}%",
            100.0 * throughput / mean
        );
    }
}

async fn loadgen(args: LoadgenArgs) -> anyhow::Result<()> {
    use alloy::primitives::{Address, U256};
    use x402_batcher::{client::Client, config::ChainConfig, devnet, loadgen, verify};

    // The ceiling is measured before and after the load, and the load compared with their
    // mean: on a shared VM the CPU available drifts during a run.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let ceiling = || {
        (args.ceiling_seconds > 0.0).then(|| {
            let c = verify::measure_recovery_ceiling(
                cores,
                std::time::Duration::from_secs_f64(args.ceiling_seconds),
            );
            println!("raw libsecp256k1 recovery ceiling: {c:.0}/s on {cores} cores");
            c
        })
    };
    let ceiling_before = ceiling();
    let payers = devnet::payer_keys(&args.seed, args.payers.max(1));
    let value = 1_000u64;

    // The devnet, its daemon and its ledger directory live until the end of the run.
    let mut _devnet_parts = None;
    let (url, domain) = if args.devnet {
        let net = devnet::Devnet::start().await?;
        let per_payer = value * (args.payments / payers.len() + 1) as u64;
        let addrs: Vec<Address> = payers.iter().map(|p| p.address()).collect();
        net.fund(&addrs, U256::from(per_payer)).await?;
        let dir = std::env::temp_dir().join(format!("x402-loadgen-{}", std::process::id()));
        let mut config = Config::parse("")?;
        config.tokens.push(net.token_config());
        config.chains.push(ChainConfig { chain_id: net.chain_id(), rpc_url: net.rpc_url().to_owned() });
        config.ledger.path = Some(dir.join("ledger"));
        let listeners = daemon::Listeners::loopback().await?;
        let url = format!("http://{}", listeners.api.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(daemon::serve(config, listeners, Arc::new(SystemClock), async {
            let _ = stopped.await;
        }));
        let domain = net.token_domain();
        _devnet_parts = Some((net, dir, stop, server));
        (url, domain)
    } else {
        let (Some(url), Some(chain_id), Some(token)) =
            (args.target.clone().or(args.facilitator.clone()), args.chain_id, args.token)
        else {
            anyhow::bail!(
                "--target (or --facilitator), --chain-id and --token are required without --devnet"
            );
        };
        (url, x402::eip712::TokenDomain::new(&args.eip712_name, &args.eip712_version, chain_id, token))
    };

    let opts = loadgen::LoadOptions {
        payments: args.payments,
        payers,
        rate: args.rate,
        streams: args.streams,
        value,
        payees: vec![x402_batcher::testkit::DEFAULT_PAYEE],
        run_id: u64::from(std::process::id()),
    };
    let signing = std::time::Instant::now();
    let now = x402_batcher::clock::Clock::now_unix(&SystemClock);
    if let Some(facilitator) = &args.facilitator {
        let bodies = loadgen::presign_facilitator(&domain, &opts, now);
        println!("pre-signed {} x402 v2 bodies in {:.1} s", bodies.len(), signing.elapsed().as_secs_f64());
        let token = args.client_auth()?.token;
        let report =
            loadgen::run_verify(facilitator, bodies, args.concurrency, token.as_deref(), args.settle).await;
        println!("{}", report.summary());
        print_over_ceiling("answers/s", report.throughput(), ceiling_before, ceiling(), cores);
        return Ok(());
    }
    let requests = loadgen::presign(&domain, &opts, now);
    println!(
        "pre-signed {} payments from {} payers in {:.1} s",
        requests.len(),
        opts.payers.len(),
        signing.elapsed().as_secs_f64()
    );
    let client = Client::connect_with(url.clone(), &args.client_auth()?).await?;
    let report = loadgen::run(&client, requests, args.rate, args.streams).await;
    println!("{}", report.summary());
    print_over_ceiling("acks/s", report.throughput(), ceiling_before, ceiling(), cores);

    if let Some((_net, dir, stop, server)) = _devnet_parts.take() {
        let _ = stop.send(());
        server.await??;
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}
