//! A full disk under the ledger (a tmpfs of 24 MiB, filled while the daemon binary runs):
//! submissions are refused with UNAVAILABLE and nothing is acknowledged that is not
//! durable; the daemon stops with an error (RocksDB refuses every write after a failed one
//! until it is reopened), and once space returns a restart serves again with every earlier
//! acknowledged payment present. Needs root, for the mount (CI runs as root).

use crate::common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use alloy::primitives::U256;
use common::binary::{start, write_config};
use x402_batcher::api::v1;
use x402_batcher::client::Client;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::tools::loadgen::{self, LoadOptions, LoadReport};

const LIMIT: Duration = Duration::from_secs(180);

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mounting a tmpfs at {} failed: this test needs root", path.display());
        Tmpfs(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 1 << 20];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
    path
}

async fn load(
    client: &Client,
    net: &Devnet,
    payers: &[alloy::signers::local::PrivateKeySigner],
    run_id: u64,
) -> (Vec<v1::SubmitRequest>, LoadReport) {
    let opts = LoadOptions {
        payments: 200,
        payers: payers.to_vec(),
        rate: None,
        streams: 1,
        value: 1_000,
        payees: Vec::new(),
        run_id,
    };
    let requests = loadgen::presign(&net.token_domain(), &opts, SystemClock.now_unix());
    let report = loadgen::run(client, requests.clone(), None, 1).await;
    (requests, report)
}

async fn present(client: &mut Client, req: &v1::SubmitRequest) -> bool {
    let Some(v1::submit_request::Payment::Authorization(a)) = &req.payment else { unreachable!() };
    let key = v1::AuthorizationKey {
        chain_id: a.chain_id,
        token: a.token.clone(),
        from: a.from.clone(),
        nonce: a.nonce.clone(),
    };
    let req = v1::GetPaymentRequest { key: Some(v1::get_payment_request::Key::AuthorizationKey(key)) };
    client
        .payments
        .get_payment(req)
        .await
        .is_ok_and(|p| p.get_ref().status == v1::PaymentStatus::Accepted as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_acks_nothing_undurable_and_recovers_after_a_restart() {
    tokio::time::timeout(LIMIT, async {
        let net = Devnet::start().await.unwrap();
        let payers = devnet::payer_keys("disk-full", 50);
        let addrs: Vec<_> = payers.iter().map(|p| p.address()).collect();
        net.fund(&addrs, U256::from(100_000_000u64)).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        let _tmpfs = Tmpfs::mount(&mnt, 24);
        let config = write_config(&mnt, &net, "");

        // Room: everything is acknowledged.
        let mut daemon = start(&config);
        let client = Client::connect(daemon.url.clone()).await.unwrap();
        let (first, before) = load(&client, &net, &payers, 1).await;
        assert_eq!(before.acked.len(), 200, "{}", before.summary());

        // Full: refused with UNAVAILABLE, and the daemon stops with an error.
        let filler = fill(&mnt);
        let Ok((second, full)) =
            tokio::time::timeout(Duration::from_secs(30), load(&client, &net, &payers, 2)).await
        else {
            let alive = daemon.child.try_wait().unwrap().is_none();
            panic!("the load on a full disk got no answer in 30 s (daemon still running: {alive})");
        };
        let unavailable = tonic::Code::Unavailable as i32;
        let refused = full.errors.get(&unavailable).copied().unwrap_or(0);
        assert!(full.rejected.is_empty(), "{}", full.summary());
        assert!(full.errors.keys().all(|c| *c == unavailable), "{}", full.summary());
        assert!(refused > 0, "the full disk refused nothing: {}", full.summary());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "the daemon kept running on a failed ledger");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!status.success(), "a failed ledger is an error exit: {status}");

        // Space returns; a restart serves again, and nothing acknowledged is missing.
        std::fs::remove_file(filler).unwrap();
        let mut daemon = start(&config);
        let mut client = Client::connect(daemon.url.clone()).await.unwrap();
        let mut lost = 0;
        for (requests, report) in [(&first, &before), (&second, &full)] {
            for &i in &report.acked {
                if !present(&mut client, &requests[i]).await {
                    lost += 1;
                }
            }
        }
        let (_, after) = load(&client, &net, &payers, 3).await;
        assert_eq!(after.acked.len(), 200, "{}", after.summary());
        // The first load again: each one a duplicate, none recorded twice.
        let again = loadgen::run(&client, first.clone(), None, 1).await;
        let duplicated = again.acked.len() - again.duplicates;
        let acked = before.acked.len() + full.acked.len() + after.acked.len();
        println!(
            "disk full: offered 600, faults 1 (disk full, then space back and a restart), acked {acked}, \
             refused {refused} (UNAVAILABLE), lost {lost}, duplicated {duplicated}"
        );
        assert_eq!((lost, duplicated), (0, 0));
        daemon.signal("TERM");
        assert!(daemon.child.wait().unwrap().success());
    })
    .await
    .expect("within the time limit");
}
