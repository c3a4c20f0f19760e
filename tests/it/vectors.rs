//! Every committed vector, signed by viem or built by the official x402 client packages
//! (ops/devnet/make-vectors.mjs), is judged exactly as labelled: through the gRPC message
//! conversion, admission and the verify pool, as a submission would be. The smart-account
//! vectors (payers with code) need a chain: they are submitted to a daemon on a devnet set
//! up as their file says (wallets created, accounts delegated by type-4 transactions).

use crate::common;

use std::sync::Arc;

use alloy::primitives::{Address, U256, keccak256};
use alloy::signers::local::PrivateKeySigner;
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
    /// What the devnet must hold for the smart-account vectors.
    #[serde(default)]
    setup: Option<Setup>,
}

#[derive(Deserialize)]
struct Setup {
    contracts: Contracts,
    wallets: Vec<WalletSetup>,
    delegations: Vec<Delegation>,
    allow_listed_factories: Vec<Address>,
}

#[derive(Deserialize)]
struct Contracts {
    token: Address,
    factory: Address,
    self_signed: Address,
    strict: Address,
}

#[derive(Deserialize)]
struct WalletSetup {
    owner: Address,
    salt: u64,
    address: Address,
}

#[derive(Deserialize)]
struct Delegation {
    key_label: String,
    address: Address,
    delegate: String,
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
    let file = read_file(name);
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

fn read_file(name: &str) -> VectorFile {
    let path = format!("{}/tests/vectors/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The payer a header vector's payload names.
fn payer_of(v: &Vector) -> Address {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD.decode(v.header.as_ref().unwrap()).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    json["payload"]["authorization"]["from"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_account_vectors_are_judged_as_labelled_on_a_devnet() {
    use x402_batcher::tools::devnet::Devnet;
    use x402_batcher::tools::wallets::Wallets;
    tokio::time::timeout(std::time::Duration::from_secs(120), async {
        let file = read_file("smart");
        let setup = file.setup.as_ref().expect("the smart vectors describe their devnet");
        assert!(file.vectors.len() >= 20, "a few vectors per kind of payer");
        let net = Devnet::start().await.unwrap();
        let w = Wallets::deploy(&net).await.unwrap();
        let c = &setup.contracts;
        assert_eq!(
            (net.token(), w.factory, w.self_signed, w.strict),
            (c.token, c.factory, c.self_signed, c.strict),
            "the devnet's contracts are where the vectors were signed for"
        );
        for wallet in &setup.wallets {
            assert_eq!(w.create_wallet(&net, wallet.owner, wallet.salt).await.unwrap(), wallet.address);
        }
        for d in &setup.delegations {
            let key = keccak256(format!("x402-batcher vectors {}", d.key_label));
            let key = PrivateKeySigner::from_bytes(&key).unwrap();
            assert_eq!(key.address(), d.address);
            let delegate = match d.delegate.as_str() {
                "self_signed" => w.self_signed,
                "strict" => w.strict,
                other => panic!("unknown delegate {other}"),
            };
            w.delegate(&net, &key, delegate).await.unwrap();
        }
        let payers: Vec<Address> = file.vectors.iter().map(payer_of).collect();
        net.fund(&payers, U256::from(1_000_000_000u64)).await.unwrap();

        // A daemon at the vectors' time, trusting the file's factories.
        let dir = tempfile::tempdir().unwrap();
        let mut config = x402_batcher::config::Config::parse("").unwrap();
        config.tokens.extend(file.tokens.iter().cloned());
        let mut chain = net.chain_config();
        chain.erc6492_factories = setup.allow_listed_factories.clone();
        config.chains.push(chain);
        config.ledger.path = Some(dir.path().join("ledger"));
        let listeners = x402_batcher::daemon::Listeners::loopback().await.unwrap();
        let url = format!("http://{}", listeners.api.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let clock = Arc::new(ManualClock::new(file.now));
        let server = tokio::spawn(x402_batcher::daemon::serve(config, listeners, clock, async {
            let _ = stopped.await;
        }));
        let client = x402_batcher::client::Client::connect(url).await.unwrap();

        let mut wrong = Vec::new();
        for v in &file.vectors {
            let reply =
                client.ingest.clone().submit(request(v)).await.expect("no transport error").into_inner();
            let got = match reply.outcome {
                Some(v1::submit_reply::Outcome::Accepted(_)) => "valid".to_owned(),
                Some(v1::submit_reply::Outcome::Rejected(r)) => r.reason,
                other => format!("{other:?}"),
            };
            if got != v.expect {
                wrong.push(format!("{}: expected {}, got {got}", v.id, v.expect));
            }
        }
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        assert!(wrong.is_empty(), "smart ({}): misjudged:\n{}", file.generator, wrong.join("\n"));
    })
    .await
    .expect("within the time limit");
}
