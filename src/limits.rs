//! Per-API-server limits on submissions: a rate (with a burst) and a cap on requests being
//! decided at once. One noisy server is refused with RESOURCE_EXHAUSTED while the others,
//! and settlement, go on.
//!
//! The rate is `governor`'s keyed GCRA limiter. The in-flight cap is ours: `governor` limits
//! how often, not how many at once, and a submission's slot must be held until its decision
//! is made (the [`Permit`] frees it when dropped).
//!
//! A server is named by the submission's `api_server` field, which the API listener sets to
//! the authenticated credential's name ([`crate::auth`]; another name is refused). Without
//! authentication (loopback only) the name is the caller's own claim.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use parking_lot::Mutex;

use crate::config::LimitsConfig;

/// Most distinct servers whose rate is tracked at once. Servers idle long enough to be back
/// at a full burst are forgotten first; past that (only a caller spraying names on an
/// unauthenticated loopback listener gets there) submissions are refused until some are.
const MAX_SERVERS: usize = 10_000;

type Rates<C> = RateLimiter<String, DefaultKeyedStateStore<String>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The limits of every server.
pub struct Limits<C: Clock = DefaultClock> {
    /// Submissions per second and burst, per server; `None`: no rate limit.
    rates: Option<(Rates<C>, f64)>,
    max_in_flight: usize,
    /// Submissions being decided, per server (servers with none are not kept).
    in_flight: Mutex<HashMap<String, usize>>,
}

/// A submission admitted under its server's in-flight cap; the slot frees when dropped.
pub struct Permit<'a, C: Clock = DefaultClock> {
    limits: &'a Limits<C>,
    server: String,
}

impl<C: Clock> Drop for Permit<'_, C> {
    fn drop(&mut self) {
        let mut in_flight = self.limits.in_flight.lock();
        if let Some(n) = in_flight.get_mut(&self.server) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                in_flight.remove(&self.server);
            }
        }
    }
}

/// `rate` submissions per second with bursts of `burst` (0: one second's worth), as a quota.
fn quota(rate: f64, burst: usize) -> Option<Quota> {
    if rate <= 0.0 || !rate.is_finite() {
        return None;
    }
    let burst = if burst > 0 { burst as f64 } else { rate };
    let burst = NonZeroU32::new(burst.clamp(1.0, f64::from(u32::MAX)) as u32)?;
    Some(Quota::with_period(Duration::from_secs_f64(1.0 / rate))?.allow_burst(burst))
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Limits {
        Limits::with_clock(config, DefaultClock::default())
    }
}

impl<C: Clock> Limits<C> {
    /// Limits timed by `clock` (tests use a fake one).
    pub fn with_clock(config: &LimitsConfig, clock: C) -> Limits<C> {
        let rates = quota(config.per_server_rate, config.per_server_burst)
            .map(|q| (RateLimiter::new(q, DefaultKeyedStateStore::default(), clock), config.per_server_rate));
        Limits { rates, max_in_flight: config.per_server_in_flight, in_flight: Mutex::new(HashMap::new()) }
    }

    /// Takes one submission of `server` under its limits, or says which one it is over.
    pub fn admit(&self, server: &str) -> Result<Option<Permit<'_, C>>, String> {
        if self.rates.is_none() && self.max_in_flight == 0 {
            return Ok(None);
        }
        let mut in_flight = self.in_flight.lock();
        let held = in_flight.get(server).copied().unwrap_or(0);
        if self.max_in_flight > 0 && held >= self.max_in_flight {
            return Err(format!(
                "API server {server:?} has {held} submissions in flight (limits.per_server_in_flight)"
            ));
        }
        if let Some((rates, rate)) = &self.rates {
            if rates.len() >= MAX_SERVERS {
                rates.retain_recent();
                rates.shrink_to_fit();
                if rates.len() >= MAX_SERVERS {
                    return Err(format!("more than {MAX_SERVERS} API servers are submitting"));
                }
            }
            if rates.check_key(&server.to_owned()).is_err() {
                return Err(format!(
                    "API server {server:?} is over its rate of {rate} submissions per second (limits.per_server_rate)"
                ));
            }
        }
        *in_flight.entry(server.to_owned()).or_default() += 1;
        Ok(Some(Permit { limits: self, server: server.to_owned() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limits(rate: f64, burst: usize, in_flight: usize) -> (Limits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let config =
            LimitsConfig { per_server_rate: rate, per_server_burst: burst, per_server_in_flight: in_flight };
        (Limits::with_clock(&config, clock.clone()), clock)
    }

    #[test]
    fn a_burst_then_the_rate_per_server() {
        let (l, clock) = limits(10.0, 5, 0);
        let held: Vec<_> = (0..5).map(|_| l.admit("a").unwrap()).collect();
        let err = l.admit("a").err().unwrap();
        assert!(err.contains("\"a\"") && err.contains("per_server_rate"), "{err}");
        assert!(l.admit("b").unwrap().is_some(), "another server has its own bucket");
        drop(held);
        clock.advance(Duration::from_millis(250));
        assert!(l.admit("a").is_ok() && l.admit("a").is_ok(), "2.5 submissions' worth back");
        assert!(l.admit("a").is_err(), "and no more");
    }

    #[test]
    fn the_burst_defaults_to_one_seconds_worth() {
        let (l, _clock) = limits(3.0, 0, 0);
        assert!((0..3).all(|_| l.admit("a").is_ok()));
        assert!(l.admit("a").is_err());
    }

    #[test]
    fn in_flight_is_capped_and_released_without_spending_the_rate() {
        let (l, _clock) = limits(0.0, 0, 2);
        let (p1, _p2) = (l.admit("a").unwrap(), l.admit("a").unwrap());
        assert!(l.admit("a").err().unwrap().contains("per_server_in_flight"));
        drop(p1);
        assert!(l.admit("a").is_ok());
        // Refused for its in-flight cap, a submission takes nothing from the rate.
        let (l, _clock) = limits(1.0, 1, 1);
        let held = l.admit("b").unwrap();
        assert!(l.admit("b").err().unwrap().contains("per_server_in_flight"));
        drop(held);
        assert!(l.admit("b").err().unwrap().contains("per_server_rate"), "the one token went to the first");
    }

    #[test]
    fn off_by_default() {
        let l = Limits::new(&LimitsConfig::default());
        assert!((0..10_000).all(|_| l.admit("a").unwrap().is_none()));
    }
}
