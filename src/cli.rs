//! The command line: flags and what they become (the library's option structs). Part of
//! the binary, not the library.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use x402_batcher::config::Config;
use x402_batcher::ledger::LedgerStore;
use x402_batcher::tools::{self, loadgen};
use x402_batcher::{export, x402};

#[derive(Parser)]
#[command(version, about = "Verifies, durably records and batch-settles x402 (EIP-3009) payments")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
        #[arg(long, default_value_t = tools::demo::DemoOptions::default().payments)]
        payments: usize,
        /// Distinct payers.
        #[arg(long, default_value_t = tools::demo::DemoOptions::default().payers)]
        payers: usize,
        /// Distinct payees.
        #[arg(long, default_value_t = tools::demo::DemoOptions::default().payees)]
        payees: usize,
        /// Settler accounts.
        #[arg(long, default_value_t = tools::demo::DemoOptions::default().settlers)]
        settlers: usize,
        /// Submissions per second (0: flat out).
        #[arg(long, default_value_t = 1_500.0)]
        rate: f64,
        /// Confirmation depth at which a payment counts as settled.
        #[arg(long, default_value_t = tools::demo::DemoOptions::default().confirmations)]
        confirmations: u64,
        /// Where the ledger and the CSV export are written (default: a new temp directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Paid requests each x402 client (x402-axios, @x402/fetch) makes through its
        /// middleware (x402-express, @x402/express) with the daemon as facilitator, after the
        /// gRPC load (0: skip; the flow needs Node and the packages ops/setup.sh installs).
        #[arg(long, default_value_t = tools::demo::DemoOptions::default().http_requests)]
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
        /// A flashblocks stand-in (OP-stack preconfirmations): anvil makes a flashblock
        /// every this many milliseconds and the printed RPC URL is a proxy that seals a
        /// block every --block-time seconds (default 2), serving receipts from the
        /// flashblocks in between as preconfirmed.
        #[arg(long, value_parser = clap::value_parser!(u64).range(10..=10_000))]
        flashblocks_ms: Option<u64>,
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
    /// Copy a RocksDB ledger (its daemon stopped) into the empty PostgreSQL ledger a fleet
    /// config names, in one transaction, and check the copy.
    MigrateLedger {
        /// A config with `[ledger] backend = "postgres"`.
        #[arg(long)]
        config: PathBuf,
        /// The RocksDB ledger directory.
        #[arg(long)]
        from: PathBuf,
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
    /// Ask a running daemon what it is doing (Admin GetStatus): each chain's head and fees,
    /// what waits per token and what settling it costs, each settler's balance, nonce and
    /// open batch. A table for a person; --json for scripts.
    Status(StatusArgs),
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The daemon's Admin listener, e.g. http://127.0.0.1:50052 (https:// with --ca-file).
    #[arg(long)]
    pub admin: String,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientFlags,
}

/// How a command reaches a daemon: TLS, mutual TLS, a bearer token.
#[derive(clap::Args)]
pub struct ClientFlags {
    /// TLS: the CA certificate (PEM) that issued the daemon's; use an https:// URL.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// The name the daemon's certificate carries, if not the URL's host.
    #[arg(long, requires = "ca_file")]
    pub server_name: Option<String>,
    /// A client certificate (PEM) for mutual TLS, with --key-file.
    #[arg(long, requires_all = ["ca_file", "key_file"])]
    pub cert_file: Option<PathBuf>,
    #[arg(long, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// The environment variable holding a bearer token (not a flag: flags show in `ps`).
    #[arg(long)]
    pub token_env: Option<String>,
}

impl ClientFlags {
    pub fn auth(self) -> anyhow::Result<x402_batcher::client::ClientAuth> {
        Ok(x402_batcher::client::ClientAuth::from_files(
            self.ca_file.as_deref(),
            self.server_name,
            self.cert_file.as_deref().zip(self.key_file.as_deref()),
            self.token_env.as_deref(),
        )?)
    }
}

