//! The x402 ecosystem's own packages against the facilitator HTTP API, on anvil: Express
//! APIs protected by `x402-express` 1.2.0 (v1) and `@x402/express` 2.27.0 (v2), configured
//! with the daemon's URL and a bearer token, paid for by `x402-axios` 0.7.2, `@x402/fetch`
//! 2.27.0 and `@x402/axios` 2.11.0 (ops/interop, pinned, installed by ops/setup.sh).
//!
//! The Node side (`ops/interop/run.mjs`) runs the middlewares and clients and reports what
//! they saw; this side runs the chain and the daemon, steers settlement, and checks the
//! ledger and the chain.

// A failed unwrap fails the test that made it.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256, U256, address};
use alloy::signers::local::PrivateKeySigner;
use common::daemon::TestDaemon;
use common::settle::{Miner, settle_with};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;
use x402_batcher::api::v1;
use x402_batcher::config::{CredentialConfig, Role, SettleMode};
use x402_batcher::ledger::LedgerStore as _;
use x402_batcher::ledger::{AuthKey, PaymentRecord, RocksLedger, Status};
use x402_batcher::tools::devnet::{Devnet, DevnetOptions, X402_CHAIN_ID};

/// Longest one Node scenario may run.
const SCENARIO_LIMIT: Duration = Duration::from_secs(240);
/// What every paid route costs, in base units.
const PRICE: u64 = 1_000;
const PAY_TO: Address = address!("0x534e3bcb27673292EB2b58fdeD126624F7d67f21");
const API_TOKEN: &str = "x4b_interop_api_server";
const ADMIN_TOKEN: &str = "x4b_interop_operator";
const CLIENTS: [&str; 3] = ["v1-axios", "v2-fetch", "v2-axios"];

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/interop")
}

fn credential(name: &str, role: Role, token: &str) -> CredentialConfig {
    CredentialConfig {
        name: name.into(),
        role,
        token_sha256: Some(hex::encode(x402_batcher::auth::hash_token(token))),
        cert_name: None,
    }
}

/// A devnet that is `base-sepolia` to the v1 packages, a daemon settling on it with its
/// facilitator in `mode`, and a funded payer per client.
struct World {
    net: Arc<Devnet>,
    daemon: TestDaemon,
    payers: BTreeMap<&'static str, PrivateKeySigner>,
    _miner: Miner,
}

impl World {
    async fn start(seed: &str, mode: SettleMode, settle_timeout_ms: u64) -> World {
        let net = Arc::new(
            Devnet::start_with(DevnetOptions { chain_id: X402_CHAIN_ID, ..Default::default() })
                .await
                .unwrap(),
        );
        Self::start_on(net, seed, mode, settle_timeout_ms).await
    }

    async fn start_on(net: Arc<Devnet>, seed: &str, mode: SettleMode, settle_timeout_ms: u64) -> World {
        let payers: BTreeMap<_, _> = CLIENTS
            .iter()
            .zip(x402_batcher::tools::devnet::payer_keys(&format!("interop {seed}"), CLIENTS.len()))
            .map(|(k, p)| (*k, p))
            .collect();
        let addrs: Vec<_> = payers.values().map(|p| p.address()).collect();
        net.fund(&addrs, U256::from(10_000_000u64)).await.unwrap();
        let settlers = net.new_settlers(seed, 2).await.unwrap();
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let path = dir.path().to_owned();
        let daemon = TestDaemon::start_on(Arc::clone(&net), dir, move |c| {
            settle_with(c, &path, &settlers);
            c.facilitator.listen = Some("127.0.0.1:0".parse().unwrap());
            c.facilitator.settle_mode = mode;
            c.facilitator.settle_timeout_ms = settle_timeout_ms;
            c.credentials =
                vec![credential("api-1", Role::Api, API_TOKEN), credential("ops", Role::Admin, ADMIN_TOKEN)];
        })
        .await;
        // Blocks besides the one each transaction gets, so confirmations accrue.
        let miner = Miner::start(Arc::clone(&net), Duration::from_millis(200), None);
        World { net, daemon, payers, _miner: miner }
    }

