//! Past the confirmation depth: a settled payment stays watched until its block is final on
//! chain (the chain's `finalized` or `safe` block, or a configured depth). Each round:
//!
//! - if the chain changed below the head last checked (a reorg), every watched block is
//!   checked against the canonical chain; otherwise only blocks above that head are (one
//!   `eth_getBlockByNumber` per round in the common case);
//! - a watched payment whose block is no longer canonical is looked for by its
//!   transaction: mined again elsewhere, its evidence is **corrected**; gone, its settlement
//!   is **reversed** and the payment goes back to be settled again while its authorization
//!   is valid (or expires). Both are new settlement log entries, never rewrites;
//! - a watched payment on the canonical chain at or below the final block is **finalized**.
//!
//! [`watch_step`] decides from what was read; the `impl Engine` below reads and writes.

use std::collections::{BTreeMap, BTreeSet};

use alloy::primitives::B256;
use futures::StreamExt as _;

use super::rpc::{Chain, Head};
use super::{Engine, RoundReport, SettleError};
use crate::config::Finality;
use crate::ledger::{ApplyRequest, BatchRecord, PaymentRecord, Status, TransitionRequest};

/// Block reads in flight at once when many watched blocks must be checked.
const CONCURRENT_BLOCK_READS: usize = 16;

/// What to do with a settled payment not yet final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WatchStep {
    /// On the canonical chain, not yet final.
    Wait,
    /// On the canonical chain at or below the final block.
    Finalize,
    /// Its block is no longer canonical: look for its transaction.
    Reorged { tx_hash: B256 },
}

/// Decides what to do with settled `record`, given the canonical hash at its block's height
/// and the final block's number (`None`: nothing final yet).
pub(super) fn watch_step(
    record: &PaymentRecord,
    canonical: Option<B256>,
    final_block: Option<u64>,
) -> WatchStep {
    let (Some(tx_hash), Some(block_hash)) = (record.tx_hash, record.block_hash) else {
        // Settled without evidence cannot happen (settled is reached from included); were
        // it ever so, nothing on chain could correct it: finality is all that is left.
        return if final_block.is_some() { WatchStep::Finalize } else { WatchStep::Wait };
    };
    if canonical != Some(block_hash) {
        return WatchStep::Reorged { tx_hash };
    }
    match final_block {
        Some(f) if record.block_number <= f => WatchStep::Finalize,
        _ => WatchStep::Wait,
    }
}

/// The final block under `finality`, given the head and the chain's tagged block.
pub(super) fn final_block(finality: Finality, head: &Head, tagged: Option<u64>) -> Option<u64> {
    match finality {
        Finality::Tag(_) => tagged,
        // `depth` blocks: the block itself and depth - 1 on top.
        Finality::Depth(depth) => (head.number + 1).checked_sub(depth.max(1)),
    }
}

impl<C: Chain> Engine<C> {
    /// Whether `tx_hash` of `record`'s batch, known to the node but without a receipt, may
    /// still be mined: its nonce is at or below its settler's next one (mined with its
    /// receipt not served yet, or next in line), or another open batch of ours holds a
    /// nonce in the gap below it. Above a gap nothing of ours fills (a reorg dropped an
    /// earlier transaction of ours) it never is: it is gone, though a node keeps it
    /// queued (a settlement watched for ever instead: found by the simulator, seeds
    /// 25353, 58095, 77774, 79035, 88502).
    async fn may_still_be_mined(&self, record: &PaymentRecord, tx_hash: B256) -> Result<bool, SettleError> {
        let batch = match BatchRecord::parse_id(&record.batch_id) {
            Some((chain_id, counter)) => self.ledger.ledger().batch(chain_id, counter)?,
            None => None,
        };
        let Some((batch, attempt)) =
            batch.as_ref().and_then(|b| b.attempts.iter().find(|a| a.tx_hash == tx_hash).map(|a| (b, a)))
        else {
            // Not one of its batch's transactions: nothing known of its nonce.
            return Ok(true);
        };
        let next = self.read(self.chain.nonce(batch.settler).await)?;
        Ok(attempt.tx_nonce <= next
            || self.open.values().any(|b| {
                b.settler == batch.settler
                    && b.counter != batch.counter
                    && b.tx_nonce().is_some_and(|n| n >= next && n < attempt.tx_nonce)
            }))
    }

