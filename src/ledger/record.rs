//! Ledger keys, lifecycle states, the payment record with its on-disk codec, and the
//! settlement log's entries ([`LogEntry`]) folded into the books ([`books`]).

use alloy::primitives::{Address, B256, U256, keccak256};
use prost::Message as _;

use crate::payer::Route;
use crate::x402::{Authorization, RawSignature, SignedAuthorization};

/// Generated on-disk encoding (`proto/x402/batcher/ledger/v1/ledger.proto`).
#[allow(clippy::all, missing_docs)]
pub mod disk {
    tonic::include_proto!("x402.batcher.ledger.v1");
}

/// What identifies an authorization on chain: `chain id ‖ token ‖ from ‖ nonce`.
/// The big-endian chain id makes keys of one chain and token sort together.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthKey([u8; 80]);

impl AuthKey {
    pub fn new(chain_id: u64, token: Address, from: Address, nonce: B256) -> Self {
        let mut k = [0u8; 80];
        k[..8].copy_from_slice(&chain_id.to_be_bytes());
        k[8..28].copy_from_slice(token.as_slice());
        k[28..48].copy_from_slice(from.as_slice());
        k[48..].copy_from_slice(nonce.as_slice());
        Self(k)
    }

    pub fn of(s: &SignedAuthorization) -> Self {
        Self::new(s.chain_id, s.token, s.authorization.from, s.authorization.nonce)
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        b.try_into().ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The payer's exposure key: the first 48 bytes.
    pub fn payer(&self) -> PayerKey {
        let mut k = [0u8; 48];
        k.copy_from_slice(&self.0[..48]);
        PayerKey(k)
    }

    /// The authorization's nonce: the last 32 bytes.
    pub fn nonce(&self) -> B256 {
        B256::from_slice(&self.0[48..])
    }

    /// The stable payment id: the first 16 bytes of the key's keccak256. Random-looking
    /// and short; 2^64 payments before a collision is even likely.
    pub fn payment_id(&self) -> PaymentId {
        let h = keccak256(self.0);
        let mut id = [0u8; 16];
        id.copy_from_slice(&h[..16]);
        PaymentId(id)
    }
}

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthKey(0x{})", alloy::hex::encode(self.0))
    }
}

/// `chain id ‖ token ‖ from`: whose exposure.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PayerKey([u8; 48]);

impl PayerKey {
    pub fn new(chain_id: u64, token: Address, from: Address) -> Self {
        AuthKey::new(chain_id, token, from, B256::ZERO).payer()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn chain_id(&self) -> u64 {
        u64::from_be_bytes(self.0[..8].try_into().expect("8 bytes"))
    }

    pub fn token(&self) -> Address {
        Address::from_slice(&self.0[8..28])
    }

    pub fn from(&self) -> Address {
        Address::from_slice(&self.0[28..48])
    }
}

/// The id clients use for a payment (`0x` + 32 hex digits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PaymentId(pub [u8; 16]);

impl std::fmt::Display for PaymentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0x{}", alloy::hex::encode(self.0))
    }
}

impl std::str::FromStr for PaymentId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let hex = s.strip_prefix("0x").ok_or(())?;
        let mut id = [0u8; 16];
        alloy::hex::decode_to_slice(hex, &mut id).map_err(|_| ())?;
        Ok(PaymentId(id))
    }
}

