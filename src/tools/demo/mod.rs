//! The README's main job: the whole product on a local devnet. Starts anvil with the test
//! token and aggregate3, runs the daemon in-process with settler accounts, drives a few
//! thousand payments from many payers to a few payees through gRPC with the load
//! generator, waits until every one is settled at depth; then the x402 ecosystem's own
//! flow: Express APIs protected by `x402-express` (v1) and `@x402/express` (v2) with the
//! daemon as their facilitator, paid for by `x402-axios` and `@x402/fetch` clients
//! (`ops/interop`, Node), with a replayed header each. It prints a summary: outcomes,
//! batches with sizes and cut reasons, gas per payment beside the same payment sent as its
//! own transaction (for the gRPC fleet and for the middlewares' payments), latency to
//! settled at depth and to final, and where the settlement log and its export are.

mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, U256};

use crate::api::v1;
use crate::chain::MULTICALL3;
use crate::client::Client;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::ledger::RocksLedger;
use crate::tools::devnet::{self, Devnet, DevnetError};
use crate::tools::loadgen::{self, LoadOptions};
use crate::tools::testkit::PaymentBuilder;
use report::{check, print_summary, tally};

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Devnet(#[from] DevnetError),
    #[error("daemon: {0}")]
    Daemon(String),
    #[error("cannot prepare the demo directory {path}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
    #[error("{0}")]
    Mismatch(String),
}

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub payments: usize,
    pub payers: usize,
    pub payees: usize,
    pub settlers: usize,
    /// Submissions per second (None: flat out).
    pub rate: Option<f64>,
    pub confirmations: u64,
    /// The devnet makes a block this often (besides one per transaction).
    pub block_ms: u64,
    /// Where the ledger and the export go (a fresh directory under the system temp dir if
    /// absent).
    pub dir: Option<PathBuf>,
    /// Paid requests each x402 client makes through its middleware after the gRPC load
    /// (0: skip the middleware flow, which needs Node and `ops/interop`'s packages).
    pub http_requests: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            payments: 3_000,
            payers: 300,
            payees: 3,
            settlers: 2,
            rate: Some(1_500.0),
            confirmations: 3,
            block_ms: 500,
            dir: None,
            http_requests: 300,
        }
    }
}

/// What the demo measured.
#[derive(Debug, Default)]
pub struct DemoReport {
    pub offered: usize,
    pub accepted: usize,
    pub settled: usize,
    pub failed: usize,
    pub expired: usize,
    pub batches: usize,
    pub cut_reasons: BTreeMap<String, usize>,
    pub batch_sizes: Vec<usize>,
    pub replacements: usize,
    /// Gas per settled payment over all batches.
    pub gas_per_payment: f64,
    /// The same kind of payment sent as its own `transferWithAuthorization` transaction.
    pub solo_gas: u64,
    /// Accepted to settled at depth (each payment's outcome entry), milliseconds: p50,
    /// p90, p99, max.
    pub latency_ms: [u64; 4],
    /// Accepted to finalized (each payment's finality entry, written when the chain's final
    /// block passed its block; the demo does not wait for it), and how many were final.
    pub final_latency_ms: [u64; 4],
    pub finalized: usize,
    pub ledger_path: PathBuf,
    pub export_path: PathBuf,
    /// The middlewares' flow, when it ran.
    pub http: Option<HttpReport>,
}

/// What the x402 middlewares and clients did through the facilitator.
#[derive(Debug, Default, Clone)]
pub struct HttpReport {
    /// Paid requests answered 200, by client (`v1-axios`, `v2-fetch`).
    pub paid: BTreeMap<String, u64>,
    /// Paid requests made.
    pub requests: u64,
    /// Replayed payment headers refused (402, handler not run), of those sent.
    pub replays_refused: u64,
    pub replays: u64,
    /// Their payments, settled; the batches that carried them; gas per payment.
    pub settled: usize,
    pub batches: usize,
    pub gas_per_payment: f64,
}