    /// Corrects, reverses or finalizes the settled payments not yet final (see the module).
    pub(super) async fn follow_settled(
        &mut self,
        head: &Head,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        let chain_id = self.chain_id;
        let watched: Vec<PaymentRecord> =
            self.ledger.ledger().watched()?.into_iter().filter(|r| r.signed.chain_id == chain_id).collect();
        let oldest = watched.iter().map(|r| r.block_number).min();
        self.metrics.finality_lag_blocks.set(oldest.map_or(0, |b| head.number.saturating_sub(b) + 1) as f64);
        if watched.is_empty() {
            self.checked_head = Some((head.number, head.hash));
            return Ok(());
        }
        // Finality moves at most a block per block: while the last final block read, moved
        // on by the heads since, is still below every watched one, nothing can be final yet.
        let bound = self.final_seen.map(|(f, at)| f.saturating_add(head.number.saturating_sub(at)));
        let final_block = match (bound, oldest) {
            (Some(bound), Some(oldest)) if bound < oldest => Some(bound),
            _ => {
                let read = self.final_block(head).await?;
                self.final_seen = read.map(|f| (f, head.number));
                read
            }
        };
        let canonical = self.canonical_hashes(&watched).await?;
        let now_ms = self.now_ms();
        let mut transitions = Vec::new();
        // A reorged payment left for a later round: its block must be read again then.
        let mut undecided = false;
        // One reorg counted per round that found settled payments moved (not one per
        // payment; a round that looks again for an undecided one counts again).
        let mut reorged = false;
        for r in &watched {
            let hash = canonical.get(&r.block_number).copied().unwrap_or(r.block_hash);
            match watch_step(r, hash, final_block) {
                WatchStep::Wait => {}
                WatchStep::Finalize => {
                    let mut t = TransitionRequest::new(r.key(), Status::Settled, now_ms);
                    t.only_from = Some(Status::Settled);
                    t.finalize = true;
                    transitions.push(t);
                }
                WatchStep::Reorged { tx_hash } => {
                    reorged = true;
                    match self.after_reorg(r, tx_hash, head, now_ms).await? {
                        Some(t) => transitions.push(t),
                        None => undecided = true,
                    }
                }
            }
        }
        self.write_settled(transitions, report).await?;
        if reorged {
            self.metrics.reorgs.increment(1);
        }
        self.checked_head = if undecided { None } else { Some((head.number, head.hash)) };
        Ok(())
    }

    /// The canonical hash at each watched payment's block, `None` where the chain has no
    /// such block. Below the head checked last round nothing changed if that block is still
    /// there; after a restart or a reorg every watched block is read.
    async fn canonical_hashes(
        &self,
        watched: &[PaymentRecord],
    ) -> Result<BTreeMap<u64, Option<B256>>, SettleError> {
        let unchanged_to = match self.checked_head {
            Some((number, hash)) if self.canonical_hash(number).await? == Some(hash) => Some(number),
            _ => None,
        };
        let to_check: BTreeSet<u64> =
            watched.iter().map(|r| r.block_number).filter(|b| unchanged_to.is_none_or(|n| *b > n)).collect();
        // After a restart or a reorg every watched block is read: many at once, so a long
        // finality window (hundreds of batches) fits in a round.
        let chain = &self.chain;
        let reads = futures::stream::iter(to_check)
            .map(|b| async move { chain.block_at(b).await.map(|found| (b, found.map(|(hash, _)| hash))) })
            .buffer_unordered(CONCURRENT_BLOCK_READS)
            .collect::<Vec<_>>()
            .await;
        let mut canonical: BTreeMap<u64, Option<B256>> = BTreeMap::new();
        for read in reads {
            let (b, hash) = self.read(read)?;
            canonical.insert(b, hash);
        }
        Ok(canonical)
    }

