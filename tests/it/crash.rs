//! Crash safety: the daemon binary is SIGKILLed at varied points under a mixed load
//! (submissions while it settles earlier ones), twenty times, over one ledger. After each
//! restart every acknowledged payment is present and on its way to settled, and no nonce
//! can be accepted twice; each round ends with SIGTERM, which must drain and exit 0. In the
//! end every acknowledged payment is settled exactly once. A second test kills it between
//! sending a batch and its confirmation.

use crate::common;

use std::process::Command;
use std::time::Duration;

use alloy::primitives::{B256, U256};
use common::binary::{settling_config, start, write_config};
use x402_batcher::api::v1;
use x402_batcher::client::{self, Client};
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::ledger::LedgerStore as _;
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::tools::loadgen::{self, LoadOptions};
use x402_batcher::tools::testkit::{self, PaymentBuilder};

const ROUNDS: u64 = 20;
const PAYMENTS_PER_ROUND: usize = 600;
/// Slow enough that the load lasts ~0.3 s, so every kill point lands inside it.
const RATE: f64 = 2_000.0;
const LIMIT: Duration = Duration::from_secs(300);

fn key_of(req: &v1::SubmitRequest) -> v1::AuthorizationKey {
    let Some(v1::submit_request::Payment::Authorization(a)) = &req.payment else { unreachable!("typed") };
    v1::AuthorizationKey {
        chain_id: a.chain_id,
        token: a.token.clone(),
        from: a.from.clone(),
        nonce: a.nonce.clone(),
    }
}

