//! The seam's reads on PostgreSQL, and its one way to write (a group).

use std::sync::atomic::Ordering;

use alloy::primitives::U256;

use super::PgLedger;
use super::decode::{clamp, decode_batch, decode_payer, decode_record, decode_u256, pg_err};
use crate::ledger::batch::BatchRecord;
use crate::ledger::command::Command;
use crate::ledger::error::LedgerError;
use crate::ledger::record::{AuthKey, PayerKey, PaymentId, PaymentRecord};
use crate::ledger::store::{Fleet, GroupOutcome, LedgerStore};

impl LedgerStore for PgLedger {
    fn location(&self) -> String {
        self.connect.location()
    }

    fn fleet(&self) -> Option<&dyn Fleet> {
        Some(self)
    }

    fn open_batches(&self, chain_id: u64) -> Result<Vec<BatchRecord>, LedgerError> {
        let chain_id = clamp(chain_id);
        self.read(move |c| async move {
            let rows = c
                .query(
                    "SELECT record FROM ledger_batch WHERE chain_id = $1 AND open ORDER BY counter",
                    &[&chain_id],
                )
                .await
                .map_err(pg_err("read batches"))?;
            rows.iter().map(|r| decode_batch(r.get(0))).collect()
        })
    }

    fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::SeqCst)
    }

    fn pending(&self) -> u64 {
        self.pending.load(Ordering::SeqCst)
    }

    fn holds(&self) -> usize {
        usize::try_from(self.live_holds.load(Ordering::SeqCst)).unwrap_or(usize::MAX)
    }

    fn last_settlement(&self) -> u64 {
        self.last_settlement.load(Ordering::SeqCst)
    }

    fn get(&self, key: &AuthKey) -> Result<Option<PaymentRecord>, LedgerError> {
        // The row's key is its id (a function of the authorization key).
        self.get_by_id(&key.payment_id())
    }

    fn get_by_id(&self, id: &PaymentId) -> Result<Option<PaymentRecord>, LedgerError> {
        let id = id.0.to_vec();
        self.read(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT f.record, f.seq FROM ledger_payments p JOIN ledger_feed f ON f.seq = p.seq WHERE p.id = $1",
                    &[&id],
                )
                .await
                .map_err(pg_err("read payment"))?;
            row.map(|r| decode_record("ledger_payments", r.get(0), r.get(1))).transpose()
        })
    }

    fn exposure(&self, payer: &PayerKey) -> Result<U256, LedgerError> {
        let payer = payer.as_bytes().to_vec();
        self.read(move |c| async move {
            let row = c
                .query_opt("SELECT value FROM ledger_exposure WHERE payer = $1", &[&payer])
                .await
                .map_err(pg_err("read exposure"))?;
            row.map(|r| decode_u256("ledger_exposure", "exposure", r.get(0)))
                .transpose()
                .map(Option::unwrap_or_default)
        })
    }

    fn exposures(&self) -> Result<Vec<(PayerKey, U256)>, LedgerError> {
        self.read(|c| async move {
            let rows = c
                .query("SELECT payer, value FROM ledger_exposure ORDER BY payer", &[])
                .await
                .map_err(pg_err("read exposure"))?;
            rows.iter()
                .map(|r| Ok((decode_payer(r.get(0))?, decode_u256("ledger_exposure", "exposure", r.get(1))?)))
                .collect()
        })
    }

    fn pending_records(&self) -> Result<Vec<PaymentRecord>, LedgerError> {
        self.records_where(
            "SELECT f.record, f.seq FROM ledger_payments p JOIN ledger_feed f ON f.seq = p.seq WHERE p.pending \
             ORDER BY p.key",
        )
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<PaymentRecord>, LedgerError> {
        let (after, limit) = (clamp(after), clamp(limit as u64));
        self.read(move |c| async move {
            let rows = c
                .query(
                    "SELECT record, seq FROM ledger_feed WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &limit],
                )
                .await
                .map_err(pg_err("read feed"))?;
            rows.iter().map(|r| decode_record("ledger_feed", r.get(0), r.get(1))).collect()
        })
    }

    fn watched(&self) -> Result<Vec<PaymentRecord>, LedgerError> {
        self.records_where(
            "SELECT f.record, f.seq FROM ledger_payments p JOIN ledger_feed f ON f.seq = p.seq WHERE p.watched \
             ORDER BY p.key",
        )
    }

    fn settlement_log(&self, after: u64, limit: usize) -> Result<Vec<(u64, PaymentRecord)>, LedgerError> {
        let (after, limit) = (clamp(after), clamp(limit as u64));
        self.read(move |c| async move {
            let rows = c
                .query(
                    "SELECT seq, record, change FROM ledger_settlement WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &limit],
                )
                .await
                .map_err(pg_err("read settlement log"))?;
            rows.iter()
                .map(|r| {
                    Ok((r.get::<_, i64>(0) as u64, decode_record("ledger_settlement", r.get(1), r.get(2))?))
                })
                .collect()
        })
    }

    fn batch(&self, chain_id: u64, counter: u64) -> Result<Option<BatchRecord>, LedgerError> {
        let (chain_id, counter) = (clamp(chain_id), clamp(counter));
        self.read(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT record FROM ledger_batch WHERE chain_id = $1 AND counter = $2",
                    &[&chain_id, &counter],
                )
                .await
                .map_err(pg_err("read batch"))?;
            row.map(|r| decode_batch(r.get(0))).transpose()
        })
    }

    fn batches(&self, chain_id: u64) -> Result<Vec<BatchRecord>, LedgerError> {
        let chain_id = clamp(chain_id);
        self.read(move |c| async move {
            let rows = c
                .query("SELECT record FROM ledger_batch WHERE chain_id = $1 ORDER BY counter", &[&chain_id])
                .await
                .map_err(pg_err("read batches"))?;
            rows.iter().map(|r| decode_batch(r.get(0))).collect()
        })
    }

    fn last_batch_counter(&self, chain_id: u64) -> Result<u64, LedgerError> {
        let chain_id = clamp(chain_id);
        self.read(move |c| async move {
            let row = c
                .query_one("SELECT max(counter) FROM ledger_batch WHERE chain_id = $1", &[&chain_id])
                .await
                .map_err(pg_err("read batches"))?;
            Ok(row.get::<_, Option<i64>>(0).unwrap_or(0) as u64)
        })
    }

    fn records(&self) -> Result<Vec<PaymentRecord>, LedgerError> {
        self.records_where(
            "SELECT f.record, f.seq FROM ledger_payments p JOIN ledger_feed f ON f.seq = p.seq ORDER BY p.key",
        )
    }

    fn apply_group(&self, commands: &[Command]) -> GroupOutcome {
        match self.group(commands) {
            Ok(outcome) => outcome,
            Err(e) => {
                // Nothing of the group is committed, its holds included; the next group
                // reconnects if the connection is gone.
                tracing::warn!("ledger group failed: {}", e.with_causes());
                GroupOutcome {
                    results: commands.iter().map(|_| Err(e.clone())).collect(),
                    changed: Vec::new(),
                    seqs: None,
                }
            }
        }
    }
}
