//! The README's main job: the whole product on a local devnet. Starts anvil with the test
//! token and aggregate3, runs the daemon in-process with settler accounts, drives a few
//! thousand payments from many payers to a few payees through gRPC with the load
//! generator, waits until every one is settled at depth, and prints a summary: outcomes,
//! batches with sizes and cut reasons, gas per payment beside the same payment sent as its
//! own transaction, end-to-end latency, and where the settlement log and its export are.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, U256};

use crate::api::v1;
use crate::chain::MULTICALL3;
use crate::client::Client;
use crate::clock::{Clock, SystemClock};
use crate::config::{ChainConfig, Config};
use crate::devnet::{self, Devnet, DevnetError};
use crate::ledger::{BatchStatus, Ledger, Status};
use crate::loadgen::{self, LoadOptions};
use crate::testkit::PaymentBuilder;

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
    /// Accepted to settled, milliseconds: p50, p90, p99, max.
    pub latency_ms: [u64; 4],
    pub ledger_path: PathBuf,
    pub export_path: PathBuf,
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

    println!("starting devnet (anvil {}) ...", devnet::ANVIL_VERSION);
    let net = Arc::new(Devnet::start().await?);
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
    let keys = dir.join("settler.keys");
    crate::settle::write_key_file(&keys, &settlers).map_err(io)?;
    let mut config = Config::parse("").map_err(|e| DemoError::Daemon(e.to_string()))?;
    config.tokens.push(net.token_config());
    config.chains.push(ChainConfig { chain_id: net.chain_id(), rpc_url: net.rpc_url().to_owned() });
    config.ledger.path = Some(ledger_path.clone());
    config.settlement.settler_keys_file = Some(keys);
    config.settlement.confirmations = opts.confirmations;
    config.settlement.poll_interval_ms = 250;
    let tokens = config.token_table();
    let listeners =
        crate::daemon::Listeners::loopback().await.map_err(|e| DemoError::Daemon(e.to_string()))?;
    let addr = |l: &tokio::net::TcpListener| {
        l.local_addr().map(|a| format!("http://{a}")).map_err(|e| DemoError::Daemon(e.to_string()))
    };
    let (url, admin_url) = (addr(&listeners.api)?, addr(&listeners.admin)?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(crate::daemon::serve(config, listeners, Arc::new(SystemClock), async {
        let _ = stopped.await;
    }));
    println!("daemon listening on {url} (ledger {})", ledger_path.display());

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
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let status = admin
            .get_status(v1::GetStatusRequest {})
            .await
            .map_err(|e| DemoError::Daemon(e.to_string()))?
            .into_inner();
        if status.pending_payments == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(DemoError::Mismatch(format!(
                "{} payments still pending after 10 minutes",
                status.pending_payments
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settle_seconds = started.elapsed().as_secs_f64();

    // The same payment as its own transaction: the reference facilitators' way.
    let solo = PaymentBuilder::new(&payers[0], &net.token_domain(), SystemClock.now_unix())
        .to(payees[0])
        .value(10_000)
        .nonce_index(u64::MAX)
        .build();
    let solo_gas = net.send_alone(&solo).await?.gas_used;

    let _ = stop.send(());
    match daemon.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(DemoError::Daemon(format!("{e:#}"))),
        Err(e) => return Err(DemoError::Daemon(e.to_string())),
    }
    producer.abort();

    let ledger = Ledger::open(&ledger_path)?;
    let export_path = dir.join("settlements.csv");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&export_path).map_err(io)?);
    let rows = crate::export::export(
        &ledger,
        &tokens,
        0,
        &crate::export::Filter::default(),
        crate::export::Format::Csv,
        &mut file,
    )?
    .rows;
    std::io::Write::flush(&mut file).map_err(io)?;

    let mut report = DemoReport {
        offered: loaded.sent,
        accepted: loaded.acked.len(),
        solo_gas,
        ledger_path,
        export_path,
        ..Default::default()
    };
    let mut latencies = Vec::new();
    for (_, r) in ledger.settlement_log(0, usize::MAX)? {
        match r.status {
            Status::Settled => {
                report.settled += 1;
                latencies.push(r.updated_at_ms.saturating_sub(r.accepted_at_ms));
            }
            Status::Failed => report.failed += 1,
            Status::Expired => report.expired += 1,
            _ => {}
        }
    }
    let (mut gas, mut items) = (0u64, 0u64);
    for b in ledger.batches(net.chain_id())? {
        report.batches += 1;
        report.batch_sizes.push(b.items.len());
        *report.cut_reasons.entry(b.cut_reason.clone()).or_default() += 1;
        report.replacements += b.attempts.len().saturating_sub(1);
        if b.status == BatchStatus::Done
            && let Some(inc) = b.inclusion
        {
            gas += inc.gas_used;
            items += u64::from(inc.settled_items);
        }
    }
    report.gas_per_payment = if items == 0 { 0.0 } else { gas as f64 / items as f64 };
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies.get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0)
    };
    report.latency_ms = [pct(0.50), pct(0.90), pct(0.99), latencies.last().copied().unwrap_or(0)];

    print_summary(&report, rows, settle_seconds);
    if report.settled + report.failed + report.expired != report.accepted {
        return Err(DemoError::Mismatch(format!(
            "{} accepted but {} outcomes in the settlement log",
            report.accepted,
            report.settled + report.failed + report.expired
        )));
    }
    if report.settled == 0 {
        return Err(DemoError::Mismatch("nothing settled".into()));
    }
    Ok(report)
}

fn print_summary(r: &DemoReport, rows: usize, seconds: f64) {
    let mut sizes = r.batch_sizes.clone();
    sizes.sort_unstable();
    let median = sizes.get(sizes.len() / 2).copied().unwrap_or(0);
    println!("\nsummary");
    println!("  payments    offered {}, accepted {}", r.offered, r.accepted);
    println!("  outcomes    settled {}, failed {}, expired {}", r.settled, r.failed, r.expired);
    println!(
        "  batches     {} (sizes min {}, median {}, max {}); fee replacements {}",
        r.batches,
        sizes.first().copied().unwrap_or(0),
        median,
        sizes.last().copied().unwrap_or(0),
        r.replacements
    );
    let reasons: Vec<String> = r.cut_reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("  cut by      {}", reasons.join(", "));
    let ratio = if r.solo_gas == 0 { 0.0 } else { r.gas_per_payment / r.solo_gas as f64 };
    println!(
        "  gas         {:.0} per payment in batches vs {} as its own transaction: {:.3}x ({:.0}% saved)",
        r.gas_per_payment,
        r.solo_gas,
        ratio,
        (1.0 - ratio) * 100.0
    );
    let [p50, p90, p99, max] = r.latency_ms;
    println!(
        "  latency     accepted -> settled at depth: p50 {p50} ms, p90 {p90} ms, p99 {p99} ms, max {max} ms"
    );
    println!("  wall time   {seconds:.1} s from the first submission to the last payment final");
    println!("  ledger      {} (settlement log: column family `settlement`)", r.ledger_path.display());
    println!("  export      {} ({rows} rows, CSV)", r.export_path.display());
}