/// Where a payment is in its lifecycle (see DESIGN.md). Values match the public
/// `PaymentStatus` enum.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Status {
    Accepted,
    Batched,
    Submitted,
    Included,
    Settled,
    Failed,
    Expired,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Accepted,
        Status::Batched,
        Status::Submitted,
        Status::Included,
        Status::Settled,
        Status::Failed,
        Status::Expired,
    ];

    /// The status as a lower-case word (logs, the HTTP facilitator's replies).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Batched => "batched",
            Status::Submitted => "submitted",
            Status::Included => "included",
            Status::Settled => "settled",
            Status::Failed => "failed",
            Status::Expired => "expired",
        }
    }

    /// Settled, failed and expired payments are done: the API server's answer never
    /// changes. (A settled payment whose block is not yet final on chain may still be
    /// corrected or reversed by a reorg: see [`PaymentRecord::can_move_to`].)
    pub fn is_final(self) -> bool {
        matches!(self, Status::Settled | Status::Failed | Status::Expired)
    }

    /// The lifecycle's edges. A dropped or reorged-out transaction returns its payments
    /// to Accepted; an on-chain refusal fails a payment that was not yet included; a
    /// payment can expire until it is included (after a reorg, via Accepted). An accepted
    /// payment moves straight to Included only when the chain shows it settled by an
    /// earlier transaction of ours (one reorged out, then mined again); an included one
    /// moves to Included again when a reorg re-mined its transaction in another block.
    /// (Settled payments move on only while their block is not final on chain:
    /// [`PaymentRecord::can_move_to`].)
    pub fn can_move_to(self, to: Status) -> bool {
        use Status::*;
        matches!(
            (self, to),
            (Accepted, Batched | Included | Failed | Expired)
                | (Batched, Submitted | Accepted | Failed | Expired)
                | (Submitted, Included | Accepted | Failed | Expired)
                | (Included, Included | Settled | Accepted | Expired)
        )
    }

    /// The status's number on disk. Fixed for ever: records written by every earlier
    /// version use these numbers (they were the public enum's, and are now the ledger's own:
    /// a change to the public API must not change what is on disk).
    pub const fn to_disk(self) -> i32 {
        match self {
            Status::Accepted => 1,
            Status::Batched => 2,
            Status::Submitted => 3,
            Status::Included => 4,
            Status::Settled => 5,
            Status::Failed => 6,
            Status::Expired => 7,
        }
    }

    pub fn from_disk(n: i32) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.to_disk() == n)
    }
}

/// Why a stored record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ledger record field {field} is corrupt")]
pub struct CorruptRecord {
    pub field: &'static str,
}

/// What the API server said about a payment besides the authorization: carried from the
/// submission into the record unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Submission {
    /// The network as the requirements named it.
    pub network: String,
    pub max_timeout_seconds: u64,
    pub idempotency_key: String,
    pub resource: String,
    pub api_server: String,
    /// How the payer's signature was judged (and the token will judge it).
    pub route: Route,
}

/// Everything the ledger knows about one payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRecord {
    pub status: Status,
    pub signed: SignedAuthorization,
    pub submission: Submission,
    pub accepted_at_ms: u64,
    pub updated_at_ms: u64,
    /// Sequence number of the latest change.
    pub seq: u64,
    /// x402 reason code, for Failed and Expired.
    pub failure_reason: String,
    pub failure_message: String,
    pub batch_id: String,
    pub tx_hash: Option<B256>,
    pub block_number: u64,
    pub block_hash: Option<B256>,
    pub block_time: u64,
    pub log_index: u64,
    /// This payment's share of its transaction's gas used and fee paid (wei).
    pub gas_share: u64,
    pub fee_share_wei: U256,
    /// When its settlement's block became final on chain (0: not yet; or settled by a
    /// version that did not follow finality).
    pub finalized_at_ms: u64,
    /// What the latest settlement log entry of this payment says (see [`LogEntry`]).
    pub log_entry: LogEntry,
    /// The settlement log entry the change this snapshot records wrote (`None`: a step in
    /// between): what a change feed consumer credits and takes back by.
    pub change_entry: Option<LogEntry>,
}

/// Why a payment's snapshot is in the settlement log. The log is append-only: a settled
/// payment whose block a reorg changed gets a new entry, never a rewritten one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum LogEntry {
    /// Its outcome: settled, failed or expired.
    #[default]
    Outcome,
    /// Its settlement transaction was mined again in another block: new evidence.
    Corrected,
    /// Its settlement transaction is gone from the chain: the settlement is undone (the
    /// payment goes back to be settled again, or expires). The snapshot is the settlement
    /// being reversed.
    Reversed,
    /// Its settlement's block is final on chain: nothing changes it any more.
    Finalized,
}

