//! Fleet mode: three daemon processes share one PostgreSQL ledger (a throw-away server) and
//! four settler keys on one devnet. Payments, resubmissions, double spends and an overspend
//! at the balance's boundary are sent to all three at once; in each round the daemon
//! holding leases is SIGKILLed under load and started again. In the end every acknowledged
//! payment is settled, once: one `AuthorizationUsed` log and one settlement row each; no
//! nonce accepted twice; no payer over its balance; each settler's nonces without gaps;
//! `WatchPayments` from cursor 0 the same sequence on every daemon; `reconcile` clean.

use crate::common;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, U256};
use alloy::providers::Provider;
use alloy::rpc::types::Filter;
use alloy::sol_types::SolEvent;
use common::binary::{Daemon, start, write_config_with_ledger};
use futures::StreamExt;
use x402_batcher::api::v1;
use x402_batcher::client::{self, Client};
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::ledger::{AuthKey, LedgerStore, PgConnect, PgLedger, Status};
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::tools::loadgen::{self, LoadOptions};
use x402_batcher::tools::postgres::TestPostgres;
use x402_batcher::tools::testkit::{self, PaymentBuilder};
use x402_batcher::x402::Authorization;

const DAEMONS: usize = 3;
const SETTLERS: usize = 4;
const ROUNDS: u64 = 4;
const PAYMENTS_PER_ROUND: usize = 300;
/// Slow enough that a round's load lasts ~1 s, so the kill lands inside it (at 600/s, ~0.5 s,
/// a loaded machine once saw the load end first).
const RATE: f64 = 300.0;
const VALUE: u64 = 1_000;
const LIMIT: Duration = Duration::from_secs(420);
const OVERSPEND_PAYEE: Address = Address::repeat_byte(0x0f);

fn key_of(req: &v1::SubmitRequest) -> AuthKey {
    AuthKey::of(&common::signed_of(req))
}

/// A counter of the ledger's (`seq`, `pending`), read in the database.
fn counter(pg: &TestPostgres, name: &str) -> u64 {
    pg.sql(&format!("SELECT value FROM ledger_meta WHERE name = '{name}'")).unwrap().parse().unwrap_or(0)
}

/// Process ids of the daemons holding a live lease.
fn lease_holders(pg: &TestPostgres) -> HashSet<u32> {
    let owners = pg.sql("SELECT DISTINCT owner FROM ledger_leases WHERE expires_at > now()").unwrap();
    // Owner names are host-pid-startms.
    owners.lines().filter_map(|o| o.rsplit('-').nth(1).and_then(|p| p.parse().ok())).collect()
}

