//! Following open batches: a signed batch is broadcast; a submitted one is looked for by
//! its receipts, replaced, resubmitted, re-signed at the account's nonce or abandoned; an
//! included one is checked against the canonical chain and settled at depth.
//!
//! What to do is decided by [`submitted_step`], [`included_step`] and [`requeue`] from
//! what was read; the `impl Engine` below reads, writes and sends.

use std::collections::BTreeMap;

use alloy::primitives::{B256, U256};

use super::rpc::{Chain, Head, Receipt};
use super::{Engine, RoundReport, SettleError};
use crate::ledger::{
    ApplyRequest, Attempt, BatchRecord, BatchStatus, Inclusion, PaymentRecord, Status, TransitionRequest,
};
use crate::planner::Fees;
use crate::x402::Reason;

/// What was read about a submitted batch, in this order: the account's nonce first, then
/// the receipts (so a transaction mined between the two reads is seen by the second), then
/// whether the node still knows the last attempt.
#[derive(Debug, Clone)]
pub(super) struct SubmittedView {
    /// The settler account's next nonce.
    pub chain_nonce: u64,
    /// The receipt of one of the batch's attempts, if one was mined.
    pub receipt: Option<Receipt>,
    /// Whether the node knows the last attempt (pending or mined).
    pub known: bool,
    /// The head at which the nonce was first seen consumed without a receipt of ours.
    pub consumed_since: Option<u64>,
    /// Whether another open batch of this settler holds a nonce between the account's and
    /// this batch's.
    pub lower_nonce_pending: bool,
}

/// What to do with a submitted batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SubmittedStep {
    /// Mined: judge its receipt.
    Included(Receipt),
    /// The nonce is used but no receipt of ours is seen yet: a node may count the nonce
    /// before it serves the receipt, so wait for a later block.
    ConsumedWait,
    /// The transaction can never be mined: its payments go back (or expire).
    Abandon(&'static str),
    /// A gap below the batch's nonce (an earlier transaction vanished in a reorg): re-sign
    /// at the account's nonce, or this one can never be mined.
    Resign { nonce: u64 },
    /// Not mined after `replace_after_blocks`, or its fee cap is under the base fee:
    /// replace it at the same nonce with a higher fee.
    Replace { priced_out: bool },
    /// The node forgot it (dropped from its pool): send the same bytes again.
    Resubmit,
    /// Pending: nothing to do.
    Wait,
}

/// Decides what to do with a submitted batch whose last attempt is `last`.
pub(super) fn submitted_step(
    last: &Attempt,
    view: SubmittedView,
    head: &Head,
    base_fee: u128,
    replace_after_blocks: u64,
) -> SubmittedStep {
    if let Some(receipt) = view.receipt {
        return SubmittedStep::Included(receipt);
    }
    if view.chain_nonce > last.tx_nonce {
        return match view.consumed_since {
            Some(first_seen) if head.number > first_seen => {
                SubmittedStep::Abandon("its account nonce was used by another transaction")
            }
            _ => SubmittedStep::ConsumedWait,
        };
    }
    if view.chain_nonce < last.tx_nonce && !view.lower_nonce_pending {
        return SubmittedStep::Resign { nonce: view.chain_nonce };
    }
    let stuck = head.number.saturating_sub(last.signed_at_block) >= replace_after_blocks;
    let priced_out = last.max_fee_per_gas < base_fee;
    if stuck || priced_out {
        return SubmittedStep::Replace { priced_out };
    }
    if !view.known {
        return SubmittedStep::Resubmit;
    }
    SubmittedStep::Wait
}

/// Whether another open batch of `batch`'s settler holds a nonce in `[from, batch's)`.
pub(super) fn lower_nonce_pending(open: &BTreeMap<u64, BatchRecord>, batch: &BatchRecord, from: u64) -> bool {
    let mine = batch.tx_nonce().unwrap_or(0);
    open.values().any(|b| {
        b.counter != batch.counter
            && b.settler == batch.settler
            && matches!(b.status, BatchStatus::Signed | BatchStatus::Submitted | BatchStatus::Included)
            && b.tx_nonce().is_some_and(|n| n >= from && n < mine)
    })
}