impl LogEntry {
    pub fn as_str(self) -> &'static str {
        match self {
            LogEntry::Outcome => "outcome",
            LogEntry::Corrected => "corrected",
            LogEntry::Reversed => "reversed",
            LogEntry::Finalized => "finalized",
        }
    }

    const fn to_disk(self) -> i32 {
        match self {
            LogEntry::Outcome => 0,
            LogEntry::Corrected => 1,
            LogEntry::Reversed => 2,
            LogEntry::Finalized => 3,
        }
    }

    fn from_disk(n: i32) -> Option<LogEntry> {
        [LogEntry::Outcome, LogEntry::Corrected, LogEntry::Reversed, LogEntry::Finalized]
            .into_iter()
            .find(|e| e.to_disk() == n)
    }
}

/// The settlement log folded into each payment's standing outcome, in the order outcomes
/// were first logged: an outcome entry adds the payment, a reversal takes its settlement
/// back out, a correction or its finality replaces it with the newer snapshot. A payment
/// listed twice had two outcomes without a reversal between: a double count.
pub fn books(log: impl IntoIterator<Item = PaymentRecord>) -> Vec<PaymentRecord> {
    let mut rows: Vec<Option<PaymentRecord>> = Vec::new();
    let mut at: std::collections::HashMap<PaymentId, Vec<usize>> = std::collections::HashMap::new();
    for r in log {
        let id = r.payment_id();
        match r.log_entry {
            LogEntry::Outcome => {
                at.entry(id).or_default().push(rows.len());
                rows.push(Some(r));
            }
            LogEntry::Reversed => {
                if let Some(i) = at.get_mut(&id).and_then(Vec::pop) {
                    rows[i] = None;
                }
            }
            LogEntry::Corrected | LogEntry::Finalized => {
                if let Some(&i) = at.get(&id).and_then(|v| v.last()) {
                    rows[i] = Some(r);
                }
            }
        }
    }
    rows.into_iter().flatten().collect()
}

impl PaymentRecord {
    pub fn key(&self) -> AuthKey {
        AuthKey::of(&self.signed)
    }

    pub fn payment_id(&self) -> PaymentId {
        self.key().payment_id()
    }

    pub fn value(&self) -> U256 {
        self.signed.authorization.value
    }

    /// Whether this payment may move to `to`: the lifecycle's edges ([`Status::can_move_to`]),
    /// and, while its settlement's block is not yet final on chain, settled → settled (new
    /// evidence after a reorg, or its finality) and settled → accepted or expired (its
    /// transaction vanished in a reorg deeper than the confirmation depth).
    pub fn can_move_to(&self, to: Status) -> bool {
        self.status.can_move_to(to)
            || (self.status == Status::Settled
                && self.finalized_at_ms == 0
                && matches!(to, Status::Settled | Status::Accepted | Status::Expired))
    }

    pub fn encode(&self) -> Vec<u8> {
        self.encode_numbered(self.seq)
    }

