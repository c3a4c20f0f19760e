//! The batch planner's deciding core: given the payments waiting, current fees, the gas
//! model, the caps and the operator's policy, decide at time `now` whether to cut a batch,
//! which payments go in it, and why, or how long to wait. A pure function of its inputs, so
//! every rule is tested without a chain or a clock.
//!
//! Cost per payment at size `n` and fee `f` (wei per gas) is `f · (fixed/n + marginal)`.
//! When gas is cheap a small batch already meets the cost target and is cut at once
//! (latency); when gas is expensive the planner waits for more payments to amortise the
//! fixed cost, but never past an item's deadline (its `validBefore` minus the safety
//! margin), never past the maximum wait, and never beyond the size and gas caps. Items not
//! yet valid wait; items that can no longer be planned in time are handed back as too late.

/// One payment waiting for a batch, in the planner's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// Caller's handle (an index into its own list).
    pub id: usize,
    /// When the ledger accepted it (Unix seconds).
    pub accepted_at: u64,
    /// The token requires `block.timestamp > validAfter` ...
    pub valid_after: u64,
    /// ... and `block.timestamp < validBefore` (saturated to u64).
    pub valid_before: u64,
}

/// Fees as last seen (`eth_feeHistory`), in wei per gas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fees {
    pub base_fee: u128,
    pub priority_fee: u128,
}

impl Fees {
    /// What one unit of gas costs a transaction included now.
    pub fn per_gas(self) -> u128 {
        self.base_fee.saturating_add(self.priority_fee)
    }
}

/// Gas a batch costs: a fixed part and a part per payment (seeded from config, then learned
/// from receipts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GasModel {
    pub fixed: u64,
    pub per_item: u64,
}

impl GasModel {
    pub fn batch_gas(self, items: usize) -> u64 {
        self.fixed.saturating_add(self.per_item.saturating_mul(items as u64))
    }

    /// Wei per payment for a batch of `items` at `fees`.
    pub fn cost_per_payment(self, items: usize, fees: Fees) -> u128 {
        if items == 0 {
            return u128::MAX;
        }
        u128::from(self.batch_gas(items)).saturating_mul(fees.per_gas()) / items as u128
    }
}

/// The operator's settlement policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_batch_size: usize,
    /// Longest a valid payment waits for a batch (seconds).
    pub max_wait_secs: u64,
    /// Cut at once when a batch would cost at most this per payment (wei).
    pub target_cost_per_payment_wei: u128,
    /// Plan a payment no later than this long before its `validBefore` (seconds): time for
    /// the transaction to be sent, included, and replaced once if stuck.
    pub deadline_margin_secs: u64,
}

/// The limits a batch must fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Per-transaction gas cap (EIP-7825: 2^24).
    pub tx_gas: u64,
    /// The chain's block gas limit.
    pub block_gas: u64,
}

/// Why a batch was cut; recorded with the batch and exported as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CutReason {
    /// The policy's maximum batch size was reached.
    SizeCap,
    /// The gas cap (per transaction or per block) limits the batch before the size cap.
    GasCap,
    /// A payment reached the last moment it can be planned.
    Deadline,
    /// A payment waited the maximum wait.
    MaxWait,
    /// The batch already costs no more per payment than the target.
    CostTarget,
}

impl CutReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CutReason::SizeCap => "size_cap",
            CutReason::GasCap => "gas_cap",
            CutReason::Deadline => "deadline",
            CutReason::MaxWait => "max_wait",
            CutReason::CostTarget => "cost_target",
        }
    }
}

/// The planner's decision at `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// A batch to send now, with why; `None` to wait.
    pub cut: Option<(Vec<usize>, CutReason)>,
    /// When to decide again if nothing changes (Unix seconds); `None` if nothing waits.
    pub wake_at: Option<u64>,
    /// Payments that can no longer be planned before their deadline margin. The caller
    /// expires them once their `validBefore` has passed on chain.
    pub too_late: Vec<usize>,
}

/// The last second at which `p` may be planned.
pub fn latest_plan_time(p: &Pending, policy: &Policy) -> u64 {
    p.valid_before.saturating_sub(policy.deadline_margin_secs).saturating_sub(1)
}

/// The first second at which `p` may be planned: a block made then satisfies
/// `block.timestamp > validAfter`.
pub fn earliest_plan_time(p: &Pending) -> u64 {
    p.valid_after.saturating_add(1)
}