    /// The scenario's config for run.mjs.
    fn node_config(&self, scenario: &str, clients: &[&str], token: Option<&str>) -> Value {
        let payers: serde_json::Map<_, _> = self
            .payers
            .iter()
            .map(|(k, p)| ((*k).to_owned(), json!(format!("0x{}", hex::encode(p.to_bytes())))))
            .collect();
        json!({
            "scenario": scenario,
            "facilitator": self.daemon.facilitator_url(),
            "token": token,
            "chainId": self.net.chain_id(),
            "v1Network": "base-sepolia",
            "asset": self.net.token().to_checksum(None),
            "assetName": "USD Coin",
            "assetVersion": "2",
            "decimals": 6,
            "payTo": PAY_TO.to_checksum(None),
            "price": PRICE.to_string(),
            "payers": payers,
            "clients": clients,
            "requests": 200,
            "concurrency": 20,
            "upfront": 10,
        })
    }

    /// Pauses or resumes settlement through Admin.
    async fn set_paused(&self, paused: bool) {
        let channel =
            tonic::transport::Channel::from_shared(self.daemon.admin_url()).unwrap().connect().await.unwrap();
        let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {ADMIN_TOKEN}").parse().unwrap();
        let mut admin =
            v1::admin_client::AdminClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", bearer.clone());
                Ok(r)
            });
        admin
            .update_policy(v1::UpdatePolicyRequest { paused: Some(paused), ..Default::default() })
            .await
            .unwrap();
    }

    /// The ledger as it stands (read-only, beside the running daemon).
    fn ledger(&self) -> RocksLedger {
        RocksLedger::open_read_only(&self.daemon.dir.path().join("ledger")).unwrap()
    }

    fn record(&self, payer: Address, nonce: B256) -> Option<PaymentRecord> {
        self.ledger().get(&AuthKey::new(self.net.chain_id(), self.net.token(), payer, nonce)).unwrap()
    }

    /// Polls until no payment is pending (every one final), or panics.
    async fn wait_all_final(&self, limit: Duration) -> Vec<PaymentRecord> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let ledger = self.ledger();
            if ledger.pending() == 0 {
                return ledger.records().unwrap();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} payments still pending after {limit:?}",
                ledger.pending()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Runs one scenario of run.mjs; `on_event` sees each `EVENT` line as it comes. Returns the
/// `RESULT`.
async fn run_node(config: &Value, mut on_event: impl AsyncFnMut(Value)) -> Value {
    let dir = interop_dir();
    assert!(
        dir.join("node_modules/@x402/express").exists(),
        "the x402 packages are not installed under {}: run ops/setup.sh",
        dir.display()
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config.to_string()).unwrap();
    let mut child = tokio::process::Command::new("node")
        .arg(dir.join("run.mjs"))
        .arg(file.path())
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node starts");
    let stderr = child.stderr.take().unwrap();
    let errors = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut kept = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("node: {line}");
            kept.push(line);
        }
        kept
    });
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let run = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(e) = line.strip_prefix("EVENT ") {
                on_event(serde_json::from_str(e).unwrap()).await;
            } else if let Some(r) = line.strip_prefix("RESULT ") {
                return Some(serde_json::from_str::<Value>(r).unwrap());
            } else {
                eprintln!("node: {line}");
            }
        }
        None
    };
    let result = tokio::time::timeout(SCENARIO_LIMIT, run).await.expect("the scenario finished in time");
    let _ = child.wait().await;
    let stderr = errors.await.unwrap();
    result.unwrap_or_else(|| panic!("run.mjs gave no result; stderr:\n{}", stderr.join("\n")))
}

fn nonce(v: &Value) -> B256 {
    v.as_str().expect("a nonce").parse().unwrap()
}

