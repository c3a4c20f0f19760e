//! The README's main job, small: the demo settles every payment it submits and exports them.
//! (The full-size run is `./ops/demo.sh`; its figures are in BENCHMARKS.md. The demo's
//! middleware flow needs Node: tests/interop.rs runs it.)

use std::time::Duration;

use x402_batcher::tools::demo::{self, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_demo_settles_and_exports_every_payment() {
    let dir = tempfile::tempdir().unwrap();
    let opts = DemoOptions {
        payments: 200,
        payers: 20,
        rate: None,
        dir: Some(dir.path().to_owned()),
        http_requests: 0,
        ..DemoOptions::default()
    };
    let started = std::time::Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(120), demo::run(&opts))
        .await
        .expect("the demo finished in time")
        .unwrap();
    assert_eq!((report.offered, report.accepted, report.settled), (200, 200, 200), "{report:?}");
    assert_eq!((report.failed, report.expired), (0, 0));
    // Accepted -> settled at depth is each payment's own outcome entry: within the run, never
    // the later finality entry's time.
    let ran_ms = started.elapsed().as_millis() as u64;
    let [p50, _, _, max] = report.latency_ms;
    assert!(
        0 < p50 && p50 <= max && max <= ran_ms,
        "settled at depth {:?} in a {ran_ms} ms run",
        report.latency_ms
    );
    assert!(report.finalized <= report.settled);
    let csv = std::fs::read_to_string(&report.export_path).unwrap();
    assert_eq!(csv.lines().count(), 201, "a header and one row per settled payment");
}
