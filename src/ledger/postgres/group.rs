//! One group of commands on PostgreSQL: two round trips, decided between them with the
//! shared rules, renumbered after the commit.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::PgLedger;
use super::decode::pg_err;
use super::read::{Named, prefetch};
use super::stage::{PROVISIONAL, PgStage, offset};
use super::statements::Counters;
use super::writes::HoldWrites;
use crate::ledger::command::Command;
use crate::ledger::error::LedgerError;
use crate::ledger::group::{Decided, Group};
use crate::ledger::record::PaymentRecord;
use crate::ledger::store::GroupOutcome;

/// How many times a group is decided before its failure is the answer (a group lost a
/// race only to a group that committed, so the next attempt sees what it took).
pub(super) const GROUP_ATTEMPTS: u32 = 5;

impl PgLedger {
    /// One group ([`Self::try_group`]), decided again from the start when it lost a race
    /// its locks do not cover (an idempotency key another payer's group took meanwhile):
    /// nothing of a failed attempt was committed or answered.
    pub(super) fn group(&self, commands: &[Command]) -> Result<GroupOutcome, LedgerError> {
        let mut attempts = 1;
        loop {
            match self.try_group(commands) {
                Err(e @ LedgerError::LostRace { .. }) if attempts < GROUP_ATTEMPTS => {
                    tracing::debug!("ledger group decided again: {e}");
                    attempts += 1;
                }
                outcome => return outcome,
            }
        }
    }

    /// One group, in two round trips to the database: (1) `BEGIN`, lock the payers named
    /// (and the counters, when it writes a batch), read what the commands name; decide, with
    /// provisional numbers; (2) lock the counters, write (the server numbering the rows
    /// from the counters) and `COMMIT`. Each trip's statements are pipelined (sent together,
    /// answered in order).
    pub(super) fn try_group(&self, commands: &[Command]) -> Result<GroupOutcome, LedgerError> {
        let conn = self.writer()?;
        let named = Named::of(commands);
        let (now_ms, verifies) = (named.now_ms, named.verifies);
        let mut read = {
            let conn = Arc::clone(&conn);
            self.block(async move {
                let read = prefetch(&conn, named).await;
                if read.is_err() {
                    let _ = conn.client.batch_execute("ROLLBACK").await;
                }
                read
            })??
        };
        // The holds of the payers named, as committed; the group decides on a copy.
        let committed_holds = std::mem::take(&mut read.holds);
        let mut holds = committed_holds.clone();
        let mut group = Group::new(PgStage::new(read), &mut holds, PROVISIONAL, PROVISIONAL);
        let mut results: Vec<_> = commands.iter().map(|c| group.apply(c)).collect();
        let Decided { stage, mut records, last_seq, last_settlement, pending_delta } = group.decided();
        let added = [offset(last_seq), offset(last_settlement), pending_delta];
        let mut writes = stage.into_writes(&records, added);
        // Lapse holds (and count the rest) when there may be any: none anywhere as of this
        // daemon's last count, none of these payers', none placed now: nothing to lapse
        // (another daemon's holds are counted by the groups of that daemon).
        let may_hold = verifies || !committed_holds.is_empty() || self.live_holds.load(Ordering::SeqCst) > 0;
        writes.holds = HoldWrites::of(&holds, &committed_holds, now_ms.filter(|_| may_hold));
        let (base, live_holds) = self.block(async move {
            if writes.is_empty() {
                // Nothing changed (every command refused or repeated): release the locks.
                conn.client.batch_execute("ROLLBACK").await.map_err(pg_err("rollback"))?;
                return Ok((None, None));
            }
            let written = writes.run(&conn).await;
            if written.is_err() {
                // A failed statement aborted the transaction (its COMMIT answered ROLLBACK);
                // this ends it if the COMMIT was never reached.
                let _ = conn.client.batch_execute("ROLLBACK").await;
            }
            written.map(|(base, live)| (Some(base), live))
        })??;
        if let Some(live) = live_holds {
            self.live_holds.store(live, Ordering::SeqCst);
        }
        let Some(base) = base else {
            return Ok(GroupOutcome { results, changed: records, seqs: None });
        };
        // The numbers the server gave: the counters as this group locked them, plus offsets.
        let number = |r: &mut PaymentRecord| {
            if r.seq > PROVISIONAL {
                r.seq = r.seq - PROVISIONAL + base.seq;
            }
        };
        records.iter_mut().for_each(number);
        for applied in results.iter_mut().flatten() {
            applied.for_each_record(number);
        }
        let after = Counters {
            seq: base.seq + (last_seq - PROVISIONAL),
            settlement: base.settlement + (last_settlement - PROVISIONAL),
            pending: base.pending.saturating_add_signed(pending_delta),
        };
        // As of this commit, every daemon's commits included (they take turns on the lock).
        self.store_counters(after);
        let seqs = (after.seq > base.seq).then_some((base.seq + 1, after.seq));
        Ok(GroupOutcome { results, changed: records, seqs })
    }
}