fn address_of(v: &Value) -> Address {
    v.as_str().expect("an address").parse().unwrap()
}

/// Each client pays 200 requests at concurrency 20 through its middleware: every request
/// answered 200, each handler run exactly once, every payment settled on chain in fewer
/// transactions than payments; a replayed header gets 402 without running the handler; a
/// handler's 500 charges nothing; v2's `upfront` routes work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_middlewares_and_clients_pay_through_the_facilitator() {
    let w = World::start("pay", SettleMode::Included, 30_000).await;
    let before: BTreeMap<_, _> = {
        let mut m = BTreeMap::new();
        for (k, p) in &w.payers {
            m.insert(*k, w.net.balance_of(p.address()).await.unwrap());
        }
        m
    };
    let result = run_node(&w.node_config("pay", &CLIENTS, Some(API_TOKEN)), async |_| {}).await;
    let facilitator = &result["facilitator"];
    eprintln!("facilitator saw: {facilitator}");

    let mut paid_per_payer = BTreeMap::new();
    for kind in CLIENTS {
        let c = &result["clients"][kind];
        assert_eq!(c["statuses"], json!({"200": 200}), "{kind}: every paid request answered 200: {c}");
        assert_eq!(c["handlerRuns"]["once"], 200, "{kind}: each handler ran exactly once: {c}");
        assert!(
            !c["settleTransactions"].as_array().unwrap().is_empty(),
            "{kind}: settle answers name a transaction"
        );
        assert_eq!(c["replay"]["status"], 402, "{kind}: a replayed header is refused");
        assert_eq!(c["replay"]["handlerRuns"], 0, "{kind}: the handler did not run for the replay");
        assert_eq!(c["fail"]["statuses"], json!({"500": 1}), "{kind}: the failing handler's answer: {c}");
        let payer = w.payers[kind].address();
        assert_eq!(
            w.record(payer, nonce(&c["fail"]["nonce"])),
            None,
            "{kind}: a handler's 500 records nothing"
        );
        let mut paid = 200;
        if kind.starts_with("v2") {
            assert_eq!(
                c["upfront"]["statuses"],
                json!({"200": 10}),
                "{kind}: upfront routes answer 200: {c}"
            );
            assert!(c["upfront"]["handlerRuns"].as_array().unwrap().iter().all(|n| n == 1), "{kind}: {c}");
            paid += 10;
        }
        paid_per_payer.insert(kind, paid);
    }
    assert_eq!(
        facilitator["verify"]["200 invalid_exact_evm_nonce_already_used"], 3,
        "each replay was refused by /verify: {facilitator}"
    );

    let records = w.wait_all_final(Duration::from_secs(120)).await;
    let total: u64 = paid_per_payer.values().sum();
    assert_eq!(records.len() as u64, total, "one payment per paid request, nothing else recorded");
    assert!(records.iter().all(|r| r.status == Status::Settled), "every payment settled");
    assert!(records.iter().all(|r| r.submission.api_server == "api-1"), "named after the credential");
    let transactions: std::collections::BTreeSet<_> = records.iter().map(|r| r.tx_hash.unwrap()).collect();
    assert!(
        (transactions.len() as u64) < total,
        "{} transactions for {total} payments: settled in batches",
        transactions.len()
    );
    for (kind, paid) in paid_per_payer {
        let p = w.payers[kind].address();
        let now = w.net.balance_of(p).await.unwrap();
        assert_eq!(
            before[kind] - now,
            U256::from(paid * PRICE),
            "{kind}: charged once per paid request, on chain"
        );
    }
    eprintln!("{total} paid requests settled in {} transactions", transactions.len());
}

