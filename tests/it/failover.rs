//! Database failover under load: the ledger on a PostgreSQL primary with a synchronous
//! standby on this machine, the daemon given both hosts with
//! `target_session_attrs=read-write`. The primary is stopped immediately (`pg_ctl -m
//! immediate`: a crash) while payments arrive, and the standby promoted. The daemon
//! refuses what it cannot record meanwhile (UNAVAILABLE, nothing acknowledged), reconnects
//! to the new primary by itself, and every payment acknowledged before, during and after
//! is there.

use crate::common;

use std::time::Duration;

use alloy::primitives::U256;
use common::daemon::TestDaemon;
use x402_batcher::api::v1;
use x402_batcher::client::Client;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::config::LedgerBackend;
use x402_batcher::ledger::{AuthKey, LedgerStore, PgConnect, PgLedger};
use x402_batcher::tools::devnet;
use x402_batcher::tools::loadgen::{self, LoadOptions};
use x402_batcher::tools::postgres::TestPostgres;
use x402_batcher::tools::testkit;

const PAYMENTS: usize = 3_000;
const RATE: f64 = 1_000.0;
const LIMIT: Duration = Duration::from_secs(180);

fn key_of(req: &v1::SubmitRequest) -> AuthKey {
    AuthKey::of(&common::signed_of(req))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_crashes_under_load_the_standby_is_promoted_and_no_acknowledged_payment_is_missing() {
    tokio::time::timeout(LIMIT, async {
        let mut primary = TestPostgres::start().unwrap();
        let standby = primary.add_sync_standby("replica1").unwrap();
        let url = format!(
            "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=postgres \
             target_session_attrs=read-write connect_timeout=2",
            primary.port(),
            standby.port()
        );
        let d = TestDaemon::start({
            let url = url.clone();
            move |c| {
                c.ledger.backend = LedgerBackend::Postgres;
                c.ledger.path = None;
                c.ledger.url = Some(url);
            }
        })
        .await;
        let payers = devnet::payer_keys("failover", 50);
        let addrs: Vec<_> = payers.iter().map(|p| p.address()).collect();
        d.devnet.fund(&addrs, U256::from(100_000_000u64)).await.unwrap();
        let opts = LoadOptions {
            payments: PAYMENTS,
            payers,
            rate: Some(RATE),
            streams: 4,
            value: 1_000,
            payees: vec![testkit::DEFAULT_PAYEE],
            run_id: 1,
        };
        let requests = loadgen::presign(&d.domain(), &opts, SystemClock.now_unix());
        let client = Client::connect(d.url()).await.unwrap();
        let load = {
            let (client, requests) = (client.clone(), requests.clone());
            tokio::spawn(async move { loadgen::run(&client, requests, Some(RATE), 4).await })
        };

        // A third of the way in, the primary crashes; the standby is promoted.
        let seq = |pg: &TestPostgres| -> u64 {
            pg.sql("SELECT value FROM ledger_meta WHERE name = 'seq'").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while seq(&primary) < PAYMENTS as u64 / 3 {
            assert!(tokio::time::Instant::now() < deadline, "the load did not progress");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        primary.stop("immediate").unwrap();
        let at_crash = seq(&standby);
        standby.promote().unwrap();
        let report = load.await.unwrap();
        println!(
            "failover: crash at ledger seq {at_crash} (on the standby), acked {} of {}, refused meanwhile {:?}, \
             broken streams {}",
            report.acked.len(),
            requests.len(),
            report.errors,
            report.broken_streams
        );
        assert!(report.acked.len() < requests.len(), "the crash came after the load ended");
        assert!(
            report.acked.len() > at_crash as usize,
            "payments were acknowledged after the failover too: {} acked, {at_crash} before the crash",
            report.acked.len()
        );

        // What was refused during the failover is accepted now, on the promoted standby.
        let acked: std::collections::HashSet<usize> = report.acked.iter().copied().collect();
        let mut client = client;
        for (i, req) in requests.iter().enumerate().filter(|(i, _)| !acked.contains(i)) {
            let reply = client.submit(req.clone()).await.unwrap();
            assert!(
                matches!(reply.outcome, Some(v1::submit_reply::Outcome::Accepted(_))),
                "payment {i} after the failover: {:?}",
                reply.outcome
            );
        }

        // Every acknowledged payment is in the new primary's ledger, once.
        let ledger = PgLedger::open_read_only(PgConnect::new(&standby.url(), None).unwrap()).unwrap();
        let records = ledger.records().unwrap();
        assert_eq!(records.len(), requests.len(), "one record per payment");
        let mut missing = 0;
        for &i in &report.acked {
            if ledger.get(&key_of(&requests[i])).unwrap().is_none() {
                missing += 1;
            }
        }
        assert_eq!(missing, 0, "acknowledged payments missing after the failover");
        let events = ledger.events_after(0, usize::MAX).unwrap();
        assert!(events.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1), "the feed has no gap");
        d.stop().await;
    })
    .await
    .expect("bounded");
}