/// Runs the demo, printing progress and the summary to stdout.
pub async fn run(opts: &DemoOptions) -> Result<DemoReport, DemoError> {
    let dir = match &opts.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("x402-batcher-demo-{}", std::process::id())),
    };
    let io = |source| DemoError::Dir { path: dir.display().to_string(), source };
    std::fs::create_dir_all(&dir).map_err(io)?;
    let ledger_path = dir.join("ledger");
    if ledger_path.exists() {
        return Err(DemoError::Mismatch(format!(
            "{} already holds a ledger; pass a new --dir",
            ledger_path.display()
        )));
    }

    let (net, settlers, payers, payees) = start_devnet(opts).await?;
    // Blocks keep coming even without payments, so confirmations accrue.
    let producer = {
        let net = Arc::clone(&net);
        let every = Duration::from_millis(opts.block_ms.max(50));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let _ = net.mine().await;
            }
        })
    };

    // The daemon, configured as an operator would, in this process.
    let daemon = DemoDaemon::start(&net, &dir, &ledger_path, &settlers, opts.confirmations).await?;
    let (url, admin_url, facilitator_url, tokens) =
        (daemon.url.clone(), daemon.admin_url.clone(), daemon.facilitator_url.clone(), daemon.tokens.clone());
    let client = Client::connect(url).await.map_err(|e| DemoError::Daemon(e.to_string()))?;
    let load = LoadOptions {
        payments: opts.payments,
        payers: payers.clone(),
        rate: opts.rate,
        streams: 4,
        value: 10_000,
        payees: payees.clone(),
        run_id: 1,
    };
    let requests = loadgen::presign(&net.token_domain(), &load, SystemClock.now_unix());
    let rate = opts.rate.map_or("flat out".to_owned(), |r| format!("{r:.0}/s"));
    println!("submitting {} payments over gRPC ({rate}) ...", requests.len());
    let started = Instant::now();
    let loaded = loadgen::run(&client, requests, opts.rate, load.streams).await;
    println!("  {}", loaded.summary());

    println!("settling (confirmation depth {}) ...", opts.confirmations);
    // Admin is served on its own listener.
    let mut admin = Client::connect(admin_url).await.map_err(|e| DemoError::Daemon(e.to_string()))?.admin;
    wait_settled(&mut admin).await?;
    let settle_seconds = started.elapsed().as_secs_f64();

    // The x402 ecosystem's own flow, through the facilitator URL.
    let http = match opts.http_requests {
        0 => None,
        n => Some(pay_through_middlewares(&net, &facilitator_url, n, &mut admin).await?),
    };

    // The same payment as its own transaction: the reference facilitators' way.
    let solo = PaymentBuilder::new(&payers[0], &net.token_domain(), SystemClock.now_unix())
        .to(payees[0])
        .value(10_000)
        .nonce_index(u64::MAX)
        .build();
    let solo_gas = net.send_alone(&solo).await?.gas_used;

    daemon.stop().await?;
    producer.abort();

    let ledger = RocksLedger::open(&ledger_path)?;
    let export_path = dir.join("settlements.csv");
    let rows = export_csv(&ledger, &tokens, &export_path)?;

    let mut report = DemoReport {
        offered: loaded.sent,
        accepted: loaded.acked.len(),
        solo_gas,
        ledger_path,
        export_path,
        ..Default::default()
    };
    tally(&ledger, net.chain_id(), http, &mut report)?;

    print_summary(&report, rows, settle_seconds);
    check(&report)?;
    Ok(report)
}

/// Starts the devnet (Base Sepolia's chain id: the x402 v1 packages pay only on networks
/// they name) with the demo's settlers, payers (funded) and payees.
async fn start_devnet(
    opts: &DemoOptions,
) -> Result<
    (
        Arc<Devnet>,
        Vec<alloy::signers::local::PrivateKeySigner>,
        Vec<alloy::signers::local::PrivateKeySigner>,
        Vec<Address>,
    ),
    DemoError,
