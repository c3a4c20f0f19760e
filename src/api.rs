//! The gRPC contract generated from `proto/x402/batcher/v1/batcher.proto`, and the
//! conversion of its messages into domain types.
//!
//! Conversion errors carry an x402 reason code like every other refusal, and say whether
//! the fault lies with the API server's message itself ([`ConvertError::is_malformed_request`]:
//! answered with INVALID_ARGUMENT) or with the payment it relays (a normal refusal).

use crate::admission::PaymentInput;
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
        signature: format!("0x{}", alloy::hex::encode(s.signature.0)),
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
            signature: RawSignature([0x55; 65]),
        }
    }

    #[test]
    fn typed_authorization_round_trips() {
        let s = sample();
        assert_eq!(signed_authorization(&typed_authorization(&s)).unwrap(), s);
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
