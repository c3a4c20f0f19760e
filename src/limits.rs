//! Per-API-server limits on submissions: a token-bucket rate and a cap on requests being
//! decided at once. One noisy server is refused with RESOURCE_EXHAUSTED while the others,
//! and settlement, go on.
//!
//! A server is named by the submission's `api_server` field, which the API listener sets to
//! the authenticated credential's name ([`crate::auth`]; another name is refused). Without
//! authentication (loopback only) the name is the caller's own claim.

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::Mutex;

use crate::config::LimitsConfig;

/// Most distinct servers tracked at once; beyond it, idle ones are forgotten first.
const MAX_SERVERS: usize = 10_000;

struct Server {
    tokens: f64,
    refilled: Instant,
    in_flight: usize,
}

/// The limits of every server.
pub struct Limits {
    rate: f64,
    burst: f64,
    max_in_flight: usize,
    servers: Mutex<HashMap<String, Server>>,
}

/// A submission admitted under its server's in-flight cap; the slot frees when dropped.
pub struct Permit<'a> {
    limits: &'a Limits,
    server: String,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.limits.servers.lock().get_mut(&self.server) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Limits {
        let burst =
            if config.per_server_burst > 0 { config.per_server_burst as f64 } else { config.per_server_rate };
        Limits {
            rate: config.per_server_rate,
            burst: burst.max(1.0),
            max_in_flight: config.per_server_in_flight,
            servers: Mutex::new(HashMap::new()),
        }
    }

    fn off(&self) -> bool {
        self.rate <= 0.0 && self.max_in_flight == 0
    }

    /// Takes one submission of `server` under its limits, or says which one it is over.
    pub fn admit(&self, server: &str) -> Result<Option<Permit<'_>>, String> {
        self.admit_at(server, Instant::now())
    }

    fn admit_at(&self, server: &str, now: Instant) -> Result<Option<Permit<'_>>, String> {
        if self.off() {
            return Ok(None);
        }
        let mut servers = self.servers.lock();
        if !servers.contains_key(server) && servers.len() >= MAX_SERVERS {
            // Forget servers with nothing in flight whose bucket has refilled.
            let (rate, burst) = (self.rate, self.burst);
            servers.retain(|_, s| {
                let full =
                    rate <= 0.0 || s.tokens + now.duration_since(s.refilled).as_secs_f64() * rate >= burst;
                s.in_flight > 0 || !full
            });
            if servers.len() >= MAX_SERVERS {
                return Err(format!("more than {MAX_SERVERS} API servers are submitting"));
            }
        }
        let s = servers.entry(server.to_owned()).or_insert(Server {
            tokens: self.burst,
            refilled: now,
            in_flight: 0,
        });
        if self.max_in_flight > 0 && s.in_flight >= self.max_in_flight {
            return Err(format!(
                "API server {server:?} has {} submissions in flight (limits.per_server_in_flight)",
                s.in_flight
            ));
        }
        if self.rate > 0.0 {
            s.tokens = (s.tokens + now.duration_since(s.refilled).as_secs_f64() * self.rate).min(self.burst);
            s.refilled = now;
            if s.tokens < 1.0 {
                return Err(format!(
                    "API server {server:?} is over its rate of {} submissions per second (limits.per_server_rate)",
                    self.rate
                ));
            }
            s.tokens -= 1.0;
        }
        s.in_flight += 1;
        Ok(Some(Permit { limits: self, server: server.to_owned() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: f64, burst: usize, in_flight: usize) -> Limits {
        Limits::new(&LimitsConfig {
            per_server_rate: rate,
            per_server_burst: burst,
            per_server_in_flight: in_flight,
        })
    }

    #[test]
    fn a_burst_then_the_rate_per_server() {
        let l = limits(10.0, 5, 0);
        let t0 = Instant::now();
        let held: Vec<_> = (0..5).map(|_| l.admit_at("a", t0).unwrap()).collect();
        let err = l.admit_at("a", t0).err().unwrap();
        assert!(err.contains("\"a\"") && err.contains("per_server_rate"), "{err}");
        assert!(l.admit_at("b", t0).unwrap().is_some(), "another server has its own bucket");
        drop(held);
        let later = t0 + std::time::Duration::from_millis(250);
        assert!(l.admit_at("a", later).is_ok() && l.admit_at("a", later).is_ok(), "2.5 tokens back");
        assert!(l.admit_at("a", later).is_err(), "and no more");
    }

    #[test]
    fn in_flight_is_capped_and_released() {
        let l = limits(0.0, 0, 2);
        let (p1, _p2) = (l.admit("a").unwrap(), l.admit("a").unwrap());
        assert!(l.admit("a").err().unwrap().contains("per_server_in_flight"));
        drop(p1);
        assert!(l.admit("a").is_ok());
    }

    #[test]
    fn off_by_default() {
        let l = Limits::new(&LimitsConfig::default());
        assert!((0..10_000).all(|_| l.admit("a").unwrap().is_none()));
    }
}
