//! Planning: accepted payments whose `validBefore` the chain passed expire; the rest are
//! planned per token ([`crate::planner::plan`]) and each cut goes to an idle settler:
//! pre-simulated (what the token would refuse now stays out, with its reason), signed,
//! recorded with its raw bytes, and only then broadcast.

use std::collections::{BTreeMap, HashSet};

use alloy::primitives::{Address, U256};

use super::rpc::{Chain, Head};
use super::{Engine, RoundReport, SettleError, Settler};
use crate::config::SettlementConfig;
use crate::ledger::{
    ApplyRequest, BatchRecord, BatchStatus, LedgerError, PaymentRecord, Status, TransitionRequest,
};
use crate::planner::{self, Caps, CutReason, Fees, GasLearner, Pending, Shape};
use crate::simulate::ItemFailure;
use crate::x402::{Reason, SignedAuthorization};

/// Splits accepted payments into those the chain can no longer take (their `validBefore`
/// is at or before the head's time), as expiry transitions, and the live ones.
pub(super) fn expire(
    accepted: Vec<PaymentRecord>,
    head: &Head,
    now_ms: u64,
) -> (Vec<TransitionRequest>, Vec<PaymentRecord>) {
    let (expired, live): (Vec<_>, Vec<_>) =
        accepted.into_iter().partition(|r| r.signed.authorization.valid_before <= U256::from(head.timestamp));
    let transitions = expired
        .iter()
        .map(|r| {
            let mut t = TransitionRequest::new(r.key(), Status::Expired, now_ms);
            t.only_from = Some(Status::Accepted);
            t.failure = Some((
                Reason::InvalidValidBefore,
                format!("validBefore passed (chain time {}) before it could be settled", head.timestamp),
            ));
            t
        })
        .collect();
    (transitions, live)
}

/// The settlers with no batch waiting for inclusion, starting at `next` (round-robin, so
/// every account takes its share).
pub(super) fn idle_settlers(
    settlers: &[Settler],
    open: &BTreeMap<u64, BatchRecord>,
    next: usize,
) -> Vec<Settler> {
    let n = settlers.len();
    (0..n)
        .map(|i| &settlers[(next + i) % n])
        .filter(|s| {
            !open.values().any(|b| {
                b.settler == s.address && matches!(b.status, BatchStatus::Signed | BatchStatus::Submitted)
            })
        })
        .cloned()
        .collect()
}

/// The nonce of `settler`'s next transaction: the chain's (as of its latest block), or
/// past the settler's open batches counted included whose block is not in that state yet
/// (a preconfirmation, or a node behind the receipt it served).
pub(super) fn next_nonce(chain_nonce: u64, open: &BTreeMap<u64, BatchRecord>, settler: Address) -> u64 {
    open.values()
        .filter(|b| b.settler == settler && b.status == BatchStatus::Included)
        .filter_map(|b| b.inclusion.and_then(|inc| b.attempts.iter().find(|a| a.tx_hash == inc.tx_hash)))
        .map(|a| a.tx_nonce + 1)
        .fold(chain_nonce, u64::max)
}

