//! Two RPC endpoints for one chain (issue #28): under a steady load, the preferred one goes
//! down, then silent, then 20 blocks behind, then recovers. No payment is refused for the
//! chain, every acknowledged payment settles once, the payee is paid each once, and the
//! pool's gauges show the endpoint out of use and 20 blocks behind, then back.

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, U256};
use common::proxy::{FaultProxy, LaggingProxy, Mode};
use common::settle::{Miner, ledger_after, settling_daemon, wait_nothing_pending};
use x402_batcher::client::Client;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::tools::loadgen::{self, LoadOptions};

const LIMIT: Duration = Duration::from_secs(240);
const PAYEE: Address = Address::repeat_byte(0x3e);
const VALUE: u64 = 1_000;

/// What endpoint 1 does, from when on.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Up,
    Down,
    Silent,
    Behind(u64),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_endpoints_down_silent_then_lagging_refuses_and_doubles_nothing() {
    const RATE: f64 = 20.0;
    const PAYMENTS: usize = 480;
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        // Endpoint 1, the nearer (preferred while it answers): faults in front of a node that
        // can fall behind. Endpoint 2: 30 ms farther, always up.
        let lagging = LaggingProxy::start(net.rpc_url(), Duration::ZERO).await;
        let first = Arc::new(FaultProxy::start(&lagging.url).await);
        let second = LaggingProxy::start(net.rpc_url(), Duration::from_millis(30)).await;
        let urls = vec![first.url.clone(), second.url.clone()];
        let d = settling_daemon(&net, "endpoints", 2, move |c| {
            c.chains[0].rpc_url = String::new();
            c.chains[0].rpc_urls = urls;
        })
        .await;
        let dir = Arc::clone(&d.dir);
        let payers = devnet::payer_keys("endpoints", 100);
        let addrs: Vec<_> = payers.iter().map(|p| p.address()).collect();
        net.fund(&addrs, U256::from(100_000_000u64)).await.unwrap();
        let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(250), None);
        let before = net.balance_of(PAYEE).await.unwrap();
        let opts = LoadOptions {
            payments: PAYMENTS,
            payers,
            rate: Some(RATE),
            streams: 2,
            value: VALUE,
            payees: vec![PAYEE],
            run_id: 11,
        };
        let requests = loadgen::presign(&net.token_domain(), &opts, SystemClock.now_unix());
        let client = Client::connect(d.url()).await.unwrap();

        // Endpoint 1's phases over the 24 s of load (this shapes the scenario; nothing waits
        // on it).
        let schedule = [(3, Phase::Down), (9, Phase::Silent), (15, Phase::Behind(20)), (21, Phase::Up)];
        let switcher = {
            let first = Arc::clone(&first);
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                for (at, phase) in schedule {
                    tokio::time::sleep_until(start + Duration::from_secs(at)).await;
                    match phase {
                        Phase::Up => (first.set(Mode::Up), lagging.lag(0)),
                        Phase::Down => (first.set(Mode::Down), ()),
                        Phase::Silent => (first.set(Mode::Blackhole), ()),
                        Phase::Behind(blocks) => (first.set(Mode::Up), lagging.lag(blocks)),
                    };
                }
                lagging
            })
        };
        // The pool's gauges for endpoint 1, watched through the process's recorder.
        let metrics = x402_batcher::telemetry::install().expect("a recorder");
        let gauge = move |name: &str| -> Option<f64> {
            let text = metrics.render();
            let line = text.lines().find(|l| l.starts_with(name) && l.contains("endpoint=\"1\""))?;
            line.rsplit(' ').next()?.parse().ok()
        };
        let watch = {
            let gauge = gauge.clone();
            tokio::spawn(async move {
                let (mut out_of_use, mut most_behind) = (false, 0.0f64);
                loop {
                    out_of_use |= gauge("x402_batcher_rpc_endpoint_usable") == Some(0.0);
                    most_behind =
                        most_behind.max(gauge("x402_batcher_rpc_endpoint_lag_blocks").unwrap_or(0.0));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if out_of_use && most_behind >= 18.0 {
                        return (out_of_use, most_behind);
                    }
                }
            })
        };
        let report = loadgen::run(&client, requests, Some(RATE), 2).await;
        let _lagging = switcher.await.unwrap();
        let (out_of_use, most_behind) =
            tokio::time::timeout(Duration::from_secs(5), watch).await.expect("the gauges showed it").unwrap();
        assert!(
            out_of_use && most_behind >= 18.0,
            "endpoint 1: out of use {out_of_use}, behind {most_behind}"
        );
        // Back in use once it answers and keeps up again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while gauge("x402_batcher_rpc_endpoint_usable") != Some(1.0) {
            assert!(tokio::time::Instant::now() < deadline, "endpoint 1 did not come back into use");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Nothing refused for the chain, whatever endpoint 1 did.
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        assert!(report.errors.is_empty(), "refused: {:?} ({})", report.errors, report.summary());
        assert_eq!(report.acked.len(), PAYMENTS);

        // Everything acknowledged settles, once.
        wait_nothing_pending(&d.admin_url(), Duration::from_secs(120)).await;
        d.stop().await;
        let (log, batches) = ledger_after(dir.path(), net.chain_id());
        let ids: HashSet<_> = log.iter().map(|r| r.payment_id()).collect();
        let settled = log.iter().filter(|r| r.status == x402_batcher::ledger::Status::Settled).count();
        let paid = net.balance_of(PAYEE).await.unwrap() - before;
        let slowest = report.latencies.last().copied().unwrap_or_default();
        println!(
            "endpoints: acked {}, settled {settled}, outcomes {}, distinct {}; slowest answer {slowest:.1?}",
            report.acked.len(),
            log.len(),
            ids.len()
        );
        assert_eq!((log.len(), ids.len(), settled), (PAYMENTS, PAYMENTS, PAYMENTS), "one settlement each");
        assert_eq!(paid, U256::from(VALUE * settled as u64), "the payee was paid each payment once");
        assert!(batches.iter().all(|b| b.status.is_final()), "no batch left open");
    })
    .await
    .expect("bounded");
}
