//! The ledger on PostgreSQL: the same records, rules and order as the RocksDB ledger, in
//! a database that outlives one machine (replicated by the operator's PostgreSQL, e.g.
//! Patroni with a synchronous standby).
//!
//! Layout (schema version [`SCHEMA_VERSION`], in the connection's `search_path`):
//!
//! | table | key | columns |
//! |---|---|---|
//! | `ledger_meta` | name | `schema_version`; the counters `seq`, `settlement`, `pending`; `turn:<task>`: when a daemon last took a fleet-wide periodic task (ms) |
//! | `ledger_payments` | payment id (16 B) | auth key, `seq` of its latest change, `pending`, `watched` |
//! | `ledger_feed` | sequence number | the record as of that change (a payment's record is its latest; its sequence number is the row's), `written_by`: the schema version of the daemon that wrote it |
//! | `ledger_idem` | idempotency key | auth key |
//! | `ledger_exposure` | payer key (48 B) | sum of values accepted, not final (32 B BE) |
//! | `ledger_settlement` | log sequence number | a settlement log entry, `change`: its record's sequence number |
//! | `ledger_batch` | chain id, batch counter | the batch record, `open` (not yet done) |
//! | `ledger_leases` | chain id, settler | owner, epoch, expiry (the database's clock) |
//! | `ledger_holds` | payment id | a `/verify` hold: payer, auth key, the authorization's other fields, idempotency key, expiry (ms, the deciding daemon's clock) |
//!
//! Records are stored in the same encoding as in RocksDB, so both backends read each
//! other's bytes (the migration copies them as they are); records a group writes leave
//! their sequence number out (it is the row's, given by the server at the commit).
//!
//! A group of commands is one transaction in two round trips. The first locks the payers
//! its commands name (transaction-level advisory locks, one per payer, taken in one order by
//! every daemon) and reads what the commands name; the group is decided with the shared
//! rules ([`super::group`]) on that, which no other group can change meanwhile: groups of
//! different daemons naming one payer are decided one after another, each on what the
//! previous one committed, and groups naming different payers overlap. The second locks the
//! counters (`seq`, `settlement`, `pending`: `SELECT … FOR UPDATE`), writes in a handful of
//! array statements whose sequence numbers the server adds to the counters it just locked,
//! and commits; so the change feed and the settlement log are numbered under that lock, in
//! commit order, without gaps (a reader never sees number n + 1 before n), and the lock is
//! held for the writes and the commit only. An acknowledgement follows `COMMIT`.
//!
//! Two things are not covered by a payer's lock: an idempotency key (two payers' payments
//! may name one), kept unique by its primary key: a group that loses that race fails its
//! insert, is rolled back whole and decided again on what is now committed (nothing of it
//! was answered); and a batch number, so a group writing a batch takes the counters' lock
//! in its first round trip (batches are written once per settlement round).
//!
//! Holds (verified payments reserved between the facilitator's `/verify` and `/settle`) are
//! rows too, read with the payers a group names and written back in the same transaction,
//! so a header verified on one daemon of a fleet is held on every one. A group with
//! acceptances or holds also deletes the holds lapsed by its clock.
//!
//! The client is async (tokio-postgres); the seam is synchronous, so the store runs its own
//! small runtime and waits on it from the caller's thread (the writer thread, or a reader).
//!
//! Files: [`connect`] (where the database is, TLS), [`schema`] (creating, checking and
//! upgrading the tables), [`statements`] (the writer's connection, its prepared statements,
//! the counters), [`read`] (what a group names and its first round trip), [`stage`] (the
//! group's decisions staged as rows), [`writes`] (the second round trip), [`group`] (one
//! group, both trips), [`fleet`] (leases and turns), [`import`] (a RocksDB ledger copied in),
//! [`store`] (the seam's reads), [`decode`] (rows back into records, and errors).

mod connect;
mod decode;
mod fleet;
mod group;
mod import;
mod read;
mod schema;
mod stage;
mod statements;
mod store;
mod writes;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_postgres::Client;

use super::error::LedgerError;
use super::record::PaymentRecord;
use decode::{decode_record, pg_err};
use statements::{Counters, Statements, WriterConn, counters};

pub use connect::PgConnect;
pub use import::Imported;
pub use schema::SCHEMA_VERSION;

/// The open PostgreSQL ledger.
pub struct PgLedger {
    connect: PgConnect,
    /// The store's own runtime (its connections run on it); `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    /// The connection reads use (pipelined: concurrent readers share it).
    reads: parking_lot::Mutex<Option<Arc<Client>>>,
    /// The connection lease decisions use (each a short transaction of its own), and the
    /// lock that keeps them one at a time on it.
    lease_conn: parking_lot::Mutex<Option<Arc<Client>>>,
    lease_calls: parking_lot::Mutex<()>,
    /// The writer's connection (transactions need it to themselves), its statements
    /// prepared once.
    writes: parking_lot::Mutex<Option<Arc<WriterConn>>>,
    last_seq: AtomicU64,
    pending: AtomicU64,
    last_settlement: AtomicU64,
    /// Holds (of every daemon) as of this daemon's last group with acceptances or holds,
    /// less those lapsed by its clock then; at the start, every hold row.
    live_holds: AtomicU64,
}

