//! What a fleet sharing the ledger needs of it: settler leases, turns at periodic tasks,
//! the newest change committed by any daemon.

use alloy::primitives::Address;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::decode::{clamp, decode_address, pg_err};
use super::statements::counters;
use super::{PgLedger, finish};
use crate::ledger::error::LedgerError;
use crate::ledger::store::Fleet;

/// Serialises the lease decisions of a chain (this plus the chain id).
pub(super) const LEASE_LOCK: i64 = 0x7834_3032_6c00_0000;

/// One daemon's turn at the leases of a chain, in a transaction: it renews its membership
/// (a member is alive while it renews within its lease time), then keeps or takes accounts
/// up to its share (the accounts divided by the live members, rounded up) and gives up the
/// rest, so a fleet spreads its settler accounts and a newcomer gets some. Taking an
/// account starts a new epoch. Times are the database's.
pub(super) async fn take_leases(
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

impl Fleet for PgLedger {
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
}
