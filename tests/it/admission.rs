//! Admission refuses each kind of bad payment with its official reason code, before any
//! signature work, and changes nothing.

use crate::common;

use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use x402_batcher::admission::{AdmissionError, PaymentInput};
use x402_batcher::clock::ManualClock;
use x402_batcher::config::TokenConfig;
use x402_batcher::tools::testkit::{self, PaymentBuilder};
use x402_batcher::x402::decode::decode_header;
use x402_batcher::x402::eip712::TokenDomain;
use x402_batcher::x402::{PaymentRequirements, Reason};

const NOW: u64 = 1_800_000_000;

fn token() -> TokenConfig {
    TokenConfig {
        chain_id: 8453,
        address: Address::repeat_byte(0x0c),
        eip712_name: "USD Coin".into(),
        eip712_version: "2".into(),
        decimals: 6,
        symbol: "USDC".into(),
        contract_signatures: true,
    }
}

fn domain() -> TokenDomain {
    let t = token();
    TokenDomain::new(&t.eip712_name, &t.eip712_version, t.chain_id, t.address)
}

fn refusal(builder: &PaymentBuilder, req: &PaymentRequirements) -> Result<(), (Reason, String)> {
    // The same token also configured on Base Sepolia, so that requirements for that chain
    // are valid and only the payment's chain differs.
    let sepolia = TokenConfig { chain_id: 84532, ..token() };
    let admission = common::admission(&[token(), sepolia], ManualClock::new(NOW));
    admission
        .admit(PaymentInput::Typed(builder.build()), req)
        .map(|_| ())
        .map_err(|e| (e.reason(), e.to_string()))
}

#[test]
fn each_static_defect_has_its_code() {
    let payer = PrivateKeySigner::random();
    let good = PaymentBuilder::new(&payer, &domain(), NOW);
    assert_eq!(refusal(&good, &good.requirements()), Ok(()));

    let with = |f: &dyn Fn(&mut PaymentRequirements)| {
        let mut r = good.requirements();
        f(&mut r);
        r
    };
    let cases: Vec<(&str, PaymentBuilder, PaymentRequirements, Reason, &str)> = vec![
        ("scheme", good.clone(), with(&|r| r.scheme = "upto".into()), Reason::InvalidScheme, "upto"),
        (
            "unknown network",
            good.clone(),
            with(&|r| r.network = "solana:mainnet".into()),
            Reason::InvalidNetwork,
            "solana",
        ),
        (
            "malformed caip-2",
            good.clone(),
            with(&|r| r.network = "eip155:x".into()),
            Reason::InvalidNetwork,
            "eip155:x",
        ),
        (
            "other chain",
            good.clone(),
            with(&|r| r.network = "base-sepolia".into()),
            Reason::InvalidNetwork,
            "84532",
        ),
        (
            "unknown asset",
            good.clone(),
            with(&|r| r.asset = Address::repeat_byte(9)),
            Reason::InvalidPaymentRequirements,
            "not a configured token",
        ),
        (
            "recipient",
            good.clone(),
            with(&|r| r.pay_to = Address::repeat_byte(7)),
            Reason::RecipientMismatch,
            "payTo",
        ),
        ("amount", good.clone(), with(&|r| r.amount = U256::from(1)), Reason::ValueMismatch, "differs"),
        (
            "zero amount",
            good.clone().value(0),
            with(&|r| r.amount = U256::ZERO),
            Reason::InvalidPaymentRequirements,
            "positive",
        ),
        (
            "expired",
            good.clone().expired(),
            good.clone().expired().requirements(),
            Reason::InvalidValidBefore,
            "expired",
        ),
        (
            "expires now",
            good.clone().valid_before(NOW),
            good.requirements(),
            Reason::InvalidValidBefore,
            "expired",
        ),
        (
            "expires soon",
            good.clone().valid_before(NOW + 10),
            good.requirements(),
            Reason::InvalidValidBefore,
            "too soon",
        ),
        (
            "not yet valid",
            good.clone().not_yet_valid(),
            good.requirements(),
            Reason::InvalidValidAfter,
            "not valid until",
        ),
    ];
    for (name, builder, req, reason, needle) in cases {
        let (got, message) = refusal(&builder, &req).expect_err(name);
        assert_eq!(got, reason, "{name}: {message}");
        assert!(message.contains(needle), "{name}: {message:?} should mention {needle:?}");
    }
}

#[test]
fn header_payloads_are_held_to_their_accepted_terms() {
    let payer = PrivateKeySigner::random();
    let builder = PaymentBuilder::new(&payer, &domain(), NOW);
    let signed = builder.build();
    let req = builder.requirements();
    let admission = common::admission(&[token()], ManualClock::new(NOW));
    let admit = |header: String, req: &PaymentRequirements| {
        admission.admit(PaymentInput::Header(decode_header(&header).unwrap()), req)
    };

    assert!(admit(testkit::v2_header(&signed, &req, &domain()), &req).is_ok());

    // The client accepted other terms than the server now asks for.
    let mut other = req.clone();
    other.amount += U256::from(1);
    let err = admit(testkit::v2_header(&signed, &other, &domain()), &req).unwrap_err();
    assert!(matches!(err, AdmissionError::AcceptedMismatch { field: "amount", .. }));
    assert_eq!(err.reason(), Reason::ValueMismatch);

    // The client says it signed over another domain name: its signature cannot verify.
    let wrong = TokenDomain::new("USDC", "2", 8453, token().address);
    let err = admit(testkit::v2_header(&signed, &req, &wrong), &req).unwrap_err();
    assert_eq!(err.reason(), Reason::InvalidSignature);

    // v1 payloads name their network; it must be the required one.
    let v1 = testkit::v1_header(&signed, "base");
    let mut v1_req = req.clone();
    v1_req.network = "base".into();
    assert!(admit(v1.clone(), &v1_req).is_ok());
    let err = admit(testkit::v1_header(&signed, "polygon"), &v1_req).unwrap_err();
    assert_eq!(err.reason(), Reason::InvalidNetwork);
    let err = admit(testkit::v1_header(&signed, "dogechain"), &v1_req).unwrap_err();
    assert_eq!(err.reason(), Reason::InvalidNetwork);
}

#[test]
fn the_clock_decides_expiry() {
    let payer = PrivateKeySigner::random();
    let builder = PaymentBuilder::new(&payer, &domain(), NOW);
    let clock = ManualClock::new(NOW);
    let admission = common::admission(&[token()], clock.clone());
    let admit = || admission.admit(PaymentInput::Typed(builder.build()), &builder.requirements());
    assert!(admit().is_ok());
    // 300 s of validity; 30 s must remain.
    clock.advance(270);
    assert!(admit().is_ok());
    clock.advance(1);
    assert_eq!(admit().unwrap_err().reason(), Reason::InvalidValidBefore);
}
