//! Fixture builders for tests, benchmarks and the demo: signed payments, their matching
//! requirements, and x402 headers built from them.
//!
//! ```
//! use alloy::signers::local::PrivateKeySigner;
//! use x402_batcher::tools::testkit::PaymentBuilder;
//! use x402_batcher::x402::eip712::TokenDomain;
//! use alloy::primitives::Address;
//!
//! let domain = TokenDomain::new("USD Coin", "2", 8453, Address::repeat_byte(1));
//! let payer = PrivateKeySigner::random();
//! let payment = PaymentBuilder::new(&payer, &domain, 1_800_000_000).value(10).expired().build();
//! assert_eq!(payment.authorization.from, payer.address());
//! ```

use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use base64::Engine as _;
use serde_json::json;

use crate::x402::eip712::TokenDomain;
use crate::x402::{Authorization, PaymentRequirements, RawSignature, SCHEME_EXACT, SignedAuthorization};

/// A payee used when a test does not care who is paid.
pub const DEFAULT_PAYEE: Address = Address::new([0xbe; 20]);

/// Builds one signed authorization. Defaults: pays [`DEFAULT_PAYEE`] 10,000 base units
/// (0.01 USDC), valid from 0 to `now + 300`, nonce from a counter-free hash of the payer
/// and `now`; change what the test is about.
#[derive(Clone)]
pub struct PaymentBuilder {
    signer: PrivateKeySigner,
    domain: TokenDomain,
    sign_domain: Option<TokenDomain>,
    sign_with: Option<PrivateKeySigner>,
    /// Turns the key's 65-byte signature into the one given (a contract wallet's form).
    wrap: Option<fn(&[u8]) -> alloy::primitives::Bytes>,
    now: u64,
    authorization: Authorization,
}

impl PaymentBuilder {
    pub fn new(signer: &PrivateKeySigner, domain: &TokenDomain, now: u64) -> Self {
        let nonce = keccak256([signer.address().as_slice(), &now.to_be_bytes()].concat());
        Self {
            signer: signer.clone(),
            domain: domain.clone(),
            sign_domain: None,
            sign_with: None,
            wrap: None,
            now,
            authorization: Authorization {
                from: signer.address(),
                to: DEFAULT_PAYEE,
                value: U256::from(10_000u64),
                valid_after: U256::ZERO,
                valid_before: U256::from(now + 300),
                nonce,
            },
        }
    }

    pub fn to(mut self, to: Address) -> Self {
        self.authorization.to = to;
        self
    }

    pub fn value(mut self, value: u64) -> Self {
        self.authorization.value = U256::from(value);
        self
    }

    pub fn nonce(mut self, nonce: B256) -> Self {
        self.authorization.nonce = nonce;
        self
    }

    /// A nonce derived from `i`, for many distinct payments from one payer.
    pub fn nonce_index(self, i: u64) -> Self {
        let from = self.authorization.from;
        self.nonce(keccak256([from.as_slice(), &i.to_be_bytes()].concat()))
    }

    pub fn valid_after(mut self, t: u64) -> Self {
        self.authorization.valid_after = U256::from(t);
        self
    }

    pub fn valid_before(mut self, t: u64) -> Self {
        self.authorization.valid_before = U256::from(t);
        self
    }

    /// Expired a minute ago.
    pub fn expired(self) -> Self {
        let t = self.now.saturating_sub(60);
        self.valid_before(t)
    }

    /// Not valid for another minute.
    pub fn not_yet_valid(self) -> Self {
        let t = self.now + 60;
        self.valid_after(t)
    }

    /// Signs over a different EIP-712 domain than the token's (wrong name, version, chain
    /// or contract).
    pub fn sign_domain(mut self, domain: TokenDomain) -> Self {
        self.sign_domain = Some(domain);
        self
    }

    /// Pays from `from` (a contract wallet, or an EIP-7702 account) while the builder's key
    /// signs. Set it before a derived nonce ([`PaymentBuilder::nonce_index`]).
    pub fn from(mut self, from: Address) -> Self {
        self.authorization.from = from;
        self
    }

    /// Gives the key's signature in the form `wrap` makes of it (a contract wallet's).
    pub fn wrap_signature(mut self, wrap: fn(&[u8]) -> alloy::primitives::Bytes) -> Self {
        self.wrap = Some(wrap);
        self
    }