    /// Encoded with `seq` in place of its sequence number (0: none; a store that keeps the
    /// number beside the record).
    pub fn encode_numbered(&self, seq: u64) -> Vec<u8> {
        let a = &self.signed.authorization;
        disk::PaymentRecord {
            status: self.status.to_disk(),
            chain_id: self.signed.chain_id,
            token: self.signed.token.to_vec(),
            from: a.from.to_vec(),
            to: a.to.to_vec(),
            value: a.value.to_be_bytes::<32>().to_vec(),
            valid_after: a.valid_after.to_be_bytes::<32>().to_vec(),
            valid_before: a.valid_before.to_be_bytes::<32>().to_vec(),
            nonce: a.nonce.to_vec(),
            signature: self.signed.signature.as_bytes().to_vec(),
            network: self.submission.network.clone(),
            max_timeout_seconds: self.submission.max_timeout_seconds,
            idempotency_key: self.submission.idempotency_key.clone(),
            resource: self.submission.resource.clone(),
            api_server: self.submission.api_server.clone(),
            accepted_at_ms: self.accepted_at_ms,
            updated_at_ms: self.updated_at_ms,
            seq,
            failure_reason: self.failure_reason.clone(),
            failure_message: self.failure_message.clone(),
            batch_id: self.batch_id.clone(),
            tx_hash: self.tx_hash.map(|h| h.to_vec()).unwrap_or_default(),
            block_number: self.block_number,
            block_hash: self.block_hash.map(|h| h.to_vec()).unwrap_or_default(),
            block_time: self.block_time,
            log_index: self.log_index,
            gas_share: self.gas_share,
            fee_share_wei: if self.fee_share_wei.is_zero() {
                Vec::new()
            } else {
                self.fee_share_wei.to_be_bytes::<32>().to_vec()
            },
            finalized_at_ms: self.finalized_at_ms,
            log_entry: self.log_entry.to_disk(),
            payer_route: self.submission.route.to_disk(),
            change_entry: self.change_entry.map_or(0, |e| e.to_disk() + 1),
        }
        .encode_to_vec()
    }

