//! Decoding of x402 payment headers and of the individual fields they carry.
//!
//! Both header versions are base64 of a JSON object; numbers are decimal strings, nonces and
//! signatures 0x-hex. Fields are read one by one from a `serde_json::Value` rather than through
//! a derived struct so that every refusal names the exact field and what is wrong with it.

use alloy::primitives::{Address, B256, U256};
use base64::Engine as _;
use serde_json::{Map, Value};

use super::{AcceptedTerms, Authorization, DomainHint, PaymentPayload, RawSignature, Reason, SCHEME_EXACT};

/// Largest header accepted, in bytes of base64. A real v2 payload is ~1.5 KiB; the bound
/// keeps hostile input from costing more than a few microseconds to refuse.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// What is wrong with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldProblem {
    Missing,
    NotString,
    NotObject,
    /// Not a plain decimal integer (digits only).
    NotDecimal,
    /// A decimal integer too large for its type.
    OutOfRange {
        max: &'static str,
    },
    /// Not 0x-prefixed hexadecimal.
    NotHex,
    WrongLength {
        expected: usize,
        found: usize,
    },
    LengthOutOfRange {
        min: usize,
        max: usize,
        found: usize,
    },
}

impl std::fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FieldProblem::Missing => f.write_str("is missing"),
            FieldProblem::NotString => f.write_str("must be a string"),
            FieldProblem::NotObject => f.write_str("must be an object"),
            FieldProblem::NotDecimal => f.write_str("must be a decimal integer string"),
            FieldProblem::OutOfRange { max } => write!(f, "is larger than {max}"),
            FieldProblem::NotHex => f.write_str("must be 0x-prefixed hex"),
            FieldProblem::WrongLength { expected, found } => {
                write!(f, "must be {expected} bytes, found {found}")
            }
            FieldProblem::LengthOutOfRange { min, max, found } => {
                write!(f, "must be {min} to {max} bytes, found {found}")
            }
        }
    }
}

