//! No input makes the decoders panic, and every refusal carries an official reason code:
//! x402 headers, their payload JSON, gRPC messages, and the HTTP facilitator's bodies.

use base64::Engine as _;
use proptest::prelude::*;
use serde_json::{Value, json};
use x402_batcher::api::{self, v1};
use x402_batcher::facilitator::wire;
use x402_batcher::x402::Reason;
use x402_batcher::x402::decode::{decode_header, decode_json};

/// Arbitrary JSON, biased towards the shapes and key names a payment payload has, so the
/// decoder is driven deep into its field checks and not only refused at the top.
fn arb_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("x402Version".to_owned()),
        Just("scheme".to_owned()),
        Just("network".to_owned()),
        Just("payload".to_owned()),
        Just("accepted".to_owned()),
        Just("authorization".to_owned()),
        Just("signature".to_owned()),
        Just("from".to_owned()),
        Just("to".to_owned()),
        Just("value".to_owned()),
        Just("validAfter".to_owned()),
        Just("validBefore".to_owned()),
        Just("nonce".to_owned()),
        Just("extra".to_owned()),
        Just("resource".to_owned()),
        "[a-zA-Z]{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(1)),
        Just(json!(2)),
        Just(json!("exact")),
        "0x[0-9a-fA-F]{0,140}".prop_map(Value::String),
        "[0-9]{0,90}".prop_map(Value::String),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn assert_official(reason: Reason) {
    assert!(Reason::from_code(reason.code()) == Some(reason));
}

const VALID_V2: &str = r#"{"x402Version":2,"accepted":{"scheme":"exact","network":"eip155:8453","amount":"1000","asset":"0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913","payTo":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","maxTimeoutSeconds":300,"extra":{"name":"USD Coin","version":"2"}},"payload":{"signature":"0x2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce6496642e377d6da8dbbf5836e9bd15092f9ecab05ded3d6293af148b571c","authorization":{"from":"0x857b06519E91e3A54538791bDbb0E22373e36b66","to":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","value":"1000","validAfter":"0","validBefore":"1740672154","nonce":"0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"}}}"#;

/// Every path to a leaf of a JSON value, as pointer strings.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    if let Value::Object(m) = v {
        for (k, child) in m {
            pointers(child, format!("{at}/{k}"), out);
        }
    }
}

/// A facilitator body (`POST /verify`, `/settle`) around the valid payload, with a
/// payment-identifier, as `@x402/express` sends it.
fn valid_body() -> Value {
    let mut payload: Value = serde_json::from_str(VALID_V2).unwrap();
    payload["extensions"] =
        json!({ "payment-identifier": { "info": { "required": false, "id": "pay_0123456789abcdef" } } });
    json!({ "x402Version": 2, "paymentRequirements": payload["accepted"].clone(), "paymentPayload": payload })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_facilitator_bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        if let Err(e) = wire::request(&bytes) { assert_official(e.reason()); }
    }

    /// A valid facilitator body with one field (of the payload, the requirements or the
    /// extensions) replaced by arbitrary JSON is decoded or refused with an official
    /// reason; never a panic.
    #[test]
    fn one_facilitator_field_replaced_never_panics(pick in any::<prop::sample::Index>(), replacement in arb_json()) {
        let mut value = valid_body();
        let mut paths = Vec::new();
        pointers(&value, String::new(), &mut paths);
        let path = pick.get(&paths[1..]).clone();
        *value.pointer_mut(&path).unwrap() = replacement;
        if let Err(e) = wire::request(value.to_string().as_bytes()) { assert_official(e.reason()); }
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        if let Err(e) = decode_json(&bytes) { assert_official(e.reason()); }
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = decode_header(&text) { assert_official(e.reason()); }
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        if let Err(e) = decode_header(&b64) { assert_official(e.reason()); }
    }

    #[test]
    fn random_json_never_panics(value in arb_json()) {
        let text = value.to_string();
        if let Err(e) = decode_json(text.as_bytes()) { assert_official(e.reason()); }
    }

    /// A valid payload with one field replaced by arbitrary JSON is decoded or refused with
    /// `invalid_payload`/`invalid_scheme`/`invalid_x402_version`; never a panic.
    #[test]
    fn one_field_replaced_never_panics(pick in any::<prop::sample::Index>(), replacement in arb_json()) {
        let mut value: Value = serde_json::from_str(VALID_V2).unwrap();
        let mut paths = Vec::new();
        pointers(&value, String::new(), &mut paths);
        let path = pick.get(&paths[1..]).clone();
        *value.pointer_mut(&path).unwrap() = replacement;
        if let Err(e) = decode_json(value.to_string().as_bytes()) {
            prop_assert!(matches!(e.reason(), Reason::InvalidPayload | Reason::InvalidScheme | Reason::InvalidX402Version), "{e}");
        }
    }

    #[test]
    fn random_proto_fields_never_panic(
        chain_id in any::<u64>(),
        fields in prop::collection::vec(prop_oneof![".{0,80}", "0x[0-9a-f]{0,140}", "[0-9]{0,90}"], 8),
    ) {
        let a = v1::TypedAuthorization {
            chain_id,
            token: fields[0].clone(),
            from: fields[1].clone(),
            to: fields[2].clone(),
            value: fields[3].clone(),
            valid_after: fields[4].clone(),
            valid_before: fields[5].clone(),
            nonce: fields[6].clone(),
            signature: fields[7].clone(),
        };
        if let Err(e) = api::signed_authorization(&a) { prop_assert_eq!(e.reason(), Reason::InvalidPayload); }
        let r = v1::PaymentRequirements {
            scheme: fields[0].clone(),
            network: fields[1].clone(),
            asset: fields[2].clone(),
            pay_to: fields[3].clone(),
            amount: fields[4].clone(),
            max_timeout_seconds: chain_id,
        };
        if let Err(e) = api::payment_requirements(&r) { assert_official(e.reason()); }
    }
}

#[test]
fn the_valid_facilitator_body_decodes() {
    let req = wire::request(valid_body().to_string().as_bytes()).unwrap();
    assert_eq!(req.payment_identifier.as_deref(), Some("pay_0123456789abcdef"));
    assert_eq!(req.requirements.network, "eip155:8453");
}

#[test]
fn the_valid_sample_decodes() {
    let p = decode_json(VALID_V2.as_bytes()).unwrap();
    assert_eq!(p.x402_version, 2);
    assert_eq!(p.accepted.unwrap().domain.name.as_deref(), Some("USD Coin"));
}