    /// Decodes a stored record, checking every fixed-size field's length.
    pub fn decode(bytes: &[u8]) -> Result<PaymentRecord, CorruptRecord> {
        let d = disk::PaymentRecord::decode(bytes).map_err(|_| CorruptRecord { field: "encoding" })?;
        let addr =
            |b: &[u8], field| <[u8; 20]>::try_from(b).map(Address::from).map_err(|_| CorruptRecord { field });
        let word = |b: &[u8], field| {
            <[u8; 32]>::try_from(b).map(|w| U256::from_be_bytes(w)).map_err(|_| CorruptRecord { field })
        };
        let hash = |b: &[u8], field| -> Result<Option<B256>, CorruptRecord> {
            match b.len() {
                0 => Ok(None),
                32 => Ok(Some(B256::from_slice(b))),
                _ => Err(CorruptRecord { field }),
            }
        };
        let status = Status::from_disk(d.status).ok_or(CorruptRecord { field: "status" })?;
        Ok(PaymentRecord {
            status,
            signed: SignedAuthorization {
                chain_id: d.chain_id,
                token: addr(&d.token, "token")?,
                authorization: Authorization {
                    from: addr(&d.from, "from")?,
                    to: addr(&d.to, "to")?,
                    value: word(&d.value, "value")?,
                    valid_after: word(&d.valid_after, "valid_after")?,
                    valid_before: word(&d.valid_before, "valid_before")?,
                    nonce: <[u8; 32]>::try_from(d.nonce.as_slice())
                        .map(B256::from)
                        .map_err(|_| CorruptRecord { field: "nonce" })?,
                },
                signature: RawSignature::new(d.signature).ok_or(CorruptRecord { field: "signature" })?,
            },
            submission: Submission {
                network: d.network,
                max_timeout_seconds: d.max_timeout_seconds,
                idempotency_key: d.idempotency_key,
                resource: d.resource,
                api_server: d.api_server,
                route: Route::from_disk(d.payer_route).ok_or(CorruptRecord { field: "payer_route" })?,
            },
            accepted_at_ms: d.accepted_at_ms,
            updated_at_ms: d.updated_at_ms,
            seq: d.seq,
            failure_reason: d.failure_reason,
            failure_message: d.failure_message,
            batch_id: d.batch_id,
            tx_hash: hash(&d.tx_hash, "tx_hash")?,
            block_number: d.block_number,
            block_hash: hash(&d.block_hash, "block_hash")?,
            block_time: d.block_time,
            log_index: d.log_index,
            gas_share: d.gas_share,
            fee_share_wei: if d.fee_share_wei.is_empty() {
                U256::ZERO
            } else {
                word(&d.fee_share_wei, "fee_share_wei")?
            },
            finalized_at_ms: d.finalized_at_ms,
            log_entry: LogEntry::from_disk(d.log_entry).ok_or(CorruptRecord { field: "log_entry" })?,
            change_entry: match d.change_entry {
                0 => None,
                n => Some(LogEntry::from_disk(n - 1).ok_or(CorruptRecord { field: "change_entry" })?),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> PaymentRecord {
        PaymentRecord {
            status: Status::Included,
            signed: SignedAuthorization {
                chain_id: 8453,
                token: Address::repeat_byte(1),
                authorization: Authorization {
                    from: Address::repeat_byte(2),
                    to: Address::repeat_byte(3),
                    value: U256::from(1_000_000u64),
                    valid_after: U256::ZERO,
                    valid_before: U256::MAX,
                    nonce: B256::repeat_byte(4),
                },
                signature: RawSignature::from([5; 65]),
            },
            submission: Submission {
                network: "eip155:8453".into(),
                max_timeout_seconds: 300,
                idempotency_key: "k".into(),
                resource: "https://api.example/x".into(),
                api_server: "node-1".into(),
                route: Route::Erc1271,
            },
            accepted_at_ms: 1,
            updated_at_ms: 2,
            seq: 3,
            failure_reason: String::new(),
            failure_message: String::new(),
            batch_id: "b".into(),
            tx_hash: Some(B256::repeat_byte(6)),
            block_number: 7,
            block_hash: None,
            block_time: 8,
            log_index: 9,
            gas_share: 10,
            fee_share_wei: U256::from(11),
            finalized_at_ms: 12,
            log_entry: LogEntry::Corrected,
            change_entry: Some(LogEntry::Reversed),
        }
    }

    #[test]
    fn record_round_trips_and_corruption_is_named() {
        let r = record();
        assert_eq!(PaymentRecord::decode(&r.encode()).unwrap(), r);
        let mut d = disk::PaymentRecord::decode(r.encode().as_slice()).unwrap();
        d.from.pop();
        assert_eq!(PaymentRecord::decode(&d.encode_to_vec()).unwrap_err().field, "from");
        d = disk::PaymentRecord::decode(r.encode().as_slice()).unwrap();
        d.status = 99;
        assert_eq!(PaymentRecord::decode(&d.encode_to_vec()).unwrap_err().field, "status");
        assert!(PaymentRecord::decode(&[0xff, 0xff, 0xff]).is_err());
    }

    /// What is on disk keeps its meaning: these numbers are in every ledger ever written.
    #[test]
    fn status_numbers_on_disk_are_pinned() {
        let pinned: Vec<(Status, i32)> = Status::ALL.iter().map(|s| (*s, s.to_disk())).collect();
        use Status::*;
        assert_eq!(
            pinned,
            [
                (Accepted, 1),
                (Batched, 2),
                (Submitted, 3),
                (Included, 4),
                (Settled, 5),
                (Failed, 6),
                (Expired, 7)
            ]
        );
        for (s, n) in pinned {
            assert_eq!(Status::from_disk(n), Some(s));
        }
        assert_eq!(Status::from_disk(0), None);
        assert_eq!(Status::from_disk(8), None);
    }

    #[test]
    fn lifecycle_edges() {
        use Status::*;
        for s in Status::ALL {
            assert_eq!(s.can_move_to(s), s == Included, "{s:?} to itself (only new evidence)");
            if s.is_final() {
                assert!(Status::ALL.iter().all(|t| !s.can_move_to(*t)), "{s:?} is final");
            }
        }
        assert!(Accepted.can_move_to(Batched) && Included.can_move_to(Settled));
        assert!(Included.can_move_to(Accepted), "reorg");
        assert!(!Accepted.can_move_to(Settled) && !Included.can_move_to(Failed));
    }

    #[test]
    fn ids_and_keys() {
        let r = record();
        let id = r.payment_id();
        assert_eq!(id.to_string().parse::<PaymentId>().unwrap(), id);
        assert_eq!(r.key().payer(), PayerKey::new(8453, Address::repeat_byte(1), Address::repeat_byte(2)));
        assert_eq!(r.key().payer().from(), Address::repeat_byte(2));
    }
}
