//! The writer's connection, the statements a group sends (prepared once per connection),
//! and the counters every group updates.

use tokio_postgres::{Client, Statement};

use super::decode::pg_err;
use crate::ledger::error::LedgerError;
use crate::ledger::record::CorruptRecord;

/// The writer's connection and its prepared statements.
pub(super) struct WriterConn {
    pub(super) client: Client,
    pub(super) st: Statements,
}

pub(super) const LOCK_COUNTERS: &str = "SELECT name, value FROM ledger_meta WHERE name IN ('seq', 'settlement', 'pending') ORDER BY name FOR UPDATE";
pub(super) const READ_COUNTERS: &str =
    "SELECT name, value FROM ledger_meta WHERE name IN ('seq', 'settlement', 'pending') ORDER BY name";

/// The statements of a group, prepared once per connection (a statement sent as text is
/// parsed and planned each time, in a round trip of its own).
pub(super) struct Statements {
    pub(super) lock_counters: Statement,
    pub(super) lock_payers: Statement,
    pub(super) read_payments: Statement,
    pub(super) read_exposure: Statement,
    pub(super) read_idem: Statement,
    pub(super) read_batches: Statement,
    pub(super) read_leases: Statement,
    pub(super) read_holds: Statement,
    pub(super) payments: Statement,
    pub(super) feed: Statement,
    pub(super) idem: Statement,
    pub(super) exposure: Statement,
    pub(super) cleared: Statement,
    pub(super) settlement: Statement,
    pub(super) batches: Statement,
    pub(super) counters_set: Statement,
    pub(super) counters_add: Statement,
    pub(super) holds_placed: Statement,
    pub(super) holds_released: Statement,
    pub(super) holds_lapsed: Statement,
    pub(super) holds_count: Statement,
}

impl Statements {
    pub(super) async fn prepare(c: &Client) -> Result<Statements, tokio_postgres::Error> {
        let (
            (lock_counters, lock_payers, read_payments, read_exposure, read_idem, read_batches, read_leases),
            (payments, feed, idem, exposure, cleared, settlement, batches),
            (counters_set, counters_add),
            (read_holds, holds_placed, holds_released, holds_lapsed, holds_count),
        ) = futures::try_join!(reads(c), rows(c), counter_writes(c), holds(c))?;
        Ok(Statements {
            lock_counters,
            lock_payers,
            read_payments,
            read_exposure,
            read_idem,
            read_batches,
            read_leases,
            read_holds,
            payments,
            feed,
            idem,
            exposure,
            cleared,
            settlement,
            batches,
            counters_set,
            counters_add,
            holds_placed,
            holds_released,
            holds_lapsed,
            holds_count,
        })
    }
}

type Prepared<T> = Result<T, tokio_postgres::Error>;

/// A group's first round trip: its locks and reads.
async fn reads(
    c: &Client,
) -> Prepared<(Statement, Statement, Statement, Statement, Statement, Statement, Statement)> {
    futures::try_join!(
        c.prepare(LOCK_COUNTERS),
        c.prepare("SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k"),
        c.prepare(
            "SELECT f.record, p.pending, p.watched, f.seq FROM ledger_payments p JOIN ledger_feed f ON f.seq = p.seq \
             WHERE p.id = ANY($1::bytea[])"
        ),
        c.prepare("SELECT payer, value FROM ledger_exposure WHERE payer = ANY($1::bytea[])"),
        c.prepare("SELECT idem, key FROM ledger_idem WHERE idem = ANY($1::text[])"),
        c.prepare(
            "SELECT record FROM ledger_batch WHERE (chain_id, counter) IN \
             (SELECT * FROM unnest($1::bigint[], $2::bigint[]))"
        ),
        c.prepare(
            "SELECT chain_id, settler, owner, epoch FROM ledger_leases WHERE (chain_id, settler) IN \
             (SELECT * FROM unnest($1::bigint[], $2::bytea[])) FOR SHARE"
        ),
    )
}

