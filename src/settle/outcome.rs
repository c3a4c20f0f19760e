//! A mined transaction → each of its payments' outcome and evidence.
//!
//! An item settled in a transaction iff the token emitted its own `AuthorizationUsed` log
//! there. An item without one is simulated again alone: the token's refusal decides it
//! ([`verdict`]): expired, failed, or, for a nonce already used, included by another
//! transaction of ours if one emitted its log; an item the token would now take goes back
//! to accepted for another batch.
//!
//! **The fee-share rule**, the only one: a transaction's fee (`gasUsed ×
//! effectiveGasPrice`, wei) and its gas are divided over the payments it settled, ranked
//! by log index; the integer remainder goes one unit each to the first ranks, so the shares
//! of one transaction sum exactly to its fee and gas. Items that failed in it carry its
//! hash with a zero share (their gas is part of what the settled ones share), unless
//! nothing settled: then the failed and expired items share it, in batch order. A
//! transaction whose items all went back to accepted is in no payment's share (it stays in
//! the batch record).

use std::collections::BTreeSet;

use alloy::primitives::{Address, U256};

use super::follow::included_elsewhere;
use super::rpc::{Chain, Head, Receipt};
use super::{Engine, RoundReport, SettleError};
use crate::ledger::{
    ApplyRequest, BatchRecord, BatchStatus, Evidence, Inclusion, PaymentRecord, Status, TransitionRequest,
};
use crate::simulate::ItemFailure;
use crate::x402::Reason;

/// How far back an `AuthorizationUsed` log is looked for when a nonce turns out used:
/// ~5.5 hours of 2-second blocks, within most nodes' `eth_getLogs` range limits.
const LOG_LOOKBACK_BLOCKS: u64 = 10_000;

/// The gas share of the payment ranked `rank` (from 0) among `n` sharing `total`.
pub fn gas_share(total: u64, n: usize, rank: usize) -> u64 {
    let n = n.max(1) as u64;
    total / n + u64::from((rank as u64) < total % n)
}

/// The fee share (wei) of the payment ranked `rank` (from 0) among `n` sharing `total`.
pub fn fee_share(total: U256, n: usize, rank: usize) -> U256 {
    let n = U256::from(n.max(1));
    let extra = if U256::from(rank) < total % n { U256::from(1) } else { U256::ZERO };
    total / n + extra
}

/// Who used an authorization (see `Engine::who_used`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum UseOf {
    Ours(Evidence),
    Others { final_: bool },
    Unseen,
}

/// Evidence of `receipt` for the item ranked `rank` of the `n` sharing its fee.
fn evidence(receipt: &Receipt, block_time: u64, log_index: u64, rank: usize, n: usize) -> Evidence {
    Evidence {
        tx_hash: receipt.tx_hash,
        block_number: receipt.block_number,
        block_hash: receipt.block_hash,
        block_time,
        log_index,
        gas_share: gas_share(receipt.gas_used, n, rank),
        fee_share_wei: fee_share(receipt.fee(), n, rank),
    }
}

/// `record`'s own `AuthorizationUsed` log in `receipt`, as evidence with its share.
pub(super) fn evidence_for(receipt: &Receipt, record: &PaymentRecord, block_time: u64) -> Option<Evidence> {
    let a = &record.signed.authorization;
    let rank = receipt.used.iter().position(|&(from, nonce, _)| from == a.from && nonce == a.nonce)?;
    Some(evidence(receipt, block_time, receipt.used[rank].2, rank, receipt.used.len()))
}

/// What a receipt says of a batch's items before any item is simulated again.
#[derive(Debug)]
pub(super) struct Judged<'a> {
    /// Items settled in it (included, with evidence), and items a re-mined transaction no
    /// longer settled (back to accepted).
    pub transitions: Vec<TransitionRequest>,
    /// Items without a log of their own: to be simulated again alone.
    pub unsettled: Vec<&'a PaymentRecord>,
    pub settled_items: u32,
}