/// Why a header or a field could not be decoded. Each maps to one x402 reason code.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payment header is {len} bytes; at most {max} are accepted")]
    TooLarge { len: usize, max: usize },
    #[error("payment header is not valid base64")]
    Base64(#[source] base64::DecodeError),
    #[error("payment header does not hold JSON")]
    Json(#[source] serde_json::Error),
    #[error("payment payload must be a JSON object")]
    NotAnObject,
    #[error("x402Version {found} is not supported (1 or 2)")]
    Version { found: String },
    #[error("scheme {found:?} is not supported; only \"exact\" is")]
    Scheme { found: String },
    #[error("{field} {problem}")]
    Field { field: &'static str, problem: FieldProblem },
}

impl DecodeError {
    pub fn reason(&self) -> Reason {
        match self {
            DecodeError::Version { .. } => Reason::InvalidX402Version,
            DecodeError::Scheme { .. } => Reason::InvalidScheme,
            // Everything else is a malformed payload: encoding, JSON, shape, numbers, lengths.
            DecodeError::TooLarge { .. }
            | DecodeError::Base64(_)
            | DecodeError::Json(_)
            | DecodeError::NotAnObject
            | DecodeError::Field { .. } => Reason::InvalidPayload,
        }
    }

    fn field(field: &'static str, problem: FieldProblem) -> Self {
        DecodeError::Field { field, problem }
    }
}

/// Decodes an x402 payment header value (v1 `X-PAYMENT` or v2 `PAYMENT-SIGNATURE`).
pub fn decode_header(header: &str) -> Result<PaymentPayload, DecodeError> {
    let header = header.trim();
    if header.len() > MAX_HEADER_BYTES {
        return Err(DecodeError::TooLarge { len: header.len(), max: MAX_HEADER_BYTES });
    }
    // Clients differ on padding; both forms are standard base64 per RFC 4648.
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(header)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(header))
        .map_err(DecodeError::Base64)?;
    decode_json(&bytes)
}

/// Decodes the JSON of a payment payload (the header after base64).
pub fn decode_json(json: &[u8]) -> Result<PaymentPayload, DecodeError> {
    let value: Value = serde_json::from_slice(json).map_err(DecodeError::Json)?;
    decode_value(&value)
}

/// Decodes a payment payload already parsed as JSON (the HTTP facilitator's
/// `paymentPayload`).
pub fn decode_value(value: &Value) -> Result<PaymentPayload, DecodeError> {
    let root = value.as_object().ok_or(DecodeError::NotAnObject)?;
    match root.get("x402Version") {
        Some(v) if v.as_u64() == Some(1) => decode_v1(root),
        Some(v) if v.as_u64() == Some(2) => decode_v2(root),
        Some(v) => Err(DecodeError::Version { found: v.to_string() }),
        None => Err(DecodeError::field("x402Version", FieldProblem::Missing)),
    }
}

fn decode_v1(root: &Map<String, Value>) -> Result<PaymentPayload, DecodeError> {
    let scheme = scheme(str_field(root, "scheme", "scheme")?)?;
    let network = str_field(root, "network", "network")?.to_owned();
    let (authorization, signature) = exact_payload(root)?;
    Ok(PaymentPayload {
        x402_version: 1,
        scheme,
        network,
        accepted: None,
        authorization,
        signature,
        resource: None,
    })
}

fn decode_v2(root: &Map<String, Value>) -> Result<PaymentPayload, DecodeError> {
    let accepted = obj_field(root, "accepted", "accepted")?;
    let scheme = scheme(str_field(accepted, "scheme", "accepted.scheme")?)?;
    let network = str_field(accepted, "network", "accepted.network")?.to_owned();
    let domain = match accepted.get("extra") {
        None | Some(Value::Null) => DomainHint { name: None, version: None },
        Some(Value::Object(extra)) => DomainHint {
            name: opt_str_field(extra, "name", "accepted.extra.name")?,
            version: opt_str_field(extra, "version", "accepted.extra.version")?,
        },
        Some(_) => return Err(DecodeError::field("accepted.extra", FieldProblem::NotObject)),
    };
    let terms = AcceptedTerms {
        scheme: scheme.clone(),
        network: network.clone(),
        asset: parse_address("accepted.asset", str_field(accepted, "asset", "accepted.asset")?)?,
        pay_to: parse_address("accepted.payTo", str_field(accepted, "payTo", "accepted.payTo")?)?,
        amount: parse_u256("accepted.amount", str_field(accepted, "amount", "accepted.amount")?)?,
        domain,
    };
    let (authorization, signature) = exact_payload(root)?;
    let resource = match root.get("resource") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(r)) => opt_str_field(r, "url", "resource.url")?,
        Some(_) => return Err(DecodeError::field("resource", FieldProblem::NotObject)),
    };
    Ok(PaymentPayload {
        x402_version: 2,
        scheme,
        network,
        accepted: Some(terms),
        authorization,
        signature,
        resource,
    })
}

/// The scheme-specific `payload` of the exact EVM scheme, identical in v1 and v2.
fn exact_payload(root: &Map<String, Value>) -> Result<(Authorization, RawSignature), DecodeError> {
    let payload = obj_field(root, "payload", "payload")?;
    let signature =
        parse_signature("payload.signature", str_field(payload, "signature", "payload.signature")?)?;
    let auth = obj_field(payload, "authorization", "payload.authorization")?;
    let authorization = Authorization {
        from: parse_address(
            "payload.authorization.from",
            str_field(auth, "from", "payload.authorization.from")?,
        )?,
        to: parse_address("payload.authorization.to", str_field(auth, "to", "payload.authorization.to")?)?,
        value: parse_u256(
            "payload.authorization.value",
            str_field(auth, "value", "payload.authorization.value")?,
        )?,
        valid_after: parse_u256(
            "payload.authorization.validAfter",
            str_field(auth, "validAfter", "payload.authorization.validAfter")?,
        )?,
        valid_before: parse_u256(
            "payload.authorization.validBefore",
            str_field(auth, "validBefore", "payload.authorization.validBefore")?,
        )?,
        nonce: parse_b256(
            "payload.authorization.nonce",
            str_field(auth, "nonce", "payload.authorization.nonce")?,
        )?,
    };
    Ok((authorization, signature))
}