/// A group's rows: payments, the change feed, idempotency keys, exposure, the settlement log,
/// batches. Sequence numbers are the row's offset plus the counter as locked (the counters
/// are updated by the group's last statement).
async fn rows(
    c: &Client,
) -> Prepared<(Statement, Statement, Statement, Statement, Statement, Statement, Statement)> {
    futures::try_join!(
        c.prepare(
            "INSERT INTO ledger_payments (id, key, seq, pending, watched) \
             SELECT u.id, u.key, u.off + (SELECT value FROM ledger_meta WHERE name = 'seq'), \
             u.pending, u.watched \
             FROM unnest($1::bytea[], $2::bytea[], $3::bigint[], $4::bool[], $5::bool[]) \
             AS u(id, key, off, pending, watched) \
             ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, pending = EXCLUDED.pending, \
             watched = EXCLUDED.watched"
        ),
        c.prepare(
            "INSERT INTO ledger_feed (seq, record, written_by) \
             SELECT u.off + (SELECT value FROM ledger_meta WHERE name = 'seq'), u.record, 3 \
             FROM unnest($1::bigint[], $2::bytea[]) AS u(off, record)"
        ),
        c.prepare("INSERT INTO ledger_idem (idem, key) SELECT * FROM unnest($1::text[], $2::bytea[])"),
        c.prepare(
            "INSERT INTO ledger_exposure (payer, value) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
             ON CONFLICT (payer) DO UPDATE SET value = EXCLUDED.value"
        ),
        c.prepare("DELETE FROM ledger_exposure WHERE payer = ANY($1::bytea[])"),
        c.prepare(
            "INSERT INTO ledger_settlement (seq, record, change) \
             SELECT u.off + m.settlement, u.record, u.change + m.seq \
             FROM unnest($1::bigint[], $2::bytea[], $3::bigint[]) AS u(off, record, change), \
             (SELECT max(value) FILTER (WHERE name = 'settlement') AS settlement, \
             max(value) FILTER (WHERE name = 'seq') AS seq FROM ledger_meta) m"
        ),
        c.prepare(
            "INSERT INTO ledger_batch (chain_id, counter, record, open) \
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bytea[], $4::bool[]) \
             ON CONFLICT (chain_id, counter) DO UPDATE SET record = EXCLUDED.record, open = EXCLUDED.open"
        ),
    )
}

/// The counters' update: set (an import) or added to (a group).
async fn counter_writes(c: &Client) -> Prepared<(Statement, Statement)> {
    futures::try_join!(
        c.prepare(
            "UPDATE ledger_meta SET value = CASE name WHEN 'seq' THEN $1::bigint \
             WHEN 'settlement' THEN $2::bigint ELSE $3::bigint END \
             WHERE name IN ('seq', 'settlement', 'pending')"
        ),
        c.prepare(
            "UPDATE ledger_meta SET value = value + CASE name WHEN 'seq' THEN $1::bigint \
             WHEN 'settlement' THEN $2::bigint ELSE $3::bigint END \
             WHERE name IN ('seq', 'settlement', 'pending')"
        ),
    )
}

/// The holds: read by payer, placed, released, lapsed, counted.
async fn holds(c: &Client) -> Prepared<(Statement, Statement, Statement, Statement, Statement)> {
    futures::try_join!(
        c.prepare(
            "SELECT key, to_address, value, valid_after, valid_before, idem, expires_at_ms \
             FROM ledger_holds WHERE payer = ANY($1::bytea[])"
        ),
        c.prepare(
            "INSERT INTO ledger_holds \
             (id, payer, key, to_address, value, valid_after, valid_before, idem, expires_at_ms) \
             SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bytea[], $4::bytea[], $5::bytea[], \
             $6::bytea[], $7::bytea[], $8::text[], $9::bigint[]) \
             ON CONFLICT (id) DO UPDATE SET key = EXCLUDED.key, to_address = EXCLUDED.to_address, \
             value = EXCLUDED.value, valid_after = EXCLUDED.valid_after, \
             valid_before = EXCLUDED.valid_before, idem = EXCLUDED.idem, expires_at_ms = EXCLUDED.expires_at_ms"
        ),
        c.prepare("DELETE FROM ledger_holds WHERE id = ANY($1::bytea[])"),
        c.prepare("DELETE FROM ledger_holds WHERE expires_at_ms <= $1"),
        c.prepare("SELECT count(*) FROM ledger_holds"),
    )
}

/// The counters every group updates: the newest sequence number and settlement log number,
/// and how many payments are pending.
#[derive(Debug, Clone, Copy)]
pub(super) struct Counters {
    pub(super) seq: u64,
    pub(super) settlement: u64,
    pub(super) pending: u64,
}

/// The counters; `lock`: for this transaction (groups of every daemon take turns on it).
pub(super) async fn counters(client: &Client, lock: bool) -> Result<Counters, LedgerError> {
    let query = if lock { LOCK_COUNTERS } else { READ_COUNTERS };
    counters_from(&client.query(query, &[]).await.map_err(pg_err("read counters"))?)
}

pub(super) fn counters_from(rows: &[tokio_postgres::Row]) -> Result<Counters, LedgerError> {
    let get = |name: &str| {
        rows.iter()
            .find(|r| r.get::<_, &str>(0) == name)
            .map(|r| r.get::<_, i64>(1) as u64)
            .ok_or(LedgerError::Corrupt { cf: "ledger_meta", source: CorruptRecord { field: "counter" } })
    };
    Ok(Counters { seq: get("seq")?, settlement: get("settlement")?, pending: get("pending")? })
}
