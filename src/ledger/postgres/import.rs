//! A ledger copied in whole (the migration from RocksDB): one transaction, read back and
//! compared with its source.

use std::collections::{BTreeSet, HashSet};

use super::decode::{clamp, pg_err};
use super::statements::{Counters, WriterConn, counters_from};
use super::writes::{CounterWrite, HoldWrites, PaymentRows, Writes, latest_batches, unzip3};
use super::{PgLedger, finish};
use crate::ledger::batch::BatchRecord;
use crate::ledger::error::LedgerError;
use crate::ledger::record::{AuthKey, PaymentRecord};
use crate::ledger::store::LedgerStore;

/// What [`PgLedger::import`] copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub records: usize,
    pub changes: u64,
    pub settlement_entries: u64,
    pub batches: usize,
}

/// Rows per statement when importing.
const IMPORT_CHUNK: usize = 5_000;

/// Everything read from the source ledger.
struct Source {
    records: Vec<PaymentRecord>,
    pending: HashSet<AuthKey>,
    watched: HashSet<AuthKey>,
    chains: BTreeSet<u64>,
    batches: Vec<BatchRecord>,
    /// The change feed: sequence numbers and records.
    feed: Vec<(i64, Vec<u8>)>,
    /// The settlement log: sequence numbers, records, their changes' numbers.
    log: Vec<(i64, Vec<u8>, i64)>,
    counters: Counters,
}

impl Source {
    /// Reads `from`: its records, pending and watched payments, the batches of `chain_ids`
    /// and of every chain a record names, the change feed and the settlement log.
    fn read(from: &dyn LedgerStore, chain_ids: &[u64]) -> Result<Source, LedgerError> {
        let records = from.records()?;
        let pending: HashSet<AuthKey> = from.pending_records()?.iter().map(|r| r.key()).collect();
        let watched: HashSet<AuthKey> = from.watched()?.iter().map(|r| r.key()).collect();
        let mut chains: BTreeSet<u64> = chain_ids.iter().copied().collect();
        chains.extend(records.iter().map(|r| r.signed.chain_id));
        let mut batches = Vec::new();
        for chain in &chains {
            batches.extend(from.batches(*chain)?);
        }
        let mut feed = Vec::new();
        let mut after = 0;
        loop {
            let page = from.events_after(after, IMPORT_CHUNK)?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            feed.extend(page.iter().map(|r| (clamp(r.seq), r.encode())));
        }
        let mut log = Vec::new();
        let mut after = 0;
        loop {
            let page = from.settlement_log(after, IMPORT_CHUNK)?;
            let Some((last, _)) = page.last() else { break };
            after = *last;
            log.extend(page.iter().map(|(seq, r)| (clamp(*seq), r.encode(), clamp(r.seq))));
        }
        let counters = Counters {
            seq: from.last_seq(),
            settlement: from.last_settlement(),
            pending: pending.len() as u64,
        };
        Ok(Source { records, pending, watched, chains, batches, feed, log, counters })
    }

    /// The writes that copy it (exposure read from `from`), numbered from counters of 0 (the
    /// ledger is empty): the source's numbers are the offsets.
    fn writes(&mut self, from: &dyn LedgerStore) -> Result<Writes, LedgerError> {
        let c = self.counters;
        let mut writes = Writes {
            payments: PaymentRows::default(),
            feed: std::mem::take(&mut self.feed).into_iter().unzip(),
            idem: self
                .records
                .iter()
                .filter(|r| !r.submission.idempotency_key.is_empty())
                .map(|r| (r.submission.idempotency_key.clone(), r.key().as_bytes().to_vec()))
                .unzip(),
            exposure: from
                .exposures()?
                .into_iter()
                .filter(|(_, v)| !v.is_zero())
                .map(|(p, v)| (p.as_bytes().to_vec(), v.to_be_bytes::<32>().to_vec()))
                .unzip(),
            exposure_cleared: Vec::new(),
            settlement: unzip3(std::mem::take(&mut self.log)),
            batches: latest_batches(self.batches.clone()),
            counters: Some(CounterWrite::Set([c.seq, c.settlement, c.pending].map(clamp))),
            holds: HoldWrites::default(),
        };
        for r in &self.records {
            let key = r.key();
            writes.payments.id.push(key.payment_id().0.to_vec());
            writes.payments.key.push(key.as_bytes().to_vec());
            writes.payments.seq.push(clamp(r.seq));
            writes.payments.pending.push(self.pending.contains(&key));
            writes.payments.watched.push(self.watched.contains(&key));
        }
        Ok(writes)
    }
}

