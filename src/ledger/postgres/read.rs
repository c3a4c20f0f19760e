//! A group's first round trip: what its commands name, the payers' locks, and the committed
//! state read under them.

use std::collections::HashMap;

use alloy::primitives::{Address, U256};

use super::decode::{
    clamp, decode_address, decode_batch, decode_hold, decode_payer, decode_record, decode_u256, pg_err,
};
use super::statements::WriterConn;
use crate::ledger::batch::BatchRecord;
use crate::ledger::command::Command;
use crate::ledger::error::LedgerError;
use crate::ledger::holds::Holds;
use crate::ledger::record::{AuthKey, CorruptRecord, PayerKey, PaymentRecord};

/// The keys, payers and idempotency keys a group's commands name.
pub(super) struct Named {
    /// Payment ids (a function of the key: the table's primary key).
    pub(super) ids: Vec<Vec<u8>>,
    pub(super) payers: Vec<Vec<u8>>,
    pub(super) idem: Vec<String>,
    /// Batches written: chain ids and counters.
    pub(super) batches: (Vec<i64>, Vec<i64>),
    /// Leases fencing the writes: chain ids and settlers.
    pub(super) leases: (Vec<i64>, Vec<Vec<u8>>),
    /// Payers of acceptances and holds (whose holds the group reads), and the latest
    /// `now_ms` of those commands (holds lapsed by then are deleted).
    pub(super) hold_payers: Vec<Vec<u8>>,
    pub(super) now_ms: Option<u64>,
    /// Whether any command is a hold (a verification).
    pub(super) verifies: bool,
    /// The payers' advisory lock keys, ascending (every group takes its locks in this
    /// order, so two groups never wait for each other in a circle).
    pub(super) locks: Vec<i64>,
}

/// A payer's advisory lock key: the first 8 bytes of the keccak256 of its exposure key (the
/// same in every daemon and version; two payers sharing one only wait for each other).
pub(super) fn payer_lock(payer: &PayerKey) -> i64 {
    let h = alloy::primitives::keccak256(payer.as_bytes());
    i64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
}

impl Named {
    pub(super) fn of(commands: &[Command]) -> Named {
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
pub(super) struct Prefetched {
    /// Records and their (pending, watched) flags.
    pub(super) records: HashMap<AuthKey, (PaymentRecord, bool, bool)>,
    pub(super) exposures: HashMap<PayerKey, U256>,
    pub(super) idem: HashMap<String, AuthKey>,
    pub(super) batches: HashMap<(u64, u64), BatchRecord>,
    /// Owner and epoch of each lease named, locked (`FOR SHARE`) until the commit, so no
    /// other daemon takes the account over between the check and the write.
    pub(super) leases: HashMap<(u64, Address), (String, u64)>,
    /// The holds of the payers of the acceptances and holds, lapsed ones included.
    pub(super) holds: Holds,
}

pub(super) async fn prefetch(conn: &WriterConn, named: Named) -> Result<Prefetched, LedgerError> {
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
