//! Settlement efficiency on a real anvil: a burst shares one batch, a lone payment goes as
//! the token's own call, gas limits follow what receipts taught, the L1 data fee of an
//! OP-stack chain is counted, and the daemon says what it is doing (Admin GetStatus and
//! `x402-batcher status`).

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, U256};
use alloy::providers::Provider;
use common::daemon::TestDaemon;
use common::settle::{Miner, ledger_after, payments, settling_daemon, status, submit, wait_for};
use x402_batcher::api::v1;
use x402_batcher::client;
use x402_batcher::ledger::BatchRecord;
use x402_batcher::tools::devnet::Devnet;
use x402_batcher::tools::testkit;
use x402_batcher::x402::SignedAuthorization;

const LIMIT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(60);
const PAYEE: Address = Address::repeat_byte(0xbe);

/// Submits every item at once (one task each over one connection); the ids, and the time
/// from the first submission to the last acknowledgement.
async fn burst(d: &TestDaemon, items: &[SignedAuthorization]) -> (Vec<String>, Duration) {
    let client = d.ingest().await;
    let started = Instant::now();
    let replies = futures::future::join_all(items.iter().map(|s| {
        let mut c = client.clone();
        let req = client::typed_request("t".into(), s, &testkit::requirements_for(s));
        async move { c.submit(req).await.expect("no transport error").into_inner() }
    }))
    .await;
    let took = started.elapsed();
    let ids = replies
        .into_iter()
        .map(|r| match r.outcome {
            Some(v1::submit_reply::Outcome::Accepted(a)) => a.payment_id,
            other => panic!("payment refused: {other:?}"),
        })
        .collect();
    (ids, took)
}

/// Submits `items` while settlement is paused, then resumes it: one round sees them all.
async fn wave(d: &TestDaemon, items: &[SignedAuthorization]) -> Vec<String> {
    let mut admin = d.admin().await;
    let pause = |on| v1::UpdatePolicyRequest { paused: Some(on), ..Default::default() };
    admin.update_policy(pause(true)).await.unwrap();
    let (ids, _) = burst(d, items).await;
    admin.update_policy(pause(false)).await.unwrap();
    ids
}

fn settled(p: &v1::Payment) -> bool {
    status(p) == v1::PaymentStatus::Settled
}

/// The batch that settled payment `id` (by the tx hash its record shows).
fn batch_of<'a>(batches: &'a [BatchRecord], p: &v1::Payment) -> &'a BatchRecord {
    batches
        .iter()
        .find(|b| b.inclusion.is_some_and(|i| i.tx_hash.to_string() == p.tx_hash))
        .unwrap_or_else(|| panic!("no batch carries {}", p.tx_hash))
}

