//! The sweep: included payments no open batch follows (their evidence is another
//! transaction of ours than their batch's, or their batch was closed while they were
//! included) are each judged on their own evidence: settled once their block is
//! `confirmations` deep on the canonical chain; after a reorg, included again where their
//! transaction was mined anew, else back to accepted (or expired). Without the sweep such a
//! payment would wait forever.

use std::collections::{BTreeMap, HashMap, HashSet};

use alloy::primitives::B256;

use super::follow::moves;
use super::rpc::{Chain, Head};
use super::{Engine, RoundReport, SettleError};
use crate::ledger::{ApplyRequest, BatchRecord, BatchStatus, PaymentRecord, Status};

/// The included payments no open included batch follows: those whose evidence is another
/// transaction of ours than their batch's, or whose batch was closed while they were
/// included. Without the sweep such a payment would wait forever.
pub(super) fn orphans<'a>(
    open: &BTreeMap<u64, BatchRecord>,
    pending: &'a [PaymentRecord],
) -> Vec<&'a PaymentRecord> {
    let followed: HashSet<(String, B256)> = open
        .values()
        .filter(|b| b.status == BatchStatus::Included)
        .filter_map(|b| b.inclusion.map(|i| (b.id(), i.tx_hash)))
        .collect();
    pending
        .iter()
        .filter(|r| r.status == Status::Included)
        .filter(|r| !r.tx_hash.is_some_and(|h| followed.contains(&(r.batch_id.clone(), h))))
        .collect()
}

/// What to do with an included payment no batch follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SweepStep {
    /// Included without evidence: back to accepted (or expired).
    NoEvidence,
    /// Its block is canonical and deep enough.
    Settle,
    /// Its block is canonical, not yet deep enough.
    Wait,
    /// Its block was reorged away: look for its transaction again.
    Reorged { tx_hash: B256 },
}

/// Decides what to do with `record` (included, unfollowed), given the canonical hash at
/// its block's height.
pub(super) fn sweep_step(
    record: &PaymentRecord,
    canonical: Option<B256>,
    head: &Head,
    confirmations: u64,
) -> SweepStep {
    let (Some(tx_hash), Some(block_hash)) = (record.tx_hash, record.block_hash) else {
        return SweepStep::NoEvidence;
    };
    if record.block_number > head.number {
        // Preconfirmed, not sealed yet.
        return SweepStep::Wait;
    }
    if canonical != Some(block_hash) {
        return SweepStep::Reorged { tx_hash };
    }
    let depth = head.number.saturating_sub(record.block_number) + 1;
    if depth >= confirmations { SweepStep::Settle } else { SweepStep::Wait }
}

impl<C: Chain> Engine<C> {
    /// Settles, re-includes or requeues the included payments no open batch follows, each
    /// on its own evidence (see [`sweep_step`]).
    pub(super) async fn sweep_included(
        &mut self,
        pending: &[PaymentRecord],
        head: &Head,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        let orphans = orphans(&self.open, pending);
        if orphans.is_empty() {
            return Ok(());
        }
        let now_ms = self.now_ms();
        let mut canonical: HashMap<u64, Option<B256>> = HashMap::new();
        let mut transitions = Vec::new();
        for r in orphans {
            let hash = match canonical.get(&r.block_number) {
                _ if r.block_number > head.number => None,
                Some(h) => *h,
                None => {
                    let h = self.canonical_hash(r.block_number).await?;
                    canonical.insert(r.block_number, h);
                    h
                }
            };
            match sweep_step(r, hash, head, self.policy.confirmations) {
                SweepStep::Wait => {}
                SweepStep::NoEvidence => transitions.push(
                    self.requeue_unless_ours(r, head, "it was included without evidence", now_ms).await?,
                ),
                SweepStep::Settle => {
                    if let Some(cache) = &self.balances {
                        cache.invalidate(&r.key().payer());
                    }
                    transitions.extend(moves(Status::Settled, Status::Included, &[r], now_ms));
                }
                SweepStep::Reorged { tx_hash } => {
                    tracing::warn!(payment = %r.payment_id(), block = r.block_number, "reorg: the block of an included payment changed");
                    self.metrics.reorgs.increment(1);
                    let receipt = self.read(self.chain.receipt(tx_hash, r.signed.token).await)?;
                    let evidence = match receipt {
                        Some(receipt) => self.evidence_in(&receipt, r).await?,
                        None => None,
                    };
                    match evidence {
                        Some(ev) => {
                            let mut t = moves(Status::Included, Status::Included, &[r], now_ms).remove(0);
                            t.evidence = Some(ev);
                            transitions.push(t);
                        }
                        None => transitions.push(
                            self.requeue_unless_ours(r, head, "its transaction was reorged out", now_ms)
                                .await?,
                        ),
                    }
                }
            }
        }
        let results = self
            .apply(ApplyRequest { transitions: transitions.clone(), batch: None, atomic: false, fence: None })
            .await?;
        for (t, r) in transitions.iter().zip(&results) {
            if r.is_ok() {
                match t.to {
                    Status::Settled => report.settled += 1,
                    Status::Expired => report.expired += 1,
                    Status::Accepted => report.requeued += 1,
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{attempt, batch, head, included, inclusion, record};
    use super::super::follow::included_elsewhere;
    use super::*;

    #[test]
    fn unfollowed_included_payments_are_swept_on_their_own_evidence() {
        let block_hash = B256::repeat_byte(0xb0);
        let r = included(record(1, Status::Accepted, 10_000), B256::repeat_byte(9), 100, block_hash);
        let h = head(101, 0);
        assert_eq!(sweep_step(&r, Some(block_hash), &h, 3), SweepStep::Wait);
        assert_eq!(sweep_step(&r, Some(block_hash), &head(102, 0), 3), SweepStep::Settle);
        let moved = sweep_step(&r, Some(B256::repeat_byte(0xb1)), &h, 3);
        assert_eq!(moved, SweepStep::Reorged { tx_hash: B256::repeat_byte(9) });
        assert_eq!(sweep_step(&record(2, Status::Included, 10_000), None, &h, 3), SweepStep::NoEvidence);
        assert_eq!(sweep_step(&r, None, &head(99, 0), 3), SweepStep::Wait, "preconfirmed, not sealed yet");
    }

    #[test]
    fn a_payment_included_by_another_transaction_is_the_sweeps() {
        let block_hash = B256::repeat_byte(0xb0);
        let mine = included(record(1, Status::Accepted, 10_000), B256::repeat_byte(1), 100, block_hash);
        let elsewhere = included(record(2, Status::Accepted, 10_000), B256::repeat_byte(9), 100, block_hash);
        let mut b = batch(
            1,
            BatchStatus::Included,
            &[mine.clone(), elsewhere.clone()],
            vec![attempt(1, 7, 99, 5_000)],
        );
        assert!(!included_elsewhere(&mine, &b));
        assert!(included_elsewhere(&elsewhere, &b));
        assert!(!included_elsewhere(&record(3, Status::Submitted, 10_000), &b));

        b.inclusion = Some(inclusion(100, block_hash));
        let mut followed = mine.clone();
        followed.batch_id = b.id();
        let mut other = elsewhere.clone();
        other.batch_id = b.id();
        let open = BTreeMap::from([(1, b)]);
        let pending = [followed, other, record(4, Status::Accepted, 10_000)];
        let swept: Vec<_> = orphans(&open, &pending).into_iter().map(|r| r.key()).collect();
        assert_eq!(swept, [elsewhere.key()], "only the payment its batch does not follow");
        assert_eq!(orphans(&BTreeMap::new(), &pending).len(), 2, "a closed batch follows nothing");
    }
}
