//! The settlement policy operators tune while the daemon runs: batch size, max wait,
//! linger, target cost per payment, confirmation depth, deadline margin, and pause.
//!
//! It starts from the config's `[settlement]` section and changes through the Admin
//! service's `UpdatePolicy` or a config reload on SIGHUP. Every change is validated as a
//! whole (a bad value refuses the change, naming the field, and nothing changes), logged
//! with what changed and who asked, and published on a watch channel: each settlement
//! engine reads the current policy at the start of every round, so a change applies from
//! the next batch planned (and, for the depth, from the next confirmation check).

use std::sync::Arc;

use tokio::sync::watch;

/// Most payments one batch may hold (a batch is also capped by gas).
pub const MAX_BATCH_SIZE_LIMIT: usize = 10_000;
/// Longest wait or margin accepted, in seconds (a day).
pub const MAX_SECONDS_LIMIT: u64 = 86_400;
/// Longest linger accepted, in milliseconds: a linger is a short hold for company, never a
/// wait (that is `max_wait_ms`).
pub const MAX_LINGER_MS: u64 = 60_000;
/// Deepest confirmation depth accepted.
pub const MAX_CONFIRMATIONS_LIMIT: u64 = 10_000;

/// The runtime-tunable part of the settlement config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementPolicy {
    pub max_batch_size: usize,
    /// Longest an accepted payment waits for a batch (milliseconds).
    pub max_wait_ms: u64,
    /// How long a cheap batch that is not full waits for more payments (milliseconds).
    pub linger_ms: u64,
    pub target_cost_per_payment_wei: u128,
    pub confirmations: u64,
    pub deadline_margin_secs: u64,
    pub paused: bool,
}

impl SettlementPolicy {
    /// The rules the planner cuts batches by.
    pub fn cut_rules(&self) -> crate::planner::CutRules {
        crate::planner::CutRules {
            max_batch_size: self.max_batch_size,
            max_wait_ms: self.max_wait_ms,
            linger_ms: self.linger_ms,
            target_cost_per_payment_wei: self.target_cost_per_payment_wei,
            deadline_margin_secs: self.deadline_margin_secs,
        }
    }
}

/// A refused policy value: the field (as the config names it) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    pub field: &'static str,
    pub reason: String,
}

pub(crate) fn refuse(field: &'static str, reason: impl Into<String>) -> PolicyError {
    PolicyError { field, reason: reason.into() }
}

/// A change to some fields of the policy; the others keep their value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyUpdate {
    pub max_batch_size: Option<usize>,
    pub max_wait_ms: Option<u64>,
    pub linger_ms: Option<u64>,
    pub target_cost_per_payment_wei: Option<u128>,
    pub confirmations: Option<u64>,
    pub deadline_margin_secs: Option<u64>,
    pub paused: Option<bool>,
}

impl SettlementPolicy {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.max_batch_size == 0 || self.max_batch_size > MAX_BATCH_SIZE_LIMIT {
            return Err(refuse("max_batch_size", format!("must be 1 to {MAX_BATCH_SIZE_LIMIT}")));
        }
        if self.max_wait_ms > MAX_SECONDS_LIMIT * 1000 {
            return Err(refuse(
                "max_wait_ms",
                format!("must be at most {} milliseconds (a day)", MAX_SECONDS_LIMIT * 1000),
            ));
        }
        if self.linger_ms > MAX_LINGER_MS {
            return Err(refuse("linger_ms", format!("must be at most {MAX_LINGER_MS} milliseconds")));
        }
        if self.confirmations == 0 || self.confirmations > MAX_CONFIRMATIONS_LIMIT {
            return Err(refuse(
                "confirmations",
                format!("must be 1 (the including block) to {MAX_CONFIRMATIONS_LIMIT}"),
            ));
        }
        if self.deadline_margin_secs > MAX_SECONDS_LIMIT {
            return Err(refuse(
                "deadline_margin_secs",
                format!("must be at most {MAX_SECONDS_LIMIT} seconds"),
            ));
        }
        Ok(())
    }

    /// This policy with `update`'s present fields applied, validated.
    pub fn with_update(&self, update: &PolicyUpdate) -> Result<Self, PolicyError> {
        let p = SettlementPolicy {
            max_batch_size: update.max_batch_size.unwrap_or(self.max_batch_size),
            max_wait_ms: update.max_wait_ms.unwrap_or(self.max_wait_ms),
            linger_ms: update.linger_ms.unwrap_or(self.linger_ms),
            target_cost_per_payment_wei: update
                .target_cost_per_payment_wei
                .unwrap_or(self.target_cost_per_payment_wei),
            confirmations: update.confirmations.unwrap_or(self.confirmations),
            deadline_margin_secs: update.deadline_margin_secs.unwrap_or(self.deadline_margin_secs),
            paused: update.paused.unwrap_or(self.paused),
        };
        p.validate()?;
        Ok(p)
    }

    /// Publishes the policy's values as gauges (at start and on every change).
    pub fn publish(&self) {
        metrics::gauge!("x402_batcher_policy_max_batch_size").set(self.max_batch_size as f64);
        metrics::gauge!("x402_batcher_policy_max_wait_seconds").set(self.max_wait_ms as f64 / 1000.0);
        metrics::gauge!("x402_batcher_policy_linger_seconds").set(self.linger_ms as f64 / 1000.0);
        metrics::gauge!("x402_batcher_policy_target_cost_per_payment_wei")
            .set(self.target_cost_per_payment_wei as f64);
        metrics::gauge!("x402_batcher_policy_confirmations").set(self.confirmations as f64);
        metrics::gauge!("x402_batcher_policy_deadline_margin_seconds").set(self.deadline_margin_secs as f64);
        metrics::gauge!("x402_batcher_settlement_paused").set(if self.paused { 1.0 } else { 0.0 });
    }

    /// `field old -> new` for each field that differs from `before`.
    pub fn changes_from(&self, before: &SettlementPolicy) -> Vec<String> {
        let mut out = Vec::new();
        let mut diff = |name: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{name} {a} -> {b}"));
            }
        };
        diff("max_batch_size", before.max_batch_size.to_string(), self.max_batch_size.to_string());
        diff("max_wait_ms", before.max_wait_ms.to_string(), self.max_wait_ms.to_string());
        diff("linger_ms", before.linger_ms.to_string(), self.linger_ms.to_string());
        diff(
            "target_cost_per_payment_wei",
            before.target_cost_per_payment_wei.to_string(),
            self.target_cost_per_payment_wei.to_string(),
        );
        diff("confirmations", before.confirmations.to_string(), self.confirmations.to_string());
        diff(
            "deadline_margin_secs",
            before.deadline_margin_secs.to_string(),
            self.deadline_margin_secs.to_string(),
        );
        diff("paused", before.paused.to_string(), self.paused.to_string());
        out
    }
}