async fn outcome(url: &str, req: v1::SubmitRequest) -> Option<v1::submit_reply::Outcome> {
    let mut client = Client::connect(url.to_owned()).await.ok()?;
    client.submit(req).await.ok()?.outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_on_one_postgres_lose_nothing_when_one_is_killed_holding_leases() {
    tokio::time::timeout(LIMIT, async {
        let pg = TestPostgres::start().unwrap();
        let net = Arc::new(Devnet::start().await.unwrap());
        let payers = devnet::payer_keys("fleet", 20);
        let addrs: Vec<_> = payers.iter().map(|p| p.address()).collect();
        net.fund(&addrs, U256::from(100_000_000u64)).await.unwrap();
        let settlers = net.new_settlers("fleet", SETTLERS).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("settler.keys");
        x402_batcher::settle::write_key_file(&keys, &settlers).unwrap();
        let config = write_config_with_ledger(
            dir.path(),
            &net,
            &format!("backend = \"postgres\"\nurl = \"{}\"", pg.url()),
            &format!(
                "[audit]\nnonce_interval_ms = 0\n[settlement]\nsettler_keys_file = \"{}\"\n\
                 poll_interval_ms = 50\nmax_wait_secs = 1\nconfirmations = 2\nlease_ms = 1500\n\
                 [metrics]\nlisten = \"127.0.0.1:0\"\n",
                keys.display()
            ),
        );
        let _miner = common::settle::Miner::start(Arc::clone(&net), Duration::from_millis(200), None);
        let payee_before = net.balance_of(testkit::DEFAULT_PAYEE).await.unwrap();
        let mut daemons: Vec<Daemon> = (0..DAEMONS).map(|_| start(&config)).collect();
        let now = SystemClock.now_unix();

        // Twenty concurrent payments of 1 against a balance of 10, over the three daemons:
        // exactly ten accepted (each daemon reads the balance; the exposure is shared).
        let poor = devnet::payer_keys("fleet-poor", 1).remove(0);
        net.fund(&[poor.address()], U256::from(10u64)).await.unwrap();
        let sends = (0..20u64).map(|i| {
            let signed =
                PaymentBuilder::new(&poor, &net.token_domain(), now).to(OVERSPEND_PAYEE).value(1).nonce_index(i).build();
            let req = client::typed_request(format!("poor-{i}"), &signed, &testkit::requirements_for(&signed));
            let url = daemons[i as usize % DAEMONS].url.clone();
            async move { (key_of(&req), outcome(&url, req).await) }
        });
        let answers = futures::future::join_all(sends).await;
        let mut acked: Vec<AuthKey> = Vec::new();
        let (mut accepted, mut refused) = (0, 0);
        for (key, answer) in answers {
            match answer {
                Some(v1::submit_reply::Outcome::Accepted(_)) => {
                    accepted += 1;
                    acked.push(key);
                }
                Some(v1::submit_reply::Outcome::Rejected(r)) if r.reason == "insufficient_funds" => refused += 1,
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert_eq!((accepted, refused), (10, 10), "exactly the balance, across daemons");

        let (mut offered, mut lost, mut double) = (20, 0, 0);
        for round in 0..ROUNDS {
            let opts = LoadOptions {
                payments: PAYMENTS_PER_ROUND,
                payers: payers.clone(),
                rate: Some(RATE),
                streams: DAEMONS,
                value: VALUE,
                payees: vec![testkit::DEFAULT_PAYEE],
                run_id: round + 1,
            };
            let requests = loadgen::presign(&net.token_domain(), &opts, now);
            offered += requests.len();
            let mut clients = Vec::new();
            for d in &daemons {
                clients.push(Client::connect(d.url.clone()).await.unwrap());
            }
            let base = counter(&pg, "seq");
            let load = {
                let requests = requests.clone();
                tokio::spawn(async move { loadgen::run_spread(&clients, requests, Some(RATE), DAEMONS).await })
            };
            // Kill a daemon holding leases once the load is well under way.
            let threshold = base + 60 + (round * 37) % 90;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            let victim = loop {
                let holders = lease_holders(&pg);
                let victim = daemons.iter().position(|d| holders.contains(&d.child.id()));
                if let Some(v) = victim
                    && counter(&pg, "seq") >= threshold
                {
                    break v;
                }
                assert!(tokio::time::Instant::now() < deadline, "round {round}: no progress or no lease holder");
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            daemons[victim].child.kill().unwrap(); // SIGKILL
            daemons[victim].child.wait().unwrap();
            let report = load.await.unwrap();
            assert!(report.acked.len() < requests.len(), "round {round}: the kill came after the load ended");
            acked.extend(report.acked.iter().map(|&i| key_of(&requests[i])));

            // Resubmissions and double spends, each to a daemon other than the one killed.
            let alive: Vec<String> =
                (0..DAEMONS).filter(|&d| d != victim).map(|d| daemons[d].url.clone()).collect();
            for (n, &i) in report.acked.iter().step_by(15).enumerate() {
                match outcome(&alive[n % alive.len()], requests[i].clone()).await {
                    Some(v1::submit_reply::Outcome::Accepted(a)) if a.duplicate => {}
                    other => {
                        double += 1;
                        eprintln!("round {round}: resubmitting {i} gave {other:?}");
                    }
                }
                let Authorization { from, nonce, .. } = common::signed_of(&requests[i]).authorization;
                let payer = payers.iter().find(|p| p.address() == from).expect("a known payer");
                let signed = PaymentBuilder::new(payer, &net.token_domain(), now).nonce(nonce).value(999).build();
                let conflicting =
                    client::typed_request("conflict".into(), &signed, &testkit::requirements_for(&signed));
                match outcome(&alive[(n + 1) % alive.len()], conflicting).await {
                    Some(v1::submit_reply::Outcome::Rejected(r))
                        if r.reason == "invalid_exact_evm_nonce_already_used" => {}
                    other => {
                        double += 1;
                        eprintln!("round {round}: reusing the nonce of {i} gave {other:?}");
                    }
                }
            }
            daemons[victim] = start(&config);
            println!(
                "round {round}: offered {}, killed daemon {victim} holding leases after ledger seq {threshold}, \
                 acked {}",
                requests.len(),
                report.acked.len()
            );
        }

        // Everything recorded settles.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        while counter(&pg, "pending") > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} payments still pending",
                counter(&pg, "pending")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ledger = PgLedger::open_read_only(PgConnect::new(&pg.url(), None).unwrap()).unwrap();
        let books = x402_batcher::ledger::books(
            ledger.settlement_log(0, usize::MAX).unwrap().into_iter().map(|(_, r)| r),
        );
        let ids: HashSet<_> = books.iter().map(|r| r.payment_id()).collect();
        double += books.len() - ids.len();
        let settled: Vec<_> = books.iter().filter(|r| r.status == Status::Settled).collect();
        for key in &acked {
            match ledger.get(key).unwrap() {
                Some(r) if r.status == Status::Settled => {}
                other => {
                    lost += 1;
                    eprintln!("acked payment {} is not settled: {other:?}", key.payment_id());
                }
            }
        }

        // One AuthorizationUsed log per settled payment, and the payees paid once each.
        let head = net.block_number().await.unwrap();
        let logs = net
            .provider()
            .get_logs(
                &Filter::new()
                    .address(net.token())
                    .event_signature(x402_batcher::chain::IEip3009::AuthorizationUsed::SIGNATURE_HASH)
                    .from_block(0)
                    .to_block(head),
            )
            .await
            .unwrap();
        let used: BTreeSet<_> = logs.iter().map(|l| (l.topics()[1], l.topics()[2])).collect();
        assert_eq!(logs.len(), used.len(), "an authorization used twice");
        assert_eq!(logs.len(), settled.len(), "one AuthorizationUsed log per settled payment");
        let paid = net.balance_of(testkit::DEFAULT_PAYEE).await.unwrap() - payee_before;
        let load_settled = settled.iter().filter(|r| r.signed.authorization.to == testkit::DEFAULT_PAYEE).count();
        assert_eq!(paid, U256::from(VALUE * load_settled as u64), "the payee was paid each settled payment once");
        assert_eq!(net.balance_of(OVERSPEND_PAYEE).await.unwrap(), U256::from(10u64), "the poor payer paid 10");

        // Each settler's nonces without gaps: its mined batches used exactly 0..nonce.
        let batches = ledger.batches(net.chain_id()).unwrap();
        for s in &settlers {
            let nonce = net.provider().get_transaction_count(s.address()).await.unwrap();
            let mined: BTreeSet<u64> = batches
                .iter()
                .filter(|b| b.settler == s.address())
                .filter_map(|b| {
                    let inc = b.inclusion?;
                    b.attempts.iter().find(|a| a.tx_hash == inc.tx_hash).map(|a| a.tx_nonce)
                })
                .collect();
            assert_eq!(mined, (0..nonce).collect::<BTreeSet<_>>(), "settler {}: nonces without gaps", s.address());
        }

        // The change feed from cursor 0: the same sequence on every daemon.
        let last = counter(&pg, "seq");
        let mut feeds = Vec::new();
        for d in &daemons {
            let mut payments = v1::payments_client::PaymentsClient::connect(d.url.clone()).await.unwrap();
            let mut stream = payments
                .watch_payments(v1::WatchPaymentsRequest { after_seq: 0, statuses: vec![] })
                .await
                .unwrap()
                .into_inner();
            let mut feed = Vec::new();
            while feed.last().map_or(0, |(seq, _, _)| *seq) < last {
                let e = stream.next().await.unwrap().unwrap();
                let p = e.payment.unwrap_or_default();
                feed.push((e.seq, p.payment_id, p.status));
            }
            assert!(feed.iter().enumerate().all(|(i, e)| e.0 == i as u64 + 1), "dense from 1");
            feeds.push(feed);
        }
        assert!(feeds.iter().all(|f| *f == feeds[0]), "every daemon streams the same sequence");

        // Every account (the four settlers and the leader) is held by exactly one daemon,
        // as their metrics say (polled: a handover between two rounds shows 0 or 2).
        let mut accounts: Vec<String> = settlers.iter().map(|s| s.address().to_string()).collect();
        accounts.push(x402_batcher::settle::LEADER.to_string());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut held: std::collections::BTreeMap<String, f64> = Default::default();
            for d in &mut daemons {
                let addr = d.line_after("metrics on ");
                let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
                d.remember(format!("metrics on {addr}"));
                for line in text.lines().filter(|l| l.starts_with("x402_batcher_lease_held{")) {
                    let account = line.split("account=\"").nth(1).and_then(|r| r.split('"').next()).unwrap();
                    let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
                    *held.entry(account.to_owned()).or_default() += value;
                }
            }
            if accounts.iter().all(|a| held.get(a) == Some(&1.0)) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "accounts not held by exactly one daemon: {held:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Reconcile finds nothing.
        let endpoint = x402_batcher::chain::RpcEndpoint::connect_http(net.chain_id(), net.rpc_url()).unwrap();
        let report = x402_batcher::reconcile::reconcile(&ledger, &endpoint, &[net.token()], false, 0, head)
            .await
            .unwrap();
        assert_eq!(report.discrepancies, vec![], "reconcile");

        for d in &daemons {
            d.signal("TERM");
        }
        for d in &mut daemons {
            assert!(d.child.wait().unwrap().success(), "SIGTERM: a clean exit");
        }
        println!(
            "fleet summary: offered {offered}, acked {}, settled {}, lost {lost}, duplicated {double} \
             ({DAEMONS} daemons, {SETTLERS} settlers, {ROUNDS} SIGKILLs of a lease holder)",
            acked.len(),
            settled.len()
        );
        assert_eq!(lost, 0, "acknowledged payments were lost");
        assert_eq!(double, 0, "a nonce was accepted twice");
        assert!(settled.len() >= acked.len(), "every acknowledged payment settled");
    })
    .await
    .expect("bounded");
}