/// With settlement paused past the settle timeout, a v2 settle answers
/// `settlement_pending` with the payment's id; the client's one retry waits on the same
/// payment and succeeds once settlement resumes. A v2 settle whose retry also times out,
/// and a v1 settle (no retry) are withdrawn: 402, nothing charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_pending_and_its_retry() {
    let w = World::start("pending", SettleMode::Included, 2_000).await;
    w.set_paused(true).await;
    let resumed = std::sync::atomic::AtomicBool::new(false);
    let result = run_node(&w.node_config("pending", &["v2-fetch"], Some(API_TOKEN)), async |event| {
        if event["kind"] == "settlement_pending" && !resumed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            w.set_paused(false).await;
        }
    })
    .await;
    let c = &result["clients"]["v2-fetch"];
    assert_eq!((c["status"].clone(), c["handlerRuns"].clone()), (json!(200), json!(1)), "{result}");
    let replies = result["facilitator"]["settleReplies"].as_array().unwrap();
    assert_eq!(replies.len(), 2, "one settle and its one retry: {result}");
    assert_eq!(replies[0]["errorReason"], "settlement_pending");
    let record = w.record(w.payers["v2-fetch"].address(), nonce(&c["nonce"])).unwrap();
    assert_eq!(
        replies[0]["transaction"],
        record.payment_id().to_string(),
        "no transaction yet: the payment's id"
    );
    assert_eq!(replies[1]["success"], true, "the retry waited on the same payment");
    assert_eq!(replies[1]["transaction"], record.tx_hash.unwrap().to_string());

    // Paused for good: both clients' settles end withdrawn.
    w.set_paused(true).await;
    let result =
        run_node(&w.node_config("pending", &["v2-axios", "v1-axios"], Some(API_TOKEN)), async |_| {}).await;
    let replies = result["facilitator"]["settleReplies"].as_array().unwrap();
    let reasons: Vec<_> = replies.iter().map(|r| r["errorReason"].as_str().unwrap_or("success")).collect();
    assert_eq!(
        reasons,
        ["settlement_pending", "unexpected_settle_error", "unexpected_settle_error"],
        "v2: pending, then the retry's final answer; v1: the final answer at once: {result}"
    );
    for kind in ["v2-axios", "v1-axios"] {
        let c = &result["clients"][kind];
        assert_eq!(c["status"], 402, "{kind}: the withdrawn payment is not served: {c}");
        let payer = w.payers[kind].address();
        let record = w.record(payer, nonce(&c["nonce"])).unwrap();
        assert_eq!(
            (record.status, record.failure_reason.as_str()),
            (Status::Failed, "unexpected_settle_error")
        );
        assert!(record.failure_message.contains("withdrawn"), "{}", record.failure_message);
        assert_eq!(
            w.net.balance_of(payer).await.unwrap(),
            U256::from(10_000_000u64),
            "{kind}: nothing charged"
        );
    }
    w.set_paused(false).await;
}

/// `accepted` answers at once with an empty transaction and the payment's id; `included`
/// with the hash of the including transaction; `confirmed` once the payment is settled at
/// depth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_settle_mode_answers_as_specified() {
    let net = Arc::new(
        Devnet::start_with(DevnetOptions { chain_id: X402_CHAIN_ID, ..Default::default() }).await.unwrap(),
    );
    for mode in [SettleMode::Accepted, SettleMode::Included, SettleMode::Confirmed] {
        let w = World::start_on(Arc::clone(&net), mode.as_str(), mode, 30_000).await;
        let result =
            run_node(&w.node_config("modes", &["v1-axios", "v2-fetch"], Some(API_TOKEN)), async |_| {}).await;
        for kind in ["v1-axios", "v2-fetch"] {
            let c = &result["clients"][kind];
            assert_eq!(c["status"], 200, "{mode:?} {kind}: {result}");
            let record = w.record(w.payers[kind].address(), nonce(&c["nonce"])).unwrap();
            let reply = result["facilitator"]["settleReplies"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["extensions"]["x402-batcher"]["paymentId"] == record.payment_id().to_string())
                .unwrap_or_else(|| panic!("{mode:?} {kind}: no settle reply for the payment: {result}"))
                .clone();
            assert_eq!(reply["success"], true);
            assert_eq!(address_of(&reply["payer"]), w.payers[kind].address());
            let status = reply["extensions"]["x402-batcher"]["status"].as_str().unwrap();
            match mode {
                SettleMode::Accepted => {
                    assert_eq!((reply["transaction"].as_str(), status), (Some(""), "accepted"), "{reply}");
                    let url = reply["extensions"]["x402-batcher"]["statusUrl"].as_str().unwrap();
                    assert_eq!(url, format!("/payments/{}", record.payment_id()));
                }
                SettleMode::Included => {
                    assert!(status == "included" || status == "settled", "{reply}");
                    let tx: B256 = reply["transaction"].as_str().unwrap().parse().unwrap();
                    w.wait_all_final(Duration::from_secs(60)).await;
                    let settled = w.record(w.payers[kind].address(), nonce(&c["nonce"])).unwrap();
                    assert_eq!(settled.tx_hash, Some(tx), "the transaction that carried it");
                }
                SettleMode::Confirmed => {
                    assert_eq!(status, "settled", "{reply}");
                    assert_eq!(reply["transaction"], record.tx_hash.unwrap().to_string());
                }
            }
        }
        w.daemon.stop().await;
    }
}