fn scheme(found: &str) -> Result<String, DecodeError> {
    if found == SCHEME_EXACT {
        Ok(found.to_owned())
    } else {
        Err(DecodeError::Scheme { found: found.to_owned() })
    }
}

pub fn str_field<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &'static str,
) -> Result<&'a str, DecodeError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(DecodeError::field(path, FieldProblem::NotString)),
        None => Err(DecodeError::field(path, FieldProblem::Missing)),
    }
}

pub fn opt_str_field(
    obj: &Map<String, Value>,
    key: &str,
    path: &'static str,
) -> Result<Option<String>, DecodeError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(DecodeError::field(path, FieldProblem::NotString)),
    }
}

pub fn obj_field<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &'static str,
) -> Result<&'a Map<String, Value>, DecodeError> {
    match obj.get(key) {
        Some(Value::Object(o)) => Ok(o),
        Some(_) => Err(DecodeError::field(path, FieldProblem::NotObject)),
        None => Err(DecodeError::field(path, FieldProblem::Missing)),
    }
}

/// Parses a 0x-prefixed hex string of exactly `N` bytes.
fn parse_hex_fixed<const N: usize>(field: &'static str, s: &str) -> Result<[u8; N], DecodeError> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .ok_or(DecodeError::field(field, FieldProblem::NotHex))?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DecodeError::field(field, FieldProblem::NotHex));
    }
    if hex.len() != 2 * N {
        // An odd digit count is reported as the length it falls short of.
        return Err(DecodeError::field(
            field,
            FieldProblem::WrongLength { expected: N, found: hex.len() / 2 },
        ));
    }
    let mut out = [0u8; N];
    alloy::hex::decode_to_slice(hex, &mut out)
        .map_err(|_| DecodeError::field(field, FieldProblem::NotHex))?;
    Ok(out)
}

/// A 20-byte address, 0x-hex, any letter case.
pub fn parse_address(field: &'static str, s: &str) -> Result<Address, DecodeError> {
    parse_hex_fixed::<20>(field, s).map(Address::from)
}

/// A 32-byte value (nonce, hash), 0x-hex.
pub fn parse_b256(field: &'static str, s: &str) -> Result<B256, DecodeError> {
    parse_hex_fixed::<32>(field, s).map(B256::from)
}

/// A signature, 0x-hex: 65 bytes `r ‖ s ‖ v` from a key, or up to
/// [`RawSignature::MAX_LEN`] bytes for a smart-contract wallet (ERC-1271, ERC-6492).
pub fn parse_signature(field: &'static str, s: &str) -> Result<RawSignature, DecodeError> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .ok_or(DecodeError::field(field, FieldProblem::NotHex))?;
    if hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DecodeError::field(field, FieldProblem::NotHex));
    }
    if hex.is_empty() || hex.len() > 2 * RawSignature::MAX_LEN {
        return Err(DecodeError::field(
            field,
            FieldProblem::LengthOutOfRange { min: 1, max: RawSignature::MAX_LEN, found: hex.len() / 2 },
        ));
    }
    let bytes = alloy::hex::decode(hex).map_err(|_| DecodeError::field(field, FieldProblem::NotHex))?;
    RawSignature::new(bytes).ok_or(DecodeError::field(field, FieldProblem::NotHex))
}

