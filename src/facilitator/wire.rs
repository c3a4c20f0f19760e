//! The facilitator protocol's JSON, as the x402 middlewares send and read it: request
//! bodies (`{x402Version, paymentPayload, paymentRequirements}`, v1 and v2) turned into a
//! [`FacilitatorRequest`], and the replies of `/verify`, `/settle` and `/supported`.
//!
//! Like the header decoder, fields are read one by one so that every refusal names the
//! field and what is wrong with it, with the x402 reason code it maps to.

use alloy::primitives::Address;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::x402::decode::{self, DecodeError};
use crate::x402::{PaymentPayload, PaymentRequirements, Reason};

/// The x402 `payment-identifier` extension's key in a v2 payload's `extensions`.
pub const PAYMENT_IDENTIFIER: &str = "payment-identifier";

/// A body of `POST /verify` or `POST /settle`, decoded.
#[derive(Debug, Clone)]
pub struct FacilitatorRequest {
    /// 1 or 2.
    pub x402_version: u8,
    pub payment: PaymentPayload,
    pub requirements: PaymentRequirements,
    /// The resource the payment is for: v2 `paymentPayload.resource.url`, v1
    /// `paymentRequirements.resource`.
    pub resource: String,
    /// The client's `payment-identifier` (v2 extension), if it sent one.
    pub payment_identifier: Option<String>,
}

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not JSON, or not an object: not an x402 facilitator request at all.
    #[error("the body is not a JSON object: {0}")]
    Body(String),
    #[error("paymentPayload: {0}")]
    Payload(#[source] DecodeError),
    #[error("paymentRequirements.{field} {problem}")]
    Requirements { field: &'static str, problem: String },
    #[error("x402Version {outer} differs from paymentPayload.x402Version {inner}")]
    VersionMismatch { outer: String, inner: u8 },
    #[error(
        "paymentPayload.extensions.payment-identifier.info.id must be 16 to 128 letters, digits, '-' or '_'"
    )]
    PaymentIdentifier,
}

impl WireError {
    /// The x402 reason code of the refusal.
    pub fn reason(&self) -> Reason {
        match self {
            WireError::Body(_) | WireError::PaymentIdentifier => Reason::InvalidPayload,
            WireError::Payload(e) => e.reason(),
            WireError::Requirements { .. } => Reason::InvalidPaymentRequirements,
            WireError::VersionMismatch { .. } => Reason::InvalidX402Version,
        }
    }

    /// Whether the request itself is malformed (answered 400), rather than a payment the
    /// protocol refuses (answered 200 with the reason, as facilitators do).
    pub fn is_malformed_request(&self) -> bool {
        matches!(self, WireError::Body(_))
    }
}

/// Decodes a request body.
pub fn request(body: &[u8]) -> Result<FacilitatorRequest, WireError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| WireError::Body(e.to_string()))?;
    let root = value.as_object().ok_or_else(|| WireError::Body("not an object".into()))?;
    let (payload_value, payload) = root
        .get("paymentPayload")
        .and_then(|v| Some((v, v.as_object()?)))
        .ok_or_else(|| WireError::Body("paymentPayload (an object) is missing".into()))?;
    let requirements = root
        .get("paymentRequirements")
        .and_then(Value::as_object)
        .ok_or_else(|| WireError::Body("paymentRequirements (an object) is missing".into()))?;
    let payment = decode::decode_value(payload_value).map_err(WireError::Payload)?;
    if let Some(outer) = root.get("x402Version")
        && outer.as_u64() != Some(u64::from(payment.x402_version))
    {
        return Err(WireError::VersionMismatch { outer: outer.to_string(), inner: payment.x402_version });
    }
    let (requirements, v1_resource) = payment_requirements(requirements, payment.x402_version)?;
    let resource = payment.resource.clone().or(v1_resource).unwrap_or_default();
    Ok(FacilitatorRequest {
        x402_version: payment.x402_version,
        payment_identifier: payment_identifier(payload)?,
        payment,
        requirements,
        resource,
    })
}