impl std::fmt::Debug for PgLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLedger").field("at", &self.connect.location()).finish()
    }
}

impl Drop for PgLedger {
    fn drop(&mut self) {
        // Dropped from anywhere, an async task included: never block on the runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
impl PgLedger {
    fn over(connect: PgConnect) -> Result<PgLedger, LedgerError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ledger-pg")
            .enable_all()
            .build()
            .map_err(|e| LedgerError::Config(format!("ledger runtime: {e}")))?;
        Ok(PgLedger {
            connect,
            rt: Some(rt),
            reads: parking_lot::Mutex::new(None),
            writes: parking_lot::Mutex::new(None),
            lease_conn: parking_lot::Mutex::new(None),
            lease_calls: parking_lot::Mutex::new(()),
            last_seq: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            last_settlement: AtomicU64::new(0),
            live_holds: AtomicU64::new(0),
        })
    }

    /// Runs `f` on the store's runtime and waits for it, from any thread (async tasks
    /// included: they block as on any storage read).
    fn block<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let rt = self.rt.as_ref().ok_or(LedgerError::WriterStopped)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().map_err(|_| LedgerError::WriterStopped)
    }

    /// The connection in `slot`, connecting (again) if there is none or it closed.
    fn client(&self, slot: &parking_lot::Mutex<Option<Arc<Client>>>) -> Result<Arc<Client>, LedgerError> {
        let mut slot = slot.lock();
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(c));
        }
        let client = Arc::new(self.block(self.connect.clone().connect())??);
        *slot = Some(Arc::clone(&client));
        Ok(client)
    }

    /// The writer's connection, connecting (again, statements prepared) if there is none or
    /// it closed.
    fn writer(&self) -> Result<Arc<WriterConn>, LedgerError> {
        let mut slot = self.writes.lock();
        if let Some(c) = slot.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(Arc::clone(c));
        }
        let connect = self.connect.clone();
        let conn = Arc::new(self.block(async move {
            let client = connect.connect().await?;
            // Each statement planned once, on its index: every statement of a group looks rows
            // up by key, and a plan made while the tables were small (a scan of the whole
            // table) would stay for good as they grow, so scans are ruled out. Planning each
            // execution instead cost ~8 % of the throughput (BENCHMARKS.md).
            client
                .batch_execute("SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off")
                .await
                .map_err(pg_err("prepare"))?;
            let st = Statements::prepare(&client).await.map_err(pg_err("prepare"))?;
            Ok::<_, LedgerError>(WriterConn { client, st })
        })??);
        *slot = Some(Arc::clone(&conn));
        Ok(conn)
    }

    /// Runs a read with the read connection.
    fn read<T: Send + 'static, F>(&self, f: impl FnOnce(Arc<Client>) -> F) -> Result<T, LedgerError>
    where
        F: Future<Output = Result<T, LedgerError>> + Send + 'static,
    {
        let client = self.client(&self.reads)?;
        self.block(f(client))?
    }

    /// Reads the counters kept in memory: last sequence numbers and pending payments.
    fn count(&self) -> Result<(), LedgerError> {
        let (counters, holds) = self.read(|c| async move {
            let holds =
                c.query_one("SELECT count(*) FROM ledger_holds", &[]).await.map_err(pg_err("count holds"))?;
            Ok((counters(&c, false).await?, holds.get::<_, i64>(0)))
        })?;
        self.store_counters(counters);
        self.live_holds.store(u64::try_from(holds).unwrap_or(0), Ordering::SeqCst);
        Ok(())
    }

    fn store_counters(&self, c: Counters) {
        self.last_seq.store(c.seq, Ordering::SeqCst);
        self.last_settlement.store(c.settlement, Ordering::SeqCst);
        self.pending.store(c.pending, Ordering::SeqCst);
    }

    fn records_where(&self, query: &'static str) -> Result<Vec<PaymentRecord>, LedgerError> {
        self.read(move |c| async move {
            let rows = c.query(query, &[]).await.map_err(pg_err("read payments"))?;
            rows.iter().map(|r| decode_record("ledger_payments", r.get(0), r.get(1))).collect()
        })
    }
}

/// Commits when `result` is Ok, rolls back otherwise; the result either way.
async fn finish(client: &Client, result: Result<(), LedgerError>) -> Result<(), LedgerError> {
    match result {
        Ok(()) => client.batch_execute("COMMIT").await.map_err(pg_err("commit")),
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}
