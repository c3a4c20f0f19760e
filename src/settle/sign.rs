//! Signing a batch's transaction: its fees ([`fees_for`]: current ones, or a replacement's
//! bump over the previous attempt, never above the configured cap), its shape (one item:
//! the token's own call; more: `aggregate3`, see [`chain::settlement_call`]) and the
//! signature; and a stuck transaction replaced at its nonce, each new attempt recorded in
//! the ledger before it is broadcast.

use alloy::consensus::Transaction as _;
use alloy::eips::Encodable2718;
use alloy::network::{Ethereum, NetworkTransactionBuilder, TransactionBuilder};
use alloy::rpc::types::TransactionRequest;

use super::rpc::{Chain, Head};
use super::{Engine, RoundReport, SettleError};
use crate::chain;
use crate::ledger::{ApplyRequest, Attempt, BatchRecord};
use crate::planner::Fees;

/// `(max_fee_per_gas, max_priority_fee_per_gas)` for a transaction: twice the base fee
/// plus the tip; replacing `previous`, at least `bump_percent` above both of its fees (what
/// nodes require of a replacement). Capped at `cap`; `None` when a replacement cannot beat
/// `previous` under it.
pub(super) fn fees_for(
    fees: Fees,
    previous: Option<&Attempt>,
    bump_percent: u64,
    cap: u128,
) -> Option<(u128, u128)> {
    let mut priority = fees.priority_fee;
    let mut max_fee = fees.base_fee.saturating_mul(2).saturating_add(priority);
    if let Some(p) = previous {
        let bump = |v: u128| v.saturating_mul(100 + u128::from(bump_percent)).div_ceil(100);
        priority = priority.max(bump(p.max_priority_fee_per_gas));
        max_fee = max_fee.max(bump(p.max_fee_per_gas));
    }
    max_fee = max_fee.min(cap);
    priority = priority.min(max_fee);
    match previous {
        Some(p) if max_fee <= p.max_fee_per_gas || priority <= p.max_priority_fee_per_gas => None,
        _ => Some((max_fee, priority)),
    }
}

impl<C: Chain> Engine<C> {
    /// Signs the batch's transaction at `nonce` (see [`fees_for`]).
    pub(super) async fn sign(
        &self,
        batch: &BatchRecord,
        nonce: u64,
        fees: Fees,
        previous: Option<&Attempt>,
        head: &Head,
    ) -> Result<Attempt, SettleError> {
        let cap = self.config.max_fee_per_gas_wei;
        let (max_fee, priority) = fees_for(fees, previous, self.config.fee_bump_percent, cap)
            .ok_or_else(|| SettleError::FeeAtCap { batch: batch.id(), cap })?;
        let settler = self
            .settlers
            .iter()
            .find(|s| s.address == batch.settler)
            .ok_or_else(|| SettleError::SettlerGone { batch: batch.id(), settler: batch.settler })?;
        let signed: Vec<_> = self.records_of(batch)?.into_iter().map(|r| r.signed).collect();
        let (to, calldata) = chain::settlement_call(&signed);
        let tx = TransactionRequest::default()
            .with_to(to)
            .with_input(calldata)
            .with_nonce(nonce)
            .with_chain_id(self.chain_id)
            .with_gas_limit(batch.gas_limit)
            .with_max_fee_per_gas(max_fee)
            .with_max_priority_fee_per_gas(priority);
        let envelope =
            <TransactionRequest as NetworkTransactionBuilder<Ethereum>>::build(tx, &settler.wallet)
                .await
                .map_err(|source| SettleError::Sign { batch: batch.id(), source })?;
        debug_assert_eq!(envelope.nonce(), nonce);
        Ok(Attempt {
            tx_hash: *envelope.tx_hash(),
            raw: envelope.encoded_2718().into(),
            max_fee_per_gas: max_fee,
            max_priority_fee_per_gas: priority,
            signed_at_block: head.number,
            tx_nonce: nonce,
        })
    }
}