fn requirement_err(field: &'static str, e: DecodeError) -> WireError {
    let problem = match e {
        DecodeError::Field { problem, .. } => problem.to_string(),
        other => other.to_string(),
    };
    WireError::Requirements { field, problem }
}

/// `paymentRequirements`: v2 names the amount `amount`, v1 `maxAmountRequired` (the exact
/// scheme pays exactly that). Also returns v1's `resource`.
fn payment_requirements(
    r: &Map<String, Value>,
    version: u8,
) -> Result<(PaymentRequirements, Option<String>), WireError> {
    let text =
        |field: &'static str| decode::str_field(r, field, field).map_err(|e| requirement_err(field, e));
    let amount_field = if version == 1 { "maxAmountRequired" } else { "amount" };
    let amount = decode::parse_u256(amount_field, text(amount_field)?)
        .map_err(|e| requirement_err(amount_field, e))?;
    let max_timeout_seconds = match r.get("maxTimeoutSeconds") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or(WireError::Requirements {
            field: "maxTimeoutSeconds",
            problem: "must be a whole number of seconds".into(),
        })?),
    };
    let requirements = PaymentRequirements {
        scheme: text("scheme")?.to_owned(),
        network: text("network")?.to_owned(),
        asset: decode::parse_address("asset", text("asset")?).map_err(|e| requirement_err("asset", e))?,
        pay_to: decode::parse_address("payTo", text("payTo")?).map_err(|e| requirement_err("payTo", e))?,
        amount,
        max_timeout_seconds: max_timeout_seconds.filter(|s| *s > 0),
    };
    let resource =
        decode::opt_str_field(r, "resource", "resource").map_err(|e| requirement_err("resource", e))?;
    Ok((requirements, resource))
}

/// The v2 `payment-identifier` id: `extensions["payment-identifier"].info.id`. An extension
/// without an id is no identifier; a malformed id is refused (a retry the client means to
/// be idempotent would otherwise be judged a replay).
fn payment_identifier(payload: &Map<String, Value>) -> Result<Option<String>, WireError> {
    let id = payload
        .get("extensions")
        .and_then(|e| e.get(PAYMENT_IDENTIFIER))
        .and_then(|e| e.get("info"))
        .and_then(|i| i.get("id"));
    match id {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) if valid_payment_identifier(id) => Ok(Some(id.clone())),
        Some(_) => Err(WireError::PaymentIdentifier),
    }
}

/// The extension's own rule: 16 to 128 of `[A-Za-z0-9_-]`.
pub fn valid_payment_identifier(id: &str) -> bool {
    (16..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The reply to `POST /verify`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReply {
    pub is_valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid_message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
}

impl VerifyReply {
    pub fn valid(payer: Address) -> VerifyReply {
        VerifyReply {
            is_valid: true,
            invalid_reason: None,
            invalid_message: None,
            payer: Some(payer.to_checksum(None)),
        }
    }

    pub fn invalid(reason: &str, message: String, payer: Option<Address>) -> VerifyReply {
        VerifyReply {
            is_valid: false,
            invalid_reason: Some(reason.to_owned()),
            invalid_message: Some(message),
            payer: payer.map(|p| p.to_checksum(None)),
        }
    }
}

/// The reply to `POST /settle`. `transaction` and `network` are always present (the v2
/// client refuses a reply without them).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SettleReply {
    pub success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    pub transaction: String,
    pub network: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Value>,
}

impl SettleReply {
    pub fn failed(reason: &str, message: String, network: String, payer: Option<Address>) -> SettleReply {
        SettleReply {
            success: false,
            error_reason: Some(reason.to_owned()),
            error_message: Some(message),
            payer: payer.map(|p| p.to_checksum(None)),
            transaction: String::new(),
            network,
            amount: None,
            extensions: None,
        }
    }
}

/// One kind of payment the facilitator takes, in `GET /supported`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SupportedKind {
    pub x402_version: u8,
    pub scheme: &'static str,
    pub network: String,
    pub extra: Value,
}