/// Without a credential, with an unknown token or with an operator's, the facilitator
/// refuses (401, 401, 403) and says why; the middlewares configured with a wrong token fail
/// closed: nothing is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_or_no_credential_is_refused() {
    let w = World::start("auth", SettleMode::Included, 30_000).await;
    let http = reqwest::Client::new();
    let url = w.daemon.facilitator_url();
    for (token, path, status) in [
        (None, "/supported", 401),
        (None, "/verify", 401),
        (Some("x4b_not_a_token"), "/settle", 401),
        (Some(ADMIN_TOKEN), "/verify", 403),
        (Some(API_TOKEN), "/verify", 400),
        (None, "/health", 200),
    ] {
        let mut req = if path.ends_with("supported") || path.ends_with("health") {
            http.get(format!("{url}{path}"))
        } else {
            http.post(format!("{url}{path}")).body("{}")
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let reply = req.send().await.unwrap();
        assert_eq!(reply.status().as_u16(), status, "{token:?} {path}");
        let body: Value = reply.json().await.unwrap();
        if status == 401 || status == 403 {
            assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "a refusal says why: {body}");
        }
    }

    let result =
        run_node(&w.node_config("auth", &["v1-axios", "v2-fetch"], Some("x4b_wrong")), async |_| {}).await;
    for kind in ["v1-axios", "v2-fetch"] {
        let c = &result["clients"][kind];
        assert_ne!(c["status"], 200, "{kind}: {result}");
        assert_eq!(c["handlerRuns"], 0, "{kind}: nothing served: {result}");
    }
    assert_eq!(w.ledger().records().unwrap().len(), 0, "nothing recorded");
}

/// The README's main job with its middleware flow, small: after the gRPC load, x402-axios
/// and @x402/fetch pay through x402-express and @x402/express with the daemon as
/// facilitator; every paid request settles, each replay is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_the_middleware_flow() {
    let dir = tempfile::tempdir().unwrap();
    let opts = x402_batcher::tools::demo::DemoOptions {
        payments: 100,
        payers: 10,
        rate: None,
        dir: Some(dir.path().to_owned()),
        http_requests: 40,
        ..Default::default()
    };
    let report = tokio::time::timeout(SCENARIO_LIMIT, x402_batcher::tools::demo::run(&opts))
        .await
        .expect("the demo finished in time")
        .unwrap();
    let http = report.http.expect("the middleware flow ran");
    assert_eq!(http.paid.values().sum::<u64>(), 80, "{http:?}");
    assert_eq!((http.settled, http.replays_refused, http.replays), (80, 2, 2), "{http:?}");
    assert!(http.batches > 0 && http.batches < 80, "settled in batches: {http:?}");
    assert_eq!(report.settled, 100, "the gRPC fleet's payments too");
}