/// The ledger's last sequence number, through `client`'s Admin stub (on the Admin listener).
async fn ledger_seq(client: &mut Client) -> u64 {
    client.admin.get_status(v1::GetStatusRequest {}).await.map(|s| s.into_inner().ledger_seq).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_payment() {
    tokio::time::timeout(LIMIT, async {
        let net = Devnet::start().await.unwrap();
        let payers = devnet::payer_keys("crash", 20);
        let addrs: Vec<_> = payers.iter().map(|p| p.address()).collect();
        net.fund(&addrs, U256::from(100_000_000u64)).await.unwrap();

        // Mixed load: submissions, and settlement of what was accepted in earlier rounds.
        let net = std::sync::Arc::new(net);
        let settler = net.new_settlers("crash-mixed", 1).await.unwrap().remove(0);
        let dir = tempfile::tempdir().unwrap();
        let config = settling_config(dir.path(), &net, &settler, "confirmations = 2\n");
        let _miner = common::settle::Miner::start(std::sync::Arc::clone(&net), Duration::from_millis(200), None);
        let payee_before = net.balance_of(testkit::DEFAULT_PAYEE).await.unwrap();
        let mut all_acked: Vec<v1::AuthorizationKey> = Vec::new();

        let (mut offered, mut acked_total, mut lost, mut double) = (0, 0, 0, 0);
        for round in 0..ROUNDS {
            let opts = LoadOptions {
                payments: PAYMENTS_PER_ROUND,
                payers: payers.clone(),
                rate: Some(RATE),
                streams: 2,
                value: 1_000,
                payees: vec![testkit::DEFAULT_PAYEE],
                run_id: round + 1,
            };
            let now = SystemClock.now_unix();
            let requests = loadgen::presign(&net.token_domain(), &opts, now);
            offered += requests.len();

            let mut daemon = start(&config);
            let client = Client::connect(daemon.url.clone()).await.unwrap();
            let mut admin = Client::connect(daemon.admin_url.clone()).await.unwrap();
            let base = ledger_seq(&mut admin).await;
            let load = {
                let (client, requests) = (client.clone(), requests.clone());
                tokio::spawn(async move { loadgen::run(&client, requests, Some(RATE), 2).await })
            };
            // A kill point that differs per round: after 1..=500 of the 600 changes.
            let threshold = base + 1 + (round * 197 + 13) % 500;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while ledger_seq(&mut admin).await < threshold {
                assert!(tokio::time::Instant::now() < deadline, "round {round}: load did not progress");
                tokio::task::yield_now().await;
            }
            daemon.child.kill().unwrap(); // SIGKILL
            daemon.child.wait().unwrap();
            let report = load.await.unwrap();
            acked_total += report.acked.len();
            all_acked.extend(report.acked.iter().map(|&i| key_of(&requests[i])));
            assert!(report.acked.len() < requests.len(), "round {round}: the kill came after the load ended");

            let mut daemon = start(&config);
            let mut client = Client::connect(daemon.url.clone()).await.unwrap();
            for &i in &report.acked {
                let got = client
                    .payments
                    .get_payment(v1::GetPaymentRequest {
                        key: Some(v1::get_payment_request::Key::AuthorizationKey(key_of(&requests[i]))),
                    })
                    .await;
                // Anywhere on its way to settled; never gone, failed or expired.
                let alive = [
                    v1::PaymentStatus::Accepted,
                    v1::PaymentStatus::Batched,
                    v1::PaymentStatus::Submitted,
                    v1::PaymentStatus::Included,
                    v1::PaymentStatus::Settled,
                ];
                match got {
                    Ok(p) if alive.iter().any(|s| *s as i32 == p.get_ref().status) => {}
                    other => {
                        lost += 1;
                        eprintln!("round {round}: acked payment {i} is missing or wrong: {other:?}");
                    }
                }
            }
            // No nonce can be accepted twice: an acked payment again is a duplicate, a
            // different transfer under its nonce a double spend.
            for &i in report.acked.iter().step_by(25) {
                let again = client.submit(requests[i].clone()).await.unwrap();
                match again.outcome {
                    Some(v1::submit_reply::Outcome::Accepted(a)) if a.duplicate => {}
                    other => {
                        double += 1;
                        eprintln!("round {round}: resubmitting {i} gave {other:?}");
                    }
                }
                // Validly signed by the payer: only the ledger can tell it is a double spend.
                let key = key_of(&requests[i]);
                let payer = payers.iter().find(|p| p.address().to_string() == key.from).expect("a known payer");
                let nonce: B256 = key.nonce.parse().unwrap();
                let signed =
                    PaymentBuilder::new(payer, &net.token_domain(), now).nonce(nonce).value(999).build();
                let conflicting = client::typed_request(
                    "conflict".into(),
                    &signed,
                    &testkit::requirements_for(&signed),
                );
                let reply = client.submit(conflicting).await.unwrap();
                match reply.outcome {
                    Some(v1::submit_reply::Outcome::Rejected(r)) if r.reason == "invalid_exact_evm_nonce_already_used" => {}
                    other => {
                        double += 1;
                        eprintln!("round {round}: reusing the nonce of {i} gave {other:?}");
                    }
                }
            }
            // SIGTERM: drain and exit 0.
            let pid = daemon.child.id().to_string();
            assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
            let status = daemon.child.wait().unwrap();
            assert!(status.success(), "round {round}: SIGTERM exit status {status}");
            println!(
                "round {round}: offered {}, killed after ledger seq {threshold}, acked {}, lost so far {lost}",
                requests.len(),
                report.acked.len()
            );
        }
        // Then everything acknowledged settles, once: one settlement log entry each, and the
        // payee paid each exactly once.
        let mut daemon = start(&config);
        common::settle::wait_nothing_pending(&daemon.admin_url, Duration::from_secs(120)).await;
        daemon.signal("TERM");
        assert!(daemon.child.wait().unwrap().success());
        let ledger = x402_batcher::ledger::RocksLedger::open(&dir.path().join("ledger")).unwrap();
        let log: Vec<_> = x402_batcher::ledger::books(
            ledger.settlement_log(0, usize::MAX).unwrap().into_iter().map(|(_, r)| r),
        )
        .into_iter()
        .map(|r| (r.seq, r))
        .collect();
        let ids: std::collections::HashSet<_> = log.iter().map(|(_, r)| r.payment_id()).collect();
        double += log.len() - ids.len();
        let settled = log.iter().filter(|(_, r)| r.status == x402_batcher::ledger::Status::Settled).count();
        for k in &all_acked {
            let key = x402_batcher::ledger::AuthKey::new(
                k.chain_id,
                k.token.parse().unwrap(),
                k.from.parse().unwrap(),
                k.nonce.parse().unwrap(),
            );
            if !ids.contains(&key.payment_id()) {
                lost += 1;
            }
        }
        let paid = net.balance_of(testkit::DEFAULT_PAYEE).await.unwrap() - payee_before;
        assert_eq!(paid, U256::from(1_000u64 * settled as u64), "the payee was paid each settled payment once");
        println!(
            "crash summary: load offered {offered} (submissions and settlement), faults injected {ROUNDS} \
             SIGKILLs, acked {acked_total}, settled {settled}, lost {lost}, duplicated {double}"
        );
        // (A payment can be recorded and the daemon killed before its ack: it settles too.)
        assert!(settled >= acked_total, "every acknowledged payment settled: {settled} < {acked_total}");
        assert_eq!(lost, 0, "acknowledged payments were lost");
        assert_eq!(double, 0, "a nonce was accepted twice");
        assert!(acked_total > 0, "the load acknowledged nothing");
    })
    .await
    .expect("bounded");
}

/// Polls until every payment is in one of `allowed` and, if given, at least one is `some`
/// (bounded), mining a block per poll when given a devnet.
async fn wait_all(
    client: &mut Client,
    keys: &[v1::AuthorizationKey],
    allowed: &[v1::PaymentStatus],
    some: Option<v1::PaymentStatus>,
    mine: Option<&Devnet>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(net) = mine {
            net.mine().await.unwrap();
        }
        let mut states = Vec::new();
        for k in keys {
            let req = v1::GetPaymentRequest {
                key: Some(v1::get_payment_request::Key::AuthorizationKey(k.clone())),
            };
            let p = client.payments.get_payment(req).await.unwrap().into_inner();
            states.push(v1::PaymentStatus::try_from(p.status).unwrap());
        }
        if states.iter().all(|s| allowed.contains(s)) && some.is_none_or(|x| states.contains(&x)) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "payments stuck: {states:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILL between sending and confirmation, twice: once while the batch waits in the pool
/// (it is mined while the daemon is down) and once after inclusion, before depth. After each
/// restart the engine resumes from the ledger and the chain; in the end every payment has
/// exactly one outcome (settled, once in the settlement log, once on chain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_sending_and_confirmation_keeps_one_outcome_per_payment() {
    tokio::time::timeout(LIMIT, async {
        let net = Devnet::start().await.unwrap();
        let payers = devnet::payer_keys("crash-settle", 10);
        let addrs: Vec<_> = payers.iter().map(|p| p.address()).collect();
        net.fund(&addrs, U256::from(100_000_000u64)).await.unwrap();
        let settler = net.new_settlers("crash", 1).await.unwrap().remove(0);
        net.set_automine(false).await.unwrap();
        let payee = testkit::DEFAULT_PAYEE;
        let before = net.balance_of(payee).await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let config = settling_config(
            dir.path(),
            &net,
            &settler,
            "confirmations = 3\ntarget_cost_per_payment_wei = \"0\"\n",
        );
        let now = SystemClock.now_unix();
        let wave = |run_id| {
            let opts = LoadOptions {
                payments: 30,
                payers: payers.clone(),
                rate: None,
                streams: 1,
                value: 1_000,
                payees: vec![payee],
                run_id,
            };
            loadgen::presign(&net.token_domain(), &opts, now)
        };
        let (first, second) = (wave(101), wave(102));
        let keys = |reqs: &[v1::SubmitRequest]| reqs.iter().map(key_of).collect::<Vec<_>>();

        // Kill 1: the batch is signed, recorded and broadcast, but not mined. (Waves are cut
        // by max wait, so each is usually one batch; should a round fall inside a wave, the
        // rest waits in Accepted for the settler's next nonce, which these waits allow.)
        let mut daemon = start(&config);
        let mut client = Client::connect(daemon.url.clone()).await.unwrap();
        let report = loadgen::run(&client, first.clone(), None, 1).await;
        assert_eq!(report.acked.len(), first.len());
        let (accepted, submitted, included) =
            (v1::PaymentStatus::Accepted, v1::PaymentStatus::Submitted, v1::PaymentStatus::Included);
        let sent = [accepted, submitted];
        wait_all(&mut client, &keys(&first), &sent, Some(submitted), None).await;
        daemon.child.kill().unwrap();
        daemon.child.wait().unwrap();
        net.mine().await.unwrap(); // mined while the daemon is down

        // Kill 2: after restart, a second wave reaches inclusion but not depth.
        let mut daemon = start(&config);
        let mut client = Client::connect(daemon.url.clone()).await.unwrap();
        let mined = [included, v1::PaymentStatus::Settled];
        wait_all(&mut client, &keys(&first), &mined, None, Some(&net)).await;
        let report = loadgen::run(&client, second.clone(), None, 1).await;
        assert_eq!(report.acked.len(), second.len());
        wait_all(&mut client, &keys(&second), &sent, Some(submitted), None).await;
        net.mine().await.unwrap();
        wait_all(&mut client, &keys(&second), &[accepted, submitted, included], Some(included), None).await;
        daemon.child.kill().unwrap();
        daemon.child.wait().unwrap();

        // Restart and let blocks come: everything settles, once.
        let mut daemon = start(&config);
        let mut client = Client::connect(daemon.url.clone()).await.unwrap();
        let all: Vec<_> = first.iter().chain(&second).cloned().collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            net.mine().await.unwrap();
            let settled = |s: v1::PaymentStatus| s == v1::PaymentStatus::Settled;
            let mut done = true;
            for k in keys(&all) {
                let req =
                    v1::GetPaymentRequest { key: Some(v1::get_payment_request::Key::AuthorizationKey(k)) };
                let p = client.payments.get_payment(req).await.unwrap().into_inner();
                done &= settled(v1::PaymentStatus::try_from(p.status).unwrap());
            }
            if done {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "not all settled after the restarts");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pid = daemon.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        assert!(daemon.child.wait().unwrap().success());

        let ledger = x402_batcher::ledger::RocksLedger::open(&dir.path().join("ledger")).unwrap();
        let log: Vec<_> = x402_batcher::ledger::books(
            ledger.settlement_log(0, usize::MAX).unwrap().into_iter().map(|(_, r)| r),
        )
        .into_iter()
        .map(|r| (r.seq, r))
        .collect();
        let ids: std::collections::HashSet<_> = log.iter().map(|(_, r)| r.payment_id()).collect();
        assert_eq!(log.len(), all.len(), "one settlement log entry per payment");
        assert_eq!(ids.len(), all.len());
        assert!(log.iter().all(|(_, r)| r.status == x402_batcher::ledger::Status::Settled));
        assert_eq!(ledger.pending(), 0);
        let sum = U256::from(1_000u64 * all.len() as u64);
        assert_eq!(
            net.balance_of(payee).await.unwrap() - before,
            sum,
            "the payee was paid each payment once"
        );
        let batches = ledger.batches(net.chain_id()).unwrap();
        assert!(batches.iter().all(|b| b.status == x402_batcher::ledger::BatchStatus::Done), "{batches:#?}");
    })
    .await
    .expect("bounded");
}

/// SIGTERM (and SIGHUP) while the daemon is still starting (it prints its address before
/// it checks the chain and opens the ledger) must not kill it by the default action: it
/// comes up and exits cleanly, 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_during_start_up_is_handled() {
    tokio::time::timeout(LIMIT, async {
        let net = Devnet::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &net, "");
        for signal in ["HUP", "TERM"] {
            let mut daemon = start(&config);
            daemon.signal(signal);
            if signal == "HUP" {
                // Still running: a reload, not a stop.
                let mut client = Client::connect(daemon.admin_url.clone()).await.unwrap();
                assert!(client.admin.get_status(v1::GetStatusRequest {}).await.is_ok());
                daemon.signal("TERM");
            }
            let status = daemon.child.wait().unwrap();
            assert!(status.success(), "{signal} at start-up: {status}");
        }
    })
    .await
    .expect("bounded");
}
