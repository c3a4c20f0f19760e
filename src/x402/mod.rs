//! The x402 protocol core: what a payment is, how it arrives, how it is hashed, and the
//! official reason codes every refusal carries.
//!
//! - [`decode`]: x402 v1 (`X-PAYMENT`) and v2 (`PAYMENT-SIGNATURE`) header payloads, and the
//!   field parsers (addresses, decimal uint256, hex) the gRPC conversion shares.
//! - [`eip712`]: the EIP-3009 typed-data digest, with the domain separator computed once per
//!   token.
//! - [`network`]: CAIP-2 ids and x402 v1 network names.

pub mod decode;
pub mod eip712;
pub mod network;

use alloy::primitives::{Address, B256, Bytes, U256};

/// The x402 "exact" scheme: pay exactly the required amount with an EIP-3009 authorization.
pub const SCHEME_EXACT: &str = "exact";

/// The official x402 reason codes (x402 specification §9) the daemon answers with.
///
/// The `@x402/evm` 2.27.0 SDK has since renamed a few EVM codes (for example
/// `invalid_exact_evm_signature`); the daemon keeps the specification's names, which the
/// other SDKs and facilitators use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The payer's balance does not cover this payment plus what is already pending.
    InsufficientFunds,
    /// The signature does not recover to `from` over the token's EIP-712 domain, or is
    /// malformed (high s, bad v).
    InvalidSignature,
    /// `validBefore` has passed, or is too close to settle safely.
    InvalidValidBefore,
    /// `validAfter` is still in the future.
    InvalidValidAfter,
    /// The authorized value differs from the required amount.
    ValueMismatch,
    /// The authorization pays someone other than the required `payTo`.
    RecipientMismatch,
    /// Unknown or mismatched network.
    InvalidNetwork,
    /// Unsupported scheme.
    InvalidScheme,
    /// The payload is malformed: encoding, JSON, missing fields, bad numbers or lengths.
    InvalidPayload,
    /// The API server's requirements are malformed or name an unconfigured asset.
    InvalidPaymentRequirements,
    /// Unsupported `x402Version`.
    InvalidX402Version,
    /// The `(from, nonce)` pair was already used by a different authorization.
    NonceAlreadyUsed,
    /// An internal failure while verifying; the payment was not recorded.
    UnexpectedVerifyError,
    /// An internal failure while settling.
    UnexpectedSettleError,
}

impl Reason {
    /// The wire code, exactly as the x402 specification spells it.
    pub const fn code(self) -> &'static str {
        match self {
            Reason::InsufficientFunds => "insufficient_funds",
            Reason::InvalidSignature => "invalid_exact_evm_payload_signature",
            Reason::InvalidValidBefore => "invalid_exact_evm_payload_authorization_valid_before",
            Reason::InvalidValidAfter => "invalid_exact_evm_payload_authorization_valid_after",
            Reason::ValueMismatch => "invalid_exact_evm_payload_authorization_value_mismatch",
            Reason::RecipientMismatch => "invalid_exact_evm_payload_recipient_mismatch",
            Reason::InvalidNetwork => "invalid_network",
            Reason::InvalidScheme => "invalid_scheme",
            Reason::InvalidPayload => "invalid_payload",
            Reason::InvalidPaymentRequirements => "invalid_payment_requirements",
            Reason::InvalidX402Version => "invalid_x402_version",
            Reason::NonceAlreadyUsed => "invalid_exact_evm_nonce_already_used",
            Reason::UnexpectedVerifyError => "unexpected_verify_error",
            Reason::UnexpectedSettleError => "unexpected_settle_error",
        }
    }

    /// Every reason, for tables and tests.
    pub const ALL: [Reason; 14] = [
        Reason::InsufficientFunds,
        Reason::InvalidSignature,
        Reason::InvalidValidBefore,
        Reason::InvalidValidAfter,
        Reason::ValueMismatch,
        Reason::RecipientMismatch,
        Reason::InvalidNetwork,
        Reason::InvalidScheme,
        Reason::InvalidPayload,
        Reason::InvalidPaymentRequirements,
        Reason::InvalidX402Version,
        Reason::NonceAlreadyUsed,
        Reason::UnexpectedVerifyError,
        Reason::UnexpectedSettleError,
    ];

    /// Parses a wire code.
    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.code() == code)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// The message an EIP-3009 `transferWithAuthorization` signs, as the token sees it.
