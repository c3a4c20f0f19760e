//! Preconfirmations (opt-in per chain, [`crate::config::ChainConfig::preconfirmation_ms`]):
//! on an OP-stack chain with flashblocks, a flashblocks-aware endpoint serves a
//! transaction's receipt as soon as the sequencer puts it in a flashblock, before the block
//! is sealed. Opted in, the engine looks for the receipts of the transactions in flight
//! every quarter flashblock and counts a payment included at its preconfirmation; once the
//! block is sealed, the batch is judged again on the sealed block if its hash or time
//! differ, and a transaction the sealed chain does not hold broke its preconfirmation: its
//! payments go back to be settled again (or expire), as after a reorg. Not opted in, a
//! receipt from a block the endpoint does not serve yet is not taken for inclusion.

use super::rpc::{Chain, Head, Receipt};
use super::{Engine, RoundReport, SettleError};
use crate::ledger::{BatchRecord, BatchStatus, Inclusion};

impl<C: Chain> Engine<C> {
    /// Whether a receipt counts as mined: its block is at or below the head last read, or
    /// the node serves that very block (sealed since), or the chain's preconfirmations
    /// count. A flashblocks-aware endpoint serves receipts from the block being built: not
    /// opted in, such a receipt is a promise the engine does not take for inclusion.
    pub(super) async fn counts(&self, receipt: &Receipt) -> Result<bool, SettleError> {
        if self.preconfirm_ms.is_some()
            || self.last_head.is_some_and(|(h, _)| receipt.block_number <= h.number)
        {
            return Ok(true);
        }
        Ok(self.canonical_hash(receipt.block_number).await? == Some(receipt.block_hash))
    }

    /// The receipts of the batches in flight, each found judged at once (a chain whose
    /// preconfirmations count: nothing else is read).
    pub(super) async fn follow_in_flight(&mut self, report: &mut RoundReport) -> Result<(), SettleError> {
        let flying: Vec<BatchRecord> = self
            .open
            .values()
            .filter(|b| b.status == BatchStatus::Submitted && self.acts_for(b.settler))
            .cloned()
            .collect();
        for batch in flying {
            if let Some(receipt) = self.receipt_of(&batch).await? {
                self.on_included(batch, receipt, report).await?;
            }
        }
        Ok(())
    }

    /// A batch counted included at a preconfirmation, its block sealed since with another
    /// hash or time than the preconfirmation said: judged again on the sealed receipt. A
    /// transaction the sealed chain does not hold broke its preconfirmation: its payments
    /// go back to be settled again (or expire), as after a reorg.
    pub(super) async fn on_sealed(
        &mut self,
        batch: BatchRecord,
        inc: &Inclusion,
        head: &Head,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        match self.receipt_of(&batch).await? {
            Some(receipt) => {
                if receipt.block_number != inc.block_number {
                    tracing::warn!(batch = %batch.id(), preconfirmed = inc.block_number, sealed = receipt.block_number, "a preconfirmed transaction was sealed in another block");
                }
                self.on_included(batch, receipt, report).await
            }
            None => {
                tracing::warn!(batch = %batch.id(), block = inc.block_number, "a preconfirmation was broken: its transaction is not in the sealed block");
                self.metrics.preconfirmations_broken.increment(1);
                self.abandon(batch, head, "its preconfirmation was broken (not in the sealed block)", report)
                    .await
            }
        }
    }
}
