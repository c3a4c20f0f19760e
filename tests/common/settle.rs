//! Helpers for settlement tests: a daemon with settler keys, a block producer, and polls
//! (with deadlines) for payment states.

use std::time::Duration;

use alloy::signers::local::PrivateKeySigner;
use x402_batcher::api::v1;
use x402_batcher::client;
use x402_batcher::config::Config;
use x402_batcher::ledger::{BatchRecord, PaymentRecord, RocksLedger};
use x402_batcher::tools::devnet::Devnet;
use x402_batcher::tools::testkit;
use x402_batcher::x402::SignedAuthorization;

use super::daemon::TestDaemon;

/// Writes `settlers`' keys to a file in `dir` and points the config at it, with settings
/// that keep tests quick: 50 ms rounds, 3 confirmations, batches cut at once when cheap.
pub fn settle_with(config: &mut Config, dir: &std::path::Path, settlers: &[PrivateKeySigner]) {
    let path = dir.join("settler.keys");
    x402_batcher::settle::write_key_file(&path, settlers).unwrap();
    config.settlement.settler_keys_file = Some(path);
    config.settlement.poll_interval_ms = 50;
    config.settlement.confirmations = 3;
    config.settlement.max_wait_ms = Some(1_000);
    // The nonce audit has its own test; here the engine alone decides.
    config.audit.nonce_interval_ms = 0;
}

/// A daemon on `net` over a new ledger directory (`d.dir`), settling with `settlers` new
/// funded settler accounts of `seed` ([`settle_with`]), then `tune`d.
pub async fn settling_daemon(
    net: &std::sync::Arc<Devnet>,
    seed: &str,
    settlers: usize,
    tune: impl FnOnce(&mut Config),
) -> TestDaemon {
    let settlers = net.new_settlers(seed, settlers).await.unwrap();
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let path = dir.path().to_owned();
    TestDaemon::start_on(std::sync::Arc::clone(net), dir, move |c| {
        settle_with(c, &path, &settlers);
        tune(c);
    })
    .await
}

/// Produces a block every `every` until dropped (optionally holding the base fee at a
/// fixed value, as a fee spike that does not decay).
pub struct Miner(tokio::task::JoinHandle<()>);

impl Miner {
    pub fn start(devnet: std::sync::Arc<Devnet>, every: Duration, base_fee: Option<u128>) -> Miner {
        Miner(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Some(fee) = base_fee {
                    let _ = devnet.set_next_base_fee(fee).await;
                }
                let _ = devnet.mine().await;
            }
        }))
    }
}

impl Drop for Miner {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `n` payments of 1,000 + i base units to `payee`, from `payers` in turn, their nonces
/// tagged with `tag` (distinct tags, distinct nonces).
pub fn payments(
    d: &TestDaemon,
    payers: &[PrivateKeySigner],
    n: usize,
    tag: u64,
    payee: alloy::primitives::Address,
) -> Vec<SignedAuthorization> {
    use x402_batcher::clock::Clock as _;
    let now = x402_batcher::clock::SystemClock.now_unix();
    (0..n)
        .map(|i| {
            testkit::PaymentBuilder::new(&payers[i % payers.len()], &d.domain(), now)
                .to(payee)
                .value(1_000 + i as u64)
                .nonce_index((tag << 32) | i as u64)
                .build()
        })
        .collect()
}

/// Submits a typed payment and returns its id; panics on a refusal.
pub async fn submit(d: &TestDaemon, signed: &SignedAuthorization) -> String {
    let mut c = d.ingest().await;
    let req = client::typed_request("t".into(), signed, &testkit::requirements_for(signed));
    let reply = c.submit(req).await.expect("no transport error").into_inner();
    match reply.outcome {
        Some(v1::submit_reply::Outcome::Accepted(a)) => a.payment_id,
        other => panic!("payment refused: {other:?}"),
    }
}

pub fn is_final(p: &v1::Payment) -> bool {
    matches!(
        v1::PaymentStatus::try_from(p.status),
        Ok(v1::PaymentStatus::Settled | v1::PaymentStatus::Failed | v1::PaymentStatus::Expired)
    )
}

/// Polls until every payment satisfies `done`, or panics after `limit` with their states.
pub async fn wait_for(
    d: &TestDaemon,
    ids: &[String],
    limit: Duration,
    done: impl Fn(&v1::Payment) -> bool,
) -> Vec<v1::Payment> {
    let mut c = d.payments().await;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut all = Vec::with_capacity(ids.len());
        for id in ids {
            let req =
                v1::GetPaymentRequest { key: Some(v1::get_payment_request::Key::PaymentId(id.clone())) };
            all.push(c.get_payment(req).await.unwrap().into_inner());
        }
        if all.iter().all(&done) {
            return all;
        }
        if tokio::time::Instant::now() > deadline {
            let states: Vec<_> = all.iter().map(|p| (p.status, p.failure_reason.clone())).collect();
            panic!("payments did not reach the expected state within {limit:?}: {states:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ledger's settlement log and batches, read after the daemon stopped.
pub fn ledger_after(d_dir: &std::path::Path, chain_id: u64) -> (Vec<PaymentRecord>, Vec<BatchRecord>) {
    super::store::books_and_batches(&RocksLedger::open(&d_dir.join("ledger")).unwrap(), chain_id)
}

pub fn status(p: &v1::Payment) -> v1::PaymentStatus {
    v1::PaymentStatus::try_from(p.status).unwrap()
}

/// Polls Admin GetStatus until no payment is pending (all final), or panics after `limit`.
pub async fn wait_nothing_pending(admin_url: &str, limit: Duration) {
    let mut admin = v1::admin_client::AdminClient::connect(admin_url.to_owned()).await.unwrap();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let pending = admin.get_status(v1::GetStatusRequest {}).await.unwrap().into_inner().pending_payments;
        if pending == 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{pending} payments still pending after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