/// Prints the daemon's status (see [`StatusArgs`]).
pub async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let s = tools::status::fetch(a.admin, &a.client.auth()?).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&tools::status::json(&s))?);
    } else {
        print!("{}", tools::status::table(&s));
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The daemon's config: its ledger path and its tokens (symbols, decimals).
    #[arg(long)]
    pub config: PathBuf,
    /// The ledger directory, if not the config's.
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// csv (RFC 4180) or jsonl.
    #[arg(long, default_value = "csv")]
    pub format: String,
    /// Where to write (default: stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A file holding the last exported log position; read at start (missing: from the
    /// beginning), rewritten once the output is complete.
    #[arg(long)]
    pub cursor: Option<PathBuf>,
    /// Start after this log position (instead of a cursor file).
    #[arg(long, conflicts_with = "cursor")]
    pub after: Option<u64>,
    /// Only payments final at or after this time: unix seconds, YYYY-MM-DD, or
    /// YYYY-MM-DDTHH:MM:SSZ (UTC). Settled payments count at their block's time.
    #[arg(long)]
    pub from: Option<String>,
    /// Only payments final before this time (same forms as --from).
    #[arg(long)]
    pub to: Option<String>,
    #[arg(long)]
    pub payee: Option<alloy::primitives::Address>,
    #[arg(long)]
    pub payer: Option<alloy::primitives::Address>,
    /// settled, failed or expired.
    #[arg(long)]
    pub status: Option<String>,
    #[arg(long)]
    pub chain_id: Option<u64>,
    #[arg(long)]
    pub token: Option<alloy::primitives::Address>,
    /// Also write settled totals per payee per UTC day (CSV) to this file.
    #[arg(long)]
    pub totals: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct LoadgenArgs {
    /// Start a devnet and an in-process daemon, fund the payers, and load that.
    #[arg(long, conflicts_with_all = ["ca_file", "token_env"])]
    pub devnet: bool,
    /// The daemon's URL (without --devnet or --facilitator).
    #[arg(long, required_unless_present_any = ["devnet", "facilitator"])]
    pub target: Option<String>,
    /// The token's chain id, address, and EIP-712 domain (without --devnet).
    #[arg(long, required_unless_present = "devnet")]
    pub chain_id: Option<u64>,
    #[arg(long, required_unless_present = "devnet")]
    pub token: Option<alloy::primitives::Address>,
    #[arg(long, default_value = "USD Coin")]
    pub eip712_name: String,
    #[arg(long, default_value = "2")]
    pub eip712_version: String,
    /// Seed of the payer keys (devnet::payer_keys); the payers must hold funds.
    #[arg(long, default_value = "loadgen")]
    pub seed: String,
    #[arg(long, default_value_t = 20_000)]
    pub payments: usize,
    #[arg(long, default_value_t = 200)]
    pub payers: usize,
    /// Submissions per second; flat out if absent.
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Seconds spent measuring the raw recovery ceiling on all cores, before and after the
    /// load (0: skip).
    #[arg(long, default_value_t = 3.0)]
    pub ceiling_seconds: f64,
    /// With --devnet: the daemons' ledger, `rocksdb` (a temp dir) or `postgres` (a
    /// throw-away server started from Debian's binaries).
    #[arg(long, default_value = "rocksdb", requires = "devnet", value_parser = ["rocksdb", "postgres"])]
    pub ledger: String,
    /// With --ledger postgres: a synchronous standby on this machine.
    #[arg(long)]
    pub sync_standby: bool,
    /// With --devnet: daemons sharing the ledger (more than one: --ledger postgres); the
    /// streams are spread over them.
    #[arg(long, default_value_t = 1)]
    pub daemons: usize,
    /// With --devnet: run each daemon as a process of its own capped at this many cores of
    /// CPU (a cgroup v1 `cpu` group; Linux, as root), as if each had a machine of its own.
    #[arg(long, requires = "devnet")]
    pub daemon_cpu: Option<f64>,
    #[command(flatten)]
    pub client: ClientFlags,
    /// Load an x402 facilitator's `POST /verify` at this URL (this daemon's, or any other
    /// facilitator's) instead of the gRPC API: pre-signed x402 v2 bodies, --concurrency
    /// calls at a time.
    #[arg(long, conflicts_with = "devnet", requires_all = ["chain_id", "token"])]
    pub facilitator: Option<String>,
    /// Calls in flight at once with --facilitator.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// With --facilitator: settle each payment after verifying it (the facilitator's side
    /// of a paid request), timing both calls.
    #[arg(long, requires = "facilitator")]
    pub settle: bool,
}

pub fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).with_context(|| format!("config {}", path.display()))
}

