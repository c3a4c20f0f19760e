//! Heads pushed by the node (`[[chains]] ws_url`, a `newHeads` subscription over
//! WebSocket) on a real anvil with 1 s blocks: the engine settles on the heads it is sent
//! and reads none of its own; when the subscription is lost it polls, and once it is made
//! again it stops polling.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::Address;
use common::daemon::TestDaemon;
use common::proxy::{CountingProxy, FaultProxy, Mode};
use common::settle::{payments, settling_daemon, status, submit, wait_for};
use x402_batcher::api::v1;
use x402_batcher::tools::devnet::{Devnet, DevnetOptions};

const LIMIT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(30);
const PAYEE: Address = Address::repeat_byte(0x4e);
const HEAD: &str = "eth_getBlockByNumber latest";

/// A devnet with a block every second.
async fn devnet() -> Arc<Devnet> {
    Arc::new(
        Devnet::start_with(DevnetOptions { block_time_secs: Some(1), ..Default::default() }).await.unwrap(),
    )
}

/// A daemon on `net` whose RPC calls go through a counting proxy and whose heads come
/// over `ws_url`.
async fn daemon(net: &Arc<Devnet>, seed: &str, ws_url: String) -> (TestDaemon, CountingProxy) {
    let rpc = CountingProxy::start(net.rpc_url()).await;
    let url = rpc.url.clone();
    let d = settling_daemon(net, seed, 1, move |c| {
        c.chains[0].rpc_url = url;
        c.chains[0].ws_url = Some(ws_url);
        c.settlement.confirmations = 1;
    })
    .await;
    (d, rpc)
}

/// Waits until the chain made `n` more blocks.
async fn blocks(net: &Devnet, n: u64) {
    let from = net.block_number().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while net.block_number().await.unwrap() < from + n {
        assert!(tokio::time::Instant::now() < deadline, "the devnet stopped making blocks");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pays `n` payments one after the other, each settled before the next.
async fn pay(d: &TestDaemon, payers: &[alloy::signers::local::PrivateKeySigner], tag: u64, n: usize) {
    for item in payments(d, payers, n, tag, PAYEE) {
        let id = submit(d, &item).await;
        wait_for(d, &[id], WAIT, |p| status(p) == v1::PaymentStatus::Settled).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_heads_pushed_the_engine_settles_without_reading_a_head() {
    tokio::time::timeout(LIMIT, async {
        let net = devnet().await;
        let (d, rpc) = daemon(&net, "heads", net.ws_url().unwrap()).await;
        let payers = d.payers("heads", 4, 1_000_000).await;
        // The cadence is learnt from the first heads.
        blocks(&net, 6).await;
        let (reads, from) = (rpc.calls(HEAD), net.block_number().await.unwrap());
        pay(&d, &payers, 1, 4).await;
        blocks(&net, 2).await;
        let made = net.block_number().await.unwrap() - from;
        // Polling (50 ms in these tests, 25 ms near each block) would read dozens.
        assert!(made >= 4, "{made} blocks");
        assert_eq!(rpc.calls(HEAD) - reads, 0, "heads read over {made} blocks with a live subscription");
    })
    .await
    .expect("within the time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_is_polled_around_and_made_again() {
    tokio::time::timeout(LIMIT, async {
        let net = devnet().await;
        // The node's WebSocket through a proxy the test can cut.
        let proxy = FaultProxy::start(net.rpc_url()).await;
        let (d, rpc) = daemon(&net, "lost", proxy.url.replacen("http://", "ws://", 1)).await;
        let payers = d.payers("lost", 4, 1_000_000).await;
        blocks(&net, 6).await;

        // The node's WebSocket goes away: the engine polls, and payments settle.
        proxy.set(Mode::Down);
        let reads = rpc.calls(HEAD);
        pay(&d, &payers[..2], 1, 2).await;
        assert!(rpc.calls(HEAD) - reads >= 5, "no polling while the subscription was down");

        // It comes back: once subscribed again (1 s, then 2 s, ... later), no head is read.
        proxy.set(Mode::Up);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let reads = rpc.calls(HEAD);
            blocks(&net, 2).await;
            if rpc.calls(HEAD) == reads {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the subscription was not made again");
        }
        pay(&d, &payers[2..], 2, 2).await;
    })
    .await
    .expect("within the time limit");
}
