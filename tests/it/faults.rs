//! Fault injection on the RPC node, under a steady load over gRPC, with settlement on: the
//! node stopped for 30 s and restarted; the node answering errors, then not answering for 30 s.
//! Ingest keeps serving while it can and otherwise refuses with UNAVAILABLE (never hangs);
//! afterwards every acknowledged payment settles, once. Each test ends with a summary line:
//! offered, faults, acked, refused, settled, lost (must be 0), duplicated (must be 0).

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, U256};
use common::proxy::{FaultProxy, Mode};
use common::settle::{Miner, ledger_after, settling_daemon, wait_nothing_pending};
use x402_batcher::chain::RPC_TIMEOUT;
use x402_batcher::client::Client;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::tools::loadgen::{self, LoadOptions};

const LIMIT: Duration = Duration::from_secs(240);
const PAYEE: Address = Address::repeat_byte(0xfa);
const VALUE: u64 = 1_000;

/// Runs `payments` at `rate` per second while `schedule` switches the node's mode at the
/// given offsets from the start of the load; checks and prints the outcome.
async fn under_faults(name: &str, payments: usize, rate: f64, schedule: Vec<(Duration, Mode)>) {
    let net = Arc::new(Devnet::start().await.unwrap());
    let proxy = FaultProxy::start(net.rpc_url()).await;
    let url = proxy.url.clone();
    let d = settling_daemon(&net, name, 2, |c| c.chains[0].rpc_url = url).await;
    let dir = Arc::clone(&d.dir);
    let payers = devnet::payer_keys(name, 100);
    let addrs: Vec<_> = payers.iter().map(|p| p.address()).collect();
    net.fund(&addrs, U256::from(100_000_000u64)).await.unwrap();
    let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(250), None);
    let before = net.balance_of(PAYEE).await.unwrap();
    let opts = LoadOptions {
        payments,
        payers,
        rate: Some(rate),
        streams: 2,
        value: VALUE,
        payees: vec![PAYEE],
        run_id: 9,
    };
    let requests = loadgen::presign(&net.token_domain(), &opts, SystemClock.now_unix());
    let client = Client::connect(d.url()).await.unwrap();

    // The faults, at their times (this shapes the scenario; nothing waits on it). While the
    // node is healthy, before the first fault and after the last, every request is served.
    let faults = schedule.iter().filter(|(_, m)| *m != Mode::Up).count();
    let load_secs = payments as f64 / rate;
    let first = schedule.first().map_or(load_secs, |(at, _)| at.as_secs_f64());
    let last = schedule.last().map_or(load_secs, |(at, _)| at.as_secs_f64());
    let healthy = (rate * (first + (load_secs - last).max(0.0))) as usize;
    let switcher = {
        let proxy = Arc::new(proxy);
        let p = Arc::clone(&proxy);
        let task = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for (at, mode) in schedule {
                tokio::time::sleep_until(start + at).await;
                p.set(mode);
            }
        });
        (proxy, task)
    };
    let report = loadgen::run(&client, requests, Some(rate), 2).await;
    switcher.1.await.unwrap();
    switcher.0.set(Mode::Up);

    // Every refusal is a clear system condition: UNAVAILABLE, never a hang or a reason code.
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    let unavailable = tonic::Code::Unavailable as i32;
    assert!(report.errors.keys().all(|c| *c == unavailable), "{:?}", report.errors);
    assert_eq!(report.broken_streams, 0);
    // No request waits on a silent node for long: each RPC ends within RPC_TIMEOUT, and a
    // balance read can queue behind one that is timing out.
    let slowest = report.latencies.last().copied().unwrap_or_default();
    assert!(slowest <= 2 * RPC_TIMEOUT + Duration::from_secs(3), "a request waited {slowest:?}");
    let refused: usize = report.errors.values().sum();
    assert_eq!(report.acked.len() + refused, payments, "every request answered");
    assert!(
        report.acked.len() >= healthy * 8 / 10,
        "ingest serves while the node is healthy (~{healthy} expected): {}",
        report.summary()
    );

    // Afterwards everything acknowledged settles.
    wait_nothing_pending(&d.admin_url(), Duration::from_secs(120)).await;
    d.stop().await;
    let (log, batches) = ledger_after(dir.path(), net.chain_id());
    let ids: HashSet<_> = log.iter().map(|r| r.payment_id()).collect();
    let settled = log.iter().filter(|r| r.status == x402_batcher::ledger::Status::Settled).count();
    let duplicated = log.len() - ids.len();
    let lost = report.acked.len().saturating_sub(settled);
    let paid = net.balance_of(PAYEE).await.unwrap() - before;
    println!(
        "faults {name}: offered {payments}, faults {faults}, acked {}, refused {refused} (UNAVAILABLE), \
         settled {settled}, lost {lost}, duplicated {duplicated}; slowest answer {slowest:.1?}",
        report.acked.len()
    );
    assert_eq!(log.len(), report.acked.len(), "one outcome per acknowledged payment");
    assert_eq!((lost, duplicated), (0, 0));
    assert_eq!(paid, U256::from(VALUE * settled as u64), "the payee was paid each settled payment once");
    assert!(batches.iter().all(|b| b.status.is_final()), "no batch left open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_stopped_for_30_seconds_loses_nothing() {
    tokio::time::timeout(LIMIT, async {
        let schedule = vec![(Duration::from_secs(3), Mode::Down), (Duration::from_secs(33), Mode::Up)];
        under_faults("node-down", 1_600, 40.0, schedule).await;
    })
    .await
    .expect("within the time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_errors_then_nothing_loses_nothing() {
    tokio::time::timeout(LIMIT, async {
        let schedule = vec![
            (Duration::from_secs(3), Mode::Errors),
            (Duration::from_secs(13), Mode::Blackhole),
            (Duration::from_secs(43), Mode::Up),
        ];
        under_faults("node-errors", 2_000, 40.0, schedule).await;
    })
    .await
    .expect("within the time limit");
}
