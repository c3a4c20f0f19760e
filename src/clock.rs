//! Time as the daemon sees it. Admission and (later) planning decisions depend on "now";
//! taking it from a [`Clock`] lets tests move time explicitly instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in whole Unix seconds, the unit EIP-3009 validity bounds use.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_unix(&self) -> u64;

    /// Milliseconds, for timestamps in records and latency figures.
    fn now_ms(&self) -> u64 {
        self.now_unix().saturating_mul(1000)
    }
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> u64 {
        // A clock before 1970 is a broken host; treating it as the epoch makes every
        // authorization look not-yet-expired-but-not-yet-valid, which refuses safely.
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    fn now_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

/// A clock that only moves when told to. Cloning shares the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(now_unix: u64) -> Self {
        Self(Arc::new(AtomicU64::new(now_unix)))
    }

    pub fn set(&self, now_unix: u64) {
        self.0.store(now_unix, Ordering::SeqCst);
    }

    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}
