//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod binary;
pub mod daemon;
pub mod metrics;
pub mod pki;
pub mod proxy;
pub mod settle;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;

use x402_batcher::admission::{Admission, Admitted};
use x402_batcher::api::{self, v1};
use x402_batcher::clock::ManualClock;
use x402_batcher::config::{AdmissionConfig, TokenConfig, TokenTable};
use x402_batcher::verify::VerifyPool;
use x402_batcher::x402::Reason;

/// Takes a submission through conversion, admission and the verify pool: `Ok` with the
/// admitted payment, or the reason it is refused.
pub async fn judge(
    admission: &Admission,
    pool: &VerifyPool,
    req: &v1::SubmitRequest,
) -> Result<Admitted, Reason> {
    let input = api::payment_input(req).map_err(|e| e.reason())?;
    let requirements = api::requirements(req).map_err(|e| e.reason())?;
    let admitted = admission.admit(input, &requirements).map_err(|e| e.reason())?;
    let verified = pool.verify(vec![admitted]).await;
    let (item, outcome) = verified.iter().next().expect("one item in, one out");
    match outcome {
        Ok(Ok(())) => Ok(item.clone()),
        Ok(Err(_)) => Err(Reason::InvalidSignature),
        Err(e) => Err(e.reason()),
    }
}

pub fn admission(tokens: &[TokenConfig], clock: ManualClock) -> Admission {
    Admission::new(TokenTable::new(tokens), BTreeMap::new(), AdmissionConfig::default(), Arc::new(clock))
}

/// `n` signed submissions (run 1, 1,000 base units each, to `payee`) from `payers` payers of
/// `seed`, each funded with 1 USDC on `net` first.
pub async fn funded_submissions(
    net: &x402_batcher::tools::devnet::Devnet,
    seed: &str,
    payers: usize,
    n: usize,
    payee: alloy::primitives::Address,
) -> Vec<v1::SubmitRequest> {
    use x402_batcher::clock::Clock as _;
    let payers = x402_batcher::tools::devnet::payer_keys(seed, payers);
    let addrs: Vec<_> = payers.iter().map(|p| p.address()).collect();
    net.fund(&addrs, alloy::primitives::U256::from(1_000_000u64)).await.unwrap();
    let opts = x402_batcher::tools::loadgen::LoadOptions {
        payments: n,
        payers,
        rate: None,
        streams: 1,
        value: 1_000,
        payees: vec![payee],
        run_id: 1,
    };
    let now = x402_batcher::clock::SystemClock.now_unix();
    x402_batcher::tools::loadgen::presign(&net.token_domain(), &opts, now)
}

/// The signed authorization a typed submission carries (the ledger's key: `AuthKey::of`).
pub fn signed_of(req: &v1::SubmitRequest) -> x402_batcher::x402::SignedAuthorization {
    let Some(v1::submit_request::Payment::Authorization(a)) = &req.payment else {
        panic!("a typed submission")
    };
    api::signed_authorization(a).expect("a well-formed typed authorization")
}