/// What to do with an included batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IncludedStep {
    /// The block at its height is no longer the one it was mined in: look for its
    /// transaction again.
    Reorged,
    /// On the canonical chain, this many blocks deep, not yet deep enough.
    Wait { depth: u64 },
    /// Deep enough: its payments are settled.
    Settle { depth: u64 },
}

/// Decides what to do with a batch included as `inclusion`, given the canonical block hash
/// at its height.
pub(super) fn included_step(
    inclusion: &Inclusion,
    canonical: Option<B256>,
    head: &Head,
    confirmations: u64,
) -> IncludedStep {
    if inclusion.block_number > head.number {
        // Preconfirmed, not sealed yet: nothing to compare until the head reaches it.
        return IncludedStep::Wait { depth: 0 };
    }
    if canonical != Some(inclusion.block_hash) {
        return IncludedStep::Reorged;
    }
    let depth = head.number.saturating_sub(inclusion.block_number) + 1;
    if depth >= confirmations { IncludedStep::Settle { depth } } else { IncludedStep::Wait { depth } }
}

/// A payment whose transaction is gone goes back to accepted while the chain can still
/// take it (its `validBefore` after the next block's earliest time), else it expires.
pub(super) fn requeue(r: &PaymentRecord, head: &Head, why: &str, now_ms: u64) -> TransitionRequest {
    let still_valid = r.signed.authorization.valid_before > U256::from(head.timestamp.saturating_add(1));
    let mut t =
        TransitionRequest::new(r.key(), if still_valid { Status::Accepted } else { Status::Expired }, now_ms);
    t.only_from = Some(r.status);
    if !still_valid {
        t.failure = Some((Reason::InvalidValidBefore, format!("validBefore passed after {why}")));
    }
    t
}

/// Whether `record` is included by a transaction that is not one of `batch`'s: its own
/// evidence, not the batch, decides its outcome (the sweep's).
pub(super) fn included_elsewhere(record: &PaymentRecord, batch: &BatchRecord) -> bool {
    record.status == Status::Included
        && record.tx_hash.is_some_and(|h| !batch.attempts.iter().any(|a| a.tx_hash == h))
}

pub(super) fn moves(
    to: Status,
    only_from: Status,
    records: &[&PaymentRecord],
    now_ms: u64,
) -> Vec<TransitionRequest> {
    records
        .iter()
        .map(|r| {
            let mut t = TransitionRequest::new(r.key(), to, now_ms);
            t.only_from = Some(only_from);
            t
        })
        .collect()
}

impl<C: Chain> Engine<C> {
    pub(super) async fn advance(
        &mut self,
        counter: u64,
        head: &Head,
        fees: Fees,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        let Some(batch) = self.open.get(&counter).cloned() else { return Ok(()) };
        match batch.status {
            BatchStatus::Signed => {
                // Recorded before it was sent: send it (again). A node that already has it
                // answers "already known" or "nonce too low"; the receipt decides later.
                for a in &batch.attempts {
                    if let Err(e) = self.chain.broadcast(&a.raw).await {
                        tracing::debug!(batch = %batch.id(), "rebroadcast of a signed attempt: {e}");
                    }
                }
                self.mark_submitted(batch).await?;
            }
            BatchStatus::Submitted => self.follow_submitted(batch, head, fees, report).await?,
            BatchStatus::Included => self.follow_included(batch, head, report).await?,
            BatchStatus::Done | BatchStatus::Abandoned => {
                self.open.remove(&counter);
            }
        }
        Ok(())
    }