async fn tx_to(net: &Devnet, hash: &str) -> Option<Address> {
    let tx = net.provider().get_transaction_by_hash(hash.parse().unwrap()).await.unwrap().unwrap();
    alloy::consensus::Transaction::to(&tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_payment_goes_at_once_as_the_tokens_own_call_and_a_burst_behind_it_as_one_batch() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        // Defaults: batches of up to 200, the seeds' gas until a receipt.
        let d = settling_daemon(&net, "eff", 1, |_| {}).await;
        let payers = d.payers("burst", 200, 1_000_000).await;
        let miner = Miner::start(Arc::clone(&net), Duration::from_millis(100), None);

        // Alone, with nothing else arriving: the token's transferWithAuthorization, sent to
        // the token at once (no company is expected, so none is waited for).
        let lone = payments(&d, &payers[..1], 1, 1, PAYEE);
        let id = submit(&d, &lone[0]).await;
        let one = wait_for(&d, &[id], WAIT, settled).await.remove(0);
        assert_eq!(tx_to(&net, &one.tx_hash).await, Some(net.token()), "a batch of one is a direct call");

        // The first of a burst leaves alone too; the other 199 arrive while its transaction
        // is in flight (no block is made meanwhile), and share the settler's next one.
        drop(miner);
        net.set_automine(false).await.unwrap();
        let items = payments(&d, &payers, 200, 2, PAYEE);
        let (mut ids, _) = burst(&d, &items[..1]).await;
        wait_for(&d, &ids, WAIT, |p| status(p) == v1::PaymentStatus::Submitted).await;
        let (rest, _) = burst(&d, &items[1..]).await;
        ids.extend(rest.iter().cloned());
        net.set_automine(true).await.unwrap();
        let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(100), None);
        let done = wait_for(&d, &ids, WAIT, settled).await;
        let txs: HashSet<_> = done.iter().map(|p| p.tx_hash.clone()).collect();
        assert_eq!(txs.len(), 2, "the first alone, the rest together: {txs:?}");
        assert_eq!(tx_to(&net, &done[1].tx_hash).await, Some(x402_batcher::chain::MULTICALL3));

        let dir = Arc::clone(&d.dir);
        d.stop().await;
        let (_, batches) = ledger_after(dir.path(), net.chain_id());
        assert_eq!(batch_of(&batches, &one).cut_reason, "no_company");
        let big = batch_of(&batches, &done[1]);
        assert_eq!(big.items.len(), 199);
        let inc = big.inclusion.unwrap();
        assert!(big.gas_limit >= inc.gas_used && big.gas_limit <= x402_batcher::chain::TX_GAS_CAP);
    })
    .await
    .expect("within the time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_warm_up_gas_limits_are_within_a_quarter_of_the_gas_used() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let d = settling_daemon(&net, "warm", 1, |_| {}).await;
        let payers = d.payers("warm", 200, 1_000_000).await;
        // A funded payee, as in steady operation (a fresh one costs ~20k more per item once).
        net.fund(&[PAYEE], U256::from(1)).await.unwrap();
        let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(100), None);
        let mut next = 0usize;
        // Batches of several sizes, and lone payments, each from payers not used before.
        for (tag, size) in (10u64..).zip([1, 20, 1, 50, 1, 10, 80, 1, 30]) {
            let items = payments(&d, &payers[next..next + size], size, tag, PAYEE);
            next += size;
            let ids = wave(&d, &items).await;
            wait_for(&d, &ids, WAIT, settled).await;
        }
        let dir = Arc::clone(&d.dir);
        d.stop().await;
        let (_, batches) = ledger_after(dir.path(), net.chain_id());
        let mut seen_direct = false;
        let mut seen_batch = false;
        let mut checked = 0;
        for b in &batches {
            let inc = b.inclusion.expect("every batch mined");
            let warm = if b.items.len() == 1 { seen_direct } else { seen_batch };
            let ratio = b.gas_limit as f64 / inc.gas_used as f64;
            eprintln!(
                "{} items: limit {} used {} ({ratio:.3}x){}",
                b.items.len(),
                b.gas_limit,
                inc.gas_used,
                if warm { "" } else { " (warm-up)" }
            );
            assert!(b.gas_limit >= inc.gas_used);
            if warm {
                assert!(
                    ratio <= 1.25,
                    "{} items: limit {} is {ratio:.3}x the {} used",
                    b.items.len(),
                    b.gas_limit,
                    inc.gas_used
                );
                checked += 1;
            }
            if b.items.len() == 1 { seen_direct = true } else { seen_batch = true }
        }
        assert_eq!(batches.len(), 9, "one settlement per wave");
        assert_eq!(checked, 7, "every settlement after each shape's first was checked");
    })
    .await
    .expect("within the time limit");
}

