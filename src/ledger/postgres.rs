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

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use alloy::primitives::{Address, U256};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

use super::batch::BatchRecord;
use super::command::{Command, Fence};
use super::error::LedgerError;
use super::group::{Decided, Group, Stage};
use super::holds::{Hold, Holds};
use super::record::{AuthKey, CorruptRecord, PayerKey, PaymentId, PaymentRecord};
use super::{GroupOutcome, LedgerStore};

/// The layout this code reads and writes. Bumped by any change older code cannot read.
pub const SCHEMA_VERSION: i64 = 3;
// 1 → 2: `ledger_holds` (holds were per daemon, in memory).
// 2 → 3: a record's sequence number is its row's (records written since carry none inside);
// `ledger_settlement.change`.

/// How long connecting may take when the URL does not say (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Serialises schema creation and upgrades between daemons starting together.
const SCHEMA_LOCK: i64 = 0x7834_3032_6c65_6467; // "x402ledg"

/// Serialises the lease decisions of a chain (this plus the chain id).
const LEASE_LOCK: i64 = 0x7834_3032_6c00_0000;

/// How many times a group is decided before its failure is the answer (a group lost a
/// race only to a group that committed, so the next attempt sees what it took).
const GROUP_ATTEMPTS: u32 = 5;

/// Where a group numbers its changes and settlement log entries while deciding, before the
/// counters are locked: the server adds the counter's value less this (far above any real
/// number, so a record the group wrote is told from one it read).
const PROVISIONAL: u64 = 1 << 62;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ledger_payments (
    id bytea PRIMARY KEY,
    key bytea NOT NULL,
    seq bigint NOT NULL,
    pending boolean NOT NULL,
    watched boolean NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_payments_pending ON ledger_payments (id) WHERE pending;
CREATE INDEX IF NOT EXISTS ledger_payments_watched ON ledger_payments (id) WHERE watched;
CREATE TABLE IF NOT EXISTS ledger_feed (seq bigint PRIMARY KEY, record bytea NOT NULL, written_by smallint NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_idem (idem text PRIMARY KEY, key bytea NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_exposure (payer bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_settlement (seq bigint PRIMARY KEY, record bytea NOT NULL, change bigint);
CREATE TABLE IF NOT EXISTS ledger_batch (
    chain_id bigint NOT NULL,
    counter bigint NOT NULL,
    record bytea NOT NULL,
    open boolean NOT NULL,
    PRIMARY KEY (chain_id, counter)
);
CREATE INDEX IF NOT EXISTS ledger_batch_open ON ledger_batch (chain_id, counter) WHERE open;
CREATE TABLE IF NOT EXISTS ledger_members (owner text PRIMARY KEY, expires_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_leases (
    chain_id bigint NOT NULL,
    settler bytea NOT NULL,
    owner text NOT NULL,
    epoch bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (chain_id, settler)
);
CREATE TABLE IF NOT EXISTS ledger_holds (
    id bytea PRIMARY KEY,
    payer bytea NOT NULL,
    key bytea NOT NULL,
    to_address bytea NOT NULL,
    value bytea NOT NULL,
    valid_after bytea NOT NULL,
    valid_before bytea NOT NULL,
    idem text NOT NULL,
    expires_at_ms bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_holds_payer ON ledger_holds (payer);
CREATE INDEX IF NOT EXISTS ledger_holds_expiry ON ledger_holds (expires_at_ms);
INSERT INTO ledger_meta (name, value) VALUES ('seq', 0), ('settlement', 0) ON CONFLICT DO NOTHING;
INSERT INTO ledger_meta (name, value)
    SELECT 'pending', count(*) FROM ledger_payments WHERE pending ON CONFLICT DO NOTHING;
";

/// From schema 1 or 2 to 3.
const UPGRADE_TO_3: &str = "
ALTER TABLE ledger_settlement ADD COLUMN IF NOT EXISTS change bigint;
ALTER TABLE ledger_feed ADD COLUMN IF NOT EXISTS written_by smallint NOT NULL DEFAULT 1;
ALTER TABLE ledger_feed ALTER COLUMN written_by DROP DEFAULT;
";

/// Where the PostgreSQL ledger is and how to log in.
#[derive(Clone)]
pub struct PgConnect {
    config: tokio_postgres::Config,
    /// TLS (rustls) with these roots; plaintext when `None`.
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

impl std::fmt::Debug for PgConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.location())
    }
}

impl PgConnect {
    /// From a connection string (`postgresql://user@host:port/db?…` or `host=… user=…`,
    /// several hosts allowed); `password`, when given, replaces any in the string.
    pub fn new(url: &str, password: Option<&str>) -> Result<PgConnect, LedgerError> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| LedgerError::Config(format!("ledger.url: {e}")))?;
        if let Some(p) = password {
            config.password(p);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        Ok(PgConnect { config, tls: None })
    }

    /// Connects over TLS only, verifying the server's certificate (and its name: the host
    /// connected to) against the CA certificates in the PEM file `ca_file`.
    pub fn with_tls(mut self, ca_file: &std::path::Path) -> Result<PgConnect, LedgerError> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::CertificateDer;
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        let shown = ca_file.display();
        let pem = std::fs::read(ca_file)
            .map_err(|e| LedgerError::Config(format!("ledger.ca_file {shown}: {e}")))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert
                .map_err(|_| LedgerError::Config(format!("ledger.ca_file {shown}: not PEM certificates")))?;
            roots.add(cert).map_err(|e| LedgerError::Config(format!("ledger.ca_file {shown}: {e}")))?;
        }
        if roots.is_empty() {
            return Err(LedgerError::Config(format!("ledger.ca_file {shown}: no certificate in it")));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| LedgerError::Config(format!("ledger TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Never fall back to plaintext once a CA is given.
        self.config.ssl_mode(tokio_postgres::config::SslMode::Require);
        self.tls = Some(Arc::new(tls));
        Ok(self)
    }

    /// Hosts, ports, database and user: never the password.
    pub fn location(&self) -> String {
        let c = &self.config;
        let hosts: Vec<String> = c
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                };
                match c.get_ports().get(i).or(c.get_ports().first()) {
                    Some(port) => format!("{host}:{port}"),
                    None => host,
                }
            })
            .collect();
        format!(
            "postgresql://{}@{}/{}",
            c.get_user().unwrap_or(""),
            hosts.join(","),
            c.get_dbname().unwrap_or("")
        )
    }

    async fn connect(self) -> Result<Client, LedgerError> {
        let closed = |e: tokio_postgres::Error| tracing::warn!("ledger database connection closed: {e}");
        match self.tls {
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(pg_err("connect"))?;
                tokio::spawn(async move { connection.await.unwrap_or_else(closed) });
                Ok(client)
            }
            Some(tls) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
                let (client, connection) = self.config.connect(tls).await.map_err(pg_err("connect"))?;
                tokio::spawn(async move { connection.await.unwrap_or_else(closed) });
                Ok(client)
            }
        }
    }
}

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
    /// Connects, creates or checks the schema (refusing one written by a newer version),
    /// and reads the counters.
    pub fn open(connect: PgConnect) -> Result<PgLedger, LedgerError> {
        let ledger = PgLedger::over(connect)?;
        let client = ledger.client(&ledger.reads)?;
        let location = ledger.connect.location();
        ledger.block(async move {
            client.batch_execute("BEGIN").await.map_err(pg_err("begin"))?;
            let created = async {
                client
                    .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
                    .await
                    .map_err(pg_err("lock schema"))?;
                client
                    .batch_execute(
                        "CREATE TABLE IF NOT EXISTS ledger_meta (name text PRIMARY KEY, value bigint NOT NULL)",
                    )
                    .await
                    .map_err(pg_err("create schema"))?;
                let found = stored_schema(&client).await?;
                if let Some(found) = found.filter(|f| *f > SCHEMA_VERSION) {
                    return Err(LedgerError::NewerSchema {
                        path: location,
                        found: found as u32,
                        supported: SCHEMA_VERSION as u32,
                    });
                }
                if found == Some(SCHEMA_VERSION) {
                    // Current: nothing to create (creating would lock tables every daemon
                    // of a running fleet writes to).
                    return Ok(());
                }
                client.batch_execute(SCHEMA).await.map_err(pg_err("create schema"))?;
                if found.is_some_and(|f| f < 3) {
                    // Only when upgrading: it locks the tables out for every daemon meanwhile.
                    // `written_by` has no default: a daemon of an older version still running
                    // (it checked the schema when it started) cannot write a change any more,
                    // so it cannot decide beside the payer locks it does not take.
                    client
                        .batch_execute(UPGRADE_TO_3)
                        .await
                        .map_err(pg_err("upgrade schema"))?;
                }
                client
                    .execute(
                        "INSERT INTO ledger_meta (name, value) VALUES ('schema_version', $1) \
                         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                        &[&SCHEMA_VERSION],
                    )
                    .await
                    .map_err(pg_err("create schema"))?;
                Ok(())
            }
            .await;
            finish(&client, created).await
        })??;
        ledger.count()?;
        Ok(ledger)
    }

    /// Opens an existing ledger for reading only (finance exports, reconciliation beside
    /// running daemons). A ledger of another schema, or none, is refused.
    pub fn open_read_only(connect: PgConnect) -> Result<PgLedger, LedgerError> {
        let ledger = PgLedger::over(connect)?;
        let client = ledger.client(&ledger.reads)?;
        let location = ledger.connect.location();
        let found = ledger.block(async move {
            let exists: bool = client
                .query_one("SELECT to_regclass('ledger_meta') IS NOT NULL", &[])
                .await
                .map_err(pg_err("read schema"))?
                .get(0);
            if exists { stored_schema(&client).await } else { Ok(None) }
        })??;
        match found {
            Some(SCHEMA_VERSION) => {}
            Some(found) if found > SCHEMA_VERSION => {
                return Err(LedgerError::NewerSchema {
                    path: location,
                    found: found as u32,
                    supported: SCHEMA_VERSION as u32,
                });
            }
            found => {
                return Err(LedgerError::OlderSchema { path: location, found: found.unwrap_or(0) as u32 });
            }
        }
        ledger.count()?;
        Ok(ledger)
    }

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

    /// One group ([`Self::try_group`]), decided again from the start when it lost a race
    /// its locks do not cover (an idempotency key another payer's group took meanwhile):
    /// nothing of a failed attempt was committed or answered.
    fn group(&self, commands: &[Command]) -> Result<GroupOutcome, LedgerError> {
        let mut attempts = 1;
        loop {
            match self.try_group(commands) {
                Err(e) if e.lost_race() && attempts < GROUP_ATTEMPTS => {
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
    fn try_group(&self, commands: &[Command]) -> Result<GroupOutcome, LedgerError> {
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

/// One daemon's turn at the leases of a chain, in a transaction: it renews its membership
/// (a member is alive while it renews within its lease time), then keeps or takes accounts
/// up to its share (the accounts divided by the live members, rounded up) and gives up the
/// rest, so a fleet spreads its settler accounts and a newcomer gets some. Taking an
/// account starts a new epoch. Times are the database's.
async fn take_leases(
    c: &Client,
    owner: &str,
    chain_id: i64,
    accounts: &[Vec<u8>],
    ttl_ms: f64,
) -> Result<Vec<(Address, u64)>, LedgerError> {
    let err = pg_err("take leases");
    c.execute("SELECT pg_advisory_xact_lock($1)", &[&(LEASE_LOCK + chain_id)]).await.map_err(err)?;
    let (_, members, _) = futures::try_join!(
        async {
            c.execute(
                "INSERT INTO ledger_members (owner, expires_at) VALUES ($1, now() + $2 * interval '1 millisecond') \
                 ON CONFLICT (owner) DO UPDATE SET expires_at = EXCLUDED.expires_at",
                &[&owner, &ttl_ms],
            )
            .await
        },
        c.query_one("SELECT count(*) FROM ledger_members WHERE expires_at > now()", &[]),
        async {
            c.execute(
                "INSERT INTO ledger_leases (chain_id, settler, owner, epoch, expires_at) \
                 SELECT $1, s, '', 0, '-infinity' FROM unnest($2::bytea[]) s ON CONFLICT DO NOTHING",
                &[&chain_id, &accounts],
            )
            .await
        },
    )
    .map_err(pg_err("take leases"))?;
    let rows = c
        .query(
            "SELECT settler, owner, epoch, expires_at > now() FROM ledger_leases \
             WHERE chain_id = $1 AND settler = ANY($2::bytea[]) ORDER BY settler FOR UPDATE",
            &[&chain_id, &accounts],
        )
        .await
        .map_err(pg_err("take leases"))?;
    let members = usize::try_from(members.get::<_, i64>(0)).unwrap_or(1).max(1);
    let share = rows.len().div_ceil(members);
    let (mut keep, mut release, mut take) = (Vec::new(), Vec::new(), Vec::new());
    for r in &rows {
        let (settler, holder, epoch, live): (Vec<u8>, &str, i64, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        if live && holder == owner {
            if keep.len() < share { keep.push((settler, epoch)) } else { release.push(settler) }
        } else if !live {
            take.push(settler);
        }
    }
    take.truncate(share.saturating_sub(keep.len()));
    let kept: Vec<Vec<u8>> = keep.iter().map(|(s, _)| s.clone()).collect();
    let (_, taken, _) = futures::try_join!(
        async {
            c.execute(
                "UPDATE ledger_leases SET expires_at = now() + $3 * interval '1 millisecond' \
                 WHERE chain_id = $1 AND settler = ANY($2::bytea[])",
                &[&chain_id, &kept, &ttl_ms],
            )
            .await
        },
        async {
            c.query(
                "UPDATE ledger_leases SET owner = $3, epoch = epoch + 1, \
                 expires_at = now() + $4 * interval '1 millisecond' \
                 WHERE chain_id = $1 AND settler = ANY($2::bytea[]) RETURNING settler, epoch",
                &[&chain_id, &take, &owner, &ttl_ms],
            )
            .await
        },
        async {
            c.execute(
                "UPDATE ledger_leases SET expires_at = now() - interval '1 second' \
                 WHERE chain_id = $1 AND settler = ANY($2::bytea[])",
                &[&chain_id, &release],
            )
            .await
        },
    )
    .map_err(pg_err("take leases"))?;
    let mut held = Vec::new();
    for (settler, epoch) in keep {
        held.push((decode_address("ledger_leases", "settler", &settler)?, epoch as u64));
    }
    for r in taken {
        held.push((decode_address("ledger_leases", "settler", r.get(0))?, r.get::<_, i64>(1) as u64));
    }
    held.sort();
    Ok(held)
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

/// The writer's connection and its prepared statements.
struct WriterConn {
    client: Client,
    st: Statements,
}

const LOCK_COUNTERS: &str = "SELECT name, value FROM ledger_meta WHERE name IN ('seq', 'settlement', 'pending') ORDER BY name FOR UPDATE";
const READ_COUNTERS: &str =
    "SELECT name, value FROM ledger_meta WHERE name IN ('seq', 'settlement', 'pending') ORDER BY name";

/// The statements of a group, prepared once per connection (a statement sent as text is
/// parsed and planned each time, in a round trip of its own).
struct Statements {
    lock_counters: Statement,
    lock_payers: Statement,
    read_payments: Statement,
    read_exposure: Statement,
    read_idem: Statement,
    read_batches: Statement,
    read_leases: Statement,
    read_holds: Statement,
    payments: Statement,
    feed: Statement,
    idem: Statement,
    exposure: Statement,
    cleared: Statement,
    settlement: Statement,
    batches: Statement,
    counters_set: Statement,
    counters_add: Statement,
    holds_placed: Statement,
    holds_released: Statement,
    holds_lapsed: Statement,
    holds_count: Statement,
}

impl Statements {
    async fn prepare(c: &Client) -> Result<Statements, tokio_postgres::Error> {
        let (lock_counters, read_payments, read_exposure, read_idem, payments, feed) = futures::try_join!(
            c.prepare(LOCK_COUNTERS),
            c.prepare(
                "SELECT f.record, p.pending, p.watched, f.seq FROM ledger_payments p JOIN ledger_feed f ON f.seq = p.seq \
                 WHERE p.id = ANY($1::bytea[])"
            ),
            c.prepare("SELECT payer, value FROM ledger_exposure WHERE payer = ANY($1::bytea[])"),
            c.prepare("SELECT idem, key FROM ledger_idem WHERE idem = ANY($1::text[])"),
            // Sequence numbers: the row's offset plus the counter as locked (the counters
            // are updated by the group's last statement).
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
        )?;
        let (read_holds, holds_placed, holds_released, holds_lapsed, holds_count) = futures::try_join!(
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
        )?;
        let (read_batches, read_leases) = futures::try_join!(
            c.prepare(
                "SELECT record FROM ledger_batch WHERE (chain_id, counter) IN \
                 (SELECT * FROM unnest($1::bigint[], $2::bigint[]))"
            ),
            c.prepare(
                "SELECT chain_id, settler, owner, epoch FROM ledger_leases WHERE (chain_id, settler) IN \
                 (SELECT * FROM unnest($1::bigint[], $2::bytea[])) FOR SHARE"
            ),
        )?;
        let (idem, exposure, cleared, settlement, batches, counters_set) = futures::try_join!(
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
            c.prepare(
                "UPDATE ledger_meta SET value = CASE name WHEN 'seq' THEN $1::bigint \
                 WHEN 'settlement' THEN $2::bigint ELSE $3::bigint END \
                 WHERE name IN ('seq', 'settlement', 'pending')"
            ),
        )?;
        let (lock_payers, counters_add) = futures::try_join!(
            c.prepare("SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k"),
            c.prepare(
                "UPDATE ledger_meta SET value = value + CASE name WHEN 'seq' THEN $1::bigint \
                 WHEN 'settlement' THEN $2::bigint ELSE $3::bigint END \
                 WHERE name IN ('seq', 'settlement', 'pending')"
            ),
        )?;
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

async fn stored_schema(client: &Client) -> Result<Option<i64>, LedgerError> {
    let row = client
        .query_opt("SELECT value FROM ledger_meta WHERE name = 'schema_version'", &[])
        .await
        .map_err(pg_err("read schema"))?;
    Ok(row.map(|r| r.get(0)))
}

/// The counters every group updates: the newest sequence number and settlement log number,
/// and how many payments are pending.
#[derive(Debug, Clone, Copy)]
struct Counters {
    seq: u64,
    settlement: u64,
    pending: u64,
}

/// The counters; `lock`: for this transaction (groups of every daemon take turns on it).
async fn counters(client: &Client, lock: bool) -> Result<Counters, LedgerError> {
    let query = if lock { LOCK_COUNTERS } else { READ_COUNTERS };
    counters_from(&client.query(query, &[]).await.map_err(pg_err("read counters"))?)
}

fn counters_from(rows: &[tokio_postgres::Row]) -> Result<Counters, LedgerError> {
    let get = |name: &str| {
        rows.iter()
            .find(|r| r.get::<_, &str>(0) == name)
            .map(|r| r.get::<_, i64>(1) as u64)
            .ok_or(LedgerError::Corrupt { cf: "ledger_meta", source: CorruptRecord { field: "counter" } })
    };
    Ok(Counters { seq: get("seq")?, settlement: get("settlement")?, pending: get("pending")? })
}

/// The keys, payers and idempotency keys a group's commands name.
struct Named {
    /// Payment ids (a function of the key: the table's primary key).
    ids: Vec<Vec<u8>>,
    payers: Vec<Vec<u8>>,
    idem: Vec<String>,
    /// Batches written: chain ids and counters.
    batches: (Vec<i64>, Vec<i64>),
    /// Leases fencing the writes: chain ids and settlers.
    leases: (Vec<i64>, Vec<Vec<u8>>),
    /// Payers of acceptances and holds (whose holds the group reads), and the latest
    /// `now_ms` of those commands (holds lapsed by then are deleted).
    hold_payers: Vec<Vec<u8>>,
    now_ms: Option<u64>,
    /// Whether any command is a hold (a verification).
    verifies: bool,
    /// The payers' advisory lock keys, ascending (every group takes its locks in this
    /// order, so two groups never wait for each other in a circle).
    locks: Vec<i64>,
}

/// A payer's advisory lock key: the first 8 bytes of the keccak256 of its exposure key (the
/// same in every daemon and version; two payers sharing one only wait for each other).
fn payer_lock(payer: &PayerKey) -> i64 {
    let h = alloy::primitives::keccak256(payer.as_bytes());
    i64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
}

impl Named {
    fn of(commands: &[Command]) -> Named {
        let mut keys = std::collections::BTreeSet::new();
        let mut idem = std::collections::BTreeSet::new();
        let mut batches = std::collections::BTreeSet::new();
        let mut leases = std::collections::BTreeSet::new();
        let mut hold_payers = std::collections::BTreeSet::new();
        let mut now_ms = None;
        let verifies = commands.iter().any(|c| matches!(c, Command::Hold(..)));
        for c in commands {
            let accept = match c {
                Command::Accept(req, _) => req,
                Command::Hold(req, _) => &req.accept,
                Command::Transition(req, _) => {
                    keys.insert(req.key);
                    continue;
                }
                Command::Apply(req, _) => {
                    keys.extend(req.transitions.iter().map(|t| t.key));
                    if let Some(b) = &req.batch {
                        batches.insert((clamp(b.chain_id), clamp(b.counter)));
                    }
                    if let Some(f) = &req.fence {
                        leases.insert((clamp(f.chain_id), f.settler.to_vec()));
                    }
                    continue;
                }
            };
            // An acceptance or a hold: its payer's holds are read, its clock lapses them.
            let key = AuthKey::of(&accept.signed);
            keys.insert(key);
            hold_payers.insert(key.payer());
            idem.insert(accept.submission.idempotency_key.clone());
            now_ms = now_ms.max(Some(accept.now_ms));
        }
        idem.remove("");
        let payers: std::collections::BTreeSet<PayerKey> = keys.iter().map(AuthKey::payer).collect();
        let locks: std::collections::BTreeSet<i64> = payers.iter().map(payer_lock).collect();
        Named {
            ids: keys.iter().map(|k| k.payment_id().0.to_vec()).collect(),
            payers: payers.iter().map(|p| p.as_bytes().to_vec()).collect(),
            idem: idem.into_iter().collect(),
            batches: batches.into_iter().unzip(),
            leases: leases.into_iter().unzip(),
            hold_payers: hold_payers.iter().map(|p| p.as_bytes().to_vec()).collect(),
            now_ms,
            verifies,
            locks: locks.into_iter().collect(),
        }
    }
}

/// The committed state a group's commands name, read under the locks of their payers (and,
/// when it writes a batch, the counters').
struct Prefetched {
    /// Records and their (pending, watched) flags.
    records: HashMap<AuthKey, (PaymentRecord, bool, bool)>,
    exposures: HashMap<PayerKey, U256>,
    idem: HashMap<String, AuthKey>,
    batches: HashMap<(u64, u64), BatchRecord>,
    /// Owner and epoch of each lease named, locked (`FOR SHARE`) until the commit, so no
    /// other daemon takes the account over between the check and the write.
    leases: HashMap<(u64, Address), (String, u64)>,
    /// The holds of the payers of the acceptances and holds, lapsed ones included.
    holds: Holds,
}

async fn prefetch(conn: &WriterConn, named: Named) -> Result<Prefetched, LedgerError> {
    let (c, st) = (&conn.client, &conn.st);
    // Pipelined: the reads run after the locks, in this order, in one round trip.
    let (_, _, _, records, exposures, idem, batches, leases, holds) = futures::try_join!(
        async { c.batch_execute("BEGIN").await.map_err(pg_err("begin")) },
        async {
            if named.locks.is_empty() {
                return Ok(0);
            }
            c.execute(&st.lock_payers, &[&named.locks]).await.map_err(pg_err("lock payers"))
        },
        async {
            // Writing a batch: one at a time (two daemons may pick the same next number).
            if named.batches.0.is_empty() {
                return Ok(Vec::new());
            }
            c.query(&st.lock_counters, &[]).await.map_err(pg_err("lock counters"))
        },
        async { c.query(&st.read_payments, &[&named.ids]).await.map_err(pg_err("read payments")) },
        async { c.query(&st.read_exposure, &[&named.payers]).await.map_err(pg_err("read exposure")) },
        async { c.query(&st.read_idem, &[&named.idem]).await.map_err(pg_err("read idempotency keys")) },
        async {
            if named.batches.0.is_empty() {
                return Ok(Vec::new());
            }
            c.query(&st.read_batches, &[&named.batches.0, &named.batches.1])
                .await
                .map_err(pg_err("read batches"))
        },
        async {
            if named.leases.0.is_empty() {
                return Ok(Vec::new());
            }
            c.query(&st.read_leases, &[&named.leases.0, &named.leases.1]).await.map_err(pg_err("read leases"))
        },
        async {
            if named.hold_payers.is_empty() {
                return Ok(Vec::new());
            }
            c.query(&st.read_holds, &[&named.hold_payers]).await.map_err(pg_err("read holds"))
        },
    )?;
    let mut out = Prefetched {
        records: HashMap::new(),
        exposures: HashMap::new(),
        idem: HashMap::new(),
        batches: HashMap::new(),
        leases: HashMap::new(),
        holds: Holds::default(),
    };
    for r in holds {
        let (key, hold) = decode_hold(&r)?;
        out.holds.insert(key, hold);
    }
    for r in batches {
        let batch = decode_batch(r.get(0))?;
        out.batches.insert((batch.chain_id, batch.counter), batch);
    }
    for r in leases {
        let settler = decode_address("ledger_leases", "settler", r.get(1))?;
        out.leases.insert((r.get::<_, i64>(0) as u64, settler), (r.get(2), r.get::<_, i64>(3) as u64));
    }
    for r in records {
        let record = decode_record("ledger_payments", r.get(0), r.get(3))?;
        out.records.insert(record.key(), (record, r.get(1), r.get(2)));
    }
    for r in exposures {
        out.exposures.insert(decode_payer(r.get(0))?, decode_u256("ledger_exposure", "exposure", r.get(1))?);
    }
    for r in idem {
        let key = AuthKey::from_bytes(r.get(1))
            .ok_or(LedgerError::Corrupt { cf: "ledger_idem", source: CorruptRecord { field: "auth key" } })?;
        out.idem.insert(r.get(0), key);
    }
    Ok(out)
}

/// A group's reads (served from what was prefetched: everything its commands can ask for)
/// and its staged writes.
struct PgStage {
    read: Prefetched,
    /// Change feed entries, in order.
    feed: Vec<(i64, Vec<u8>)>,
    /// Final (pending, watched) of each key whose flags the group set.
    flags: HashMap<AuthKey, (bool, bool)>,
    idem: Vec<(String, Vec<u8>)>,
    exposures: HashMap<PayerKey, U256>,
    /// Settlement log entries: offset, record, its change's offset.
    settlement: Vec<(i64, Vec<u8>, i64)>,
    batches: Vec<BatchRecord>,
}

/// A provisional number's place among the group's ([`PROVISIONAL`]): 1 for the first.
fn offset(provisional: u64) -> i64 {
    clamp(provisional.saturating_sub(PROVISIONAL))
}

/// A record as stored in the feed and the log: without its sequence number (the row's).
fn encode_unnumbered(record: &PaymentRecord) -> Vec<u8> {
    record.encode_numbered(0)
}

impl PgStage {
    fn new(read: Prefetched) -> PgStage {
        PgStage {
            read,
            feed: Vec::new(),
            flags: HashMap::new(),
            idem: Vec::new(),
            exposures: HashMap::new(),
            settlement: Vec::new(),
            batches: Vec::new(),
        }
    }

    fn flags(&mut self, key: &AuthKey) -> &mut (bool, bool) {
        let committed = self.read.records.get(key).map(|(_, p, w)| (*p, *w)).unwrap_or_default();
        self.flags.entry(*key).or_insert(committed)
    }

    /// The statements that write what the group decided; `records`: every record it wrote;
    /// `counters`: what it adds to them.
    fn into_writes(self, records: &[PaymentRecord], counters: [i64; 3]) -> Writes {
        let mut payments = PaymentRows::default();
        for r in records {
            let key = r.key();
            let (pending, watched) = match self.flags.get(&key) {
                Some(f) => *f,
                None => self.read.records.get(&key).map(|(_, p, w)| (*p, *w)).unwrap_or_default(),
            };
            payments.id.push(key.payment_id().0.to_vec());
            payments.key.push(key.as_bytes().to_vec());
            payments.seq.push(offset(r.seq));
            payments.pending.push(pending);
            payments.watched.push(watched);
        }
        let (zero, nonzero): (Vec<_>, Vec<_>) = self.exposures.into_iter().partition(|(_, v)| v.is_zero());
        Writes {
            payments,
            feed: self.feed.into_iter().unzip(),
            idem: self.idem.into_iter().unzip(),
            exposure: nonzero
                .iter()
                .map(|(p, v)| (p.as_bytes().to_vec(), v.to_be_bytes::<32>().to_vec()))
                .unzip(),
            exposure_cleared: zero.iter().map(|(p, _)| p.as_bytes().to_vec()).collect(),
            settlement: unzip3(self.settlement),
            batches: latest_batches(self.batches),
            counters: Some(CounterWrite::Add(counters)),
            holds: HoldWrites::default(),
        }
    }
}

fn unzip3<A, B, C>(rows: Vec<(A, B, C)>) -> (Vec<A>, Vec<B>, Vec<C>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for (a, b, c) in rows {
        out.0.push(a);
        out.1.push(b);
        out.2.push(c);
    }
    out
}

impl Stage for PgStage {
    fn get(&self, key: &AuthKey) -> Result<Option<PaymentRecord>, LedgerError> {
        Ok(self.read.records.get(key).map(|(r, _, _)| r.clone()))
    }

    fn exposure(&self, payer: &PayerKey) -> Result<U256, LedgerError> {
        Ok(self.read.exposures.get(payer).copied().unwrap_or_default())
    }

    fn batch(&self, chain_id: u64, counter: u64) -> Result<Option<BatchRecord>, LedgerError> {
        Ok(self.read.batches.get(&(chain_id, counter)).cloned())
    }

    fn holds_lease(&self, fence: &Fence) -> Result<bool, LedgerError> {
        let held = self.read.leases.get(&(fence.chain_id, fence.settler));
        Ok(held.is_some_and(|(owner, epoch)| *owner == fence.owner && *epoch == fence.epoch))
    }

    fn idem(&self, idem: &str) -> Result<Option<AuthKey>, LedgerError> {
        Ok(self.read.idem.get(idem).copied())
    }

    fn put_record(&mut self, record: &PaymentRecord) {
        self.feed.push((offset(record.seq), encode_unnumbered(record)));
    }

    fn put_id(&mut self, _key: &AuthKey) {
        // The id is a column of the payment's row.
    }

    fn put_idem(&mut self, idem: &str, key: &AuthKey) {
        self.idem.push((idem.to_owned(), key.as_bytes().to_vec()));
    }

    fn put_exposure(&mut self, payer: &PayerKey, value: U256) {
        self.exposures.insert(*payer, value);
    }

    fn set_pending(&mut self, key: &AuthKey, pending: bool) {
        self.flags(key).0 = pending;
    }

    fn set_watched(&mut self, key: &AuthKey, watched: bool) {
        self.flags(key).1 = watched;
    }

    fn put_settlement(&mut self, seq: u64, record: &PaymentRecord) {
        // The entry's record is one this group wrote (a log entry follows its change).
        self.settlement.push((offset(seq), encode_unnumbered(record), offset(record.seq)));
    }

    fn put_batch(&mut self, batch: &BatchRecord) {
        self.batches.push(batch.clone());
    }
}

#[derive(Default)]
struct PaymentRows {
    id: Vec<Vec<u8>>,
    key: Vec<Vec<u8>>,
    /// The sequence number of the record's latest change (its row in the feed).
    seq: Vec<i64>,
    pending: Vec<bool>,
    watched: Vec<bool>,
}

/// A group's writes as array statements.
struct Writes {
    payments: PaymentRows,
    feed: (Vec<i64>, Vec<Vec<u8>>),
    idem: (Vec<String>, Vec<Vec<u8>>),
    exposure: (Vec<Vec<u8>>, Vec<Vec<u8>>),
    exposure_cleared: Vec<Vec<u8>>,
    /// Offsets (to the settlement counter), records, their changes' offsets (to `seq`).
    settlement: (Vec<i64>, Vec<Vec<u8>>, Vec<i64>),
    /// Chain ids, counters, records, open.
    batches: (Vec<i64>, Vec<i64>, Vec<Vec<u8>>, Vec<bool>),
    /// The counters' change, the writes' last statement (the others number their rows from
    /// the counters as they were).
    counters: Option<CounterWrite>,
    holds: HoldWrites,
}

/// A change of the counters: seq, settlement, pending.
#[derive(Clone, Copy)]
enum CounterWrite {
    /// Added (a group).
    Add([i64; 3]),
    /// Set (an import into an empty ledger, whose counters were 0).
    Set([i64; 3]),
}

/// What a group changed of the holds.
#[derive(Default)]
struct HoldWrites {
    /// Holds placed or replaced: id, payer, key, to, value, valid after, valid before,
    /// idempotency key, expiry.
    placed: HoldRows,
    /// Ids of holds claimed or lapsed.
    released: Vec<Vec<u8>>,
    /// Delete every hold lapsed by then and count the rest (a group with acceptances or
    /// holds: its clock).
    lapse_at: Option<i64>,
}

#[derive(Default)]
struct HoldRows {
    id: Vec<Vec<u8>>,
    payer: Vec<Vec<u8>>,
    key: Vec<Vec<u8>>,
    to: Vec<Vec<u8>>,
    value: Vec<Vec<u8>>,
    valid_after: Vec<Vec<u8>>,
    valid_before: Vec<Vec<u8>>,
    idem: Vec<String>,
    expires_at_ms: Vec<i64>,
}

impl HoldWrites {
    /// The changes from `committed` to `decided`.
    fn of(decided: &Holds, committed: &Holds, now_ms: Option<u64>) -> HoldWrites {
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

    fn is_empty(&self) -> bool {
        self.placed.id.is_empty() && self.released.is_empty() && self.lapse_at.is_none()
    }

    /// Sends the statements (pipelined); the live holds once lapsed ones are gone, if
    /// asked to lapse them.
    async fn run(&self, conn: &WriterConn) -> Result<Option<u64>, tokio_postgres::Error> {
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
    fn is_empty(&self) -> bool {
        self.payments.key.is_empty() && self.batches.0.is_empty() && self.holds.is_empty()
    }

    /// Locks the counters, sends every statement and the `COMMIT` (pipelined on the one
    /// connection) and waits for them all: `Ok` once the commit returned, with the counters
    /// as locked (the group's numbers follow them) and the live holds if counted.
    async fn run(&self, conn: &WriterConn) -> Result<(Counters, Option<u64>), LedgerError> {
        let (c, st) = (&conn.client, &conn.st);
        let lock =
            async { counters_from(&c.query(&st.lock_counters, &[]).await.map_err(pg_err("lock counters"))?) };
        let commit = async { c.batch_execute("COMMIT").await.map_err(pg_err("commit")) };
        let holds = async { self.holds.run(conn).await.map_err(pg_err("write holds")) };
        let (base, _, live, _) = futures::try_join!(lock, self.statements(conn), holds, commit)?;
        Ok((base, live))
    }

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

    /// Sends every statement (pipelined) and waits for them all, without committing.
    async fn statements(&self, conn: &WriterConn) -> Result<(), LedgerError> {
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

impl PgLedger {
    /// Copies another ledger (a RocksDB one, with its daemon stopped) into this one, which
    /// must be empty: every record, the change feed and the settlement log under their own
    /// sequence numbers, the batches of `chain_ids` (and of every chain a record names),
    /// the idempotency keys and the exposure, in one transaction. Then reads the copy back
    /// and compares it with the source.
    pub fn import(&self, from: &dyn LedgerStore, chain_ids: &[u64]) -> Result<Imported, LedgerError> {
        let records = from.records()?;
        let pending: std::collections::HashSet<AuthKey> =
            from.pending_records()?.iter().map(|r| r.key()).collect();
        let watched: std::collections::HashSet<AuthKey> = from.watched()?.iter().map(|r| r.key()).collect();
        let mut chains: std::collections::BTreeSet<u64> = chain_ids.iter().copied().collect();
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
        let mut writes = Writes {
            payments: PaymentRows::default(),
            feed: feed.into_iter().unzip(),
            idem: records
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
            // Numbered from counters of 0 (the ledger is empty): offsets are the numbers.
            settlement: unzip3(log),
            batches: latest_batches(batches.clone()),
            counters: Some(CounterWrite::Set(
                [counters.seq, counters.settlement, counters.pending].map(clamp),
            )),
            holds: HoldWrites::default(),
        };
        for r in &records {
            let key = r.key();
            writes.payments.id.push(key.payment_id().0.to_vec());
            writes.payments.key.push(key.as_bytes().to_vec());
            writes.payments.seq.push(clamp(r.seq));
            writes.payments.pending.push(pending.contains(&key));
            writes.payments.watched.push(watched.contains(&key));
        }
        let conn = self.writer()?;
        self.block(async move {
            let c = &conn.client;
            c.batch_execute("BEGIN").await.map_err(pg_err("begin"))?;
            let copied = async {
                let before = counters_from(&c.query(&conn.st.lock_counters, &[]).await.map_err(pg_err("lock counters"))?)?;
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
                    part.statements(&conn).await?;
                }
                Ok(())
            }
            .await;
            finish(c, copied).await
        })??;
        self.count()?;
        // Read back and compare.
        let copied = self.records()?;
        let check = |what: &str, same: bool| {
            if same {
                Ok(())
            } else {
                Err(LedgerError::Config(format!("the imported {what} differ from the source's")))
            }
        };
        check("records", copied == records)?;
        check("change feed length", self.last_seq() == from.last_seq())?;
        check("settlement log length", self.last_settlement() == from.last_settlement())?;
        check("pending payments", self.pending() == counters.pending)?;
        let mut copied_batches = Vec::new();
        for chain in &chains {
            copied_batches.extend(self.batches(*chain)?);
        }
        check("batches", copied_batches == batches)?;
        check(
            "exposure",
            self.exposures()?
                == from.exposures()?.into_iter().filter(|(_, v)| !v.is_zero()).collect::<Vec<_>>(),
        )?;
        Ok(Imported {
            records: records.len(),
            changes: counters.seq,
            settlement_entries: counters.settlement,
            batches: batches.len(),
        })
    }
}

impl LedgerStore for PgLedger {
    fn location(&self) -> String {
        self.connect.location()
    }

    fn shared(&self) -> bool {
        true
    }

    fn acquire_leases(
        &self,
        owner: &str,
        chain_id: u64,
        accounts: &[Address],
        ttl_ms: u64,
    ) -> Result<Vec<(Address, u64)>, LedgerError> {
        let (owner, ttl_ms) = (owner.to_owned(), ttl_ms as f64);
        let (chain_id, accounts): (i64, Vec<Vec<u8>>) =
            (clamp(chain_id), accounts.iter().map(|s| s.to_vec()).collect());
        let _one_at_a_time = self.lease_calls.lock();
        let client = self.client(&self.lease_conn)?;
        self.block(async move {
            client.batch_execute("BEGIN").await.map_err(pg_err("begin"))?;
            let held = take_leases(&client, &owner, chain_id, &accounts, ttl_ms).await;
            finish(&client, held.as_ref().map(|_| ()).map_err(Clone::clone)).await?;
            held
        })?
    }

    fn release_leases(&self, owner: &str) -> Result<(), LedgerError> {
        let owner = owner.to_owned();
        self.read(move |c| async move {
            let params: [&(dyn ToSql + Sync); 1] = [&owner];
            let released = c.execute(
                "UPDATE ledger_leases SET expires_at = now() - interval '1 second' WHERE owner = $1",
                &params,
            );
            let gone = c.execute("DELETE FROM ledger_members WHERE owner = $1", &params);
            futures::try_join!(released, gone).map(|_| ()).map_err(pg_err("release leases"))
        })
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

    fn claim_turn(&self, task: &str, every_ms: u64) -> Result<bool, LedgerError> {
        // A row of `ledger_meta` per task: when its last turn was taken (ms since the epoch).
        let (name, every_ms) = (format!("turn:{task}"), clamp(every_ms));
        self.read(move |c| async move {
            c.execute("INSERT INTO ledger_meta (name, value) VALUES ($1, 0) ON CONFLICT DO NOTHING", &[&name])
                .await
                .map_err(pg_err("take a turn"))?;
            // Concurrent daemons: the row's lock orders them; the later one re-reads the
            // turn the first just took and gets none.
            let taken = c
                .query_opt(
                    "UPDATE ledger_meta SET value = (extract(epoch FROM clock_timestamp()) * 1000)::bigint \
                     WHERE name = $1 AND value <= (extract(epoch FROM clock_timestamp()) * 1000)::bigint - $2 \
                     RETURNING value",
                    &[&name, &every_ms],
                )
                .await
                .map_err(pg_err("take a turn"))?;
            Ok(taken.is_some())
        })
    }

    fn committed_seq(&self) -> Result<u64, LedgerError> {
        self.read(|c| async move { Ok(counters(&c, false).await?.seq) })
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

/// Runs `statement` if `rows` (it has any), else nothing.
async fn execute(
    c: &Client,
    rows: bool,
    statement: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    if rows { c.execute(statement, params).await } else { Ok(0) }
}

/// The last version of each batch a group wrote (one row per batch in the statement),
/// as array columns.
fn latest_batches(batches: Vec<BatchRecord>) -> (Vec<i64>, Vec<i64>, Vec<Vec<u8>>, Vec<bool>) {
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

/// A 20-byte address stored in `table`'s `field`.
fn decode_address(table: &'static str, field: &'static str, bytes: &[u8]) -> Result<Address, LedgerError> {
    <[u8; 20]>::try_from(bytes)
        .map(Address::from)
        .map_err(|_| LedgerError::Corrupt { cf: table, source: CorruptRecord { field } })
}

/// Numbers past i64 (PostgreSQL's bigint) ask for nothing that exists.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored record and its sequence number (the row's; a record written before schema 3
/// carries it inside too, and a settlement log entry written then has none beside it).
fn decode_record(table: &'static str, bytes: &[u8], seq: Option<i64>) -> Result<PaymentRecord, LedgerError> {
    let mut record =
        PaymentRecord::decode(bytes).map_err(|source| LedgerError::Corrupt { cf: table, source })?;
    if let Some(seq) = seq {
        record.seq = u64::try_from(seq)
            .map_err(|_| LedgerError::Corrupt { cf: table, source: CorruptRecord { field: "seq" } })?;
    }
    Ok(record)
}

/// A `ledger_holds` row as read by the `read_holds` statement.
fn decode_hold(r: &tokio_postgres::Row) -> Result<(AuthKey, Hold), LedgerError> {
    const T: &str = "ledger_holds";
    let corrupt = |field| LedgerError::Corrupt { cf: T, source: CorruptRecord { field } };
    let key = AuthKey::from_bytes(r.get(0)).ok_or(corrupt("auth key"))?;
    let authorization = crate::x402::Authorization {
        from: key.payer().from(),
        to: decode_address(T, "to", r.get(1))?,
        value: decode_u256(T, "value", r.get(2))?,
        valid_after: decode_u256(T, "valid after", r.get(3))?,
        valid_before: decode_u256(T, "valid before", r.get(4))?,
        nonce: key.nonce(),
    };
    let expires_at_ms = u64::try_from(r.get::<_, i64>(6)).map_err(|_| corrupt("expiry"))?;
    Ok((key, Hold { authorization, idempotency_key: r.get(5), expires_at_ms }))
}

fn decode_batch(bytes: &[u8]) -> Result<BatchRecord, LedgerError> {
    BatchRecord::decode(bytes).map_err(|source| LedgerError::Corrupt { cf: "ledger_batch", source })
}

fn decode_payer(bytes: &[u8]) -> Result<PayerKey, LedgerError> {
    AuthKey::from_bytes(&[bytes, &[0u8; 32]].concat())
        .map(|k| k.payer())
        .ok_or(LedgerError::Corrupt { cf: "ledger_exposure", source: CorruptRecord { field: "payer" } })
}

/// A 32-byte big-endian number stored in `table`'s `field`.
fn decode_u256(table: &'static str, field: &'static str, bytes: &[u8]) -> Result<U256, LedgerError> {
    <[u8; 32]>::try_from(bytes)
        .map(U256::from_be_bytes)
        .map_err(|_| LedgerError::Corrupt { cf: table, source: CorruptRecord { field } })
}

fn pg_err(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> LedgerError {
    move |source| LedgerError::Postgres { op, source: Arc::new(source) }
}