/// The reply to `GET /supported`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SupportedReply {
    pub kinds: Vec<SupportedKind>,
    pub extensions: Vec<&'static str>,
    /// Settler addresses by CAIP-2 family, as the reference facilitator lists them.
    pub signers: std::collections::BTreeMap<String, Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::U256;

    fn v2_body(extensions: &str) -> String {
        format!(
            r#"{{"x402Version":2,"paymentPayload":{{"x402Version":2,"payload":{{"authorization":{{"from":"0xbF53b76a66b566bA6f9ABB4090f9C1f305b79f1c","to":"0x534e3bcb27673292EB2b58fdeD126624F7d67f21","value":"1000","validAfter":"0","validBefore":"1795794267","nonce":"0x6e74878555369cde511944bd7e6438ea0ffd238ac41112052232ff0fc6955fef"}},"signature":"0x7b0f8ea35a47e9ab72874dfad00a28479e05293389dcdc00889d2f1d907148f8195f57fdcaeddb26934d9cb727a5185f3340aa42c605f1c45ab3ae1518cd53ff1c"}},"resource":{{"url":"http://127.0.0.1:42549/v2/paid","description":"d","mimeType":"application/json"}},"accepted":{{"scheme":"exact","network":"eip155:84532","amount":"1000","asset":"0x5FbDB2315678afecb367f032d93F642f64180aa3","payTo":"0x534e3bcb27673292EB2b58fdeD126624F7d67f21","maxTimeoutSeconds":300,"extra":{{"name":"USD Coin","version":"2"}}}}{extensions}}},"paymentRequirements":{{"scheme":"exact","network":"eip155:84532","amount":"1000","asset":"0x5FbDB2315678afecb367f032d93F642f64180aa3","payTo":"0x534e3bcb27673292EB2b58fdeD126624F7d67f21","maxTimeoutSeconds":300,"extra":{{"name":"USD Coin","version":"2"}}}}}}"#
        )
    }

    /// The v1 exchange captured from x402-express 1.2.0 (shared/facilitator-exchanges.json).
    const V1: &str = r#"{"x402Version":1,"paymentPayload":{"x402Version":1,"scheme":"exact","network":"base-sepolia","payload":{"signature":"0x594f1284551e1a8f69ae60f6fe89739e5ba95ab9fcdc68549533acc865a914455caf6ca9e8db68488bf15ad19da8fa2cee0ab9553968463a07ee6d6ea7328bdd1c","authorization":{"from":"0x8C15255B7a2d416aC181C2f3Ee1d09D6F800408D","to":"0x534e3bcb27673292EB2b58fdeD126624F7d67f21","value":"1000","validAfter":"1795793367","validBefore":"1795794027","nonce":"0x5062fafade77eceec5137eb16292022d4d9a5260f556ee5e0c5490a29047bad2"}}},"paymentRequirements":{"scheme":"exact","network":"base-sepolia","maxAmountRequired":"1000","resource":"http://127.0.0.1:42549/v1/paid","description":"a paid route (v1)","mimeType":"application/json","payTo":"0x534e3bcb27673292EB2b58fdeD126624F7d67f21","maxTimeoutSeconds":60,"asset":"0x5FbDB2315678afecb367f032d93F642f64180aa3","outputSchema":{"input":{"type":"http","method":"GET","discoverable":true}},"extra":{"name":"USD Coin","version":"2"}}}"#;

    #[test]
    fn decodes_the_captured_v1_and_v2_bodies() {
        let v1 = request(V1.as_bytes()).unwrap();
        assert_eq!((v1.x402_version, v1.requirements.network.as_str()), (1, "base-sepolia"));
        assert_eq!(v1.requirements.amount, U256::from(1000));
        assert_eq!(v1.requirements.max_timeout_seconds, Some(60));
        assert_eq!(v1.resource, "http://127.0.0.1:42549/v1/paid");
        assert_eq!(v1.payment_identifier, None);

        let v2 = request(v2_body("").as_bytes()).unwrap();
        assert_eq!((v2.x402_version, v2.requirements.network.as_str()), (2, "eip155:84532"));
        assert_eq!(v2.resource, "http://127.0.0.1:42549/v2/paid");
        let id = r#","extensions":{"payment-identifier":{"info":{"required":false,"id":"pay_7d5d747be160e280504c099d984bcfe0"}}}"#;
        let with_id = request(v2_body(id).as_bytes()).unwrap();
        assert_eq!(with_id.payment_identifier.as_deref(), Some("pay_7d5d747be160e280504c099d984bcfe0"));
    }

    /// `body` without `paymentRequirements.<field>`.
    fn without_requirement(body: &str, field: &str) -> String {
        let mut v: Value = serde_json::from_str(body).unwrap();
        v["paymentRequirements"].as_object_mut().unwrap().remove(field);
        v.to_string()
    }

    #[test]
    fn every_problem_names_its_field_and_reason() {
        let v2 = v2_body("");
        let cases: Vec<(String, Reason, &str, bool)> = vec![
            ("not json".into(), Reason::InvalidPayload, "JSON object", true),
            ("[]".into(), Reason::InvalidPayload, "not an object", true),
            (r#"{"paymentRequirements":{}}"#.into(), Reason::InvalidPayload, "paymentPayload", true),
            (
                V1.replace(r#""x402Version":1,"paymentPayload""#, r#""x402Version":2,"paymentPayload""#),
                Reason::InvalidX402Version,
                "differs",
                false,
            ),
            (
                V1.replace(r#""maxAmountRequired":"1000""#, r#""maxAmountRequired":"ten""#),
                Reason::InvalidPaymentRequirements,
                "maxAmountRequired must be a decimal",
                false,
            ),
            (
                without_requirement(&v2, "amount"),
                Reason::InvalidPaymentRequirements,
                "amount is missing",
                false,
            ),
            (
                V1.replace(r#""maxTimeoutSeconds":60"#, r#""maxTimeoutSeconds":"60""#),
                Reason::InvalidPaymentRequirements,
                "maxTimeoutSeconds",
                false,
            ),
            (
                V1.replace(
                    r#""payTo":"0x534e3bcb27673292EB2b58fdeD126624F7d67f21","maxTimeoutSeconds""#,
                    r#""payTo":"0x12","maxTimeoutSeconds""#,
                ),
                Reason::InvalidPaymentRequirements,
                "payTo must be 20 bytes",
                false,
            ),
            (
                V1.replace(r#""value":"1000""#, r#""value":"-5""#),
                Reason::InvalidPayload,
                "payload.authorization.value",
                false,
            ),
            (
                v2_body(r#","extensions":{"payment-identifier":{"info":{"id":"short"}}}"#),
                Reason::InvalidPayload,
                "payment-identifier",
                false,
            ),
        ];
        for (body, reason, needle, malformed) in cases {
            let err = request(body.as_bytes()).expect_err(needle);
            assert_eq!(err.reason(), reason, "{err}");
            assert_eq!(err.is_malformed_request(), malformed, "{err}");
            assert!(err.to_string().contains(needle), "{err} should mention {needle:?}");
        }
    }

    #[test]
    fn replies_serialize_as_the_middlewares_read_them() {
        let payer = Address::repeat_byte(0xab);
        let v = serde_json::to_value(VerifyReply::valid(payer)).unwrap();
        assert_eq!(v, serde_json::json!({"isValid": true, "payer": payer.to_checksum(None)}));
        let s = serde_json::to_value(SettleReply::failed(
            "insufficient_funds",
            "m".into(),
            "eip155:1".into(),
            None,
        ))
        .unwrap();
        assert_eq!(
            s,
            serde_json::json!({"success": false, "errorReason": "insufficient_funds", "errorMessage": "m",
                "transaction": "", "network": "eip155:1"})
        );
    }

    #[test]
    fn payment_identifiers_follow_the_extension_rule() {
        assert!(valid_payment_identifier("pay_7d5d747be160e280"));
        assert!(!valid_payment_identifier("pay_7d5d747be16"), "15 chars");
        assert!(!valid_payment_identifier(&"a".repeat(129)));
        assert!(!valid_payment_identifier("pay 7d5d747be160e280"));
    }
}