/// Polls Admin GetStatus until `done` holds, or panics with the last status after 30 s.
async fn status_until(d: &TestDaemon, done: impl Fn(&v1::Status) -> bool) -> v1::Status {
    let mut admin = d.admin().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = admin.get_status(v1::GetStatusRequest {}).await.unwrap().into_inner();
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "status never matched: {s:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_chain_its_payments_and_both_settlers_with_real_values() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let d = settling_daemon(&net, "status", 2, |_| {}).await;
        let payers = d.payers("status", 2, 1_000_000).await;
        // Nothing is mined until the test says: the batch stays open for status to show.
        net.set_automine(false).await.unwrap();
        let items = payments(&d, &payers, 2, 30, PAYEE);
        let ids = wave(&d, &items).await;
        let open = status_until(&d, |s| s.settlers.iter().any(|t| !t.open_tx_hash.is_empty())).await;
        let head = net.provider().get_block_number().await.unwrap();
        assert_eq!(open.chains.len(), 1);
        let c = &open.chains[0];
        assert_eq!(c.chain_id, net.chain_id());
        assert!(c.head_block > 0 && c.head_block <= head, "head {} vs the node's {head}", c.head_block);
        assert!(c.base_fee_wei.parse::<u128>().unwrap() > 0 && c.head_time > 0 && c.updated_at_ms > 0);
        let t = &c.tokens[0];
        assert_eq!((t.token.parse::<Address>().unwrap(), t.pending_payments), (net.token(), 2));
        let value: U256 = items.iter().map(|i| i.authorization.value).sum();
        assert_eq!(t.pending_value, value.to_string());
        assert_eq!(
            (t.batch_fixed_gas, t.batch_gas_per_payment),
            (40_000, 60_000),
            "the seeds before a receipt"
        );
        let sender = open.settlers.iter().find(|t| !t.open_tx_hash.is_empty()).unwrap();
        assert!(!sender.open_batch_id.is_empty() && sender.pending_transactions == 1);
        let pending_tx =
            net.provider().get_transaction_by_hash(sender.open_tx_hash.parse().unwrap()).await.unwrap();
        assert!(pending_tx.is_some(), "the open transaction is the one the node holds");
        let addresses: HashSet<Address> = open.settlers.iter().map(|t| t.address.parse().unwrap()).collect();
        assert_eq!(addresses.len(), 2, "both settlers listed");
        for t in &open.settlers {
            let addr: Address = t.address.parse().unwrap();
            assert!(t.balance_known && t.nonce_known, "{t:?}");
            assert_eq!(t.native_balance_wei, net.provider().get_balance(addr).await.unwrap().to_string());
            assert_eq!(t.next_nonce, 0, "read before its first transaction was mined");
        }

        // Mined: the open batch closes; the payments settle.
        let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(100), None);
        wait_for(&d, &ids, WAIT, settled).await;
        let after = status_until(&d, |s| s.settlers.iter().all(|t| t.open_tx_hash.is_empty())).await;
        assert_eq!(after.pending_payments, 0);

        // The command: a table for a person, JSON for a script.
        let run = |json: bool| {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_x402-batcher"));
            cmd.args(["status", "--admin", &d.admin_url()]);
            if json {
                cmd.arg("--json");
            }
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        };
        let table = run(false);
        for t in &after.settlers {
            assert!(table.contains(&t.address), "{table}");
        }
        assert!(table.contains("settler") && table.contains(&net.chain_id().to_string()), "{table}");
        let json: serde_json::Value = serde_json::from_str(&run(true)).unwrap();
        assert_eq!(json["chains"][0]["chain_id"], net.chain_id());
        assert_eq!(json["settlers"].as_array().unwrap().len(), 2);
        assert!(json["settlers"].as_array().unwrap().iter().all(|t| t["native_balance_wei"].is_string()));
        d.stop().await;
    })
    .await
    .expect("within the time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_an_op_stack_chain_the_l1_data_fee_counts_in_the_cost_of_a_batch() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        // An L1 fee of 0.001 ETH per transaction (plus 16 wei a byte): ten times the default
        // cost target, so a lone payment is no longer cheap enough to go at once.
        let (base, per_byte) = (1_000_000_000_000_000u128, 16u128);
        net.install_l1_fee_oracle(U256::from(base), U256::from(per_byte)).await.unwrap();
        let d = settling_daemon(&net, "l1", 1, |c| {
            c.chains[0].op_stack = true;
            c.settlement.max_wait_ms = Some(1_500);
        })
        .await;
        let payers = d.payers("l1", 1, 1_000_000).await;
        let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(100), None);
        let items = payments(&d, &payers, 1, 40, PAYEE);
        let id = submit(&d, &items[0]).await;
        // What the daemon read from the oracle, per shape, while the payment waits.
        let s =
            status_until(&d, |s| s.chains.iter().flat_map(|c| &c.tokens).any(|t| t.l1_fee_direct_wei != "0"))
                .await;
        let t = &s.chains[0].tokens[0];
        let fee = |data: alloy::primitives::Bytes| base + per_byte * data.len() as u128;
        let one = std::slice::from_ref(&items[0]);
        let two = [items[0].clone(), items[0].clone()];
        let (direct, b1, b2) = (
            fee(x402_batcher::chain::settlement_call(one).1),
            fee(x402_batcher::chain::aggregate3_calldata(one)),
            fee(x402_batcher::chain::aggregate3_calldata(&two)),
        );
        assert_eq!(t.l1_fee_direct_wei, direct.to_string());
        assert_eq!(t.l1_fee_batch_per_payment_wei, (b2 - b1).to_string());
        assert_eq!(t.l1_fee_batch_fixed_wei, (b1 - (b2 - b1)).to_string());
        let p = wait_for(&d, &[id], WAIT, settled).await.remove(0);
        let dir = Arc::clone(&d.dir);
        d.stop().await;
        let (_, batches) = ledger_after(dir.path(), net.chain_id());
        // Alone and dear (its L1 fee): held to the maximum wait, not cut at the linger as
        // on a chain without an L1 fee (the first test).
        assert_eq!(batch_of(&batches, &p).cut_reason, "max_wait");
    })
    .await
    .expect("within the time limit");
}