/// The current policy, shared by the Admin service, the SIGHUP reload and the engines.
#[derive(Debug, Clone)]
pub struct PolicyHandle(Arc<watch::Sender<SettlementPolicy>>);

impl PolicyHandle {
    pub fn new(initial: SettlementPolicy) -> Self {
        initial.publish();
        Self(Arc::new(watch::Sender::new(initial)))
    }

    pub fn get(&self) -> SettlementPolicy {
        self.0.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<SettlementPolicy> {
        self.0.subscribe()
    }

    /// Applies `update` to the current policy atomically (two concurrent updates never
    /// lose one another's fields), publishes and logs the result.
    pub fn update(
        &self,
        source: &str,
        update: impl FnOnce(&SettlementPolicy) -> Result<SettlementPolicy, PolicyError>,
    ) -> Result<SettlementPolicy, PolicyError> {
        let mut outcome = None;
        self.0.send_if_modified(|current| match update(current) {
            Ok(next) => {
                let changes = next.changes_from(current);
                if changes.is_empty() {
                    outcome = Some(Ok(next));
                    return false;
                }
                tracing::info!(source, changes = %changes.join(", "), "settlement policy changed");
                next.publish();
                *current = next.clone();
                outcome = Some(Ok(next));
                true
            }
            Err(e) => {
                tracing::warn!(source, "settlement policy change refused: {e}");
                outcome = Some(Err(e));
                false
            }
        });
        outcome.expect("send_if_modified runs the closure once")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> SettlementPolicy {
        SettlementPolicy {
            max_batch_size: 200,
            max_wait_ms: 5_000,
            linger_ms: 250,
            target_cost_per_payment_wei: 1,
            confirmations: 3,
            deadline_margin_secs: 10,
            paused: false,
        }
    }

    #[test]
    fn absent_fields_keep_their_value() {
        let p = base().with_update(&PolicyUpdate { max_batch_size: Some(7), ..Default::default() }).unwrap();
        assert_eq!(p.max_batch_size, 7);
        assert_eq!(SettlementPolicy { max_batch_size: base().max_batch_size, ..p }, base());
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        let cases = [
            (PolicyUpdate { max_batch_size: Some(0), ..Default::default() }, "max_batch_size"),
            (PolicyUpdate { max_batch_size: Some(10_001), ..Default::default() }, "max_batch_size"),
            (PolicyUpdate { confirmations: Some(0), ..Default::default() }, "confirmations"),
            (PolicyUpdate { max_wait_ms: Some(86_400_001), ..Default::default() }, "max_wait_ms"),
            (PolicyUpdate { linger_ms: Some(60_001), ..Default::default() }, "linger_ms"),
            (
                PolicyUpdate { deadline_margin_secs: Some(u64::MAX), ..Default::default() },
                "deadline_margin_secs",
            ),
        ];
        for (update, field) in cases {
            assert_eq!(base().with_update(&update).unwrap_err().field, field, "{update:?}");
        }
    }

    #[test]
    fn a_refused_update_changes_nothing_and_a_good_one_is_published() {
        let h = PolicyHandle::new(base());
        let rx = h.subscribe();
        let bad = PolicyUpdate { max_batch_size: Some(5), confirmations: Some(0), ..Default::default() };
        assert!(h.update("test", |p| p.with_update(&bad)).is_err());
        assert_eq!(h.get(), base(), "the good field of a refused update is not applied either");
        assert!(!rx.has_changed().unwrap());
        let good = PolicyUpdate { paused: Some(true), ..Default::default() };
        let p = h.update("test", |p| p.with_update(&good)).unwrap();
        assert!(p.paused && h.get().paused);
        assert!(rx.has_changed().unwrap());
        assert_eq!(p.changes_from(&base()), vec!["paused false -> true".to_owned()]);
    }
}