/// A uint256 written as a plain decimal string, as x402 writes amounts and times.
pub fn parse_u256(field: &'static str, s: &str) -> Result<U256, DecodeError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DecodeError::field(field, FieldProblem::NotDecimal));
    }
    U256::from_str_radix(s, 10)
        .map_err(|_| DecodeError::field(field, FieldProblem::OutOfRange { max: "2^256-1" }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(json: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(json)
    }

    const V1: &str = r#"{"x402Version":1,"scheme":"exact","network":"base-sepolia","payload":{"signature":"0x2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce6496642e377d6da8dbbf5836e9bd15092f9ecab05ded3d6293af148b571c","authorization":{"from":"0x857b06519E91e3A54538791bDbb0E22373e36b66","to":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","value":"10000","validAfter":"1740672089","validBefore":"1740672154","nonce":"0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"}}}"#;

    #[test]
    fn decodes_v1() {
        let p = decode_header(&b64(V1)).unwrap();
        assert_eq!(p.x402_version, 1);
        assert_eq!(p.network, "base-sepolia");
        assert_eq!(p.authorization.value, U256::from(10_000));
        assert_eq!(p.signature.ecdsa().map(|s| s[64]), Some(0x1c));
        assert!(p.accepted.is_none());
    }

    #[test]
    fn every_problem_has_its_reason() {
        let cases: Vec<(String, Reason, &str)> = vec![
            ("%%%".into(), Reason::InvalidPayload, "base64"),
            (b64("not json"), Reason::InvalidPayload, "JSON"),
            (b64("[1]"), Reason::InvalidPayload, "object"),
            (b64(r#"{"scheme":"exact"}"#), Reason::InvalidPayload, "x402Version is missing"),
            (b64(&V1.replace(r#""x402Version":1"#, r#""x402Version":3"#)), Reason::InvalidX402Version, "3"),
            (
                b64(&V1.replace(r#""x402Version":1"#, r#""x402Version":"1""#)),
                Reason::InvalidX402Version,
                "\"1\"",
            ),
            (b64(&V1.replace("\"exact\"", "\"upto\"")), Reason::InvalidScheme, "upto"),
            (b64(&V1.replace("\"10000\"", "10000")), Reason::InvalidPayload, "value must be a string"),
            (b64(&V1.replace("\"10000\"", "\"-1\"")), Reason::InvalidPayload, "decimal"),
            (b64(&V1.replace("\"10000\"", "\"1e4\"")), Reason::InvalidPayload, "decimal"),
            (
                b64(&V1.replace("\"10000\"", &format!("\"1{}\"", "0".repeat(78)))),
                Reason::InvalidPayload,
                "larger",
            ),
            (
                b64(&V1.replace("0x857b06519E91e3A54538791bDbb0E22373e36b66", "0x857b")),
                Reason::InvalidPayload,
                "20 bytes",
            ),
            (
                b64(&V1.replace(
                    "0x857b06519E91e3A54538791bDbb0E22373e36b66",
                    "857b06519E91e3A54538791bDbb0E22373e36b66",
                )),
                Reason::InvalidPayload,
                "hex",
            ),
            (b64(&V1.replace("0xf3746613", "0xg3746613")), Reason::InvalidPayload, "hex"),
            (
                b64(&V1.replace(
                    "0x2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce6496642e377d6da8dbbf5836e9bd15092f9ecab05ded3d6293af148b571c",
                    "0x",
                )),
                Reason::InvalidPayload,
                "must be 1 to 8192 bytes, found 0",
            ),
            (b64(&V1.replace("571c\"", "571c0\"")), Reason::InvalidPayload, "hex"),
            (
                b64(&V1.replace(r#","network":"base-sepolia""#, "")),
                Reason::InvalidPayload,
                "network is missing",
            ),
            ("A".repeat(MAX_HEADER_BYTES + 1), Reason::InvalidPayload, "at most"),
        ];
        for (header, reason, needle) in cases {
            let err = decode_header(&header).expect_err(needle);
            assert_eq!(err.reason(), reason, "{err}");
            assert!(err.to_string().contains(needle), "{err:?} should mention {needle:?}");
        }
    }
}
