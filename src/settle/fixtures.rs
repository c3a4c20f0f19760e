//! Built records, batches, attempts and receipts for the engine's unit tests.

use alloy::primitives::{Address, B256, Bytes, U256};

use super::rpc::{Head, Receipt};
use crate::ledger::{Attempt, BatchRecord, BatchStatus, Inclusion, PaymentRecord, Status, Submission};
use crate::x402::{Authorization, RawSignature, SignedAuthorization};

pub const TOKEN: Address = Address::repeat_byte(0x70);
pub const SETTLER: Address = Address::repeat_byte(0x5e);

/// Payment `i` (its payer and nonce derive from `i`) in `status`, valid until `valid_before`.
pub fn record(i: u8, status: Status, valid_before: u64) -> PaymentRecord {
    PaymentRecord {
        status,
        signed: SignedAuthorization {
            chain_id: 8453,
            token: TOKEN,
            authorization: Authorization {
                from: Address::repeat_byte(i),
                to: Address::repeat_byte(0xee),
                value: U256::from(1_000u64 + u64::from(i)),
                valid_after: U256::ZERO,
                valid_before: U256::from(valid_before),
                nonce: B256::repeat_byte(i),
            },
            signature: RawSignature::from([i; 65]),
        },
        submission: Submission {
            network: "eip155:8453".into(),
            max_timeout_seconds: 60,
            idempotency_key: String::new(),
            resource: String::new(),
            api_server: String::new(),
            route: Default::default(),
        },
        accepted_at_ms: 1_000,
        updated_at_ms: 1_000,
        seq: 0,
        failure_reason: String::new(),
        failure_message: String::new(),
        batch_id: String::new(),
        tx_hash: None,
        block_number: 0,
        block_hash: None,
        block_time: 0,
        log_index: 0,
        gas_share: 0,
        fee_share_wei: U256::ZERO,
        finalized_at_ms: 0,
        log_entry: crate::ledger::LogEntry::Outcome,
        change_entry: None,
    }
}

/// `record` included by transaction `tx` in block `block` (hash `block_hash`).
pub fn included(mut record: PaymentRecord, tx: B256, block: u64, block_hash: B256) -> PaymentRecord {
    record.status = Status::Included;
    record.tx_hash = Some(tx);
    record.block_number = block;
    record.block_hash = Some(block_hash);
    record
}

/// A signed attempt at `nonce`, signed at block `at`, paying at most `max_fee` per gas.
pub fn attempt(tx: u8, nonce: u64, at: u64, max_fee: u128) -> Attempt {
    Attempt {
        tx_hash: B256::repeat_byte(tx),
        raw: Bytes::from(vec![tx]),
        max_fee_per_gas: max_fee,
        max_priority_fee_per_gas: max_fee / 10,
        signed_at_block: at,
        tx_nonce: nonce,
    }
}

/// Batch `counter` of `records` by [`SETTLER`], with `attempts`.
pub fn batch(
    counter: u64,
    status: BatchStatus,
    records: &[PaymentRecord],
    attempts: Vec<Attempt>,
) -> BatchRecord {
    BatchRecord {
        chain_id: 8453,
        counter,
        token: TOKEN,
        settler: SETTLER,
        items: records.iter().map(PaymentRecord::key).collect(),
        cut_reason: "size".into(),
        status,
        attempts,
        created_at_ms: 1_000,
        updated_at_ms: 1_000,
        gas_limit: 1_000_000,
        inclusion: None,
    }
}

/// A receipt of `tx` in block `block` whose logs show the payments `used` settled (their
/// log indexes in that order), with `gas_used` at `price` wei per gas.
pub fn receipt(tx: u8, block: u64, used: &[(u8, u64)], gas_used: u64, price: u128) -> Receipt {
    Receipt {
        tx_hash: B256::repeat_byte(tx),
        from: SETTLER,
        block_number: block,
        block_hash: B256::repeat_byte(0xb0),
        gas_used,
        effective_gas_price: price,
        success: true,
        l1_fee: 0,
        used: used.iter().map(|&(i, log)| (Address::repeat_byte(i), B256::repeat_byte(i), log)).collect(),
    }
}

pub fn head(number: u64, timestamp: u64) -> Head {
    Head { number, hash: B256::repeat_byte(0xaa), timestamp, gas_limit: 30_000_000, base_fee: None }
}

/// An inclusion of transaction 1 in block `block` (hash `hash`).
pub fn inclusion(block: u64, hash: B256) -> Inclusion {
    Inclusion {
        tx_hash: B256::repeat_byte(1),
        block_number: block,
        block_hash: hash,
        block_time: 0,
        gas_used: 0,
        effective_gas_price: 0,
        settled_items: 1,
        l1_fee: 0,
    }
}