    /// Signs with another key than the payer's.
    pub fn signed_by(mut self, signer: &PrivateKeySigner) -> Self {
        self.sign_with = Some(signer.clone());
        self
    }

    /// The authorization as built, unsigned.
    pub fn authorization(&self) -> &Authorization {
        &self.authorization
    }

    pub fn build(&self) -> SignedAuthorization {
        let domain = self.sign_domain.as_ref().unwrap_or(&self.domain);
        let signer = self.sign_with.as_ref().unwrap_or(&self.signer);
        let sig = signer
            .sign_hash_sync(&domain.signing_hash(&self.authorization))
            .expect("local signing of a 32-byte hash does not fail");
        let signature = match self.wrap {
            None => RawSignature::from(sig.as_bytes()),
            Some(wrap) => RawSignature::new(wrap(&sig.as_bytes())).expect("a wrapped signature is not empty"),
        };
        SignedAuthorization {
            chain_id: self.domain.chain_id,
            token: self.domain.verifying_contract,
            authorization: self.authorization.clone(),
            signature,
        }
    }

    /// Requirements this payment meets: its network, token, payee and amount.
    pub fn requirements(&self) -> PaymentRequirements {
        requirements_for(&self.build())
    }
}

/// Requirements that `signed` meets exactly.
pub fn requirements_for(signed: &SignedAuthorization) -> PaymentRequirements {
    PaymentRequirements {
        scheme: SCHEME_EXACT.into(),
        network: format!("eip155:{}", signed.chain_id),
        asset: signed.token,
        pay_to: signed.authorization.to,
        amount: signed.authorization.value,
        max_timeout_seconds: Some(300),
    }
}

fn payload_json(signed: &SignedAuthorization) -> serde_json::Value {
    let a = &signed.authorization;
    json!({
        "signature": signed.signature.bytes().to_string(),
        "authorization": {
            "from": a.from.to_checksum(None),
            "to": a.to.to_checksum(None),
            "value": a.value.to_string(),
            "validAfter": a.valid_after.to_string(),
            "validBefore": a.valid_before.to_string(),
            "nonce": a.nonce.to_string(),
        }
    })
}

/// An x402 v2 `PAYMENT-SIGNATURE` header value for `signed`, accepting `req`.
pub fn v2_header(signed: &SignedAuthorization, req: &PaymentRequirements, domain: &TokenDomain) -> String {
    base64::engine::general_purpose::STANDARD.encode(v2_payload(signed, req, domain).to_string())
}

/// The body of an HTTP facilitator `POST /verify` or `/settle` for `signed` (x402 v2), as
/// `@x402/express` sends it: the payload and the requirements it accepted.
pub fn facilitator_body(
    signed: &SignedAuthorization,
    req: &PaymentRequirements,
    domain: &TokenDomain,
) -> String {
    let payload = v2_payload(signed, req, domain);
    json!({ "x402Version": 2, "paymentRequirements": payload["accepted"].clone(), "paymentPayload": payload })
        .to_string()
}

/// The v2 payment payload (a `PAYMENT-SIGNATURE` header before base64).
fn v2_payload(
    signed: &SignedAuthorization,
    req: &PaymentRequirements,
    domain: &TokenDomain,
) -> serde_json::Value {
    json!({
        "x402Version": 2,
        "resource": { "url": "https://api.example/paid", "description": "", "mimeType": "application/json" },
        "accepted": {
            "scheme": req.scheme,
            "network": req.network,
            "amount": req.amount.to_string(),
            "asset": req.asset.to_checksum(None),
            "payTo": req.pay_to.to_checksum(None),
            "maxTimeoutSeconds": req.max_timeout_seconds.unwrap_or(300),
            "extra": { "name": domain.name, "version": domain.version },
        },
        "payload": payload_json(signed),
    })
}

/// An x402 v1 `X-PAYMENT` header value for `signed` on the v1 network `network`.
pub fn v1_header(signed: &SignedAuthorization, network: &str) -> String {
    let body = json!({
        "x402Version": 1,
        "scheme": SCHEME_EXACT,
        "network": network,
        "payload": payload_json(signed),
    });
    base64::engine::general_purpose::STANDARD.encode(body.to_string())
}