    pub(super) async fn mark_submitted(&mut self, mut batch: BatchRecord) -> Result<(), SettleError> {
        let now_ms = self.now_ms();
        let transitions = batch
            .items
            .iter()
            .map(|k| {
                let mut t = TransitionRequest::new(*k, Status::Submitted, now_ms);
                t.only_from = Some(Status::Batched);
                t
            })
            .collect();
        batch.status = BatchStatus::Submitted;
        batch.updated_at_ms = now_ms;
        // Not atomic: an item already moved on (a restart after a partial round) keeps its state.
        self.apply(ApplyRequest { transitions, batch: Some(batch.clone()), atomic: false, fence: None })
            .await?;
        self.open.insert(batch.counter, batch);
        Ok(())
    }

    /// The receipt of the batch's latest mined attempt, if it counts ([`Self::counts`]).
    pub(super) async fn receipt_of(&self, batch: &BatchRecord) -> Result<Option<Receipt>, SettleError> {
        for a in batch.attempts.iter().rev() {
            if let Some(r) = self.read(self.chain.receipt(a.tx_hash, batch.token).await)? {
                return Ok(self.counts(&r).await?.then_some(r));
            }
        }
        Ok(None)
    }

    async fn follow_submitted(
        &mut self,
        batch: BatchRecord,
        head: &Head,
        fees: Fees,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        let Some(last) = batch.attempts.last().cloned() else {
            return self.abandon(batch, head, "batch has no signed transaction", report).await;
        };
        // A receipt decides alone; only without one do the nonce and the pool tell more.
        let receipt = self.receipt_of(&batch).await?;
        let (chain_nonce, known) = match receipt {
            Some(_) => (last.tx_nonce + 1, true),
            None => (
                self.read(self.chain.nonce(batch.settler).await)?,
                self.read(self.chain.is_known(last.tx_hash).await)?,
            ),
        };
        let view = SubmittedView {
            chain_nonce,
            receipt,
            known,
            consumed_since: self.consumed.get(&batch.counter).copied(),
            lower_nonce_pending: lower_nonce_pending(&self.open, &batch, chain_nonce),
        };
        let step = submitted_step(&last, view, head, fees.base_fee, self.config.replace_after_blocks);
        if !matches!(step, SubmittedStep::ConsumedWait) {
            self.consumed.remove(&batch.counter);
        }
        match step {
            SubmittedStep::Included(receipt) => self.on_included(batch, receipt, report).await,
            SubmittedStep::ConsumedWait => {
                self.consumed.entry(batch.counter).or_insert(head.number);
                Ok(())
            }
            SubmittedStep::Abandon(why) => self.abandon(batch, head, why, report).await,
            SubmittedStep::Resign { nonce } => {
                let attempt = self.sign(&batch, nonce, fees, None, head).await?;
                self.add_attempt(batch, attempt, report, false).await
            }
            SubmittedStep::Replace { .. } => self.replace(batch, &last, fees, head, report).await,
            SubmittedStep::Resubmit => {
                self.metrics.transactions_dropped.increment(1);
                match self.chain.broadcast(&last.raw).await {
                    Ok(()) => {
                        report.rebroadcast += 1;
                        tracing::info!(batch = %batch.id(), tx = %last.tx_hash, "dropped transaction resubmitted");
                        Ok(())
                    }
                    Err(e) => {
                        tracing::info!(batch = %batch.id(), "resubmission refused ({e}); re-signing");
                        self.replace(batch, &last, fees, head, report).await
                    }
                }
            }
            SubmittedStep::Wait => Ok(()),
        }
    }

