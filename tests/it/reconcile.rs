//! `x402-batcher reconcile`, the binary, against a devnet the daemon settled on: a clean run
//! reports nothing and exits 0 (beside the running daemon); a nonce used outside the daemon
//! and a tampered settlement log entry are each reported, and the exit code says so.

use crate::common;

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, U256};
use common::binary::write_config;
use common::settle::{Miner, settling_daemon, status, submit, wait_for};
use x402_batcher::api::v1;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::ledger::PaymentRecord;
use x402_batcher::tools::devnet::Devnet;
use x402_batcher::tools::testkit::PaymentBuilder;

const LIMIT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(60);
const PAYEE: Address = Address::repeat_byte(0xbe);

fn reconcile(config: &std::path::Path, to_block: u64) -> (bool, String) {
    let Output { status, stdout, stderr } = Command::new(env!("CARGO_BIN_EXE_x402-batcher"))
        .args(["reconcile", "--config"])
        .arg(config)
        .args(["--from-block", "0", "--to-block", &to_block.to_string()])
        .output()
        .unwrap();
    let out = String::from_utf8(stdout).unwrap();
    assert!(status.code().is_some_and(|c| c <= 1), "{out}\n{}", String::from_utf8_lossy(&stderr));
    (status.success(), out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_run_reports_nothing_and_outside_use_and_tampering_are_reported() {
    tokio::time::timeout(LIMIT, async {
        let devnet = Arc::new(Devnet::start().await.unwrap());
        let d = settling_daemon(&devnet, "reconcile", 1, |_| {}).await;
        let dir = Arc::clone(&d.dir);
        // The same ledger and chain, for the command.
        let config = write_config(dir.path(), &devnet, "");
        let payers = d.payers("reconcile", 4, 10_000_000).await;
        let _miner = Miner::start(Arc::clone(&devnet), Duration::from_millis(100), None);
        let now = SystemClock.now_unix();
        let pay = |i: u64| {
            PaymentBuilder::new(&payers[i as usize % payers.len()], &d.domain(), now)
                .to(PAYEE)
                .value(1_000 + i)
                .nonce_index(i)
                .build()
        };
        let mut ids = Vec::new();
        for i in 0..10 {
            ids.push(submit(&d, &pay(i)).await);
        }
        let settled = |p: &v1::Payment| status(p) == v1::PaymentStatus::Settled;
        wait_for(&d, &ids, WAIT, settled).await;

        // Clean, while the daemon runs.
        let head = devnet.block_number().await.unwrap();
        let (clean, out) = reconcile(&config, head);
        assert!(clean, "{out}");
        assert!(out.contains("10 settled payments") && out.contains("0 discrepancies"), "{out}");

        // A payment the daemon holds is settled by someone else's transaction.
        let mut admin = v1::admin_client::AdminClient::connect(d.admin_url()).await.unwrap();
        let pause = |on| v1::UpdatePolicyRequest { paused: Some(on), ..Default::default() };
        admin.update_policy(pause(true)).await.unwrap();
        let outside = pay(100);
        let outside_id = submit(&d, &outside).await;
        assert!(devnet.send_batch(std::slice::from_ref(&outside)).await.unwrap().status());
        admin.update_policy(pause(false)).await.unwrap();
        let failed = |p: &v1::Payment| status(p) == v1::PaymentStatus::Failed;
        wait_for(&d, std::slice::from_ref(&outside_id), WAIT, failed).await;
        let head = devnet.block_number().await.unwrap();
        let (clean, out) = reconcile(&config, head);
        assert!(!clean, "{out}");
        assert!(out.contains(&format!("used_outside payment {outside_id}")), "{out}");
        assert!(out.contains("1 discrepancies"), "only that one: {out}");
        // One more payment, settled and not yet final when the daemon stops.
        let fresh = submit(&d, &pay(200)).await;
        let p = wait_for(&d, std::slice::from_ref(&fresh), WAIT, settled).await.remove(0);
        assert_eq!(p.finalized_at_ms, 0, "stopped before its block is final");
        let head = devnet.block_number().await.unwrap();
        let dir_keep = Arc::clone(&d.dir);
        d.stop().await;

        // Someone edits a settled amount in the settlement log.
        let ledger_path = dir_keep.path().join("ledger");
        let tampered = {
            let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &ledger_path).unwrap();
            let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &ledger_path, &cfs).unwrap();
            let cf = db.cf_handle("settlement").unwrap();
            let entries: Vec<_> =
                db.iterator_cf(cf, rocksdb::IteratorMode::Start).map(|kv| kv.unwrap()).collect();
            let first = PaymentRecord::decode(&entries[0].1).unwrap().payment_id().to_string();
            for (key, bytes) in &entries {
                let mut record = PaymentRecord::decode(bytes).unwrap();
                let id = record.payment_id().to_string();
                if id == first {
                    // Every entry of one payment: a settled amount edited.
                    record.signed.authorization.value += U256::from(1u64);
                } else if id == fresh {
                    // The fresh one's block, as a reorg the daemon has not followed yet would
                    // leave it.
                    record.block_hash = Some(alloy::primitives::B256::repeat_byte(0x99));
                } else {
                    continue;
                }
                db.put_cf(cf, key, record.encode()).unwrap();
            }
            (first, fresh.clone())
        };
        let (tampered, moved) = tampered;
        let (clean, out) = reconcile(&config, head);
        assert!(!clean);
        assert!(out.contains(&format!("transfer_mismatch payment {tampered}")), "{out}");
        assert!(out.contains("2 discrepancies"), "{out}");
        // Its block is not final yet (the daemon still watches it): listed apart, not failed.
        assert!(
            out.contains(&format!(
                "not final yet, the daemon is following a reorg: evidence_mismatch payment {moved}"
            )),
            "{out}"
        );
        assert!(out.contains("1 not final yet"), "{out}");
    })
    .await
    .expect("within the time limit");
}
