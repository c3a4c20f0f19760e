//! Admission: the cheap, static checks that run before any signature work.
//!
//! They compare a payment with the API server's requirements and the token table, and its
//! validity window with a [`Clock`]. Each refusal is a typed [`AdmissionError`] carrying the
//! official x402 reason code. Nothing here touches the chain or the disk.

use std::collections::BTreeMap;
use std::sync::Arc;

use alloy::primitives::{Address, B256, U256};

use crate::clock::Clock;
use crate::config::{AdmissionConfig, TokenTable};
use crate::x402::network::{self, NetworkError};
use crate::x402::{
    Authorization, PaymentPayload, PaymentRequirements, Reason, SCHEME_EXACT, SignedAuthorization,
};

/// A payment as it arrives: already typed by the API server, or the raw decoded header.
#[derive(Debug, Clone)]
pub enum PaymentInput {
    Typed(SignedAuthorization),
    Header(PaymentPayload),
}

/// A payment that passed admission: bound to a configured token, ready for its signature check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub signed: SignedAuthorization,
    /// The token's EIP-712 domain separator, so the verifier needs no table lookup.
    pub domain_separator: B256,
    /// Whether the token judges payers with code by ERC-1271
    /// ([`crate::config::TokenConfig::contract_signatures`]).
    pub contract_signatures: bool,
}

/// Why admission refused a payment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("scheme {found:?} is not supported; only \"exact\" is")]
    Scheme { found: String },
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("payment is for chain {paid}, requirements ask for chain {required}")]
    NetworkMismatch { required: u64, paid: u64 },
    #[error("asset {asset} on chain {chain_id} is not a configured token")]
    UnknownAsset { chain_id: u64, asset: Address },
    #[error("payment is in token {paid}, requirements ask for {required}")]
    AssetMismatch { required: Address, paid: Address },
    #[error("payment accepted {field} {accepted}, requirements say {required}")]
    AcceptedMismatch { field: &'static str, required: String, accepted: String },
    #[error("signed for EIP-712 domain {field} {signed:?}; the token's is {token:?}")]
    DomainMismatch { field: &'static str, signed: String, token: String },
    #[error("authorization pays {paid}, requirements ask for payTo {required}")]
    RecipientMismatch { required: Address, paid: Address },
    #[error("authorization value {paid} differs from the required amount {required}")]
    ValueMismatch { required: U256, paid: U256 },
    #[error("required amount must be positive")]
    ZeroAmount,
    #[error("required amount {amount} exceeds the configured maximum {max}")]
    AmountOverCap { amount: U256, max: U256 },
    #[error("authorization is not valid until {valid_after} (now {now})")]
    NotYetValid { valid_after: U256, now: u64 },
    #[error("authorization expired at {valid_before} (now {now})")]
    Expired { valid_before: U256, now: u64 },
    #[error(
        "authorization expires at {valid_before}, less than {min_remaining} s from now ({now}): too soon to settle"
    )]
    ExpiresTooSoon { valid_before: U256, now: u64, min_remaining: u64 },
}

impl AdmissionError {
    pub fn reason(&self) -> Reason {
        match self {
            AdmissionError::Scheme { .. } => Reason::InvalidScheme,
            AdmissionError::Network(_) | AdmissionError::NetworkMismatch { .. } => Reason::InvalidNetwork,
            // The requirements name something this daemon cannot take or will not take.
            AdmissionError::UnknownAsset { .. }
            | AdmissionError::ZeroAmount
            | AdmissionError::AmountOverCap { .. } => Reason::InvalidPaymentRequirements,
            // The payment is for another token than the one asked for.
            AdmissionError::AssetMismatch { .. } => Reason::InvalidPayload,
            AdmissionError::AcceptedMismatch { field, .. } => match *field {
                "payTo" => Reason::RecipientMismatch,
                "amount" => Reason::ValueMismatch,
                _ => Reason::InvalidPayload,
            },
            // A signature over another domain can never verify against this token.
            AdmissionError::DomainMismatch { .. } => Reason::InvalidSignature,
            AdmissionError::RecipientMismatch { .. } => Reason::RecipientMismatch,
            AdmissionError::ValueMismatch { .. } => Reason::ValueMismatch,
            AdmissionError::NotYetValid { .. } => Reason::InvalidValidAfter,
            AdmissionError::Expired { .. } | AdmissionError::ExpiresTooSoon { .. } => {
                Reason::InvalidValidBefore
            }
        }
    }
}

/// The admission checks with everything they need.
#[derive(Debug, Clone)]
pub struct Admission {
    tokens: TokenTable,
    aliases: BTreeMap<String, u64>,
    config: AdmissionConfig,
    clock: Arc<dyn Clock>,
}

