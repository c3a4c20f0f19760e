//! Every committed vector, signed by viem or built by the official x402 client packages
//! (ops/devnet/make-vectors.mjs), is judged exactly as labelled: through the gRPC message
//! conversion, admission and the verify pool, as a submission would be.

mod common;

use serde::Deserialize;
use x402_batcher::api::v1;
use x402_batcher::clock::ManualClock;
use x402_batcher::config::TokenConfig;
use x402_batcher::verify::VerifyPool;
use x402_batcher::x402::Reason;

#[derive(Deserialize)]
struct VectorFile {
    generator: String,
    now: u64,
    tokens: Vec<TokenConfig>,
    vectors: Vec<Vector>,
}

#[derive(Deserialize)]
struct Vector {
    id: String,
    form: String,
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    authorization: Option<TypedJson>,
    requirements: RequirementsJson,
    expect: String,
}

#[derive(Deserialize)]
struct TypedJson {
    chain_id: u64,
    token: String,
    from: String,
    to: String,
    value: String,
    #[serde(rename = "validAfter")]
    valid_after: String,
    #[serde(rename = "validBefore")]
    valid_before: String,
    nonce: String,
    signature: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequirementsJson {
    scheme: String,
    network: String,
    asset: String,
    pay_to: String,
    amount: String,
    max_timeout_seconds: u64,
}

fn request(v: &Vector) -> v1::SubmitRequest {
    let payment = match v.form.as_str() {
        "header" => {
            v1::submit_request::Payment::X402Header(v.header.clone().expect("header vector has a header"))
        }
        "typed" => {
            let a = v.authorization.as_ref().expect("typed vector has an authorization");
            v1::submit_request::Payment::Authorization(v1::TypedAuthorization {
                chain_id: a.chain_id,
                token: a.token.clone(),
                from: a.from.clone(),
                to: a.to.clone(),
                value: a.value.clone(),
                valid_after: a.valid_after.clone(),
                valid_before: a.valid_before.clone(),
                nonce: a.nonce.clone(),
                signature: a.signature.clone(),
            })
        }
        other => panic!("vector {} has unknown form {other}", v.id),
    };
    let r = &v.requirements;
    v1::SubmitRequest {
        request_id: v.id.clone(),
        payment: Some(payment),
        requirements: Some(v1::PaymentRequirements {
            scheme: r.scheme.clone(),
            network: r.network.clone(),
            asset: r.asset.clone(),
            pay_to: r.pay_to.clone(),
            amount: r.amount.clone(),
            max_timeout_seconds: r.max_timeout_seconds,
        }),
        ..Default::default()
    }
}

async fn judge_file(name: &str) {
    let path = format!("{}/tests/vectors/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let file: VectorFile = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let admission = common::admission(&file.tokens, ManualClock::new(file.now));
    let pool = VerifyPool::new(2, 1024).unwrap();
    assert!(file.vectors.len() >= 100, "{name}: expected a few hundred vectors");

    let mut wrong = Vec::new();
    let mut valid = 0;
    for v in &file.vectors {
        let expected = if v.expect == "valid" {
            None
        } else {
            Some(
                Reason::from_code(&v.expect).unwrap_or_else(|| panic!("{}: unknown code {}", v.id, v.expect)),
            )
        };
        let got = common::judge(&admission, &pool, &request(v)).await;
        valid += got.is_ok() as usize;
        if got.as_ref().err().copied() != expected {
            wrong.push(format!("{}: expected {}, got {:?}", v.id, v.expect, got.map(|_| "valid")));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} ({}): {} of {} vectors misjudged:\n{}",
        name,
        file.generator,
        wrong.len(),
        file.vectors.len(),
        wrong.join("\n")
    );
    assert!(valid > 0, "{name}: no valid vector");
}

#[tokio::test]
async fn viem_vectors_are_judged_as_labelled() {
    judge_file("viem").await;
}

#[tokio::test]
async fn x402_client_vectors_are_judged_as_labelled() {
    judge_file("x402").await;
}
