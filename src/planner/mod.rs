//! The batch planner's deciding core: given the payments waiting, current fees, what a
//! settlement costs, the caps and the operator's policy, decide at time `now_ms` whether to
//! cut a batch, which payments go in it, and why, or how long to wait. A pure function of
//! its inputs, so every rule is tested without a chain or a clock.
//!
//! A settlement of one payment is the token's own `transferWithAuthorization` sent
//! directly ([`Shape::Direct`]); of more, one Multicall3 `aggregate3` ([`Shape::Batch`]).
//! Cost per payment at size `n` and fee `f` (wei per gas) is `(f · gas(n) + l1(n)) / n`,
//! with `gas(n) = fixed + marginal · n` for a batch and the direct call's gas for one, and
//! `l1` the L1 data fee OP-stack chains charge (zero elsewhere). When gas is cheap a small
//! batch already meets the cost target; it is still held for the policy's *linger* (counted
//! from the oldest waiting payment) so that payments arriving together share a batch. When
//! gas is expensive the planner waits for more payments to amortise the fixed cost, but
//! never past an item's deadline (its `validBefore` minus the safety margin), never past
//! the maximum wait, and never beyond the size and gas caps. Items not yet valid wait;
//! items that can no longer be planned in time are handed back as too late.
//!
//! Waits are in milliseconds; validity windows are chain time, in whole seconds. What a
//! settlement costs (fees, gas by shape, the learnt gas model) is [`gas`].

pub mod gas;

pub use gas::{Costs, Fees, GasBook, GasLearner, GasModel, L1Fees, Shape};

/// One payment waiting for a batch, in the planner's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// Caller's handle (an index into its own list).
    pub id: usize,
    /// When the ledger accepted it (Unix milliseconds).
    pub accepted_at_ms: u64,
    /// The token requires `block.timestamp > validAfter` ...
    pub valid_after: u64,
    /// ... and `block.timestamp < validBefore` (saturated to u64).
    pub valid_before: u64,
    /// Who pays: among payments equally urgent, one payer's go together (see [`plan`]).
    pub payer: alloy::primitives::Address,
}

/// The rules of when to cut a batch: the part of the operator's settlement policy
/// ([`crate::policy::SettlementPolicy::cut_rules`]) the planner decides by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutRules {
    pub max_batch_size: usize,
    /// Longest a valid payment waits for a batch (milliseconds).
    pub max_wait_ms: u64,
    /// How long a batch that is not full, but already cheap enough, waits for more
    /// payments, counted from its oldest payment (milliseconds).
    pub linger_ms: u64,
    /// Cut (after the linger) when a batch would cost at most this per payment (wei).
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
    /// The batch already costs no more per payment than the target (and lingered).
    CostTarget,
    /// The send moment of the chain's next block came (a chain with a block cadence).
    Block,
    /// Cheap enough, and nothing else is expected in time to share it (the arrival rate,
    /// or a chain that includes a transaction at once).
    NoCompany,
}

impl CutReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CutReason::SizeCap => "size_cap",
            CutReason::GasCap => "gas_cap",
            CutReason::Deadline => "deadline",
            CutReason::MaxWait => "max_wait",
            CutReason::CostTarget => "cost_target",
            CutReason::Block => "block",
            CutReason::NoCompany => "no_company",
        }
    }
}

/// The planner's decision at `now_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// A batch to send now, with why; `None` to wait.
    pub cut: Option<(Vec<usize>, CutReason)>,
    /// When to decide again if nothing changes (Unix milliseconds); `None` if nothing waits.
    pub wake_at_ms: Option<u64>,
    /// Payments that can no longer be planned before their deadline margin. The caller
    /// expires them once their `validBefore` has passed on chain.
    pub too_late: Vec<usize>,
}

/// The last second (chain time) in which `p` may be planned.
pub fn latest_plan_time(p: &Pending, rules: &CutRules) -> u64 {
    p.valid_before.saturating_sub(rules.deadline_margin_secs).saturating_sub(1)
}

/// The first second at which `p` may be planned: a block made then satisfies
/// `block.timestamp > validAfter`.
pub fn earliest_plan_time(p: &Pending) -> u64 {
    p.valid_after.saturating_add(1)
}

fn ms(secs: u64) -> u64 {
    secs.saturating_mul(1000)
}