/// The config's ledger (or the RocksDB directory `over`), opened read-only: export and
/// reconcile run beside the daemon, on either backend.
pub fn read_only_ledger(
    config: &Config,
    over: Option<PathBuf>,
) -> anyhow::Result<std::sync::Arc<dyn LedgerStore>> {
    Ok(x402_batcher::ledger::open_read_only(&config.ledger, over.as_deref())?)
}

pub fn export_job(a: ExportArgs) -> anyhow::Result<export::Job> {
    let time = |flag, v: Option<String>| v.map(|t| export::time_from_flag(flag, &t)).transpose();
    Ok(export::Job {
        start: match (a.cursor, a.after) {
            (Some(path), _) => export::Start::Cursor(export::Cursor::at(path)),
            (None, after) => export::Start::After(after.unwrap_or(0)),
        },
        filter: export::Filter {
            from: time("--from", a.from)?,
            to: time("--to", a.to)?,
            payer: a.payer,
            payee: a.payee,
            status: a.status.as_deref().map(export::status_from_flag).transpose()?,
            chain_id: a.chain_id,
            token: a.token,
        },
        format: export::Format::from_flag(&a.format)?,
        out: a.out,
        totals: a.totals,
    })
}

pub fn loadgen_command(a: LoadgenArgs) -> anyhow::Result<loadgen::Command> {
    let domain = |chain_id: Option<u64>, token| {
        x402::eip712::TokenDomain::new(&a.eip712_name, &a.eip712_version, chain_id.unwrap_or_default(), token)
    };
    let target = match (a.devnet, a.facilitator, a.target, a.token) {
        (true, ..) => {
            let backend = match a.ledger.as_str() {
                "postgres" => x402_batcher::config::LedgerBackend::Postgres,
                _ => x402_batcher::config::LedgerBackend::Rocksdb,
            };
            let rocks = backend == x402_batcher::config::LedgerBackend::Rocksdb;
            anyhow::ensure!(!(rocks && a.sync_standby), "--sync-standby needs --ledger postgres");
            anyhow::ensure!(!(rocks && a.daemons > 1), "several --daemons need --ledger postgres");
            loadgen::Target::Devnet(loadgen::OwnLedger {
                backend,
                sync_standby: a.sync_standby,
                daemons: a.daemons,
                daemon_cpu: a.daemon_cpu,
            })
        }
        (false, Some(url), _, Some(token)) => loadgen::Target::Facilitator {
            url,
            domain: domain(a.chain_id, token),
            token: a.client.token_env.as_deref().map(std::env::var).transpose().context("--token-env")?,
            concurrency: a.concurrency,
            settle: a.settle,
        },
        (false, None, Some(url), Some(token)) => {
            loadgen::Target::Grpc { url, domain: domain(a.chain_id, token), auth: a.client.auth()? }
        }
        _ => {
            anyhow::bail!("--target (or --facilitator), --chain-id and --token are required without --devnet")
        }
    };
    Ok(loadgen::Command {
        target,
        seed: a.seed,
        payments: a.payments,
        payers: a.payers,
        rate: a.rate,
        streams: a.streams,
        ceiling_seconds: a.ceiling_seconds,
    })
}