impl Admission {
    pub fn new(
        tokens: TokenTable,
        aliases: BTreeMap<String, u64>,
        config: AdmissionConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self { tokens, aliases, config, clock }
    }

    pub fn tokens(&self) -> &TokenTable {
        &self.tokens
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Every check: [`Admission::admit_static`], then [`Admission::check_window`].
    pub fn admit(&self, input: PaymentInput, req: &PaymentRequirements) -> Result<Admitted, AdmissionError> {
        let admitted = self.admit_static(input, req)?;
        self.check_window(&admitted.signed.authorization)?;
        Ok(admitted)
    }

    /// The checks that do not depend on time; the first failure is the answer. The
    /// requirements are judged on their own first (a misconfigured API server is the root
    /// cause whatever the payment), then the payment against them.
    pub fn admit_static(
        &self,
        input: PaymentInput,
        req: &PaymentRequirements,
    ) -> Result<Admitted, AdmissionError> {
        if req.scheme != SCHEME_EXACT {
            return Err(AdmissionError::Scheme { found: req.scheme.clone() });
        }
        let required_chain = network::resolve(&req.network, &self.aliases)?;
        let token = self
            .tokens
            .get(required_chain, req.asset)
            .ok_or(AdmissionError::UnknownAsset { chain_id: required_chain, asset: req.asset })?;
        if req.amount.is_zero() {
            return Err(AdmissionError::ZeroAmount);
        }
        if let Some(max) = self.config.max_value
            && req.amount > max
        {
            return Err(AdmissionError::AmountOverCap { amount: req.amount, max });
        }

        let (signed, accepted) = match input {
            PaymentInput::Typed(signed) => (signed, None),
            PaymentInput::Header(payload) => {
                let chain_id = network::resolve(&payload.network, &self.aliases)?;
                // A v1 payload does not name its token: it pays in the required asset.
                let signed = SignedAuthorization {
                    chain_id,
                    token: req.asset,
                    authorization: payload.authorization,
                    signature: payload.signature,
                };
                (signed, payload.accepted)
            }
        };

        if signed.chain_id != required_chain {
            return Err(AdmissionError::NetworkMismatch { required: required_chain, paid: signed.chain_id });
        }
        if let Some(accepted) = &accepted {
            check_accepted("asset", req.asset, accepted.asset)?;
            check_accepted("payTo", req.pay_to, accepted.pay_to)?;
            check_accepted("amount", req.amount, accepted.amount)?;
        }
        if signed.token != req.asset {
            return Err(AdmissionError::AssetMismatch { required: req.asset, paid: signed.token });
        }
        if let Some(hint) = accepted.map(|a| a.domain) {
            for (field, signed_as, ours) in
                [("name", hint.name, &token.domain.name), ("version", hint.version, &token.domain.version)]
            {
                if let Some(signed_as) = signed_as
                    && &signed_as != ours
                {
                    return Err(AdmissionError::DomainMismatch {
                        field,
                        signed: signed_as,
                        token: ours.clone(),
                    });
                }
            }
        }

        let auth = &signed.authorization;
        if auth.to != req.pay_to {
            return Err(AdmissionError::RecipientMismatch { required: req.pay_to, paid: auth.to });
        }
        if auth.value != req.amount {
            return Err(AdmissionError::ValueMismatch { required: req.amount, paid: auth.value });
        }

        Ok(Admitted {
            domain_separator: token.domain.separator(),
            contract_signatures: token.contract_signatures,
            signed,
        })
    }

    /// The validity window against the clock: valid already, and for long enough to settle.
    pub fn check_window(&self, auth: &Authorization) -> Result<(), AdmissionError> {
        let now = self.clock.now_unix();
        if auth.valid_after > U256::from(now) {
            return Err(AdmissionError::NotYetValid { valid_after: auth.valid_after, now });
        }
        // On chain the token needs `block.timestamp < validBefore`.
        if auth.valid_before <= U256::from(now) {
            return Err(AdmissionError::Expired { valid_before: auth.valid_before, now });
        }
        let min_remaining = self.config.min_validity_remaining_secs;
        if auth.valid_before < U256::from(now.saturating_add(min_remaining)) {
            return Err(AdmissionError::ExpiresTooSoon {
                valid_before: auth.valid_before,
                now,
                min_remaining,
            });
        }

        Ok(())
    }
}

fn check_accepted<T: PartialEq + std::fmt::Display>(
    field: &'static str,
    required: T,
    accepted: T,
) -> Result<(), AdmissionError> {
    if required == accepted {
        Ok(())
    } else {
        Err(AdmissionError::AcceptedMismatch {
            field,
            required: required.to_string(),
            accepted: accepted.to_string(),
        })
    }
}