    /// What a settled payment whose block was reorged away becomes: its evidence corrected
    /// (its transaction mined again elsewhere), or its settlement reversed (the transaction
    /// is gone); `None`: undecided this round (the node still knows the transaction).
    async fn after_reorg(
        &self,
        r: &PaymentRecord,
        tx_hash: B256,
        head: &Head,
        now_ms: u64,
    ) -> Result<Option<TransitionRequest>, SettleError> {
        let receipt = self.read(self.chain.receipt(tx_hash, r.signed.token).await)?;
        // Mined again elsewhere: its log there, with the shares of that
        // receipt's fee (the new block's base fee may differ).
        let evidence = match &receipt {
            Some(rc) => self.evidence_in(rc, r).await?,
            None => None,
        };
        // No receipt, but the node knows the transaction (mined, its receipt not
        // served yet; or back in its pool after the reorg): not gone, so nothing
        // is reversed this round (a reversal that expired a payment the
        // transaction had paid: found by the simulator, seed 352).
        if receipt.is_none()
            && self.read(self.chain.is_known(tx_hash).await)?
            && self.may_still_be_mined(r, tx_hash).await?
        {
            return Ok(None);
        }
        match evidence {
            Some(ev) => {
                tracing::warn!(
                    payment = %r.payment_id(), tx = %tx_hash, from_block = r.block_number, to_block = ev.block_number,
                    "reorg past settlement: the transaction was mined again in another block; evidence corrected"
                );
                let mut t = TransitionRequest::new(r.key(), Status::Settled, now_ms);
                t.only_from = Some(Status::Settled);
                t.evidence = Some(ev);
                Ok(Some(t))
            }
            None => {
                tracing::error!(
                    payment = %r.payment_id(), tx = %tx_hash, block = r.block_number,
                    "reorg past settlement: the settlement transaction is gone; the settlement is reversed and the payment settles again"
                );
                let reason = "its settlement was reversed by a reorg";
                Ok(Some(self.requeue_unless_ours(r, head, reason, now_ms).await?))
            }
        }
    }

    /// Writes the round's corrections, reversals and finalizations, counting those written.
    async fn write_settled(
        &mut self,
        transitions: Vec<TransitionRequest>,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        if transitions.is_empty() {
            return Ok(());
        }
        let results = self
            .apply(ApplyRequest { transitions: transitions.clone(), batch: None, atomic: false, fence: None })
            .await?;
        for (t, r) in transitions.iter().zip(&results) {
            if r.is_err() {
                continue;
            }
            match t.to {
                _ if t.finalize => report.finalized += 1,
                Status::Settled => {
                    report.corrected += 1;
                    self.metrics.corrections.increment(1);
                }
                Status::Accepted | Status::Expired => {
                    report.reversed += 1;
                    self.metrics.reversals.increment(1);
                    if t.to == Status::Expired {
                        report.expired += 1;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{head, included, record};
    use super::*;
    use crate::config::FinalityTag;

    fn settled(block: u64) -> PaymentRecord {
        let mut r = included(
            record(1, Status::Accepted, 10_000),
            B256::repeat_byte(9),
            block,
            B256::repeat_byte(0xb0),
        );
        r.status = Status::Settled;
        r
    }

    #[test]
    fn a_settled_payment_waits_for_finality_and_is_looked_for_after_a_reorg() {
        let r = settled(100);
        let ours = Some(B256::repeat_byte(0xb0));
        assert_eq!(watch_step(&r, ours, None), WatchStep::Wait, "nothing final yet");
        assert_eq!(watch_step(&r, ours, Some(99)), WatchStep::Wait);
        assert_eq!(watch_step(&r, ours, Some(100)), WatchStep::Finalize);
        let moved = WatchStep::Reorged { tx_hash: B256::repeat_byte(9) };
        assert_eq!(watch_step(&r, Some(B256::repeat_byte(0xb1)), Some(100)), moved, "a reorg first");
        assert_eq!(watch_step(&r, None, None), moved, "the block is gone");
    }

    #[test]
    fn the_final_block_is_the_chains_tag_or_the_configured_depth() {
        let h = head(100, 0);
        assert_eq!(final_block(Finality::Tag(FinalityTag::Finalized), &h, Some(36)), Some(36));
        assert_eq!(final_block(Finality::Tag(FinalityTag::Safe), &h, None), None);
        assert_eq!(final_block(Finality::Depth(1), &h, Some(3)), Some(100), "depth 1: the head itself");
        assert_eq!(final_block(Finality::Depth(64), &h, None), Some(37));
        assert_eq!(final_block(Finality::Depth(200), &h, None), None);
    }
}
