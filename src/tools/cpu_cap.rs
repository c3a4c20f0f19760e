//! A CPU cap for processes, by a Linux control group (the CFS quota of cgroup v1's `cpu`
//! controller, mounted at `/sys/fs/cgroup/cpu` on these machines). The ledger benchmark runs
//! daemons as processes capped to a share of the cores each, as if each daemon had a small
//! machine of its own beside the database's.

use std::path::{Path, PathBuf};

/// The CFS period the quota is a share of.
const PERIOD_US: u64 = 100_000;

/// Where cgroup v1 mounts its `cpu` controller.
const V1_CPU: &str = "/sys/fs/cgroup/cpu";

/// Why a CPU cap could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CpuCapError {
    #[error("a CPU cap is a number of cores above 0, not {0}")]
    Cores(f64),
    #[error(
        "no cgroup v1 cpu controller at {V1_CPU} (cgroup v2 only is not supported); a CPU cap needs Linux and root"
    )]
    NoController,
    #[error("process {pid} is not in {dir} after being moved there")]
    NotMoved { pid: u32, dir: PathBuf },
    #[error("cgroup file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A control group of its own whose processes together get at most `cores` of CPU time.
/// Removed when dropped (its processes must have ended by then).
#[derive(Debug)]
pub struct CpuCap {
    dir: PathBuf,
}

impl CpuCap {
    /// Creates the group `name` capped at `cores` (0.5: half a core).
    pub fn new(name: &str, cores: f64) -> Result<CpuCap, CpuCapError> {
        let quota_us = quota_us(cores)?;
        let root = Path::new(V1_CPU);
        if !root.join("cpu.cfs_quota_us").exists() {
            return Err(CpuCapError::NoController);
        }
        let dir = root.join(name);
        std::fs::create_dir(&dir).map_err(|source| CpuCapError::Io { path: dir.clone(), source })?;
        let cap = CpuCap { dir };
        cap.write("cpu.cfs_period_us", &PERIOD_US.to_string())?;
        cap.write("cpu.cfs_quota_us", &quota_us.to_string())?;
        Ok(cap)
    }

    /// Moves the process `pid` (all its threads) into the group, and checks it is there.
    pub fn add(&self, pid: u32) -> Result<(), CpuCapError> {
        self.write("cgroup.procs", &pid.to_string())?;
        let path = self.dir.join("cgroup.procs");
        let procs = std::fs::read_to_string(&path).map_err(|source| CpuCapError::Io { path, source })?;
        if !procs.lines().any(|l| l.trim() == pid.to_string()) {
            return Err(CpuCapError::NotMoved { pid, dir: self.dir.clone() });
        }
        Ok(())
    }

    fn write(&self, file: &str, value: &str) -> Result<(), CpuCapError> {
        let path = self.dir.join(file);
        std::fs::write(&path, value).map_err(|source| CpuCapError::Io { path, source })
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The quota per period for `cores` (at least the kernel's minimum of 1 ms).
fn quota_us(cores: f64) -> Result<u64, CpuCapError> {
    if !(cores.is_finite() && cores > 0.0) {
        return Err(CpuCapError::Cores(cores));
    }
    Ok(((cores * PERIOD_US as f64).round() as u64).max(1_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_is_a_share_of_each_period() {
        assert_eq!(quota_us(0.4).unwrap(), 40_000);
        assert_eq!(quota_us(2.0).unwrap(), 200_000);
        assert_eq!(quota_us(0.001).unwrap(), 1_000, "the kernel's minimum");
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(quota_us(bad), Err(CpuCapError::Cores(_))), "{bad}");
        }
    }
}
