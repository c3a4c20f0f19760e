//! Settlement batches as the ledger stores them: which payments, which settler account and
//! transaction nonce, every signed attempt (raw bytes included, so a restart can broadcast
//! exactly what was signed), and the inclusion once a receipt is found.

use alloy::primitives::{Address, B256, Bytes, U256};
use prost::Message as _;

use super::record::{AuthKey, CorruptRecord, disk};

/// Where a batch is. Values are stored; never renumber.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum BatchStatus {
    /// Signed and recorded; not yet known to have reached a node.
    Signed,
    /// Broadcast; waiting for a receipt.
    Submitted,
    /// A receipt was found; waiting for the confirmation depth.
    Included,
    /// Every item has its final outcome.
    Done,
    /// Its transaction vanished (dropped for good, or reorged out) and its payments went
    /// back to accepted or expired.
    Abandoned,
}

impl BatchStatus {
    fn to_i32(self) -> i32 {
        match self {
            BatchStatus::Signed => 0,
            BatchStatus::Submitted => 1,
            BatchStatus::Included => 2,
            BatchStatus::Done => 3,
            BatchStatus::Abandoned => 4,
        }
    }

    fn from_i32(v: i32) -> Option<Self> {
        Some(match v {
            0 => BatchStatus::Signed,
            1 => BatchStatus::Submitted,
            2 => BatchStatus::Included,
            3 => BatchStatus::Done,
            4 => BatchStatus::Abandoned,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(self, BatchStatus::Done | BatchStatus::Abandoned)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Signed => "signed",
            BatchStatus::Submitted => "submitted",
            BatchStatus::Included => "included",
            BatchStatus::Done => "done",
            BatchStatus::Abandoned => "abandoned",
        }
    }
}

/// One signed transaction of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub tx_hash: B256,
    pub raw: Bytes,
    pub max_fee_per_gas: u128,
    pub max_priority_fee_per_gas: u128,
    pub signed_at_block: u64,
    pub tx_nonce: u64,
}

/// The block a batch's transaction was mined in, and what it cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inclusion {
    pub tx_hash: B256,
    pub block_number: u64,
    pub block_hash: B256,
    pub block_time: u64,
    pub gas_used: u64,
    pub effective_gas_price: u128,
    pub settled_items: u32,
    /// The L1 data fee paid besides gas (OP-stack chains; 0 elsewhere), wei.
    pub l1_fee: u128,
}

/// A batch and everything known about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    pub chain_id: u64,
    /// Per-chain counter: with the chain id, the batch's key.
    pub counter: u64,
    pub token: Address,
    pub settler: Address,
    pub items: Vec<AuthKey>,
    pub cut_reason: String,
    pub status: BatchStatus,
    pub attempts: Vec<Attempt>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub gas_limit: u64,
    pub inclusion: Option<Inclusion>,
}

impl BatchRecord {
    /// The batch's key in the `batch` column family.
    pub fn key(&self) -> [u8; 16] {
        batch_key(self.chain_id, self.counter)
    }

    /// The id payments carry (`batch_id`): `chain:counter`.
    pub fn id(&self) -> String {
        format!("{}:{}", self.chain_id, self.counter)
    }

    /// The `(chain_id, counter)` of a batch id made by [`BatchRecord::id`].
    pub fn parse_id(id: &str) -> Option<(u64, u64)> {
        let (chain, counter) = id.split_once(':')?;
        Some((chain.parse().ok()?, counter.parse().ok()?))
    }

    /// The account nonce of the newest attempt.
    pub fn tx_nonce(&self) -> Option<u64> {
        self.attempts.last().map(|a| a.tx_nonce)
    }

