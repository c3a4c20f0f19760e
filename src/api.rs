//! The gRPC contract generated from `proto/x402/batcher/v1/batcher.proto`, and the
//! conversion of its messages into domain types.
//!
//! Conversion errors carry an x402 reason code like every other refusal, and say whether
//! the fault lies with the API server's message itself ([`ConvertError::is_malformed_request`]:
//! answered with INVALID_ARGUMENT) or with the payment it relays (a normal refusal).

use alloy::primitives::B256;

use crate::admission::PaymentInput;
use crate::ingest::PaymentRequest;
use crate::ledger::{LogEntry, PaymentRecord, Repeat, Status};
use crate::policy::{PolicyError, PolicyUpdate, SettlementPolicy};
use crate::settle::ChainView;
use crate::x402::decode::{self, DecodeError, FieldProblem};
use crate::x402::{Authorization, PaymentRequirements, Reason, SignedAuthorization};

/// Generated messages and service stubs for `x402.batcher.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("x402.batcher.v1");
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("x402_batcher_descriptor");

/// Why a `SubmitRequest` could not become a payment and its requirements.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("request carries no payment (set `authorization` or `x402_header`)")]
    MissingPayment,
    #[error("request carries no `requirements`")]
    MissingRequirements,
    #[error("payment: {0}")]
    Payment(#[source] DecodeError),
    #[error("requirements: {0}")]
    Requirements(#[source] DecodeError),
}

impl ConvertError {
    pub fn reason(&self) -> Reason {
        match self {
            ConvertError::MissingPayment => Reason::InvalidPayload,
            ConvertError::Payment(e) => e.reason(),
            ConvertError::MissingRequirements | ConvertError::Requirements(_) => {
                Reason::InvalidPaymentRequirements
            }
        }
    }

    /// True when the API server's own message is malformed (its requirements, or a missing
    /// payment), as opposed to a bad payment relayed from a client.
    pub fn is_malformed_request(&self) -> bool {
        !matches!(self, ConvertError::Payment(_))
    }
}

/// The payment of a submission, typed or decoded from its header.
pub fn payment_input(req: &v1::SubmitRequest) -> Result<PaymentInput, ConvertError> {
    match &req.payment {
        None => Err(ConvertError::MissingPayment),
        Some(v1::submit_request::Payment::Authorization(a)) => {
            signed_authorization(a).map(PaymentInput::Typed).map_err(ConvertError::Payment)
        }
        Some(v1::submit_request::Payment::X402Header(h)) => {
            decode::decode_header(h).map(PaymentInput::Header).map_err(ConvertError::Payment)
        }
    }
}

/// The payment and terms of a submission, for the decision path.
pub fn payment_request(req: &v1::SubmitRequest) -> Result<PaymentRequest, ConvertError> {
    Ok(PaymentRequest {
        payment: payment_input(req)?,
        requirements: requirements(req)?,
        idempotency_key: req.idempotency_key.clone(),
        resource: req.resource.clone(),
        api_server: req.api_server.clone(),
    })
}

/// The requirements of a submission.
pub fn requirements(req: &v1::SubmitRequest) -> Result<PaymentRequirements, ConvertError> {
    let r = req.requirements.as_ref().ok_or(ConvertError::MissingRequirements)?;
    payment_requirements(r).map_err(ConvertError::Requirements)
}

fn non_empty(field: &'static str, s: &str) -> Result<(), DecodeError> {
    if s.is_empty() { Err(DecodeError::Field { field, problem: FieldProblem::Missing }) } else { Ok(()) }
}

/// A typed authorization from its message.
pub fn signed_authorization(a: &v1::TypedAuthorization) -> Result<SignedAuthorization, DecodeError> {
    if a.chain_id == 0 {
        return Err(DecodeError::Field { field: "authorization.chain_id", problem: FieldProblem::Missing });
    }
    Ok(SignedAuthorization {
        chain_id: a.chain_id,
        token: decode::parse_address("authorization.token", &a.token)?,
        authorization: Authorization {
            from: decode::parse_address("authorization.from", &a.from)?,
            to: decode::parse_address("authorization.to", &a.to)?,
            value: decode::parse_u256("authorization.value", &a.value)?,
            valid_after: decode::parse_u256("authorization.valid_after", &a.valid_after)?,
            valid_before: decode::parse_u256("authorization.valid_before", &a.valid_before)?,
            nonce: decode::parse_b256("authorization.nonce", &a.nonce)?,
        },
        signature: decode::parse_signature("authorization.signature", &a.signature)?,
    })
}

/// Payment requirements from their message.
pub fn payment_requirements(r: &v1::PaymentRequirements) -> Result<PaymentRequirements, DecodeError> {
    non_empty("requirements.scheme", &r.scheme)?;
    non_empty("requirements.network", &r.network)?;
    Ok(PaymentRequirements {
        scheme: r.scheme.clone(),
        network: r.network.clone(),
        asset: decode::parse_address("requirements.asset", &r.asset)?,
        pay_to: decode::parse_address("requirements.pay_to", &r.pay_to)?,
        amount: decode::parse_u256("requirements.amount", &r.amount)?,
        max_timeout_seconds: (r.max_timeout_seconds > 0).then_some(r.max_timeout_seconds),
    })
}

/// The message form of a typed authorization: what a Rust API server sends.
pub fn typed_authorization(s: &SignedAuthorization) -> v1::TypedAuthorization {
    let a = &s.authorization;
    v1::TypedAuthorization {
        chain_id: s.chain_id,
        token: s.token.to_checksum(None),
        from: a.from.to_checksum(None),
        to: a.to.to_checksum(None),
        value: a.value.to_string(),
        valid_after: a.valid_after.to_string(),
        valid_before: a.valid_before.to_string(),
        nonce: a.nonce.to_string(),
        signature: s.signature.bytes().to_string(),
    }
}

/// The public form of a chain's view (see [`crate::settle::ChainView`]).
pub fn chain_status(c: &ChainView) -> v1::ChainStatus {
    v1::ChainStatus {
        chain_id: c.chain_id,
        head_block: c.head_block,
        base_fee_wei: c.base_fee_wei.to_string(),
        head_time: c.head_time,
        priority_fee_wei: c.priority_fee_wei.to_string(),
        tokens: c
            .tokens
            .iter()
            .map(|t| v1::TokenStatus {
                token: t.token.to_checksum(None),
                pending_payments: t.pending,
                pending_value: t.pending_value.to_string(),
                l1_fee_direct_wei: t.l1_fees.direct.to_string(),
                l1_fee_batch_fixed_wei: t.l1_fees.batch_fixed.to_string(),
                l1_fee_batch_per_payment_wei: t.l1_fees.batch_per_item.to_string(),
                batch_fixed_gas: t.batch_gas.fixed,
                batch_gas_per_payment: t.batch_gas.per_item,
                direct_gas: t.direct_gas,
            })
            .collect(),
        updated_at_ms: c.updated_at_ms,
    }
}

/// The public form of a chain's settler accounts.
pub fn settler_statuses(c: &ChainView) -> Vec<v1::SettlerStatus> {
    c.settlers
        .iter()
        .map(|s| v1::SettlerStatus {
            chain_id: c.chain_id,
            address: s.address.to_checksum(None),
            native_balance_wei: s.native_balance_wei.unwrap_or_default().to_string(),
            next_nonce: s.next_nonce.unwrap_or_default(),
            pending_transactions: s.pending_transactions,
            open_batch_id: s.open_batch.clone().unwrap_or_default(),
            open_tx_hash: s.open_tx.map(|h| h.to_string()).unwrap_or_default(),
            balance_known: s.native_balance_wei.is_some(),
            nonce_known: s.next_nonce.is_some(),
        })
        .collect()
}

/// The public form of the settlement policy.
pub fn policy(p: &SettlementPolicy) -> v1::Policy {
    v1::Policy {
        max_batch_size: u32::try_from(p.max_batch_size).unwrap_or(u32::MAX),
        max_wait_seconds: p.max_wait_ms / 1000,
        max_wait_ms: p.max_wait_ms,
        linger_ms: p.linger_ms,
        target_cost_per_payment_wei: p.target_cost_per_payment_wei.to_string(),
        confirmation_depth: u32::try_from(p.confirmations).unwrap_or(u32::MAX),
        deadline_margin_seconds: p.deadline_margin_secs,
        paused: p.paused,
    }
}

/// The policy change an `UpdatePolicy` asks for (absent fields keep their value).
pub fn policy_update(req: &v1::UpdatePolicyRequest) -> Result<PolicyUpdate, PolicyError> {
    let target = req
        .target_cost_per_payment_wei
        .as_ref()
        .map(|v| {
            v.trim().parse::<u128>().map_err(|_| PolicyError {
                field: "target_cost_per_payment_wei",
                reason: format!("{v:?} is not a decimal integer of wei"),
            })
        })
        .transpose()?;
    let max_wait_ms = match (req.max_wait_ms, req.max_wait_seconds) {
        (Some(_), Some(_)) => {
            return Err(PolicyError {
                field: "max_wait_ms",
                reason: "set max_wait_ms or max_wait_seconds, not both".into(),
            });
        }
        (Some(ms), None) => Some(ms),
        (None, Some(secs)) => Some(secs.saturating_mul(1000)),
        (None, None) => None,
    };
    Ok(PolicyUpdate {
        max_batch_size: req.max_batch_size.map(|v| v as usize),
        max_wait_ms,
        linger_ms: req.linger_ms,
        target_cost_per_payment_wei: target,
        confirmations: req.confirmation_depth.map(u64::from),
        deadline_margin_secs: req.deadline_margin_seconds,
        paused: req.paused,
    })
}

/// The public form of a payment's status.
pub fn status(s: Status) -> v1::PaymentStatus {
    match s {
        Status::Accepted => v1::PaymentStatus::Accepted,
        Status::Batched => v1::PaymentStatus::Batched,
        Status::Submitted => v1::PaymentStatus::Submitted,
        Status::Included => v1::PaymentStatus::Included,
        Status::Settled => v1::PaymentStatus::Settled,
        Status::Failed => v1::PaymentStatus::Failed,
        Status::Expired => v1::PaymentStatus::Expired,
    }
}

/// The public form of a [`Repeat`].
pub fn repeat(repeat: Repeat) -> v1::Repeat {
    match repeat {
        Repeat::New => v1::Repeat::New,
        Repeat::Retry => v1::Repeat::Retry,
        Repeat::Replay => v1::Repeat::Replay,
    }
}

/// A change of the change feed (`WatchPayments`): the payment as of it, and the
/// settlement-log entry it wrote.
pub fn payment_event(r: &PaymentRecord) -> v1::PaymentEvent {
    let entry = match r.change_entry {
        None => v1::SettlementEntry::None,
        Some(LogEntry::Outcome) => v1::SettlementEntry::Outcome,
        Some(LogEntry::Corrected) => v1::SettlementEntry::Corrected,
        Some(LogEntry::Reversed) => v1::SettlementEntry::Reversed,
        Some(LogEntry::Finalized) => v1::SettlementEntry::Finalized,
    };
    v1::PaymentEvent { seq: r.seq, payment: Some(payment(r)), entry: entry as i32 }
}

/// The public form of a payment record.
pub fn payment(r: &PaymentRecord) -> v1::Payment {
    let hash = |h: Option<B256>| h.map(|h| h.to_string()).unwrap_or_default();
    v1::Payment {
        payment_id: r.payment_id().to_string(),
        status: status(r.status) as i32,
        failure_reason: r.failure_reason.clone(),
        failure_message: r.failure_message.clone(),
        authorization: Some(typed_authorization(&r.signed)),
        requirements: Some(v1::PaymentRequirements {
            scheme: crate::x402::SCHEME_EXACT.into(),
            network: r.submission.network.clone(),
            asset: r.signed.token.to_checksum(None),
            pay_to: r.signed.authorization.to.to_checksum(None),
            amount: r.signed.authorization.value.to_string(),
            max_timeout_seconds: r.submission.max_timeout_seconds,
        }),
        idempotency_key: r.submission.idempotency_key.clone(),
        resource: r.submission.resource.clone(),
        api_server: r.submission.api_server.clone(),
        accepted_at_ms: r.accepted_at_ms,
        batch_id: r.batch_id.clone(),
        tx_hash: hash(r.tx_hash),
        block_number: r.block_number,
        block_hash: hash(r.block_hash),
        block_time: r.block_time,
        log_index: r.log_index,
        seq: r.seq,
        finalized_at_ms: r.finalized_at_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x402::RawSignature;
    use alloy::primitives::{Address, B256, U256};

    fn sample() -> SignedAuthorization {
        SignedAuthorization {
            chain_id: 8453,
            token: Address::repeat_byte(0x11),
            authorization: Authorization {
                from: Address::repeat_byte(0x22),
                to: Address::repeat_byte(0x33),
                value: U256::from(5),
                valid_after: U256::ZERO,
                valid_before: U256::MAX,
                nonce: B256::repeat_byte(0x44),
            },
            signature: RawSignature::from([0x55; 65]),
        }
    }

    #[test]
    fn typed_authorization_round_trips() {
        let s = sample();
        assert_eq!(signed_authorization(&typed_authorization(&s)).unwrap(), s);
    }

    #[test]
    fn policy_updates_convert_and_refuse_bad_amounts_naming_the_field() {
        let req = v1::UpdatePolicyRequest {
            max_batch_size: Some(7),
            confirmation_depth: Some(2),
            target_cost_per_payment_wei: Some(" 12 ".into()),
            ..Default::default()
        };
        let u = policy_update(&req).unwrap();
        assert_eq!(
            (u.max_batch_size, u.confirmations, u.target_cost_per_payment_wei, u.paused),
            (Some(7), Some(2), Some(12), None)
        );
        for bad in ["1.5", "-1", "wei"] {
            let req = v1::UpdatePolicyRequest {
                target_cost_per_payment_wei: Some(bad.into()),
                ..Default::default()
            };
            assert_eq!(policy_update(&req).unwrap_err().field, "target_cost_per_payment_wei", "{bad}");
        }
    }

    #[test]
    fn malformed_messages_are_classified() {
        let mut req = v1::SubmitRequest::default();
        let err = payment_input(&req).unwrap_err();
        assert!(err.is_malformed_request());
        assert_eq!(err.reason(), Reason::InvalidPayload);

        let mut bad = typed_authorization(&sample());
        bad.value = "12a".into();
        req.payment = Some(v1::submit_request::Payment::Authorization(bad));
        let err = payment_input(&req).unwrap_err();
        assert!(!err.is_malformed_request());
        assert!(err.to_string().contains("authorization.value"), "{err}");

        let err = requirements(&req).unwrap_err();
        assert!(err.is_malformed_request());
        assert_eq!(err.reason(), Reason::InvalidPaymentRequirements);
        req.requirements = Some(v1::PaymentRequirements { scheme: "exact".into(), ..Default::default() });
        let err = requirements(&req).unwrap_err();
        assert!(err.to_string().contains("requirements.network"), "{err}");
    }
}