/// Reads `receipt` for `batch`'s items (`records`, in batch order). Items included by
/// another transaction of ours are left to their own evidence.
pub(super) fn judge_receipt<'a>(
    batch: &BatchRecord,
    records: &'a [PaymentRecord],
    receipt: &Receipt,
    block_time: u64,
    now_ms: u64,
) -> Judged<'a> {
    let mut judged = Judged { transitions: Vec::new(), unsettled: Vec::new(), settled_items: 0 };
    for record in records.iter().filter(|r| !included_elsewhere(r, batch)) {
        let mut t = TransitionRequest::new(record.key(), Status::Included, now_ms);
        t.only_from = Some(record.status);
        if let Some(ev) = evidence_for(receipt, record, block_time) {
            t.evidence = Some(ev);
            judged.settled_items += 1;
        } else if record.status == Status::Included {
            // A reorg re-mined the transaction and this item no longer settled in it.
            t.to = Status::Accepted;
        } else {
            judged.unsettled.push(record);
            continue;
        }
        judged.transitions.push(t);
    }
    judged
}

/// Gives the items that failed or expired in `receipt`'s transaction (outcomes without
/// evidence yet) its hash and their shares: zero when some item settled in it, else an
/// equal part of its fee and gas each, in the order given.
pub(super) fn attribute_failures(receipt: &Receipt, block_time: u64, transitions: &mut [TransitionRequest]) {
    let failed: Vec<usize> = transitions
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(t.to, Status::Failed | Status::Expired) && t.evidence.is_none())
        .map(|(i, _)| i)
        .collect();
    let sharing = if receipt.used.is_empty() { failed.len() } else { 0 };
    for (rank, i) in failed.into_iter().enumerate() {
        let mut ev = evidence(receipt, block_time, 0, rank, sharing.max(1));
        if sharing == 0 {
            (ev.gas_share, ev.fee_share_wei) = (0, U256::ZERO);
        }
        transitions[i].evidence = Some(ev);
    }
}

/// What the token's refusal of an item, simulated alone, makes of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// `validBefore` passed on chain.
    Expired(String),
    /// Not valid yet on chain: stays accepted for a later batch.
    NotYet,
    /// Its nonce is used: included if a transaction of ours used it, failed otherwise.
    NonceUsed(String),
    /// Refused for this reason.
    Failed(Reason, String),
}

pub(super) fn verdict(failure: ItemFailure) -> Verdict {
    match failure.reason {
        Reason::InvalidValidBefore => Verdict::Expired(failure.message),
        Reason::InvalidValidAfter => Verdict::NotYet,
        Reason::NonceAlreadyUsed => Verdict::NonceUsed(failure.message),
        reason => Verdict::Failed(reason, failure.message),
    }
}

impl<C: Chain> Engine<C> {
    /// Records a mined batch: each item's outcome from the receipt, the batch included.
    pub(super) async fn on_included(
        &mut self,
        mut batch: BatchRecord,
        receipt: Receipt,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        if let Some(made) = self.pace.included(batch.counter, receipt.block_number) {
            let lead_ms = self.pace.lead_ms(batch.items.len());
            tracing::debug!(
                block = receipt.block_number,
                made,
                items = batch.items.len(),
                lead_ms,
                "send lead learnt"
            );
        }
        if self.last_head.is_some_and(|(h, _)| receipt.block_number > h.number) {
            self.preconfirmed.insert(batch.counter);
        }
        let block_time = self.block_time(receipt.block_number, receipt.block_hash).await?;
        let records = self.records_of(&batch)?;
        let now_ms = self.now_ms();
        let judged = judge_receipt(&batch, &records, &receipt, block_time, now_ms);
        let mut transitions = judged.transitions;
        transitions.extend(self.judge_unsettled_in(&receipt, block_time, &judged.unsettled, now_ms).await?);
        report.count_judged(&transitions);
        if judged.unsettled.is_empty() && receipt.success && !batch.items.is_empty() {
            self.gas.observe(batch.token, batch.items.len(), receipt.gas_used);
            self.metrics.batch_gas_per_payment.record(receipt.gas_used as f64 / batch.items.len() as f64);
        }
        batch.status = BatchStatus::Included;
        batch.updated_at_ms = now_ms;
        batch.inclusion = Some(Inclusion {
            tx_hash: receipt.tx_hash,
            block_number: receipt.block_number,
            block_hash: receipt.block_hash,
            block_time,
            gas_used: receipt.gas_used,
            effective_gas_price: receipt.effective_gas_price,
            l1_fee: receipt.l1_fee,
            settled_items: judged.settled_items,
        });
        let finals = transitions.iter().filter(|t| t.to.is_final()).count();
        let results = self
            .apply(ApplyRequest { transitions, batch: Some(batch.clone()), atomic: false, fence: None })
            .await?;
        let moved = results.iter().filter(|r| r.is_ok()).count();
        tracing::info!(
            batch = %batch.id(),
            tx = %receipt.tx_hash,
            block = receipt.block_number,
            items = batch.items.len(),
            settled_items = judged.settled_items,
            failed = finals,
            moved,
            gas_used = receipt.gas_used,
            "batch included"
        );
        report.included += 1;
        self.open.insert(batch.counter, batch);
        Ok(())
    }

