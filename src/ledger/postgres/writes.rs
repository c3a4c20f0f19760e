//! A group's second round trip: its writes as array statements, the counters' update last,
//! and the commit, pipelined.

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::decode::{clamp, pg_err};
use super::statements::{Counters, WriterConn, counters_from};
use crate::ledger::batch::BatchRecord;
use crate::ledger::error::LedgerError;
use crate::ledger::holds::Holds;

#[derive(Default)]
pub(super) struct PaymentRows {
    pub(super) id: Vec<Vec<u8>>,
    pub(super) key: Vec<Vec<u8>>,
    /// The sequence number of the record's latest change (its row in the feed).
    pub(super) seq: Vec<i64>,
    pub(super) pending: Vec<bool>,
    pub(super) watched: Vec<bool>,
}

/// A group's writes as array statements.
pub(super) struct Writes {
    pub(super) payments: PaymentRows,
    pub(super) feed: (Vec<i64>, Vec<Vec<u8>>),
    pub(super) idem: (Vec<String>, Vec<Vec<u8>>),
    pub(super) exposure: (Vec<Vec<u8>>, Vec<Vec<u8>>),
    pub(super) exposure_cleared: Vec<Vec<u8>>,
    /// Offsets (to the settlement counter), records, their changes' offsets (to `seq`).
    pub(super) settlement: (Vec<i64>, Vec<Vec<u8>>, Vec<i64>),
    /// Chain ids, counters, records, open.
    pub(super) batches: (Vec<i64>, Vec<i64>, Vec<Vec<u8>>, Vec<bool>),
    /// The counters' change, the writes' last statement (the others number their rows from
    /// the counters as they were).
    pub(super) counters: Option<CounterWrite>,
    pub(super) holds: HoldWrites,
}

/// A change of the counters: seq, settlement, pending.
#[derive(Clone, Copy)]
pub(super) enum CounterWrite {
    /// Added (a group).
    Add([i64; 3]),
    /// Set (an import into an empty ledger, whose counters were 0).
    Set([i64; 3]),
}

/// What a group changed of the holds.
#[derive(Default)]
pub(super) struct HoldWrites {
    /// Holds placed or replaced: id, payer, key, to, value, valid after, valid before,
    /// idempotency key, expiry.
    pub(super) placed: HoldRows,
    /// Ids of holds claimed or lapsed.
    pub(super) released: Vec<Vec<u8>>,
    /// Delete every hold lapsed by then and count the rest (a group with acceptances or
    /// holds: its clock).
    pub(super) lapse_at: Option<i64>,
}

#[derive(Default)]
pub(super) struct HoldRows {
    pub(super) id: Vec<Vec<u8>>,
    pub(super) payer: Vec<Vec<u8>>,
    pub(super) key: Vec<Vec<u8>>,
    pub(super) to: Vec<Vec<u8>>,
    pub(super) value: Vec<Vec<u8>>,
    pub(super) valid_after: Vec<Vec<u8>>,
    pub(super) valid_before: Vec<Vec<u8>>,
    pub(super) idem: Vec<String>,
    pub(super) expires_at_ms: Vec<i64>,
}

impl HoldWrites {
    /// The changes from `committed` to `decided`.
    pub(super) fn of(decided: &Holds, committed: &Holds, now_ms: Option<u64>) -> HoldWrites {
        let (placed, released) = decided.changes_since(committed);
        let mut rows = HoldRows::default();
        for (key, hold) in placed {
            let a = &hold.authorization;
            rows.id.push(key.payment_id().0.to_vec());
            rows.payer.push(key.payer().as_bytes().to_vec());
            rows.key.push(key.as_bytes().to_vec());
            rows.to.push(a.to.to_vec());
            rows.value.push(a.value.to_be_bytes::<32>().to_vec());
            rows.valid_after.push(a.valid_after.to_be_bytes::<32>().to_vec());
            rows.valid_before.push(a.valid_before.to_be_bytes::<32>().to_vec());
            rows.idem.push(hold.idempotency_key.clone());
            rows.expires_at_ms.push(clamp(hold.expires_at_ms));
        }
        HoldWrites {
            placed: rows,
            released: released.iter().map(|k| k.payment_id().0.to_vec()).collect(),
            lapse_at: now_ms.map(clamp),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.placed.id.is_empty() && self.released.is_empty() && self.lapse_at.is_none()
    }

    /// Sends the statements (pipelined); the live holds once lapsed ones are gone, if
    /// asked to lapse them.
    pub(super) async fn run(&self, conn: &WriterConn) -> Result<Option<u64>, tokio_postgres::Error> {
        let (c, st, p) = (&conn.client, &conn.st, &self.placed);
        let placed: [&(dyn ToSql + Sync); 9] = [
            &p.id,
            &p.payer,
            &p.key,
            &p.to,
            &p.value,
            &p.valid_after,
            &p.valid_before,
            &p.idem,
            &p.expires_at_ms,
        ];
        let released: [&(dyn ToSql + Sync); 1] = [&self.released];
        let released = execute(c, !self.released.is_empty(), &st.holds_released, &released);
        let placed = execute(c, !p.id.is_empty(), &st.holds_placed, &placed);
        let live = async {
            let Some(at) = self.lapse_at else { return Ok(None) };
            // Both sent before either is answered (and before the COMMIT).
            let at: [&(dyn ToSql + Sync); 1] = [&at];
            let (_, live) =
                futures::try_join!(c.execute(&st.holds_lapsed, &at), c.query_one(&st.holds_count, &[]))?;
            Ok(Some(live.get::<_, i64>(0) as u64))
        };
        let (_, _, live) = futures::try_join!(released, placed, live)?;
        Ok(live)
    }
}

impl Writes {
    pub(super) fn is_empty(&self) -> bool {
        self.payments.key.is_empty() && self.batches.0.is_empty() && self.holds.is_empty()
    }