    async fn follow_included(
        &mut self,
        batch: BatchRecord,
        head: &Head,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        let Some(inc) = batch.inclusion else {
            return self.abandon(batch, head, "included without inclusion data", report).await;
        };
        if inc.block_number > head.number {
            return Ok(());
        }
        let canonical = self.canonical_block(inc.block_number).await?;
        let preconfirmed = self.preconfirmed.remove(&batch.counter);
        let hash = canonical.map(|(hash, _)| hash);
        if hash == Some(inc.block_hash) && canonical.is_some_and(|(_, time)| time != inc.block_time) {
            // Sealed as preconfirmed: its time is the sealed block's from now on.
            return self.on_sealed(batch, &inc, head, report).await;
        }
        let depth = match included_step(&inc, hash, head, self.policy.confirmations) {
            IncludedStep::Wait { .. } => return Ok(()),
            // Sealed with another hash than its preconfirmation named: judged again on the
            // sealed block; only a transaction gone or moved broke the preconfirmation.
            IncludedStep::Reorged if preconfirmed => return self.on_sealed(batch, &inc, head, report).await,
            IncludedStep::Reorged => {
                tracing::warn!(batch = %batch.id(), block = inc.block_number, "reorg: the including block changed");
                self.metrics.reorgs.increment(1);
                return match self.receipt_of(&batch).await? {
                    Some(receipt) => self.on_included(batch, receipt, report).await,
                    None => self.abandon(batch, head, "its transaction was reorged out", report).await,
                };
            }
            IncludedStep::Settle { depth } => depth,
        };
        let records = self.records_of(&batch)?;
        // A payment included by another transaction of ours is the sweep's to settle.
        let included: Vec<&PaymentRecord> = records
            .iter()
            .filter(|r| r.status == Status::Included && r.tx_hash == Some(inc.tx_hash))
            .collect();
        // Balances first: once exposure is released, a cached balance from before the
        // transfer would cover the same money twice.
        if let Some(cache) = &self.balances {
            for r in &included {
                cache.invalidate(&r.key().payer());
            }
        }
        let now_ms = self.now_ms();
        let mut transitions = moves(Status::Settled, Status::Included, &included, now_ms);
        // Items refused in the transaction are decided once its block is final (see
        // `judge_unsettled_in`); the batch stays open for them until then.
        let undecided: Vec<&PaymentRecord> = records
            .iter()
            .filter(|r| r.batch_id == batch.id() && matches!(r.status, Status::Batched | Status::Submitted))
            .collect();
        let mut closed = true;
        if !undecided.is_empty() {
            match self.receipt_of(&batch).await? {
                Some(receipt) if receipt.block_hash == inc.block_hash => {
                    let decided =
                        self.judge_unsettled_in(&receipt, inc.block_time, &undecided, now_ms).await?;
                    closed = decided.len() == undecided.len();
                    report.count_judged(&decided);
                    transitions.extend(decided);
                }
                // Not served now (a lagging node): next round.
                _ => closed = false,
            }
        }
        if !closed && transitions.is_empty() {
            // Waiting for its block to be final, nothing new: no write every round.
            return Ok(());
        }
        let mut next = batch.clone();
        if closed {
            next.status = BatchStatus::Done;
        }
        next.updated_at_ms = now_ms;
        let results = self
            .apply(ApplyRequest { transitions, batch: Some(next.clone()), atomic: false, fence: None })
            .await?;
        report.settled += results.iter().zip(&included).filter(|(r, _)| r.is_ok()).count();
        if closed {
            tracing::info!(batch = %batch.id(), settled = included.len(), depth, "batch settled");
            self.open.remove(&batch.counter);
        } else {
            self.open.insert(batch.counter, next);
        }
        Ok(())
    }

    /// [`requeue`], unless a transaction of ours used `r`'s authorization after all: a
    /// payment about to expire is first looked for on chain. A transaction taken for gone
    /// (its nonce used and no receipt served within a block, a node lagging on receipts)
    /// may have been mined and paid it; the books must then say so, never expired (found
    /// by the simulator, seeds 233, 404, 721). Still-valid payments go back without the
    /// look: a new batch's simulation finds the use and its evidence.
    pub(super) async fn requeue_unless_ours(
        &self,
        r: &PaymentRecord,
        head: &Head,
        why: &str,
        now_ms: u64,
    ) -> Result<TransitionRequest, SettleError> {
        let mut t = requeue(r, head, why, now_ms);
        if t.to != Status::Expired {
            return Ok(t);
        }
        let Some(ev) = self.find_our_use(r).await? else { return Ok(t) };
        tracing::warn!(payment = %r.payment_id(), tx = %ev.tx_hash, "{why}, but a transaction of ours paid it");
        t.failure = None;
        if r.status == Status::Settled {
            // Settled by another transaction of ours than the one reversed: a correction.
            t.to = Status::Settled;
            t.evidence = Some(ev);
        } else if r.status.can_move_to(Status::Included) {
            t.to = Status::Included;
            t.evidence = Some(ev);
        } else {
            // Batched: back to accepted, where the expiry check finds the same evidence.
            t.to = Status::Accepted;
        }
        Ok(t)
    }