/// Largest batch the caps and the cut rules allow (at least 1 when one payment fits at all).
pub fn capacity(gas: GasModel, caps: Caps, rules: &CutRules) -> (usize, CutReason) {
    let gas_cap = caps.tx_gas.min(caps.block_gas);
    // No gas per item (a degenerate model) means gas does not bound the batch.
    let by_gas =
        gas_cap.saturating_sub(gas.fixed).checked_div(gas.per_item).map_or(usize::MAX, |n| n as usize);
    if by_gas < rules.max_batch_size {
        (by_gas, CutReason::GasCap)
    } else {
        (rules.max_batch_size, CutReason::SizeCap)
    }
}

/// How long a batch that already meets the cost target waits for company: until
/// `until_ms` (planner time), then it is cut for `reason`. The engine decides it from the
/// chain's cadence and the arrival rate (see `settle::pace`); without one, the policy's
/// linger from the oldest payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    pub until_ms: u64,
    pub reason: CutReason,
}

/// Decides what to do at `now_ms`, a cheap batch held for the policy's linger.
pub fn plan(
    now_ms: u64,
    pending: &[Pending],
    fees: Fees,
    costs: &Costs,
    caps: Caps,
    rules: &CutRules,
) -> Plan {
    plan_held(now_ms, pending, fees, costs, caps, rules, None)
}

/// Decides what to do at `now_ms`, a cheap batch held as `hold` says (the linger when
/// `None`); the maximum wait, deadlines and caps bound every hold.
pub fn plan_held(
    now_ms: u64,
    pending: &[Pending],
    fees: Fees,
    costs: &Costs,
    caps: Caps,
    rules: &CutRules,
    hold: Option<Hold>,
) -> Plan {
    let now = now_ms / 1000;
    let mut too_late = Vec::new();
    let mut ready: Vec<&Pending> = Vec::new();
    let mut wake_at_ms: Option<u64> = None;

    for p in pending {
        let (earliest, latest) = (earliest_plan_time(p), latest_plan_time(p, rules));
        if now > latest || earliest > latest {
            too_late.push(p.id);
        } else if now < earliest {
            wake_at_ms = earlier(wake_at_ms, ms(earliest));
        } else {
            ready.push(p);
        }
    }
    let (cap, cap_reason) = capacity(costs.batch, caps, rules);
    if ready.is_empty() || cap == 0 {
        return Plan { cut: None, wake_at_ms, too_late };
    }

    // Earliest deadline first, then oldest (by the second): whoever must go first goes
    // first. Among payments equally urgent, one payer's go together: a payer's second
    // payment in a transaction costs ~1.5-4k gas less (its balance is warm storage).
    ready.sort_by_key(|p| (latest_plan_time(p, rules), p.accepted_at_ms / 1000, p.payer, p.id));
    let take = ready.len().min(cap);
    let chosen = || ready[..take].iter().map(|p| p.id).collect::<Vec<_>>();

    let first_deadline = ready.iter().map(|p| ms(latest_plan_time(p, rules))).min().unwrap_or(u64::MAX);
    let oldest =
        ready.iter().map(|p| p.accepted_at_ms.max(ms(earliest_plan_time(p)))).min().unwrap_or(u64::MAX);
    let wait_over = oldest.saturating_add(rules.max_wait_ms);
    let (hold_over, hold_reason) = match hold {
        Some(h) => (h.until_ms.min(wait_over), h.reason),
        None => (oldest.saturating_add(rules.linger_ms).min(wait_over), CutReason::CostTarget),
    };
    let cheap = costs.cost_per_payment(take, fees) <= rules.target_cost_per_payment_wei;

    let reason = if ready.len() >= cap {
        Some(cap_reason)
    } else if now_ms >= first_deadline {
        Some(CutReason::Deadline)
    } else if now_ms >= wait_over {
        Some(CutReason::MaxWait)
    } else if cheap && now_ms >= hold_over {
        Some(hold_reason)
    } else {
        None
    };
    match reason {
        Some(reason) => {
            // What is left behind decides the next wake-up.
            Plan { cut: Some((chosen(), reason)), wake_at_ms: Some(now_ms), too_late }
        }
        None => {
            let next = first_deadline.min(if cheap { hold_over } else { wait_over });
            Plan { cut: None, wake_at_ms: earlier(wake_at_ms, next), too_late }
        }
    }
}