/// Caps for the planner such that the batches it plans get a gas limit (see
/// [`SettlementConfig::gas_limit`]) within the per-transaction and block gas caps.
pub(super) fn caps(
    config: &SettlementConfig,
    learner: &GasLearner,
    max_batch_size: usize,
    block_gas_limit: u64,
) -> Caps {
    let cap = config.tx_gas_cap.min(block_gas_limit.max(1));
    // Largest n whose limit fits (the limit grows with n: a short search).
    let (mut lo, mut hi) = (0usize, max_batch_size);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if config.gas_need(learner, mid) <= cap {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let tx_gas = if lo >= max_batch_size { u64::MAX } else { learner.model().batch_gas(lo) };
    Caps { tx_gas, block_gas: u64::MAX }
}

fn pending(records: &[PaymentRecord]) -> Vec<Pending> {
    let saturate = |v: U256| u64::try_from(v).unwrap_or(u64::MAX);
    records
        .iter()
        .enumerate()
        .map(|(i, r)| Pending {
            id: i,
            accepted_at_ms: r.accepted_at_ms,
            valid_after: saturate(r.signed.authorization.valid_after),
            valid_before: saturate(r.signed.authorization.valid_before),
            payer: r.signed.authorization.from,
        })
        .collect()
}

/// `records` split into the ones at `ids` (in order) and the rest.
fn take(records: Vec<PaymentRecord>, ids: &[usize]) -> (Vec<PaymentRecord>, Vec<PaymentRecord>) {
    let chosen: HashSet<usize> = ids.iter().copied().collect();
    let (mut taken, mut rest) = (Vec::with_capacity(ids.len()), Vec::new());
    for (i, r) in records.into_iter().enumerate() {
        if chosen.contains(&i) { taken.push(r) } else { rest.push(r) }
    }
    (taken, rest)
}

impl<C: Chain> Engine<C> {
    pub(super) async fn plan_and_send(
        &mut self,
        accepted: Vec<PaymentRecord>,
        head: &Head,
        fees: Fees,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        // Decided afresh: what waits, and until when it is held.
        self.wake_at_ms = None;
        self.waiting = accepted.len();
        if accepted.is_empty() {
            return Ok(());
        }
        let now_ms = self.now_ms();
        // Chain time ahead of the clock (a devnet's, or a skewed node's) decides windows.
        let plan_ms = now_ms.max(head.timestamp.saturating_mul(1000));
        let live = self.expire_passed(accepted, head, now_ms, report).await?;

        let mut idle = idle_settlers(&self.settlers, &self.open, self.next_settler);
        idle.retain(|s| self.acts_for(s.address));
        if idle.is_empty() {
            return Ok(());
        }
        let mut by_token: BTreeMap<Address, Vec<PaymentRecord>> = BTreeMap::new();
        for r in live {
            by_token.entry(r.signed.token).or_default().push(r);
        }
        // The live value, read after this round's pending payments were: a payment
        // accepted after a pause took effect is never batched before the resume.
        if self.policy.paused || self.policy_rx.borrow().paused {
            return Ok(());
        }
        let rules = self.policy.cut_rules();
        let affordable = fees.per_gas() <= self.config.max_fee_per_gas_wei;
        for (token, mut records) in by_token {
            if self.l1_read_at.get(&token) != Some(&head.number) {
                self.read_l1_fees(token, &records[0]).await;
                self.l1_read_at.insert(token, head.number);
            }
            let costs = self.costs(token);
            let caps =
                caps(&self.config, &self.gas.learner(token, 2), self.policy.max_batch_size, head.gas_limit);
            while !records.is_empty() && !idle.is_empty() {
                let hold = self.hold(&records, now_ms, plan_ms, rules.linger_ms);
                let plan =
                    planner::plan_held(plan_ms, &pending(&records), fees, &costs, caps, &rules, Some(hold));
                let Some((ids, reason)) = plan.cut else {
                    // Decide again when the planner said (a linger or a wait ending), if
                    // that comes before the next poll.
                    if let Some(at) = plan.wake_at_ms {
                        let at = at.saturating_sub(plan_ms - now_ms);
                        self.wake_at_ms = Some(self.wake_at_ms.map_or(at, |w| w.min(at)));
                    }
                    break;
                };
                if !affordable {
                    tracing::warn!(
                        chain_id = self.chain_id,
                        base_fee = fees.base_fee,
                        max_fee_per_gas = self.config.max_fee_per_gas_wei,
                        "fees above settlement.max_fee_per_gas_wei: batches wait"
                    );
                    break;
                }
                let (batch_records, rest) = take(records, &ids);
                records = rest;
                self.waiting = self.waiting.saturating_sub(batch_records.len());
                let settler = idle.remove(0);
                if let Some(i) = self.settlers.iter().position(|s| s.address == settler.address) {
                    self.next_settler = i + 1;
                }
                let cut = Cut { token, records: batch_records, reason, settler: settler.address };
                self.cut(cut, head, fees, report).await?;
            }
        }
        Ok(())
    }

    /// Expires the accepted payments whose `validBefore` the chain passed (the fleet
    /// leader's work), unless a transaction of ours paid them after all; the live rest.
    async fn expire_passed(
        &mut self,
        accepted: Vec<PaymentRecord>,
        head: &Head,
        now_ms: u64,
        report: &mut RoundReport,
    ) -> Result<Vec<PaymentRecord>, SettleError> {
        let (mut expired, live) = expire(accepted, head, now_ms);
        if !self.acts_for(super::LEADER) {
            // Expiry is the fleet leader's work.
            expired.clear();
        }
        // A payment that was in a batch before may have been paid by that batch's
        // transaction after all (back in a node's pool after a reorg, mined later): its
        // evidence, not its expiry (found by the simulator, seed 38).
        for t in &mut expired {
            let Some(record) = self.ledger.ledger().get(&t.key)? else { continue };
            if record.batch_id.is_empty() {
                continue;
            }
            if let Some(ev) = self.find_our_use(&record).await? {
                t.to = Status::Included;
                t.failure = None;
                t.evidence = Some(ev);
            }
        }
        if !expired.is_empty() {
            let results = self
                .apply(ApplyRequest { transitions: expired.clone(), batch: None, atomic: false, fence: None })
                .await?;
            for (t, r) in expired.iter().zip(&results) {
                if r.is_ok() && t.to == Status::Expired {
                    report.expired += 1;
                }
            }
        }
        Ok(live)
    }

    /// How long `records`, if cheap enough, are held for company ([`super::pace`]), in the
    /// planner's time (chain time when that is ahead of the clock).
    fn hold(&self, records: &[PaymentRecord], now_ms: u64, plan_ms: u64, linger_ms: u64) -> planner::Hold {
        let oldest = records.iter().map(|r| r.accepted_at_ms).min().unwrap_or(now_ms);
        let hold = self.pace.hold(now_ms, oldest, records.len(), linger_ms);
        planner::Hold { until_ms: hold.until_ms.saturating_add(plan_ms - now_ms), reason: hold.reason }
    }

    /// Reads the L1 data fees of `token`'s settlements (OP-stack chains; zero elsewhere).
    /// A failed read keeps the last fees known: the planner prices a little off, nothing
    /// else depends on them.
    async fn read_l1_fees(&mut self, token: Address, sample: &PaymentRecord) {
        match self.chain.l1_fees(&sample.signed).await {
            Ok(fees) => {
                self.l1.insert(token, fees);
            }
            Err(e) => {
                self.metrics.rpc_error(e.call);
                tracing::warn!(chain_id = self.chain_id, %token, "cannot read the L1 data fee; keeping the last known: {e}");
            }
        }
    }

    /// Simulates `signed` as one settlement at the limit it would be sent with. When that
    /// is a learnt limit and an item reverted without data (perhaps out of gas), simulates
    /// again at the seeds' limit and sends with that: a learnt limit never under-funds an
    /// item, and never turns a payment that would settle into a failure.
    async fn simulate_at_limit(
        &self,
        token: Address,
        signed: &[SignedAuthorization],
    ) -> Result<(Vec<Result<(), ItemFailure>>, u64), SettleError> {
        let deploys = crate::chain::deployments(signed);
        let limit = self.config.with_deployments(self.gas_limit(token, signed.len()), deploys);
        let sim = self.read(self.chain.simulate(signed, limit, None).await)?;
        let seed = self.config.with_deployments(self.config.seed_gas_limit(signed.len()), deploys);
        if limit < seed && sim.iter().any(|r| r.as_ref().is_err_and(ItemFailure::maybe_out_of_gas)) {
            tracing::warn!(
                chain_id = self.chain_id,
                %token,
                items = signed.len(),
                learnt_limit = limit,
                seed_limit = seed,
                "an item may run short of gas at the learnt limit; sending with the seeds' limit"
            );
            self.metrics.gas_limit_fallbacks.increment(1);
            let sim = self.read(self.chain.simulate(signed, seed, None).await)?;
            return Ok((sim, seed));
        }
        Ok((sim, limit))
    }

    /// Pre-simulates a cut, fails what the token would refuse, then signs, records and
    /// sends a batch of the rest.
    async fn cut(
        &mut self,
        cut: Cut,
        head: &Head,
        fees: Fees,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        let Cut { token, records, reason, settler } = cut;
        let now_ms = self.now_ms();
        // The simulation and the settler's nonce are read together: one round trip to the
        // node before the send, not two.
        let signed: Vec<_> = records.iter().map(|r| r.signed.clone()).collect();
        let (sim, chain_nonce) =
            tokio::join!(self.simulate_at_limit(token, &signed), self.chain.nonce(settler));
        let chain_nonce = self.read(chain_nonce);
        let Some((items, gas_limit)) = self.presimulate(records, sim?, now_ms, report).await? else {
            return Ok(());
        };
        // Items refused: the rest keep the limit they were simulated with, proven enough for
        // them together with the refused ones (a little generous, on a rare path).
        let counter = self.next_counter;
        self.next_counter += 1;
        let nonce = next_nonce(chain_nonce?, &self.open, settler);
        let mut batch = BatchRecord {
            chain_id: self.chain_id,
            counter,
            token,
            settler,
            items: items.iter().map(PaymentRecord::key).collect(),
            cut_reason: reason.as_str().to_owned(),
            status: BatchStatus::Signed,
            attempts: Vec::new(),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            gas_limit,
            inclusion: None,
        };
        let attempt = self.sign(&batch, nonce, fees, None, head).await?;
        let raw = attempt.raw.clone();
        batch.attempts.push(attempt);
        let transitions = items
            .iter()
            .map(|r| {
                let mut t = TransitionRequest::new(r.key(), Status::Batched, now_ms);
                t.only_from = Some(Status::Accepted);
                t.batch_id = Some(batch.id());
                t
            })
            .collect();
        // Atomic: the signed transaction carries exactly these items, so either all of
        // them join the batch or the batch is not recorded (and never sent).
        match self
            .apply(ApplyRequest { transitions, batch: Some(batch.clone()), atomic: true, fence: None })
            .await
        {
            Ok(_) => {}
            Err(LedgerError::IllegalTransition { id, .. }) => {
                tracing::info!(%id, "a payment changed while its batch was prepared; planning again next round");
                return Ok(());
            }
            Err(e @ (LedgerError::BatchTaken { .. } | LedgerError::LeaseLost { .. })) => {
                // Another daemon of the fleet got there first: nothing was recorded or sent.
                tracing::info!("{e}; planning again next round");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(
            batch = %batch.id(),
            items = batch.items.len(),
            shape = Shape::of(batch.items.len()).as_str(),
            reason = reason.as_str(),
            %settler,
            nonce,
            gas_limit = batch.gas_limit,
            "batch cut"
        );
        self.metrics.batch_cut(reason.as_str(), batch.items.len());
        if let Err(e) = self.chain.broadcast(&raw).await {
            // Recorded as submitted anyway: the next round finds it unknown to the node and
            // re-signs it with current fees.
            tracing::warn!(batch = %batch.id(), "broadcast refused: {e}");
        }
        self.pace.sent(counter, batch.items.len(), self.look_at_ms, self.now_ms());
        self.receipts_at_ms = Some(self.now_ms());
        self.mark_submitted(batch).await?;
        report.batches_sent += 1;
        Ok(())
    }

    /// Given the pre-simulation of `records` at the gas limit the batch would get, fails
    /// (or expires) what the token would refuse: the rest and that limit, `None` when
    /// nothing is left.
    async fn presimulate(
        &mut self,
        records: Vec<PaymentRecord>,
        (sim, gas_limit): (Vec<Result<(), ItemFailure>>, u64),
        now_ms: u64,
        report: &mut RoundReport,
    ) -> Result<Option<(Vec<PaymentRecord>, u64)>, SettleError> {
        let mut refusals = Vec::new();
        let mut routes = Vec::new();
        let mut items = Vec::new();
        for (record, outcome) in records.into_iter().zip(sim) {
            match outcome {
                Ok(()) => items.push(record),
                Err(failure) => {
                    let mut t = TransitionRequest::new(record.key(), Status::Failed, now_ms);
                    t.only_from = Some(Status::Accepted);
                    self.refusal(&record, failure, &mut t).await?;
                    if t.to != Status::Accepted {
                        refusals.push(t);
                        routes.push(record.submission.route);
                    }
                }
            }
        }
        if !refusals.is_empty() {
            let results = self
                .apply(ApplyRequest {
                    transitions: refusals.clone(),
                    batch: None,
                    atomic: false,
                    fence: None,
                })
                .await?;
            for ((t, r), route) in refusals.iter().zip(&results).zip(&routes) {
                if r.is_ok() {
                    match t.to {
                        Status::Failed => report.failed += 1,
                        Status::Expired => report.expired += 1,
                        _ => {}
                    }
                    if let Some((reason, msg)) = &t.failure {
                        self.metrics.presimulation_refused(route.as_str(), reason.code());
                        tracing::info!(payment = %t.key.payment_id(), route = route.as_str(), reason = reason.code(), "refused before sending: {msg}");
                    }
                }
            }
        }
        Ok((!items.is_empty()).then_some((items, gas_limit)))
    }
}

/// A batch the planner cut: its token, payments, why, and the settler that sends it.
struct Cut {
    token: Address,
    records: Vec<PaymentRecord>,
    reason: CutReason,
    settler: Address,
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{attempt, batch, head, record};
    use super::*;
    use alloy::network::EthereumWallet;
    use alloy::signers::local::PrivateKeySigner;

    #[test]
    fn the_next_nonce_passes_a_settlers_batches_counted_included_before_the_chain_shows_them() {
        let r = [record(1, Status::Included, 10_000)];
        let mut preconfirmed = batch(1, BatchStatus::Included, &r, vec![attempt(1, 7, 100, 5_000)]);
        preconfirmed.inclusion = Some(super::super::fixtures::inclusion(101, alloy::primitives::B256::ZERO));
        let settler = preconfirmed.settler;
        let open = BTreeMap::from([(1, preconfirmed)]);
        assert_eq!(next_nonce(7, &open, settler), 8, "the latest block does not hold nonce 7 yet");
        assert_eq!(next_nonce(9, &open, settler), 9, "the chain is ahead: its nonce");
        assert_eq!(next_nonce(7, &open, Address::repeat_byte(0x42)), 7, "another settler's batches");
    }

    #[test]
    fn payments_the_chain_passed_expire_with_their_reason() {
        let h = head(100, 5_000);
        let accepted = vec![
            record(1, Status::Accepted, 4_999),
            record(2, Status::Accepted, 5_000),
            record(3, Status::Accepted, 5_001),
        ];
        let (expired, live) = expire(accepted, &h, 77);
        assert_eq!(expired.len(), 2);
        assert!(expired.iter().all(|t| t.to == Status::Expired
            && t.only_from == Some(Status::Accepted)
            && t.failure.as_ref().is_some_and(|f| f.0 == Reason::InvalidValidBefore)));
        assert_eq!(
            live.iter().map(PaymentRecord::key).collect::<Vec<_>>(),
            [record(3, Status::Accepted, 0).key()]
        );
    }

    #[test]
    fn idle_settlers_take_turns_and_busy_ones_wait() {
        let settlers: Vec<Settler> = (0..3)
            .map(|_| {
                let s = PrivateKeySigner::random();
                Settler { address: s.address(), wallet: EthereumWallet::from(s) }
            })
            .collect();
        let names = |v: Vec<Settler>| v.into_iter().map(|s| s.address).collect::<Vec<_>>();
        let all = settlers.iter().map(|s| s.address).collect::<Vec<_>>();
        assert_eq!(names(idle_settlers(&settlers, &BTreeMap::new(), 1)), [all[1], all[2], all[0]]);
        let r = [record(1, Status::Submitted, 0)];
        let mut busy = batch(1, BatchStatus::Submitted, &r, vec![attempt(1, 0, 0, 1)]);
        busy.settler = all[2];
        let mut mined = batch(2, BatchStatus::Included, &r, vec![attempt(2, 0, 0, 1)]);
        mined.settler = all[0];
        let open = BTreeMap::from([(1, busy), (2, mined)]);
        assert_eq!(
            names(idle_settlers(&settlers, &open, 1)),
            [all[1], all[0]],
            "an included batch frees its settler"
        );
    }

    #[test]
    fn caps_keep_every_planned_batch_within_the_transaction_gas_cap() {
        let config = SettlementConfig { tx_gas_cap: 1_000_000, ..SettlementConfig::default() };
        let learner = GasLearner::new(config.seed_gas(), 4);
        let caps = caps(&config, &learner, 500, 30_000_000);
        let fits = (0..500).take_while(|&n| learner.model().batch_gas(n) <= caps.tx_gas).last().unwrap();
        assert!(config.gas_limit(&learner, fits) <= 1_000_000);
        assert!(config.gas_need(&learner, fits + 1) > 1_000_000);
        let roomy = super::caps(&config, &learner, 5, 30_000_000);
        assert_eq!(roomy.tx_gas, u64::MAX, "a full batch fits: no gas cap for the planner");
        let small_block = super::caps(&config, &learner, 500, 200_000);
        // Seeds 40k + 60k per item, +30 %: one item (130k) fits a 200k block, two (208k) do not.
        assert_eq!(small_block.tx_gas, learner.model().batch_gas(1), "the block's gas limit caps too");
    }

    #[test]
    fn a_cut_takes_exactly_the_planned_items() {
        let records: Vec<_> = (1..=5).map(|i| record(i, Status::Accepted, 0)).collect();
        let (taken, rest) = take(records.clone(), &[3, 0]);
        assert_eq!(taken, [records[0].clone(), records[3].clone()]);
        assert_eq!(rest, [records[1].clone(), records[2].clone(), records[4].clone()]);
    }
}
