//! Per-API-server limits under overload: one server sending flat out is shed with
//! RESOURCE_EXHAUSTED while another, within its rate, is served in full, and everything
//! acknowledged goes on to settle.

mod common;

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, U256};
use common::daemon::TestDaemon;
use common::settle::{Miner, ledger_after, settle_with, wait_nothing_pending};
use x402_batcher::client::Client;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::devnet::{self, Devnet};
use x402_batcher::loadgen::{self, LoadOptions};

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_server_is_shed_while_a_quiet_one_is_served_and_acked_payments_settle() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let settlers = net.new_settlers("limits", 1).await.unwrap();
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let path = dir.path().to_owned();
        let d = TestDaemon::start_on(Arc::clone(&net), Arc::clone(&dir), move |c| {
            settle_with(c, &path, &settlers);
            c.limits.per_server_rate = 20.0;
            c.limits.per_server_burst = 20;
            c.limits.per_server_in_flight = 8;
        })
        .await;
        let payers = devnet::payer_keys("limits", 40);
        let addrs: Vec<_> = payers.iter().map(|p| p.address()).collect();
        net.fund(&addrs, U256::from(100_000_000u64)).await.unwrap();
        let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(200), None);
        let now = SystemClock.now_unix();
        let load = |server: &str, payers: &[alloy::signers::local::PrivateKeySigner], n, run_id| {
            let opts = LoadOptions {
                payments: n,
                payers: payers.to_vec(),
                rate: None,
                streams: 1,
                value: 1_000,
                payees: vec![Address::repeat_byte(0x1e)],
                run_id,
            };
            let mut reqs = loadgen::presign(&net.token_domain(), &opts, now);
            for r in &mut reqs {
                r.api_server = server.to_owned();
            }
            reqs
        };
        let noisy = load("noisy", &payers[..20], 400, 1);
        let quiet = load("quiet", &payers[20..], 30, 2);
        let client = Client::connect(d.url()).await.unwrap();
        let (noisy_report, quiet_report) =
            tokio::join!(loadgen::run(&client, noisy, None, 1), loadgen::run(&client, quiet, Some(10.0), 1),);
        let exhausted = tonic::Code::ResourceExhausted as i32;
        let shed = noisy_report.errors.get(&exhausted).copied().unwrap_or(0);
        println!("limits: noisy {}; quiet {}", noisy_report.summary(), quiet_report.summary());
        assert!(shed > 200, "the flat-out server was shed: {}", noisy_report.summary());
        assert_eq!(noisy_report.acked.len() + shed, 400, "{:?}", noisy_report.errors);
        assert_eq!(
            quiet_report.acked.len(),
            30,
            "the quiet server was served in full: {}",
            quiet_report.summary()
        );

        // Everything acknowledged settles.
        wait_nothing_pending(&d.admin_url(), Duration::from_secs(60)).await;
        d.stop().await;
        let (log, _) = ledger_after(dir.path(), net.chain_id());
        assert_eq!(log.len(), noisy_report.acked.len() + 30);
        assert!(log.iter().all(|r| r.status == x402_batcher::ledger::Status::Settled));
    })
    .await
    .expect("within the time limit");
}