impl PgLedger {
    /// Copies another ledger (a RocksDB one, with its daemon stopped) into this one, which
    /// must be empty: every record, the change feed and the settlement log under their own
    /// sequence numbers, the batches of `chain_ids` (and of every chain a record names),
    /// the idempotency keys and the exposure, in one transaction. Then reads the copy back
    /// and compares it with the source.
    pub fn import(&self, from: &dyn LedgerStore, chain_ids: &[u64]) -> Result<Imported, LedgerError> {
        let mut source = Source::read(from, chain_ids)?;
        let writes = source.writes(from)?;
        let conn = self.writer()?;
        self.block(async move { copy(&conn, writes).await })??;
        self.count()?;
        self.check_copy(from, &source)?;
        Ok(Imported {
            records: source.records.len(),
            changes: source.counters.seq,
            settlement_entries: source.counters.settlement,
            batches: source.batches.len(),
        })
    }

    /// Reads the copy back and compares it with the source.
    fn check_copy(&self, from: &dyn LedgerStore, source: &Source) -> Result<(), LedgerError> {
        let check = |what: &str, same: bool| {
            if same {
                Ok(())
            } else {
                Err(LedgerError::Config(format!("the imported {what} differ from the source's")))
            }
        };
        check("records", self.records()? == source.records)?;
        check("change feed length", self.last_seq() == from.last_seq())?;
        check("settlement log length", self.last_settlement() == from.last_settlement())?;
        check("pending payments", self.pending() == source.counters.pending)?;
        let mut copied_batches = Vec::new();
        for chain in &source.chains {
            copied_batches.extend(self.batches(*chain)?);
        }
        check("batches", copied_batches == source.batches)?;
        check(
            "exposure",
            self.exposures()?
                == from.exposures()?.into_iter().filter(|(_, v)| !v.is_zero()).collect::<Vec<_>>(),
        )
    }
}

/// Writes the copy in one transaction, into a ledger that must be empty.
async fn copy(conn: &WriterConn, writes: Writes) -> Result<(), LedgerError> {
    let c = &conn.client;
    c.batch_execute("BEGIN").await.map_err(pg_err("begin"))?;
    let copied = async {
        let before =
            counters_from(&c.query(&conn.st.lock_counters, &[]).await.map_err(pg_err("lock counters"))?)?;
        let rows: i64 = c
            .query_one("SELECT count(*) FROM ledger_payments", &[])
            .await
            .map_err(pg_err("count payments"))?
            .get(0);
        if before.seq != 0 || before.settlement != 0 || rows != 0 {
            return Err(LedgerError::Config(format!(
                "the PostgreSQL ledger is not empty ({rows} payments, change {}): import only into a new one",
                before.seq
            )));
        }
        for part in writes.chunks() {
            part.statements(conn).await?;
        }
        Ok(())
    }
    .await;
    finish(c, copied).await
}

impl Writes {
    /// The same in parts of at most [`IMPORT_CHUNK`] rows per statement (an import).
    fn chunks(&self) -> Vec<Writes> {
        fn part<T: Clone>(v: &[T], i: usize) -> Vec<T> {
            v.iter().skip(i * IMPORT_CHUNK).take(IMPORT_CHUNK).cloned().collect()
        }
        let longest = [
            self.payments.id.len(),
            self.feed.0.len(),
            self.idem.0.len(),
            self.exposure.0.len(),
            self.settlement.0.len(),
            self.batches.0.len(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        let parts = longest.div_ceil(IMPORT_CHUNK).max(1);
        (0..parts)
            .map(|i| Writes {
                payments: PaymentRows {
                    id: part(&self.payments.id, i),
                    key: part(&self.payments.key, i),
                    seq: part(&self.payments.seq, i),
                    pending: part(&self.payments.pending, i),
                    watched: part(&self.payments.watched, i),
                },
                feed: (part(&self.feed.0, i), part(&self.feed.1, i)),
                idem: (part(&self.idem.0, i), part(&self.idem.1, i)),
                exposure: (part(&self.exposure.0, i), part(&self.exposure.1, i)),
                exposure_cleared: part(&self.exposure_cleared, i),
                settlement: (
                    part(&self.settlement.0, i),
                    part(&self.settlement.1, i),
                    part(&self.settlement.2, i),
                ),
                batches: (
                    part(&self.batches.0, i),
                    part(&self.batches.1, i),
                    part(&self.batches.2, i),
                    part(&self.batches.3, i),
                ),
                // Last: the parts number their rows from the counters as they were.
                counters: self.counters.filter(|_| i + 1 == parts),
                holds: HoldWrites::default(),
            })
            .collect()
    }
}