> {
    println!("starting devnet (anvil {}) ...", devnet::ANVIL_VERSION);
    let options = devnet::DevnetOptions { chain_id: devnet::X402_CHAIN_ID, ..Default::default() };
    let net = Arc::new(Devnet::start_with(options).await?);
    println!("  rpc {}  token {}  aggregate3 at {}", net.rpc_url(), net.token(), MULTICALL3);
    let settlers = net.new_settlers("demo", opts.settlers.max(1)).await?;
    let payers = devnet::payer_keys("demo", opts.payers.max(1));
    let addrs: Vec<Address> = payers.iter().map(|p| p.address()).collect();
    net.fund(&addrs, U256::from(100_000_000u64)).await?;
    let payees: Vec<Address> =
        (0..opts.payees.max(1)).map(|i| Address::repeat_byte(0xa0 + i as u8)).collect();
    println!(
        "  {} payers funded with 100 USDC each; {} payees; {} settler accounts",
        payers.len(),
        payees.len(),
        settlers.len()
    );
    Ok((net, settlers, payers, payees))
}

/// `requests` paid requests per x402 client through its middleware, the facilitator at
/// `facilitator_url`, with payers of their own; then waits until they are settled.
async fn pay_through_middlewares(
    net: &Devnet,
    facilitator_url: &str,
    requests: usize,
    admin: &mut v1::admin_client::AdminClient<crate::client::AuthChannel>,
) -> Result<HttpReport, DemoError> {
    let payers = devnet::payer_keys("demo-http", 3);
    let addrs: Vec<Address> = payers.iter().map(|p| p.address()).collect();
    net.fund(&addrs, U256::from(100_000_000u64)).await?;
    println!(
        "paying {requests} requests per client through x402 middlewares (x402-express <- x402-axios, \
         @x402/express <- @x402/fetch), facilitator {facilitator_url} ..."
    );
    let result = run_interop(&interop_config(net, facilitator_url, &payers, requests)).await?;
    wait_settled(admin).await?;
    Ok(result)
}

/// The finance export of `ledger` as CSV at `path`: its rows.
fn export_csv(
    ledger: &RocksLedger,
    tokens: &crate::config::TokenTable,
    path: &std::path::Path,
) -> Result<usize, DemoError> {
    let io = |source| DemoError::Dir { path: path.display().to_string(), source };
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    let filter = crate::export::Filter::default();
    let rows = crate::export::export(ledger, tokens, 0, &filter, crate::export::Format::Csv, &mut file)?.rows;
    std::io::Write::flush(&mut file).map_err(io)?;
    Ok(rows)
}

/// The daemon the demo runs in this process, and where it listens.
struct DemoDaemon {
    url: String,
    admin_url: String,
    facilitator_url: String,
    tokens: crate::config::TokenTable,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), crate::daemon::DaemonError>>,
}

impl DemoDaemon {
    /// Configures the daemon as an operator would (the devnet's token and chain, a ledger at
    /// `ledger_path`, `settlers`' keys in a file under `dir`) and starts it on loopback.
    async fn start(
        net: &Devnet,
        dir: &std::path::Path,
        ledger_path: &std::path::Path,
        settlers: &[alloy::signers::local::PrivateKeySigner],
        confirmations: u64,
    ) -> Result<DemoDaemon, DemoError> {
        let io = |source| DemoError::Dir { path: dir.display().to_string(), source };
        let keys = dir.join("settler.keys");
        crate::settle::write_key_file(&keys, settlers).map_err(io)?;
        let mut config = Config::parse("").map_err(|e| DemoError::Daemon(e.to_string()))?;
        config.tokens.push(net.token_config());
        // Heads pushed over anvil's WebSocket, as in the config `x402-batcher devnet` writes.
        let mut chain = net.chain_config();
        chain.ws_url = net.ws_url();
        config.chains.push(chain);
        config.ledger.path = Some(ledger_path.to_path_buf());
        config.settlement.settler_keys_file = Some(keys);
        config.settlement.confirmations = confirmations;
        config.settlement.poll_interval_ms = 250;
        let tokens = config.token_table();
        let listeners = crate::daemon::Listeners::loopback_with_facilitator()
            .await
            .map_err(|e| DemoError::Daemon(e.to_string()))?;
        let addr = |l: &tokio::net::TcpListener| {
            l.local_addr().map(|a| format!("http://{a}")).map_err(|e| DemoError::Daemon(e.to_string()))
        };
        let (url, admin_url) = (addr(&listeners.api)?, addr(&listeners.admin)?);
        let facilitator =
            listeners.facilitator.as_ref().ok_or(DemoError::Daemon("no facilitator listener".into()))?;
        let facilitator_url = addr(facilitator)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(crate::daemon::serve(config, listeners, Arc::new(SystemClock), async {
            let _ = stopped.await;
        }));
        println!(
            "daemon listening on {url}, facilitator on {facilitator_url} (ledger {})",
            ledger_path.display()
        );
        Ok(DemoDaemon { url, admin_url, facilitator_url, tokens, stop, task })
    }