/// Largest batch the caps and the policy allow (at least 1 when one payment fits at all).
pub fn capacity(gas: GasModel, caps: Caps, policy: &Policy) -> (usize, CutReason) {
    let gas_cap = caps.tx_gas.min(caps.block_gas);
    // No gas per item (a degenerate model) means gas does not bound the batch.
    let by_gas =
        gas_cap.saturating_sub(gas.fixed).checked_div(gas.per_item).map_or(usize::MAX, |n| n as usize);
    if by_gas < policy.max_batch_size {
        (by_gas, CutReason::GasCap)
    } else {
        (policy.max_batch_size, CutReason::SizeCap)
    }
}

/// Decides what to do at `now`.
pub fn plan(now: u64, pending: &[Pending], fees: Fees, gas: GasModel, caps: Caps, policy: &Policy) -> Plan {
    let mut too_late = Vec::new();
    let mut ready: Vec<&Pending> = Vec::new();
    let mut wake_at: Option<u64> = None;

    for p in pending {
        let (earliest, latest) = (earliest_plan_time(p), latest_plan_time(p, policy));
        if now > latest || earliest > latest {
            too_late.push(p.id);
        } else if now < earliest {
            wake_at = earlier(wake_at, earliest);
        } else {
            ready.push(p);
        }
    }
    let (cap, cap_reason) = capacity(gas, caps, policy);
    if ready.is_empty() || cap == 0 {
        return Plan { cut: None, wake_at, too_late };
    }

    // Earliest deadline first, then oldest: whoever must go first goes first.
    ready.sort_by_key(|p| (latest_plan_time(p, policy), p.accepted_at, p.id));
    let take = ready.len().min(cap);
    let chosen = || ready[..take].iter().map(|p| p.id).collect::<Vec<_>>();

    let first_deadline = ready.iter().map(|p| latest_plan_time(p, policy)).min().unwrap_or(u64::MAX);
    let oldest_wait =
        ready.iter().map(|p| p.accepted_at.max(earliest_plan_time(p))).min().unwrap_or(u64::MAX);
    let wait_over = oldest_wait.saturating_add(policy.max_wait_secs);

    let reason = if ready.len() >= cap {
        Some(cap_reason)
    } else if now >= first_deadline {
        Some(CutReason::Deadline)
    } else if now >= wait_over {
        Some(CutReason::MaxWait)
    } else if gas.cost_per_payment(take, fees) <= policy.target_cost_per_payment_wei {
        Some(CutReason::CostTarget)
    } else {
        None
    };
    match reason {
        Some(reason) => {
            // What is left behind decides the next wake-up.
            Plan { cut: Some((chosen(), reason)), wake_at: Some(now), too_late }
        }
        None => Plan { cut: None, wake_at: earlier(wake_at, first_deadline.min(wait_over)), too_late },
    }
}

fn earlier(a: Option<u64>, t: u64) -> Option<u64> {
    Some(a.map_or(t, |a| a.min(t)))
}

/// Learns the gas model from receipts: a least-squares line `gas = fixed + per_item · n`
/// through the most recent batches. Until two different sizes have been seen, only the
/// per-item part is learned (the fixed part keeps its seed). What it learns prices batches
/// for the planner; gas *limits* never go below the seeds (see [`GasLearner::limit_model`]).
#[derive(Debug, Clone)]
pub struct GasLearner {
    seed: GasModel,
    samples: std::collections::VecDeque<(u64, u64)>,
    window: usize,
}

impl GasLearner {
    pub fn new(seed: GasModel, window: usize) -> Self {
        Self { seed, samples: std::collections::VecDeque::new(), window: window.max(2) }
    }

    /// A receipt: `items` payments used `gas_used` gas.
    pub fn observe(&mut self, items: usize, gas_used: u64) {
        if items == 0 {
            return;
        }
        if self.samples.len() == self.window {
            self.samples.pop_front();
        }
        self.samples.push_back((items as u64, gas_used));
    }

    /// The model as learned so far (the seed before any receipt).
    pub fn model(&self) -> GasModel {
        let n = self.samples.len() as f64;
        if n == 0.0 {
            return self.seed;
        }
        let (sx, sy) = self.samples.iter().fold((0.0, 0.0), |(a, b), &(x, y)| (a + x as f64, b + y as f64));
        let (mx, my) = (sx / n, sy / n);
        let (sxx, sxy) = self.samples.iter().fold((0.0, 0.0), |(a, b), &(x, y)| {
            let dx = x as f64 - mx;
            (a + dx * dx, b + dx * (y as f64 - my))
        });
        // At least the intrinsic 21,000 of any transaction; at least 1 per item.
        let (fixed, per_item) = if sxx > 0.0 {
            let slope = sxy / sxx;
            (my - slope * mx, slope)
        } else {
            let fixed = self.seed.fixed as f64;
            (fixed, (my - fixed) / mx)
        };
        GasModel { fixed: fixed.max(21_000.0).round() as u64, per_item: per_item.max(1.0).round() as u64 }
    }

