//! Rows back into the ledger's types (a malformed one is `Corrupt`, naming its table and
//! field), and the client's errors into the ledger's, classified.

use std::sync::Arc;

use alloy::primitives::{Address, U256};

use crate::ledger::batch::BatchRecord;
use crate::ledger::error::{Cause, LedgerError};
use crate::ledger::holds::Hold;
use crate::ledger::record::{AuthKey, CorruptRecord, PayerKey, PaymentRecord};

/// A 20-byte address stored in `table`'s `field`.
pub(super) fn decode_address(
    table: &'static str,
    field: &'static str,
    bytes: &[u8],
) -> Result<Address, LedgerError> {
    <[u8; 20]>::try_from(bytes)
        .map(Address::from)
        .map_err(|_| LedgerError::Corrupt { cf: table, source: CorruptRecord { field } })
}

/// Numbers past i64 (PostgreSQL's bigint) ask for nothing that exists.
pub(super) fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored record and its sequence number (the row's; a record written before schema 3
/// carries it inside too, and a settlement log entry written then has none beside it).
pub(super) fn decode_record(
    table: &'static str,
    bytes: &[u8],
    seq: Option<i64>,
) -> Result<PaymentRecord, LedgerError> {
    let mut record =
        PaymentRecord::decode(bytes).map_err(|source| LedgerError::Corrupt { cf: table, source })?;
    if let Some(seq) = seq {
        record.seq = u64::try_from(seq)
            .map_err(|_| LedgerError::Corrupt { cf: table, source: CorruptRecord { field: "seq" } })?;
    }
    Ok(record)
}

/// A `ledger_holds` row as read by the `read_holds` statement.
pub(super) fn decode_hold(r: &tokio_postgres::Row) -> Result<(AuthKey, Hold), LedgerError> {
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

pub(super) fn decode_batch(bytes: &[u8]) -> Result<BatchRecord, LedgerError> {
    BatchRecord::decode(bytes).map_err(|source| LedgerError::Corrupt { cf: "ledger_batch", source })
}

pub(super) fn decode_payer(bytes: &[u8]) -> Result<PayerKey, LedgerError> {
    AuthKey::from_bytes(&[bytes, &[0u8; 32]].concat())
        .map(|k| k.payer())
        .ok_or(LedgerError::Corrupt { cf: "ledger_exposure", source: CorruptRecord { field: "payer" } })
}

/// A 32-byte big-endian number stored in `table`'s `field`.
pub(super) fn decode_u256(
    table: &'static str,
    field: &'static str,
    bytes: &[u8],
) -> Result<U256, LedgerError> {
    <[u8; 32]>::try_from(bytes)
        .map(U256::from_be_bytes)
        .map_err(|_| LedgerError::Corrupt { cf: table, source: CorruptRecord { field } })
}

/// A client error as the ledger's, classified: a lost race (a unique key another group
/// took, a deadlock broken: decide again), no connection, or a failed statement.
pub(super) fn pg_err(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> LedgerError {
    use tokio_postgres::error::SqlState;
    move |e| {
        let lost = e
            .code()
            .is_some_and(|c| *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::T_R_DEADLOCK_DETECTED);
        let unreachable = op == "connect" || e.is_closed();
        let source: Cause = Arc::new(e);
        if lost {
            LedgerError::LostRace { op, source }
        } else if unreachable {
            LedgerError::Unreachable { op, place: "the PostgreSQL server", source }
        } else {
            LedgerError::Storage { op, place: "PostgreSQL", source }
        }
    }
}