    /// The outcomes of the items that did not settle in `receipt`'s transaction, each
    /// simulated again alone, failures given the transaction's hash and shares. A failure
    /// or expiry is decided only once the receipt's block is final: until then a reorg may
    /// mine the transaction again where the item settles (a payer's balance moved away in
    /// a block a reorg undoes: found by the simulator, seeds 280, 428, 487, ...); such items
    /// stay with their batch, which decides them when its block is final.
    pub(super) async fn judge_unsettled_in(
        &self,
        receipt: &Receipt,
        block_time: u64,
        records: &[&PaymentRecord],
        now_ms: u64,
    ) -> Result<Vec<TransitionRequest>, SettleError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let head = self.read(self.chain.head().await)?;
        let block_final = self.final_block(&head).await?.is_some_and(|f| receipt.block_number <= f);
        let mut transitions = Vec::new();
        for record in records {
            if let Some(t) = self.judge_unsettled(record, now_ms, block_final).await? {
                transitions.push(t);
            }
        }
        attribute_failures(receipt, block_time, &mut transitions);
        Ok(transitions)
    }

    /// The outcome of an item that did not settle in its transaction: simulated again alone.
    /// `None`: refused, but its transaction's block is not final yet (decided later).
    async fn judge_unsettled(
        &self,
        record: &PaymentRecord,
        now_ms: u64,
        block_final: bool,
    ) -> Result<Option<TransitionRequest>, SettleError> {
        let mut t = TransitionRequest::new(record.key(), Status::Accepted, now_ms);
        t.only_from = Some(record.status);
        // Generous: only whether the token would take it matters here.
        let gas = self.alone_gas(record);
        let sim = self.read(self.chain.simulate(std::slice::from_ref(&record.signed), gas, None).await)?;
        match sim.into_iter().next() {
            None | Some(Ok(())) => {
                // It would settle now (it ran short of gas, or the payer's balance came
                // back): another batch tries again.
                tracing::warn!(payment = %record.payment_id(), "item did not settle in its batch but would now; re-queued");
            }
            Some(Err(failure)) => {
                let final_verdict =
                    matches!(verdict(failure.clone()), Verdict::Failed(..) | Verdict::Expired(_));
                if final_verdict && !block_final {
                    tracing::info!(payment = %record.payment_id(), reason = failure.reason.code(), "refused in its transaction, whose block is not final yet: deciding then");
                    return Ok(None);
                }
                self.refusal(record, failure, &mut t).await?;
            }
        }
        Ok(Some(t))
    }

    /// Turns the token's refusal of an item into its transition (see [`verdict`]).
    pub(super) async fn refusal(
        &self,
        record: &PaymentRecord,
        failure: ItemFailure,
        t: &mut TransitionRequest,
    ) -> Result<(), SettleError> {
        match verdict(failure) {
            Verdict::Expired(message) => {
                // A payment once in a batch may have been paid by that batch's transaction
                // after all (mined in a block a lagging node did not show yet, or again
                // after a reorg): its evidence, not its expiry (found by the simulator,
                // seed 2328).
                let once_batched = !record.batch_id.is_empty() && record.status.can_move_to(Status::Included);
                match if once_batched { self.find_our_use(record).await? } else { None } {
                    Some(ev) => {
                        t.to = Status::Included;
                        t.evidence = Some(ev);
                    }
                    None => {
                        t.to = Status::Expired;
                        t.failure = Some((Reason::InvalidValidBefore, message));
                    }
                }
            }
            Verdict::NotYet => t.to = Status::Accepted,
            Verdict::NonceUsed(message) => match self.who_used(record).await? {
                UseOf::Ours(ev) => {
                    t.to = Status::Included;
                    t.evidence = Some(ev);
                }
                UseOf::Others { final_: false } => {
                    // Used by someone else in a block a reorg may still undo: nothing is
                    // final yet, so neither is this payment; it is judged again later. (A
                    // failure decided here was wrong when the reorg came and our own
                    // transaction paid it: found by the simulator, seeds 62, 143, 149.)
                    tracing::info!(payment = %record.payment_id(), "its nonce was used by another transaction, not yet final: deciding later");
                    t.to = Status::Accepted;
                }
                UseOf::Others { final_: true } | UseOf::Unseen => {
                    t.to = Status::Failed;
                    t.failure = Some((Reason::NonceAlreadyUsed, message));
                }
            },
            Verdict::Failed(reason, message) => {
                if self.refused_at_final(record).await? {
                    t.to = Status::Failed;
                    t.failure = Some((reason, message));
                } else {
                    // Refused on a state a reorg may still undo (a payer's balance moved
                    // away in a block not yet final): nothing is final yet, so neither is
                    // this payment; it is judged again later. (A failure decided here was
                    // wrong when the reorg came and our own transaction, mined again,
                    // paid it: found by the simulator, seeds 280, 428, 487, ...)
                    tracing::info!(payment = %record.payment_id(), reason = reason.code(), "refused on a state not yet final: deciding later");
                    t.to = Status::Accepted;
                }
            }
        }
        Ok(())
    }

    /// A generous gas limit for simulating `record` alone (its wallet's deployment too).
    fn alone_gas(&self, record: &PaymentRecord) -> u64 {
        let deploys = crate::chain::deployments(std::slice::from_ref(&record.signed));
        self.config.with_deployments(self.config.seed_gas_limit(1), deploys)
    }

    /// Whether the token refuses `record` on the state of the chain's final block as well
    /// (no block final yet: nothing is refused for good).
    async fn refused_at_final(&self, record: &PaymentRecord) -> Result<bool, SettleError> {
        let head = self.read(self.chain.head().await)?;
        let Some(final_block) = self.final_block(&head).await? else { return Ok(false) };
        let gas = self.alone_gas(record);
        let sim = self
            .read(self.chain.simulate(std::slice::from_ref(&record.signed), gas, Some(final_block)).await)?;
        Ok(sim
            .into_iter()
            .next()
            .is_some_and(|r| r.is_err_and(|f| matches!(verdict(f), Verdict::Failed(..)))))
    }

    /// The newest block final on chain by the configured finality (under `head`), if one
    /// is known.
    pub(super) async fn final_block(&self, head: &Head) -> Result<Option<u64>, SettleError> {
        let tagged = match self.finality {
            crate::config::Finality::Tag(tag) => self.read(self.chain.tagged_block(tag).await)?,
            crate::config::Finality::Depth(_) => None,
        };
        Ok(super::finality::final_block(self.finality, head, tagged))
    }

    /// The `AuthorizationUsed` log of `record`'s authorization if a transaction from one
    /// of our settlers emitted it: a payment that did settle (say, a reorged-out
    /// transaction mined again) must never be reported failed.
    /// Our own use of `record`'s authorization, as evidence, if a transaction of ours used it.
    pub(super) async fn find_our_use(&self, record: &PaymentRecord) -> Result<Option<Evidence>, SettleError> {
        Ok(match self.who_used(record).await? {
            UseOf::Ours(ev) => Some(ev),
            UseOf::Others { .. } | UseOf::Unseen => None,
        })
    }

    /// Who used `record`'s authorization, by its `AuthorizationUsed` logs of the last
    /// [`LOG_LOOKBACK_BLOCKS`]: a transaction of ours (its evidence), someone else's (and
    /// whether in a block final on chain), or nobody the logs show (canceled, or older).
    pub(super) async fn who_used(&self, record: &PaymentRecord) -> Result<UseOf, SettleError> {
        let head = self.read(self.chain.head().await)?;
        let a = &record.signed.authorization;
        let token = record.signed.token;
        let from = head.number.saturating_sub(LOG_LOOKBACK_BLOCKS);
        // Up to the latest block, whatever head this round read: the use that made the
        // token refuse may be in a block newer than it (a lagging read missed one and failed
        // a payment our own transaction had paid: found by the simulator, seed 149).
        let txs = self.read(self.chain.uses_of(token, a.from, a.nonce, from, u64::MAX).await)?;
        let ours: BTreeSet<Address> = self.settlers.iter().map(|s| s.address).collect();
        let mut others = Vec::new();
        for tx in txs {
            let Some(receipt) = self.read(self.chain.receipt(tx, token).await)? else {
                // Its log is served but not its receipt (a node catching up): whose it is
                // cannot be told yet, so nothing is decided; a later round asks again. (Taking
                // it for someone else's failed a payment our own transaction paid: found by
                // the simulator, seed 19.)
                self.metrics.rpc_error("eth_getTransactionReceipt");
                return Err(SettleError::Rpc(crate::chain::RpcError {
                    chain_id: self.chain_id,
                    call: "eth_getTransactionReceipt",
                    detail: format!(
                        "transaction {tx} used the authorization but its receipt is not served yet"
                    ),
                }));
            };
            if ours.contains(&receipt.from) {
                return match self.evidence_in(&receipt, record).await? {
                    Some(ev) => Ok(UseOf::Ours(ev)),
                    // Its log, seen a moment ago, is not in the receipt served now (a node
                    // between two views of a reorg): decided in a later round.
                    None => Err(SettleError::Rpc(crate::chain::RpcError {
                        chain_id: self.chain_id,
                        call: "eth_getTransactionReceipt",
                        detail: format!(
                            "transaction {tx} of ours used the authorization but its receipt shows no log for it"
                        ),
                    })),
                };
            }
            others.push(receipt.block_number);
        }
        if others.is_empty() {
            return Ok(UseOf::Unseen);
        }
        let final_block = self.final_block(&head).await?;
        Ok(UseOf::Others { final_: others.iter().any(|b| final_block.is_some_and(|f| *b <= f)) })
    }

    /// `record`'s evidence in a mined `receipt`, if its log is there (with the block's time).
    pub(super) async fn evidence_in(
        &self,
        receipt: &Receipt,
        record: &PaymentRecord,
    ) -> Result<Option<Evidence>, SettleError> {
        let Some(mut evidence) = evidence_for(receipt, record, 0) else { return Ok(None) };
        evidence.block_time = self.block_time(receipt.block_number, receipt.block_hash).await?;
        Ok(Some(evidence))
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{attempt, batch, included, receipt, record};
    use super::*;
    use alloy::primitives::B256;

    #[test]
    fn shares_sum_exactly_to_the_whole_and_differ_by_at_most_one() {
        for total in [0u64, 1, 2, 99, 100, 101, 1_000_003, 21_000 * 7 + 5] {
            for n in 1..=13usize {
                let gas: Vec<u64> = (0..n).map(|rank| gas_share(total, n, rank)).collect();
                assert_eq!(gas.iter().sum::<u64>(), total, "{total} over {n}");
                assert!(gas.iter().max().unwrap() - gas.iter().min().unwrap() <= 1);
                assert!(gas.windows(2).all(|w| w[0] >= w[1]), "the remainder goes to the first ranks");
                let fee = U256::from(total) * U256::from(1_000_000_007u64);
                let shares: U256 = (0..n).map(|rank| fee_share(fee, n, rank)).sum();
                assert_eq!(shares, fee, "{fee} over {n}");
            }
        }
    }

    #[test]
    fn an_l1_fee_is_shared_with_the_gas_fee() {
        let recs: Vec<_> = (1..=3).map(|i| record(i, Status::Submitted, 10_000)).collect();
        let b = batch(1, BatchStatus::Submitted, &recs, vec![attempt(0xa1, 7, 99, 5_000)]);
        let mut r = receipt(0xa1, 100, &[(1, 1), (2, 2), (3, 3)], 150_000, 1_000);
        r.l1_fee = 7_000_001;
        let judged = judge_receipt(&b, &recs, &r, 1_700, 50);
        let fees: U256 = judged.transitions.iter().map(|t| t.evidence.unwrap().fee_share_wei).sum();
        assert_eq!(fees, U256::from(150_000u64 * 1_000 + 7_000_001), "gas and L1 fee, to the wei");
    }

    #[test]
    fn each_item_gets_its_own_log_and_a_share_ranked_by_log_index() {
        let recs: Vec<_> = (1..=4).map(|i| record(i, Status::Submitted, 10_000)).collect();
        let b = batch(1, BatchStatus::Submitted, &recs, vec![attempt(0xa1, 7, 99, 5_000)]);
        // Items 1, 2 and 4 settled (logs 9, 3 and 5); item 3 has no log.
        let r = receipt(0xa1, 100, &[(2, 3), (4, 5), (1, 9)], 200_002, 1_000_000_007);
        let judged = judge_receipt(&b, &recs, &r, 1_700, 50);
        assert_eq!(judged.settled_items, 3);
        assert_eq!(judged.unsettled.iter().map(|r| r.key()).collect::<Vec<_>>(), [recs[2].key()]);
        let by_key = |i: usize| judged.transitions.iter().find(|t| t.key == recs[i].key()).unwrap();
        let ev = |i: usize| by_key(i).evidence.unwrap();
        assert_eq!([ev(0).log_index, ev(1).log_index, ev(3).log_index], [9, 3, 5]);
        assert_eq!([ev(1).gas_share, ev(3).gas_share, ev(0).gas_share], [66_668, 66_667, 66_667]);
        let fees: U256 = [0, 1, 3].iter().map(|&i| ev(i).fee_share_wei).sum();
        assert_eq!(fees, r.fee(), "the shares of one transaction sum to its fee");
        assert!(
            ev(1).fee_share_wei > ev(0).fee_share_wei,
            "the remainder goes to the lowest log index first"
        );
        for i in [0, 1, 3] {
            let t = by_key(i);
            assert_eq!((t.to, t.only_from), (Status::Included, Some(Status::Submitted)));
            assert_eq!((ev(i).tx_hash, ev(i).block_number, ev(i).block_time), (r.tx_hash, 100, 1_700));
        }
    }

    #[test]
    fn a_re_mined_transaction_without_an_items_log_sends_it_back_and_skips_other_evidence() {
        let hash = B256::repeat_byte(0xb0);
        let was_in = included(record(1, Status::Accepted, 10_000), B256::repeat_byte(0xa1), 90, hash);
        let elsewhere = included(record(2, Status::Accepted, 10_000), B256::repeat_byte(0xcc), 90, hash);
        let recs = [was_in.clone(), elsewhere];
        let b = batch(1, BatchStatus::Included, &recs, vec![attempt(0xa1, 7, 80, 5_000)]);
        let judged = judge_receipt(&b, &recs, &receipt(0xa1, 95, &[], 50_000, 1), 0, 50);
        assert!(judged.unsettled.is_empty());
        assert_eq!(judged.transitions.len(), 1, "the payment included elsewhere is left alone");
        let t = &judged.transitions[0];
        assert_eq!((t.key, t.to, t.only_from), (was_in.key(), Status::Accepted, Some(Status::Included)));
    }

    fn failed(i: u8) -> TransitionRequest {
        let mut t = TransitionRequest::new(record(i, Status::Submitted, 10_000).key(), Status::Failed, 5);
        t.failure = Some((Reason::InsufficientFunds, "poor".into()));
        t
    }

    #[test]
    fn failed_items_carry_the_transaction_with_no_share_when_others_settled() {
        let r = receipt(0xa1, 100, &[(1, 0)], 120_000, 3);
        let mut settled = TransitionRequest::new(record(1, Status::Submitted, 0).key(), Status::Included, 5);
        settled.evidence = evidence_for(&r, &record(1, Status::Submitted, 0), 7);
        let requeued = TransitionRequest::new(record(3, Status::Submitted, 0).key(), Status::Accepted, 5);
        let mut ts = vec![settled, failed(2), requeued];
        attribute_failures(&r, 7, &mut ts);
        let ev = ts[1].evidence.unwrap();
        assert_eq!((ev.tx_hash, ev.gas_share, ev.fee_share_wei), (r.tx_hash, 0, U256::ZERO));
        assert_eq!(ts[0].evidence.unwrap().fee_share_wei, r.fee(), "the settled item's share is untouched");
        assert_eq!(ts[2].evidence, None, "an item back in the queue is in no transaction");
    }

    #[test]
    fn when_nothing_settled_the_failed_items_share_the_fee() {
        let r = receipt(0xa1, 100, &[], 100_001, 7);
        let mut expired = failed(3);
        expired.to = Status::Expired;
        let mut ts = vec![failed(1), failed(2), expired];
        attribute_failures(&r, 7, &mut ts);
        let fee: U256 = ts.iter().map(|t| t.evidence.unwrap().fee_share_wei).sum();
        let gas: u64 = ts.iter().map(|t| t.evidence.unwrap().gas_share).sum();
        assert_eq!((fee, gas), (r.fee(), r.gas_used));
    }

    #[test]
    fn the_tokens_refusal_decides_an_items_fate() {
        let f = |reason| ItemFailure { reason, message: "m".into() };
        assert_eq!(verdict(f(Reason::InvalidValidBefore)), Verdict::Expired("m".into()));
        assert_eq!(verdict(f(Reason::InvalidValidAfter)), Verdict::NotYet);
        assert_eq!(verdict(f(Reason::NonceAlreadyUsed)), Verdict::NonceUsed("m".into()));
        assert_eq!(
            verdict(f(Reason::InsufficientFunds)),
            Verdict::Failed(Reason::InsufficientFunds, "m".into())
        );
    }
}