///
/// The bounds are kept as `U256` because the signature covers their exact uint256 values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Authorization {
    pub from: Address,
    pub to: Address,
    pub value: U256,
    pub valid_after: U256,
    pub valid_before: U256,
    pub nonce: B256,
}

/// A payer's signature as given: 65 bytes `r ‖ s ‖ v` from a key (an EOA, or an EIP-7702
/// account), or any other length a smart-contract wallet's ERC-1271 check understands,
/// possibly wrapped for a wallet not yet deployed (ERC-6492). Only the length is bounded on
/// construction; [`crate::verify`] and [`crate::payer`] judge the content.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RawSignature(Bytes);

/// ERC-6492's magic suffix: a signature ending in it is `abi.encode(factory, factoryCalldata,
/// innerSignature)` followed by these 32 bytes.
pub const ERC6492_SUFFIX: [u8; 32] = [
    0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64,
    0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92,
];

/// An ERC-6492 wrapper, unwrapped: the call that deploys the wallet, and its own signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erc6492 {
    pub factory: Address,
    pub factory_calldata: Bytes,
    pub inner: Bytes,
}

impl RawSignature {
    /// The longest signature taken (an ERC-6492 wrapper of a passkey wallet's WebAuthn
    /// signature with its factory call is ~1.5 KB).
    pub const MAX_LEN: usize = 8192;

    /// `bytes` as a signature, if not empty and at most [`RawSignature::MAX_LEN`] long.
    pub fn new(bytes: impl Into<Bytes>) -> Option<RawSignature> {
        let bytes = bytes.into();
        (!bytes.is_empty() && bytes.len() <= Self::MAX_LEN).then_some(RawSignature(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// The 65 bytes of an ECDSA signature, if this has that length and is not an ERC-6492
    /// wrapper.
    pub fn ecdsa(&self) -> Option<&[u8; 65]> {
        self.0.as_ref().try_into().ok()
    }

    /// The ERC-6492 wrapper, if the signature ends in its suffix and decodes as one; `Err`
    /// if it ends in the suffix but does not decode.
    pub fn erc6492(&self) -> Option<Result<Erc6492, alloy::sol_types::Error>> {
        use alloy::sol_types::SolValue;
        let body = self.0.strip_suffix(&ERC6492_SUFFIX[..])?;
        Some(
            <(Address, Bytes, Bytes)>::abi_decode_params(body)
                .map(|(factory, factory_calldata, inner)| Erc6492 { factory, factory_calldata, inner }),
        )
    }

    /// The signature the token is given: a 6492 wrapper's inner one, else this.
    pub fn for_token(&self) -> Bytes {
        match self.erc6492() {
            Some(Ok(w)) => w.inner,
            _ => self.0.clone(),
        }
    }
}

impl From<[u8; 65]> for RawSignature {
    fn from(sig: [u8; 65]) -> Self {
        RawSignature(Bytes::copy_from_slice(&sig))
    }
}

impl std::fmt::Debug for RawSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawSignature({})", self.0)
    }
}

/// An authorization bound to its token, with the payer's signature: everything needed to
/// check it offline and to settle it on chain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SignedAuthorization {
    pub chain_id: u64,
    pub token: Address,
    pub authorization: Authorization,
    pub signature: RawSignature,
}

/// What an API server demands for one resource, as in its x402 `PaymentRequired`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRequirements {
    pub scheme: String,
    /// The network as the API server named it (CAIP-2 or v1 name), resolved by admission.
    pub network: String,
    pub asset: Address,
    pub pay_to: Address,
    pub amount: U256,
    /// `maxTimeoutSeconds`; `None` means the x402 default.
    pub max_timeout_seconds: Option<u64>,
}

/// The EIP-712 domain name and version a v2 client says it signed with (`accepted.extra`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainHint {
    pub name: Option<String>,
    pub version: Option<String>,
}

/// What the v2 payload says the client accepted: the requirements it chose to pay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedTerms {
    pub scheme: String,
    pub network: String,
    pub asset: Address,
    pub pay_to: Address,
    pub amount: U256,
    pub domain: DomainHint,
}

/// A decoded x402 payment header payload (v1 or v2), not yet checked against anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentPayload {
    pub x402_version: u8,
    pub scheme: String,
    /// The network the payload names: v1 `network`, v2 `accepted.network`.
    pub network: String,
    /// v2 only.
    pub accepted: Option<AcceptedTerms>,
    pub authorization: Authorization,
    pub signature: RawSignature,
    /// v2 `resource.url` (or a bare string), when given.
    pub resource: Option<String>,
}
