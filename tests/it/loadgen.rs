//! `x402-batcher loadgen --devnet --daemon-cpu CORES`: the fleet benchmark with each daemon a
//! process of its own in a CPU cap (a cgroup v1 `cpu` group; these machines mount one and
//! CI runs as root), as if each had a machine of its own. The daemons serve the whole load
//! on one PostgreSQL, and their groups are gone afterwards.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(180);

#[test]
fn daemons_capped_in_cgroups_of_their_own_serve_the_load_and_leave_no_group_behind() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_x402-batcher"))
        .args(["loadgen", "--devnet", "--ledger", "postgres", "--daemons", "2", "--daemon-cpu", "0.5"])
        .args(["--payments", "300", "--payers", "30", "--streams", "2", "--ceiling-seconds", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + LIMIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("loadgen did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for i in 0..2 {
        assert!(
            stdout.contains(&format!("daemon {i}: a process of its own at http://127.0.0.1:")),
            "{stdout}"
        );
    }
    assert!(stdout.contains("capped at 0.5 cores of CPU"), "{stdout}");
    assert!(stdout.contains("sent 300, acked 300 (0 duplicates), rejected {}, errors {}"), "{stdout}");
    assert!(stdout.contains("machine CPU during the load: "), "{stdout}");
    let left: Vec<_> = std::fs::read_dir("/sys/fs/cgroup/cpu")
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&format!("x402-loadgen-{pid}-")))
        .collect();
    assert!(left.is_empty(), "groups left behind: {left:?}");
}