    /// The model gas limits come from: the learned one, never below the seeds, so a run of
    /// cheap batches (say, all items failing early) cannot shrink limits under what an
    /// item may need.
    pub fn limit_model(&self) -> GasModel {
        let m = self.model();
        GasModel { fixed: m.fixed.max(self.seed.fixed), per_item: m.per_item.max(self.seed.per_item) }
    }

    /// The gas limit for a batch of `items`: the limit model plus `margin_percent`.
    pub fn gas_limit(&self, items: usize, margin_percent: u64) -> u64 {
        let gas = self.limit_model().batch_gas(items);
        gas.saturating_add(gas.saturating_mul(margin_percent) / 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GAS: GasModel = GasModel { fixed: 30_000, per_item: 45_000 };
    const CAPS: Caps = Caps { tx_gas: 1 << 24, block_gas: 30_000_000 };
    const POLICY: Policy = Policy {
        max_batch_size: 100,
        max_wait_secs: 10,
        target_cost_per_payment_wei: 50_000 * 1_000_000_000,
        deadline_margin_secs: 20,
    };
    /// 1 gwei: a batch of one costs 75k gwei per payment, of ten 48k gwei.
    const CHEAPISH: Fees = Fees { base_fee: 1_000_000_000, priority_fee: 0 };
    const EXPENSIVE: Fees = Fees { base_fee: 100_000_000_000, priority_fee: 1_000_000_000 };

    fn item(id: usize, accepted_at: u64, valid_before: u64) -> Pending {
        Pending { id, accepted_at, valid_after: 0, valid_before }
    }

    #[test]
    fn each_reason() {
        let now = 1_000;
        // Expensive gas, young payments, far deadlines: wait, and say until when.
        let few: Vec<_> = (0..3).map(|i| item(i, now, now + 300)).collect();
        let p = plan(now, &few, EXPENSIVE, GAS, CAPS, &POLICY);
        assert_eq!(p.cut, None);
        assert_eq!(p.wake_at, Some(now + POLICY.max_wait_secs));
        // ... until the oldest has waited the maximum.
        let p = plan(now + 10, &few, EXPENSIVE, GAS, CAPS, &POLICY);
        assert_eq!(p.cut, Some((vec![0, 1, 2], CutReason::MaxWait)));
        // A deadline comes first.
        let urgent = vec![item(0, now, now + 21), item(1, now, now + 300)];
        let p = plan(now, &urgent, EXPENSIVE, GAS, CAPS, &POLICY);
        assert_eq!(p.cut, Some((vec![0, 1], CutReason::Deadline)));
        // Cheap gas: ten payments already meet the cost target; one does not.
        let ten: Vec<_> = (0..10).map(|i| item(i, now, now + 300)).collect();
        assert_eq!(
            plan(now, &ten, CHEAPISH, GAS, CAPS, &POLICY).cut.map(|c| c.1),
            Some(CutReason::CostTarget)
        );
        assert_eq!(plan(now, &ten[..1], CHEAPISH, GAS, CAPS, &POLICY).cut, None);
        // Size cap, then gas cap.
        let many: Vec<_> = (0..250).map(|i| item(i, now, now + 300)).collect();
        let (ids, reason) = plan(now, &many, EXPENSIVE, GAS, CAPS, &POLICY).cut.unwrap();
        assert_eq!((ids.len(), reason), (100, CutReason::SizeCap));
        let big = Policy { max_batch_size: 1000, ..POLICY };
        let (ids, reason) =
            plan(now, &many[..], EXPENSIVE, GAS, Caps { tx_gas: 3_000_000, ..CAPS }, &big).cut.unwrap();
        assert_eq!((ids.len(), reason), (66, CutReason::GasCap));
        // Not yet valid: wait for it; past its deadline margin: too late.
        let later = Pending { id: 7, accepted_at: now, valid_after: now + 5, valid_before: now + 300 };
        let gone = item(8, now - 100, now + 20);
        let p = plan(now, &[later, gone], EXPENSIVE, GAS, CAPS, &POLICY);
        assert_eq!((p.cut, p.wake_at, p.too_late), (None, Some(now + 6), vec![8]));
    }

    fn arb_pending(n: usize) -> impl Strategy<Value = Vec<Pending>> {
        prop::collection::vec((0u64..200, 0u64..60, 0u64..400), 0..n).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(id, (accepted_at, after, life))| Pending {
                    id,
                    accepted_at,
                    valid_after: accepted_at.saturating_sub(30) + after,
                    valid_before: accepted_at + life,
                })
                .collect()
        })
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (1usize..60, 0u64..30, 0u128..200_000_000_000_000, 0u64..40).prop_map(
            |(size, wait, target, margin)| Policy {
                max_batch_size: size,
                max_wait_secs: wait,
                target_cost_per_payment_wei: target,
                deadline_margin_secs: margin,
            },
        )
    }

    fn arb_fees() -> impl Strategy<Value = Fees> {
        (0u128..500_000_000_000, 0u128..5_000_000_000)
            .prop_map(|(b, p)| Fees { base_fee: b, priority_fee: p })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Never over a cap; never an item outside its window; every item accounted for.
        #[test]
        fn a_cut_respects_caps_and_windows(
            now in 0u64..500,
            pending in arb_pending(300),
            fees in arb_fees(),
            policy in arb_policy(),
            tx_gas in 50_000u64..20_000_000,
        ) {
            let caps = Caps { tx_gas, block_gas: 30_000_000 };
            let p = plan(now, &pending, fees, GAS, caps, &policy);
            if let Some((ids, _)) = &p.cut {
                prop_assert!(!ids.is_empty());
                prop_assert!(ids.len() <= policy.max_batch_size);
                prop_assert!(GAS.batch_gas(ids.len()) <= caps.tx_gas.min(caps.block_gas));
                for id in ids {
                    let item = &pending[*id];
                    prop_assert!(earliest_plan_time(item) <= now && now <= latest_plan_time(item, &policy));
                    prop_assert!(!p.too_late.contains(id));
                }
            }
            for id in &p.too_late {
                let item = &pending[*id];
                prop_assert!(now > latest_plan_time(item, &policy) || earliest_plan_time(item) > latest_plan_time(item, &policy));
            }
            if p.cut.is_none() && let Some(w) = p.wake_at {
                prop_assert!(w > now, "a wait wakes in the future");
            }
        }

        /// Run over time (a decision every second, as many cuts per second as it makes):
        /// every payment that could be planned is planned by its deadline and by its
        /// maximum wait; only payments that arrived too late are handed back.
        #[test]
        fn no_payment_starves(pending in arb_pending(120), fees in arb_fees(), policy in arb_policy()) {
            let mut planned_at = vec![None; pending.len()];
            let mut too_late = vec![false; pending.len()];
            for now in 0..700u64 {
                loop {
                    let waiting: Vec<Pending> = pending
                        .iter()
                        .filter(|p| p.accepted_at <= now && planned_at[p.id].is_none() && !too_late[p.id])
                        .copied()
                        .collect();
                    let p = plan(now, &waiting, fees, GAS, CAPS, &policy);
                    for id in p.too_late {
                        too_late[id] = true;
                    }
                    match p.cut {
                        Some((ids, _)) => ids.into_iter().for_each(|id| planned_at[id] = Some(now)),
                        None => break,
                    }
                }
            }
            for p in &pending {
                let (earliest, latest) = (earliest_plan_time(p), latest_plan_time(p, &policy));
                let start = p.accepted_at.max(earliest);
                if start <= latest {
                    let by = latest.min(start + policy.max_wait_secs);
                    prop_assert!(matches!(planned_at[p.id], Some(t) if t <= by), "{p:?} planned at {:?}, due by {by}", planned_at[p.id]);
                } else {
                    prop_assert!(too_late[p.id] && planned_at[p.id].is_none());
                }
            }
        }
    }

    #[test]
    fn gas_learner_finds_the_line() {
        let seed = GasModel { fixed: 40_000, per_item: 60_000 };
        let mut l = GasLearner::new(seed, 16);
        assert_eq!(l.model(), seed);
        // One size only: the per-item part from the seed's fixed part.
        l.observe(10, 40_000 + 10 * 45_000);
        assert_eq!(l.model(), GasModel { fixed: 40_000, per_item: 45_000 });
        // Two sizes: the exact line.
        l.observe(50, 27_000 + 50 * 45_300);
        l.observe(1, 27_000 + 45_300);
        l.observe(10, 27_000 + 10 * 45_300);
        l.samples.pop_front();
        assert_eq!(l.model(), GasModel { fixed: 27_000, per_item: 45_300 });
        // Limits never below the seeds, plus the margin.
        assert_eq!(l.limit_model(), GasModel { fixed: 40_000, per_item: 60_000 });
        assert_eq!(l.gas_limit(1, 50), 150_000);
        // The window forgets old samples.
        let mut w = GasLearner::new(seed, 2);
        for _ in 0..3 {
            w.observe(1, 200_000);
        }
        w.observe(2, 300_000);
        w.observe(4, 500_000);
        assert_eq!(w.model(), GasModel { fixed: 100_000, per_item: 100_000 });
    }
}