    /// Stops the daemon (a drain) and waits for it.
    async fn stop(self) -> Result<(), DemoError> {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DemoError::Daemon(format!("{e:#}"))),
            Err(e) => Err(DemoError::Daemon(e.to_string())),
        }
    }
}

/// Polls Admin until no payment is pending (10 minutes at most).
async fn wait_settled(
    admin: &mut v1::admin_client::AdminClient<crate::client::AuthChannel>,
) -> Result<(), DemoError> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let status = admin
            .get_status(v1::GetStatusRequest {})
            .await
            .map_err(|e| DemoError::Daemon(e.to_string()))?
            .into_inner();
        if status.pending_payments == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DemoError::Mismatch(format!(
                "{} payments still pending after 10 minutes",
                status.pending_payments
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where the x402 packages and the scripts that drive them are: `$X402_INTEROP_DIR`, else
/// `ops/interop` in the source tree (`ops/setup.sh` installs the packages there).
pub fn interop_dir() -> PathBuf {
    std::env::var_os("X402_INTEROP_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::devnet::source_root().join("ops/interop"))
}

/// The middleware flow's settings for `ops/interop/run.mjs` (its `pay` scenario).
fn interop_config(
    net: &Devnet,
    facilitator: &str,
    payers: &[alloy::signers::local::PrivateKeySigner],
    requests: usize,
) -> serde_json::Value {
    let key = |i: usize| format!("0x{}", alloy::hex::encode(payers[i].to_bytes()));
    serde_json::json!({
        "scenario": "pay",
        "facilitator": facilitator,
        "token": null,
        "chainId": net.chain_id(),
        "v1Network": "base-sepolia",
        "asset": net.token().to_checksum(None),
        "assetName": "USD Coin",
        "assetVersion": "2",
        "decimals": 6,
        "payTo": Address::repeat_byte(0xa0).to_checksum(None),
        "price": "10000",
        "payers": { "v1-axios": key(0), "v2-fetch": key(1), "v2-axios": key(2) },
        "clients": ["v1-axios", "v2-fetch"],
        "requests": requests,
        "concurrency": 20,
        "upfront": 0,
    })
}

/// Runs `run.mjs` with `config` and reads its result.
async fn run_interop(config: &serde_json::Value) -> Result<HttpReport, DemoError> {
    let dir = interop_dir();
    if !dir.join("node_modules/@x402/express").exists() {
        return Err(DemoError::Mismatch(format!(
            "the x402 packages are not installed under {}: run ops/setup.sh (or pass --http-requests 0)",
            dir.display()
        )));
    }
    let file = dir.join(format!(".demo-{}.json", std::process::id()));
    let io = |source| DemoError::Dir { path: file.display().to_string(), source };
    std::fs::write(&file, config.to_string()).map_err(io)?;
    let output = tokio::process::Command::new("node")
        .arg(dir.join("run.mjs"))
        .arg(&file)
        .current_dir(&dir)
        .kill_on_drop(true)
        .output()
        .await;
    let _ = std::fs::remove_file(&file);
    let output = output.map_err(|e| DemoError::Daemon(format!("cannot run node: {e}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let Some(result) = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
        return Err(DemoError::Mismatch(format!(
            "the middleware flow gave no result: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    };
    let v: serde_json::Value =
        serde_json::from_str(result).map_err(|e| DemoError::Mismatch(e.to_string()))?;
    let mut report = HttpReport::default();
    for (kind, c) in v["clients"].as_object().into_iter().flatten() {
        report.requests += config["requests"].as_u64().unwrap_or(0);
        report.paid.insert(kind.clone(), c["statuses"]["200"].as_u64().unwrap_or(0));
        report.replays += 1;
        let refused = c["replay"]["status"] == 402 && c["replay"]["handlerRuns"] == 0;
        report.replays_refused += u64::from(refused);
    }
    Ok(report)
}