    /// The batch's transaction is gone: its payments go back to accepted while the chain
    /// can still take them, else they expire.
    pub(super) async fn abandon(
        &mut self,
        batch: BatchRecord,
        head: &Head,
        why: &str,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        let records = self.records_of(&batch)?;
        let now_ms = self.now_ms();
        let mut transitions = Vec::new();
        for r in records
            .iter()
            .filter(|r| matches!(r.status, Status::Batched | Status::Submitted | Status::Included))
            .filter(|r| !included_elsewhere(r, &batch))
        {
            let t = self.requeue_unless_ours(r, head, why, now_ms).await?;
            if t.to == Status::Expired {
                report.expired += 1;
            } else {
                report.requeued += 1;
            }
            transitions.push(t);
        }
        let mut gone = batch.clone();
        gone.status = BatchStatus::Abandoned;
        gone.updated_at_ms = now_ms;
        self.apply(ApplyRequest { transitions, batch: Some(gone), atomic: false, fence: None }).await?;
        tracing::warn!(batch = %batch.id(), items = batch.items.len(), "batch abandoned: {why}");
        self.open.remove(&batch.counter);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{attempt, batch, head, inclusion, receipt, record};
    use super::*;

    const K: u64 = 3;
    const BASE_FEE: u128 = 1_000;

    fn view() -> SubmittedView {
        SubmittedView {
            chain_nonce: 7,
            receipt: None,
            known: true,
            consumed_since: None,
            lower_nonce_pending: false,
        }
    }

    /// The step for an attempt at nonce 7 signed at block 100 paying up to 5,000 wei/gas.
    fn step(view: SubmittedView, head_number: u64) -> SubmittedStep {
        submitted_step(&attempt(1, 7, 100, 5_000), view, &head(head_number, 0), BASE_FEE, K)
    }

    #[test]
    fn a_pending_transaction_waits_until_k_blocks_then_is_replaced() {
        assert_eq!(step(view(), 101), SubmittedStep::Wait);
        assert_eq!(step(view(), 100 + K - 1), SubmittedStep::Wait);
        assert_eq!(step(view(), 100 + K), SubmittedStep::Replace { priced_out: false });
        assert_eq!(step(view(), 100 + 10 * K), SubmittedStep::Replace { priced_out: false });
    }

    #[test]
    fn a_transaction_priced_out_by_the_base_fee_is_replaced_at_once() {
        let last = attempt(1, 7, 100, BASE_FEE - 1);
        let step = submitted_step(&last, view(), &head(101, 0), BASE_FEE, K);
        assert_eq!(step, SubmittedStep::Replace { priced_out: true });
        let at_base = attempt(1, 7, 100, BASE_FEE);
        assert_eq!(submitted_step(&at_base, view(), &head(101, 0), BASE_FEE, K), SubmittedStep::Wait);
    }

    #[test]
    fn a_dropped_transaction_is_resubmitted() {
        assert_eq!(step(SubmittedView { known: false, ..view() }, 101), SubmittedStep::Resubmit);
        // Stuck as well: a replacement (new fees) rather than the same bytes.
        let stuck = step(SubmittedView { known: false, ..view() }, 100 + K);
        assert_eq!(stuck, SubmittedStep::Replace { priced_out: false });
    }

    #[test]
    fn a_receipt_decides_whatever_else_was_read() {
        let r = receipt(1, 101, &[(1, 0)], 100_000, 10);
        let seen = SubmittedView { receipt: Some(r.clone()), chain_nonce: 8, known: false, ..view() };
        assert_eq!(step(seen, 100 + K), SubmittedStep::Included(r));
    }

    #[test]
    fn a_nonce_consumed_without_a_receipt_waits_a_block_then_abandons() {
        let consumed = SubmittedView { chain_nonce: 8, ..view() };
        assert_eq!(step(consumed.clone(), 105), SubmittedStep::ConsumedWait, "first seen");
        let same_block = SubmittedView { consumed_since: Some(105), ..consumed.clone() };
        assert_eq!(step(same_block, 105), SubmittedStep::ConsumedWait, "the node may lag its receipts");
        let later = SubmittedView { consumed_since: Some(105), ..consumed };
        assert!(matches!(step(later, 106), SubmittedStep::Abandon(_)));
    }

    #[test]
    fn a_gap_below_the_nonce_is_closed_by_re_signing_at_the_accounts_nonce() {
        let gap = SubmittedView { chain_nonce: 5, ..view() };
        assert_eq!(step(gap.clone(), 101), SubmittedStep::Resign { nonce: 5 });
        // Another open batch of ours holds the lower nonce: no gap.
        let covered = SubmittedView { lower_nonce_pending: true, ..gap };
        assert_eq!(step(covered, 101), SubmittedStep::Wait);
    }

    #[test]
    fn lower_nonces_pending_are_other_open_batches_of_the_same_settler() {
        let r = [record(1, Status::Submitted, 10_000)];
        let mine = batch(2, BatchStatus::Submitted, &r, vec![attempt(2, 7, 100, 5_000)]);
        let mut open = BTreeMap::from([(2, mine.clone())]);
        assert!(!lower_nonce_pending(&open, &mine, 5));
        open.insert(1, batch(1, BatchStatus::Submitted, &r, vec![attempt(1, 6, 99, 5_000)]));
        assert!(lower_nonce_pending(&open, &mine, 5));
        assert!(!lower_nonce_pending(&open, &mine, 7), "nonce 6 is below the account's 7");
        let mut other = batch(3, BatchStatus::Submitted, &r, vec![attempt(3, 5, 99, 5_000)]);
        other.settler = alloy::primitives::Address::repeat_byte(0x99);
        let open = BTreeMap::from([(2, mine.clone()), (3, other)]);
        assert!(!lower_nonce_pending(&open, &mine, 5), "another settler's nonces are its own");
    }

    #[test]
    fn an_included_batch_settles_at_depth_and_a_changed_block_is_a_reorg() {
        let ours = B256::repeat_byte(0xb0);
        let inc = inclusion(100, ours);
        assert_eq!(included_step(&inc, Some(ours), &head(100, 0), 3), IncludedStep::Wait { depth: 1 });
        assert_eq!(included_step(&inc, Some(ours), &head(102, 0), 3), IncludedStep::Settle { depth: 3 });
        assert_eq!(
            included_step(&inc, Some(B256::repeat_byte(0xb1)), &head(102, 0), 3),
            IncludedStep::Reorged
        );
        assert_eq!(included_step(&inc, None, &head(102, 0), 3), IncludedStep::Reorged, "block gone");
        // A preconfirmation: the endpoint serves no block above its head yet.
        assert_eq!(included_step(&inc, None, &head(99, 0), 3), IncludedStep::Wait { depth: 0 });
    }

    #[test]
    fn a_payment_whose_transaction_is_gone_is_requeued_while_valid_else_expired() {
        let h = head(200, 5_000);
        let live = requeue(&record(1, Status::Included, 5_002), &h, "reorged out", 9);
        assert_eq!((live.to, live.only_from, live.failure), (Status::Accepted, Some(Status::Included), None));
        // The next block is at least one second later: validBefore must be after that.
        let dead = requeue(&record(1, Status::Included, 5_001), &h, "reorged out", 9);
        assert_eq!(dead.to, Status::Expired);
        assert_eq!(dead.failure.unwrap().0, Reason::InvalidValidBefore);
    }
}