    pub fn encode(&self) -> Vec<u8> {
        let inc = self.inclusion;
        disk::BatchRecord {
            chain_id: self.chain_id,
            counter: self.counter,
            token: self.token.to_vec(),
            settler: self.settler.to_vec(),
            tx_nonce: self.tx_nonce().unwrap_or_default(),
            items: self.items.iter().map(|k| k.as_bytes().to_vec()).collect(),
            cut_reason: self.cut_reason.clone(),
            status: self.status.to_i32(),
            attempts: self
                .attempts
                .iter()
                .map(|a| disk::Attempt {
                    tx_hash: a.tx_hash.to_vec(),
                    raw: a.raw.to_vec(),
                    max_fee_per_gas: a.max_fee_per_gas.to_be_bytes().to_vec(),
                    max_priority_fee_per_gas: a.max_priority_fee_per_gas.to_be_bytes().to_vec(),
                    signed_at_block: a.signed_at_block,
                    tx_nonce: a.tx_nonce,
                })
                .collect(),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            gas_limit: self.gas_limit,
            included_tx: inc.map(|i| i.tx_hash.to_vec()).unwrap_or_default(),
            block_number: inc.map(|i| i.block_number).unwrap_or_default(),
            block_hash: inc.map(|i| i.block_hash.to_vec()).unwrap_or_default(),
            block_time: inc.map(|i| i.block_time).unwrap_or_default(),
            gas_used: inc.map(|i| i.gas_used).unwrap_or_default(),
            effective_gas_price: inc
                .map(|i| i.effective_gas_price.to_be_bytes().to_vec())
                .unwrap_or_default(),
            settled_items: inc.map(|i| i.settled_items).unwrap_or_default(),
            l1_fee: inc.filter(|i| i.l1_fee > 0).map(|i| i.l1_fee.to_be_bytes().to_vec()).unwrap_or_default(),
        }
        .encode_to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<BatchRecord, CorruptRecord> {
        let d = disk::BatchRecord::decode(bytes).map_err(|_| CorruptRecord { field: "batch encoding" })?;
        let addr =
            |b: &[u8], field| <[u8; 20]>::try_from(b).map(Address::from).map_err(|_| CorruptRecord { field });
        let hash =
            |b: &[u8], field| <[u8; 32]>::try_from(b).map(B256::from).map_err(|_| CorruptRecord { field });
        let u128_of = |b: &[u8], field| {
            <[u8; 16]>::try_from(b).map(u128::from_be_bytes).map_err(|_| CorruptRecord { field })
        };
        let items = d
            .items
            .iter()
            .map(|k| AuthKey::from_bytes(k).ok_or(CorruptRecord { field: "batch item" }))
            .collect::<Result<_, _>>()?;
        let attempts = d
            .attempts
            .iter()
            .map(|a| {
                Ok(Attempt {
                    tx_hash: hash(&a.tx_hash, "attempt tx_hash")?,
                    raw: Bytes::from(a.raw.clone()),
                    max_fee_per_gas: u128_of(&a.max_fee_per_gas, "attempt max_fee_per_gas")?,
                    max_priority_fee_per_gas: u128_of(
                        &a.max_priority_fee_per_gas,
                        "attempt max_priority_fee_per_gas",
                    )?,
                    signed_at_block: a.signed_at_block,
                    tx_nonce: a.tx_nonce,
                })
            })
            .collect::<Result<_, CorruptRecord>>()?;
        let inclusion = if d.included_tx.is_empty() {
            None
        } else {
            Some(Inclusion {
                tx_hash: hash(&d.included_tx, "included_tx")?,
                block_number: d.block_number,
                block_hash: hash(&d.block_hash, "batch block_hash")?,
                block_time: d.block_time,
                gas_used: d.gas_used,
                effective_gas_price: u128_of(&d.effective_gas_price, "effective_gas_price")?,
                settled_items: d.settled_items,
                l1_fee: if d.l1_fee.is_empty() { 0 } else { u128_of(&d.l1_fee, "l1_fee")? },
            })
        };
        Ok(BatchRecord {
            chain_id: d.chain_id,
            counter: d.counter,
            token: addr(&d.token, "batch token")?,
            settler: addr(&d.settler, "settler")?,
            items,
            cut_reason: d.cut_reason,
            status: BatchStatus::from_i32(d.status).ok_or(CorruptRecord { field: "batch status" })?,
            attempts,
            created_at_ms: d.created_at_ms,
            updated_at_ms: d.updated_at_ms,
            gas_limit: d.gas_limit,
            inclusion,
        })
    }

    /// The fee this batch's transaction paid, in wei (zero before inclusion): its gas, and
    /// its L1 data fee on an OP-stack chain.
    pub fn fee_wei(&self) -> U256 {
        self.inclusion.map_or(U256::ZERO, |i| {
            U256::from(i.gas_used) * U256::from(i.effective_gas_price) + U256::from(i.l1_fee)
        })
    }
}

/// `chain_id ‖ counter`, big-endian: one chain's batches sort together, in order.
pub fn batch_key(chain_id: u64, counter: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&chain_id.to_be_bytes());
    k[8..].copy_from_slice(&counter.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trips() {
        let b = BatchRecord {
            chain_id: 31337,
            counter: 9,
            token: Address::repeat_byte(1),
            settler: Address::repeat_byte(2),
            items: vec![AuthKey::new(31337, Address::repeat_byte(1), Address::repeat_byte(3), B256::ZERO)],
            cut_reason: "max_wait".into(),
            status: BatchStatus::Included,
            attempts: vec![Attempt {
                tx_hash: B256::repeat_byte(4),
                raw: Bytes::from_static(&[1, 2, 3]),
                max_fee_per_gas: 7,
                max_priority_fee_per_gas: 1,
                signed_at_block: 5,
                tx_nonce: 3,
            }],
            created_at_ms: 1,
            updated_at_ms: 2,
            gas_limit: 100_000,
            inclusion: Some(Inclusion {
                tx_hash: B256::repeat_byte(4),
                block_number: 6,
                block_hash: B256::repeat_byte(5),
                block_time: 8,
                gas_used: 70_000,
                effective_gas_price: 3,
                settled_items: 1,
                l1_fee: 0,
            }),
        };
        assert_eq!(BatchRecord::decode(&b.encode()).unwrap(), b);
        assert_eq!(b.fee_wei(), U256::from(210_000));
        let mut op = b.clone();
        op.inclusion.as_mut().unwrap().l1_fee = 5_000;
        assert_eq!(BatchRecord::decode(&op.encode()).unwrap(), op, "an L1 fee is kept");
        assert_eq!(op.fee_wei(), U256::from(215_000), "and counted in the fee");
        assert_eq!(b.id(), "31337:9");
        assert!(BatchRecord::decode(&[0xff, 0xff]).is_err());
    }
}