/// Replacing a stuck transaction, and recording a new attempt before it is broadcast.
impl<C: Chain> Engine<C> {
    /// Replaces `last` at its nonce with a higher fee; at the fee cap it waits instead.
    pub(super) async fn replace(
        &mut self,
        batch: BatchRecord,
        last: &Attempt,
        fees: Fees,
        head: &Head,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        match self.sign(&batch, last.tx_nonce, fees, Some(last), head).await {
            Ok(attempt) => self.add_attempt(batch, attempt, report, true).await,
            Err(e @ SettleError::FeeAtCap { .. }) => {
                tracing::warn!("cannot replace a stuck transaction: {e}");
                // At the cap it cannot be replaced; if the node forgot it meanwhile, it must
                // at least be sent again, or it waits for ever (found by the simulator).
                if !self.read(self.chain.is_known(last.tx_hash).await)? {
                    self.metrics.transactions_dropped.increment(1);
                    if self.chain.broadcast(&last.raw).await.is_ok() {
                        report.rebroadcast += 1;
                        tracing::info!(batch = %batch.id(), tx = %last.tx_hash, "dropped transaction at the fee cap resubmitted");
                    }
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Records a new signed attempt, then broadcasts it.
    pub(super) async fn add_attempt(
        &mut self,
        mut batch: BatchRecord,
        attempt: Attempt,
        report: &mut RoundReport,
        replacement: bool,
    ) -> Result<(), SettleError> {
        let raw = attempt.raw.clone();
        tracing::info!(
            batch = %batch.id(),
            tx = %attempt.tx_hash,
            nonce = attempt.tx_nonce,
            max_fee_per_gas = attempt.max_fee_per_gas,
            replacement,
            "new transaction for a batch"
        );
        batch.attempts.push(attempt);
        batch.updated_at_ms = self.now_ms();
        self.ledger
            .apply(ApplyRequest {
                transitions: Vec::new(),
                batch: Some(batch.clone()),
                atomic: false,
                fence: None,
            })
            .await?;
        self.open.insert(batch.counter, batch.clone());
        if let Err(e) = self.chain.broadcast(&raw).await {
            tracing::warn!(batch = %batch.id(), "broadcast refused: {e}");
        }
        report.replaced += 1;
        if replacement {
            self.metrics.transactions_replaced.increment(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::attempt;
    use super::*;

    const FEES: Fees = Fees { base_fee: 1_000, priority_fee: 100 };

    #[test]
    fn a_first_transaction_offers_twice_the_base_fee_plus_the_tip() {
        assert_eq!(fees_for(FEES, None, 25, u128::MAX), Some((2_100, 100)));
        assert_eq!(fees_for(FEES, None, 25, 1_500), Some((1_500, 100)), "capped");
        assert_eq!(fees_for(FEES, None, 25, 50), Some((50, 50)), "the tip never above the cap");
    }

    #[test]
    fn a_replacement_bumps_both_fees_by_at_least_the_percentage() {
        // The previous attempt paid more than today's fees call for: bump it.
        let prev = attempt(1, 7, 100, 10_000); // priority 1,000
        let (max_fee, priority) = fees_for(FEES, Some(&prev), 25, u128::MAX).unwrap();
        assert_eq!((max_fee, priority), (12_500, 1_250));
        // Fees rose past the bump: today's fees.
        let high = Fees { base_fee: 20_000, priority_fee: 2_000 };
        assert_eq!(fees_for(high, Some(&prev), 25, u128::MAX), Some((42_000, 2_000)));
    }

    #[test]
    fn a_replacement_that_cannot_beat_the_previous_under_the_cap_is_refused() {
        let prev = attempt(1, 7, 100, 10_000);
        assert_eq!(fees_for(FEES, Some(&prev), 25, 10_000), None, "already at the cap");
        assert_eq!(
            fees_for(FEES, Some(&prev), 25, 11_000),
            Some((11_000, 1_250)),
            "partly capped still beats it"
        );
    }
}