fn earlier(a: Option<u64>, t: u64) -> Option<u64> {
    Some(a.map_or(t, |a| a.min(t)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::Address;
    use proptest::prelude::*;

    const GAS: GasModel = GasModel { fixed: 30_000, per_item: 45_000 };
    const COSTS: Costs =
        Costs { batch: GAS, direct_gas: 70_000, l1: L1Fees { direct: 0, batch_fixed: 0, batch_per_item: 0 } };
    const CAPS: Caps = Caps { tx_gas: 1 << 24, block_gas: 30_000_000 };
    const RULES: CutRules = CutRules {
        max_batch_size: 100,
        max_wait_ms: 10_000,
        linger_ms: 0,
        target_cost_per_payment_wei: 50_000 * 1_000_000_000,
        deadline_margin_secs: 20,
    };
    /// 1 gwei: a batch of two costs 60k gwei per payment, of ten 48k gwei.
    const CHEAPISH: Fees = Fees { base_fee: 1_000_000_000, priority_fee: 0 };
    const EXPENSIVE: Fees = Fees { base_fee: 100_000_000_000, priority_fee: 1_000_000_000 };

    fn item(id: usize, accepted_at: u64, valid_before: u64) -> Pending {
        Pending { id, accepted_at_ms: accepted_at * 1000, valid_after: 0, valid_before, payer: Address::ZERO }
    }

    #[test]
    fn each_reason() {
        let now = 1_000;
        let now_ms = now * 1000;
        // Expensive gas, young payments, far deadlines: wait, and say until when.
        let few: Vec<_> = (0..3).map(|i| item(i, now, now + 300)).collect();
        let p = plan(now_ms, &few, EXPENSIVE, &COSTS, CAPS, &RULES);
        assert_eq!(p.cut, None);
        assert_eq!(p.wake_at_ms, Some(now_ms + RULES.max_wait_ms));
        // ... until the oldest has waited the maximum (to the millisecond).
        assert_eq!(plan(now_ms + 9_999, &few, EXPENSIVE, &COSTS, CAPS, &RULES).cut, None);
        let p = plan(now_ms + 10_000, &few, EXPENSIVE, &COSTS, CAPS, &RULES);
        assert_eq!(p.cut, Some((vec![0, 1, 2], CutReason::MaxWait)));
        // A deadline comes first.
        let urgent = vec![item(0, now, now + 21), item(1, now, now + 300)];
        let p = plan(now_ms, &urgent, EXPENSIVE, &COSTS, CAPS, &RULES);
        assert_eq!(p.cut, Some((vec![0, 1], CutReason::Deadline)));
        // Cheap gas: ten payments already meet the cost target; two do not.
        let ten: Vec<_> = (0..10).map(|i| item(i, now, now + 300)).collect();
        assert_eq!(
            plan(now_ms, &ten, CHEAPISH, &COSTS, CAPS, &RULES).cut.map(|c| c.1),
            Some(CutReason::CostTarget)
        );
        assert_eq!(plan(now_ms, &ten[..2], CHEAPISH, &COSTS, CAPS, &RULES).cut, None);
        // Size cap, then gas cap.
        let many: Vec<_> = (0..250).map(|i| item(i, now, now + 300)).collect();
        let (ids, reason) = plan(now_ms, &many, EXPENSIVE, &COSTS, CAPS, &RULES).cut.unwrap();
        assert_eq!((ids.len(), reason), (100, CutReason::SizeCap));
        let big = CutRules { max_batch_size: 1000, ..RULES };
        let (ids, reason) =
            plan(now_ms, &many[..], EXPENSIVE, &COSTS, Caps { tx_gas: 3_000_000, ..CAPS }, &big).cut.unwrap();
        assert_eq!((ids.len(), reason), (66, CutReason::GasCap));
        // Not yet valid: wait for it; past its deadline margin: too late.
        let later = Pending {
            id: 7,
            accepted_at_ms: now_ms,
            valid_after: now + 5,
            valid_before: now + 300,
            payer: Address::ZERO,
        };
        let gone = item(8, now - 100, now + 20);
        let p = plan(now_ms, &[later, gone], EXPENSIVE, &COSTS, CAPS, &RULES);
        assert_eq!((p.cut, p.wake_at_ms, p.too_late), (None, Some((now + 6) * 1000), vec![8]));
    }

    #[test]
    fn a_cheap_batch_lingers_for_more_payments_but_a_full_one_goes_at_once() {
        let t0 = 5_000_000;
        let rules = CutRules { linger_ms: 250, max_batch_size: 4, ..RULES };
        let first =
            Pending { id: 0, accepted_at_ms: t0, valid_after: 0, valid_before: 10_000, payer: Address::ZERO };
        // Alone and cheap: held until the linger is over, counted from the oldest payment.
        let p = plan(t0 + 10, &[first], CHEAPISH, &Costs { direct_gas: 21_000, ..COSTS }, CAPS, &rules);
        assert_eq!((p.cut, p.wake_at_ms), (None, Some(t0 + 250)));
        let two = [first, Pending { id: 1, accepted_at_ms: t0 + 200, ..first }];
        let p = plan(
            t0 + 250,
            &two,
            EXPENSIVE,
            &COSTS,
            CAPS,
            &CutRules { target_cost_per_payment_wei: u128::MAX, ..rules },
        );
        assert_eq!(p.cut, Some((vec![0, 1], CutReason::CostTarget)));
        // Full: no lingering.
        let four: Vec<_> = (0..4).map(|id| Pending { id, ..first }).collect();
        assert_eq!(
            plan(t0, &four, CHEAPISH, &COSTS, CAPS, &rules).cut.map(|c| c.1),
            Some(CutReason::SizeCap)
        );
        // A linger longer than the maximum wait ends with it.
        let short = CutRules { max_wait_ms: 100, target_cost_per_payment_wei: u128::MAX, ..rules };
        assert_eq!(plan(t0, &[first], CHEAPISH, &COSTS, CAPS, &short).wake_at_ms, Some(t0 + 100));
    }

    #[test]
    fn equally_urgent_payments_of_one_payer_share_a_batch_but_urgency_comes_first() {
        let (a, b) = (Address::repeat_byte(0xa), Address::repeat_byte(0xb));
        let now_ms = 1_000_000;
        let three = CutRules { max_batch_size: 3, ..RULES };
        // Arrived in the same second, payers alternating: a full batch takes one payer's.
        let mixed: Vec<_> = (0..6)
            .map(|id| Pending { payer: if id % 2 == 0 { a } else { b }, ..item(id, 999, 2_000) })
            .collect();
        assert_eq!(
            plan(now_ms, &mixed, EXPENSIVE, &COSTS, CAPS, &three).cut,
            Some((vec![0, 2, 4], CutReason::SizeCap))
        );
        // An older or more urgent payment still goes first, whoever pays it.
        let mut older = mixed.clone();
        older[5].accepted_at_ms -= 1_000;
        assert_eq!(plan(now_ms, &older, EXPENSIVE, &COSTS, CAPS, &three).cut.unwrap().0, vec![5, 0, 2]);
        let mut urgent = mixed;
        urgent[3].valid_before = 1_100;
        assert_eq!(plan(now_ms, &urgent, EXPENSIVE, &COSTS, CAPS, &three).cut.unwrap().0, vec![3, 0, 2]);
    }

    #[test]
    fn the_cost_model_knows_a_direct_call_from_a_batch_and_counts_the_l1_fee() {
        let fees = Fees { base_fee: 10, priority_fee: 0 };
        let l1 = L1Fees { direct: 1_000, batch_fixed: 2_000, batch_per_item: 500 };
        let c = Costs { l1, ..COSTS };
        assert_eq!(c.cost_per_payment(1, fees), 70_000 * 10 + 1_000);
        assert_eq!(c.cost_per_payment(2, fees), ((30_000 + 90_000) * 10 + 2_000 + 1_000) / 2);
        assert_eq!(c.cost_per_payment(0, fees), u128::MAX);
        // An L1 fee that makes one payment too dear lets a batch of two meet the target.
        let target = CutRules { target_cost_per_payment_wei: 650_000, ..RULES };
        let now_ms = 1_000_000;
        let one = [item(0, 1_000, 2_000)];
        assert_eq!(plan(now_ms, &one, fees, &c, CAPS, &target).cut, None);
        let two = [item(0, 1_000, 2_000), item(1, 1_000, 2_000)];
        assert_eq!(plan(now_ms, &two, fees, &c, CAPS, &target).cut.map(|c| c.1), Some(CutReason::CostTarget));
    }

    fn arb_pending(n: usize) -> impl Strategy<Value = Vec<Pending>> {
        prop::collection::vec((0u64..200_000, 0u64..60, 0u64..400), 0..n).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(id, (accepted_at_ms, after, life))| {
                    let accepted_at = accepted_at_ms / 1000;
                    Pending {
                        id,
                        accepted_at_ms,
                        valid_after: accepted_at.saturating_sub(30) + after,
                        valid_before: accepted_at + life,
                        payer: Address::with_last_byte((id % 7) as u8),
                    }
                })
                .collect()
        })
    }

    fn arb_rules() -> impl Strategy<Value = CutRules> {
        (1usize..60, 0u64..30_000, 0u64..2_000, 0u128..200_000_000_000_000, 0u64..40).prop_map(
            |(size, wait, linger, target, margin)| CutRules {
                max_batch_size: size,
                max_wait_ms: wait,
                linger_ms: linger,
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
            now_ms in 0u64..500_000,
            pending in arb_pending(300),
            fees in arb_fees(),
            rules in arb_rules(),
            tx_gas in 50_000u64..20_000_000,
        ) {
            let now = now_ms / 1000;
            let caps = Caps { tx_gas, block_gas: 30_000_000 };
            let p = plan(now_ms, &pending, fees, &COSTS, caps, &rules);
            if let Some((ids, _)) = &p.cut {
                prop_assert!(!ids.is_empty());
                prop_assert!(ids.len() <= rules.max_batch_size);
                prop_assert!(GAS.batch_gas(ids.len()) <= caps.tx_gas.min(caps.block_gas));
                for id in ids {
                    let item = &pending[*id];
                    prop_assert!(earliest_plan_time(item) <= now && now <= latest_plan_time(item, &rules));
                    prop_assert!(!p.too_late.contains(id));
                }
            }
            for id in &p.too_late {
                let item = &pending[*id];
                prop_assert!(now > latest_plan_time(item, &rules) || earliest_plan_time(item) > latest_plan_time(item, &rules));
            }
            if p.cut.is_none() && let Some(w) = p.wake_at_ms {
                prop_assert!(w > now_ms, "a wait wakes in the future");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Run over time (a decision every 250 ms, as many cuts each time as it makes):
        /// every payment that could be planned is planned by its deadline and by its
        /// maximum wait, whatever the linger; only payments that arrived too late are
        /// handed back.
        #[test]
        fn no_payment_starves(pending in arb_pending(120), fees in arb_fees(), rules in arb_rules()) {
            const STEP: u64 = 250;
            let mut planned_at = vec![None; pending.len()];
            let mut too_late = vec![false; pending.len()];
            for step in 0..(700_000 / STEP) {
                let now_ms = step * STEP;
                loop {
                    let waiting: Vec<Pending> = pending
                        .iter()
                        .filter(|p| p.accepted_at_ms <= now_ms && planned_at[p.id].is_none() && !too_late[p.id])
                        .copied()
                        .collect();
                    let p = plan(now_ms, &waiting, fees, &COSTS, CAPS, &rules);
                    for id in p.too_late {
                        too_late[id] = true;
                    }
                    match p.cut {
                        Some((ids, _)) => ids.into_iter().for_each(|id| planned_at[id] = Some(now_ms)),
                        None => break,
                    }
                }
            }
            for p in &pending {
                let (earliest, latest) = (earliest_plan_time(p), latest_plan_time(p, &rules));
                // The first decision at or after its arrival and validity.
                let start = p.accepted_at_ms.max(earliest * 1000).div_ceil(STEP) * STEP;
                if start / 1000 <= latest {
                    let by = (latest * 1000 + 999).min((start + rules.max_wait_ms).div_ceil(STEP) * STEP);
                    prop_assert!(matches!(planned_at[p.id], Some(t) if t <= by), "{p:?} planned at {:?}, due by {by}", planned_at[p.id]);
                } else {
                    prop_assert!(too_late[p.id] && planned_at[p.id].is_none());
                }
            }
        }
    }
}