    /// Locks the counters, sends every statement and the `COMMIT` (pipelined on the one
    /// connection) and waits for them all: `Ok` once the commit returned, with the counters
    /// as locked (the group's numbers follow them) and the live holds if counted.
    pub(super) async fn run(&self, conn: &WriterConn) -> Result<(Counters, Option<u64>), LedgerError> {
        let (c, st) = (&conn.client, &conn.st);
        let lock =
            async { counters_from(&c.query(&st.lock_counters, &[]).await.map_err(pg_err("lock counters"))?) };
        let commit = async { c.batch_execute("COMMIT").await.map_err(pg_err("commit")) };
        let holds = async { self.holds.run(conn).await.map_err(pg_err("write holds")) };
        let (base, _, live, _) = futures::try_join!(lock, self.statements(conn), holds, commit)?;
        Ok((base, live))
    }

    /// Sends every statement (pipelined) and waits for them all, without committing.
    pub(super) async fn statements(&self, conn: &WriterConn) -> Result<(), LedgerError> {
        let (c, st) = (&conn.client, &conn.st);
        let p = &self.payments;
        let (f, i, e, l, b) = (&self.feed, &self.idem, &self.exposure, &self.settlement, &self.batches);
        let payments: [&(dyn ToSql + Sync); 5] = [&p.id, &p.key, &p.seq, &p.pending, &p.watched];
        let feed: [&(dyn ToSql + Sync); 2] = [&f.0, &f.1];
        let idem: [&(dyn ToSql + Sync); 2] = [&i.0, &i.1];
        let exposure: [&(dyn ToSql + Sync); 2] = [&e.0, &e.1];
        let cleared: [&(dyn ToSql + Sync); 1] = [&self.exposure_cleared];
        let settlement: [&(dyn ToSql + Sync); 3] = [&l.0, &l.1, &l.2];
        let batches: [&(dyn ToSql + Sync); 4] = [&b.0, &b.1, &b.2, &b.3];
        let (counters_statement, values) = match self.counters {
            Some(CounterWrite::Add(v)) => (&st.counters_add, Some(v)),
            Some(CounterWrite::Set(v)) => (&st.counters_set, Some(v)),
            None => (&st.counters_add, None),
        };
        let values = values.unwrap_or_default();
        let counters: [&(dyn ToSql + Sync); 3] = [&values[0], &values[1], &values[2]];
        // Each statement only if it has rows (an empty one would still cost the server).
        let payments = execute(c, !p.id.is_empty(), &st.payments, &payments);
        let feed = execute(c, !f.0.is_empty(), &st.feed, &feed);
        let idem = execute(c, !i.0.is_empty(), &st.idem, &idem);
        let exposure = execute(c, !e.0.is_empty(), &st.exposure, &exposure);
        let cleared = execute(c, !self.exposure_cleared.is_empty(), &st.cleared, &cleared);
        let settlement = execute(c, !l.0.is_empty(), &st.settlement, &settlement);
        let batches = execute(c, !b.0.is_empty(), &st.batches, &batches);
        // Sent last: the statements before number their rows from the counters as they were.
        let counters = execute(c, self.counters.is_some(), counters_statement, &counters);
        futures::try_join!(payments, feed, idem, exposure, cleared, settlement, batches, counters)
            .map_err(pg_err("write"))?;
        Ok(())
    }
}

/// Runs `statement` if `rows` (it has any), else nothing.
pub(super) async fn execute(
    c: &Client,
    rows: bool,
    statement: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    if rows { c.execute(statement, params).await } else { Ok(0) }
}

/// The last version of each batch a group wrote (one row per batch in the statement),
/// as array columns.
pub(super) fn latest_batches(batches: Vec<BatchRecord>) -> (Vec<i64>, Vec<i64>, Vec<Vec<u8>>, Vec<bool>) {
    let mut latest: std::collections::BTreeMap<(u64, u64), BatchRecord> = std::collections::BTreeMap::new();
    for b in batches {
        latest.insert((b.chain_id, b.counter), b);
    }
    let mut out = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for b in latest.into_values() {
        out.0.push(clamp(b.chain_id));
        out.1.push(clamp(b.counter));
        out.2.push(b.encode());
        out.3.push(!b.status.is_final());
    }
    out
}

/// Three columns from rows of three.
pub(super) fn unzip3<A, B, C>(rows: Vec<(A, B, C)>) -> (Vec<A>, Vec<B>, Vec<C>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for (a, b, c) in rows {
        out.0.push(a);
        out.1.push(b);
        out.2.push(c);
    }
    out
}
