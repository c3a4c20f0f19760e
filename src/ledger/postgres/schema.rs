//! The tables: created on a new database, checked (a newer schema refused), and upgraded in
//! place from older ones, one daemon at a time.

use tokio_postgres::Client;

use super::decode::pg_err;
use super::{PgConnect, PgLedger, finish};
use crate::ledger::error::LedgerError;

/// The layout this code reads and writes. Bumped by any change older code cannot read.
pub const SCHEMA_VERSION: i64 = 3;
// 1 → 2: `ledger_holds` (holds were per daemon, in memory).
// 2 → 3: a record's sequence number is its row's (records written since carry none inside);
// `ledger_settlement.change`.

/// Serialises schema creation and upgrades between daemons starting together.
pub(super) const SCHEMA_LOCK: i64 = 0x7834_3032_6c65_6467; // "x402ledg"

pub(super) const SCHEMA: &str = "
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
pub(super) const UPGRADE_TO_3: &str = "
ALTER TABLE ledger_settlement ADD COLUMN IF NOT EXISTS change bigint;
ALTER TABLE ledger_feed ADD COLUMN IF NOT EXISTS written_by smallint NOT NULL DEFAULT 1;
ALTER TABLE ledger_feed ALTER COLUMN written_by DROP DEFAULT;
";

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
}

pub(super) async fn stored_schema(client: &Client) -> Result<Option<i64>, LedgerError> {
    let row = client
        .query_opt("SELECT value FROM ledger_meta WHERE name = 'schema_version'", &[])
        .await
        .map_err(pg_err("read schema"))?;
    Ok(row.map(|r| r.get(0)))
}
