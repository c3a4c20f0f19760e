//! The README's main job, at the foundation stage: start the devnet, check the token's
//! domain as the daemon does at start-up, verify a set of signed sample payments (valid
//! ones and each common defect) through admission and the verify pool, and settle one of
//! them through the aggregate3 contract, confirming it by its `AuthorizationUsed` log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;

use crate::admission::{Admission, Admitted, PaymentInput};
use crate::chain::{self, MULTICALL3};
use crate::clock::{Clock, SystemClock};
use crate::config::{AdmissionConfig, TokenTable, VerifyConfig};
use crate::devnet::{self, Devnet, DevnetError};
use crate::testkit::{self, PaymentBuilder};
use crate::verify::VerifyPool;
use crate::x402::decode::decode_header;
use crate::x402::eip712::TokenDomain;
use crate::x402::{PaymentRequirements, Reason};

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Devnet(#[from] DevnetError),
    #[error(transparent)]
    Chain(#[from] chain::ChainError),
    #[error("could not start the verify pool")]
    Pool(#[source] std::io::Error),
    #[error("settlement transaction failed: {0}")]
    Settle(String),
    #[error("{0}")]
    Mismatch(String),
}

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Sample payments to verify.
    pub payments: usize,
    /// Distinct payers.
    pub payers: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self { payments: 400, payers: 20 }
    }
}

/// What the demo found.
#[derive(Debug)]
pub struct DemoReport {
    pub accepted: usize,
    /// Refusals by x402 reason code.
    pub refused: BTreeMap<&'static str, usize>,
    /// Samples whose verdict differed from the defect planted in them (must be 0).
    pub misjudged: usize,
    pub verify_seconds: f64,
    pub settled_tx: String,
    pub settled_block: u64,
    pub settle_gas_used: u64,
}

/// One sample with the verdict it should get.
struct Sample {
    input: PaymentInput,
    requirements: PaymentRequirements,
    expect: Option<Reason>,
}

/// A planted defect, one per sample index modulo the list length; `None` is a valid payment.
const DEFECTS: &[Option<&str>] = &[
    None,
    None,
    None,
    None,
    Some("wrong signer"),
    None,
    Some("tampered value"),
    None,
    Some("wrong recipient"),
    None,
    Some("expired"),
    None,
    Some("wrong domain name"),
    None,
];

fn sample(i: usize, payer: &PrivateKeySigner, domain: &TokenDomain, payee: Address, now: u64) -> Sample {
    let base = PaymentBuilder::new(payer, domain, now).to(payee).nonce_index(i as u64);
    let defect = DEFECTS[i % DEFECTS.len()];
    let (signed, requirements, expect) = match defect {
        None => (base.build(), base.requirements(), None),
        Some("wrong signer") => {
            let b = base.signed_by(&PrivateKeySigner::random());
            (b.build(), b.requirements(), Some(Reason::InvalidSignature))
        }
        Some("tampered value") => {
            let mut signed = base.build();
            signed.authorization.value += U256::from(1);
            let req = testkit::requirements_for(&signed);
            (signed, req, Some(Reason::InvalidSignature))
        }
        Some("wrong recipient") => {
            let mut req = base.requirements();
            req.pay_to = Address::repeat_byte(0x77);
            (base.build(), req, Some(Reason::RecipientMismatch))
        }
        Some("expired") => {
            let b = base.expired();
            (b.build(), b.requirements(), Some(Reason::InvalidValidBefore))
        }
        Some(_) => {
            let wrong = TokenDomain::new("USDC", &domain.version, domain.chain_id, domain.verifying_contract);
            let b = base.sign_domain(wrong);
            (b.build(), b.requirements(), Some(Reason::InvalidSignature))
        }
    };
    // Alternate the two ways API servers submit: the raw v2 header and the typed form.
    let input = if i.is_multiple_of(2) {
        match decode_header(&testkit::v2_header(&signed, &requirements, domain)) {
            Ok(payload) => PaymentInput::Header(payload),
            Err(_) => PaymentInput::Typed(signed),
        }
    } else {
        PaymentInput::Typed(signed)
    };
    Sample { input, requirements, expect }
}

/// Runs the demo, printing progress to stdout.
pub async fn run(opts: &DemoOptions) -> Result<DemoReport, DemoError> {
    println!("starting devnet (anvil {}) ...", devnet::ANVIL_VERSION);
    let devnet = Devnet::start().await?;
    let domain = devnet.token_domain();
    println!("  rpc {}  token {}  aggregate3 at {}", devnet.rpc_url(), devnet.token(), MULTICALL3);
    chain::check_domain(devnet.provider(), &domain).await?;
    println!("  token DOMAIN_SEPARATOR matches the configured domain {:?}/{:?}", domain.name, domain.version);

    let payers = devnet::payer_keys("demo", opts.payers.max(1));
    let addresses: Vec<Address> = payers.iter().map(|p| p.address()).collect();
    devnet.fund(&addresses, U256::from(100_000_000u64)).await?;
    println!("  funded {} payers with 100 USDC each", payers.len());

    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now_unix();
    let payee = Address::repeat_byte(0xbe);
    let admission = Admission::new(
        TokenTable::new(&[devnet.token_config()]),
        BTreeMap::new(),
        AdmissionConfig::default(),
        clock,
    );
    let samples: Vec<Sample> =
        (0..opts.payments).map(|i| sample(i, &payers[i % payers.len()], &domain, payee, now)).collect();

    println!("verifying {} sample payments (admission, then the signature pool) ...", samples.len());
    let pool = VerifyPool::from_config(&VerifyConfig::default()).map_err(DemoError::Pool)?;
    let started = Instant::now();
    let mut verdicts: Vec<Option<Result<(), Reason>>> = Vec::with_capacity(samples.len());
    let mut admitted: Vec<(usize, Admitted)> = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        match admission.admit(s.input.clone(), &s.requirements) {
            Ok(a) => {
                admitted.push((i, a));
                verdicts.push(None);
            }
            Err(e) => verdicts.push(Some(Err(e.reason()))),
        }
    }
    let (indices, items): (Vec<usize>, Vec<Admitted>) = admitted.into_iter().unzip();
    let verified = pool.verify(items).await;
    let verify_seconds = started.elapsed().as_secs_f64();
    let mut accepted_items = Vec::new();
    for (&i, (item, outcome)) in indices.iter().zip(verified.iter()) {
        verdicts[i] = Some(match outcome {
            Ok(Ok(())) => {
                accepted_items.push(item.signed.clone());
                Ok(())
            }
            Ok(Err(_)) => Err(Reason::InvalidSignature),
            Err(e) => Err(e.reason()),
        });
    }

    let mut refused = BTreeMap::new();
    let mut misjudged = 0;
    for (s, v) in samples.iter().zip(&verdicts) {
        let got = v.unwrap_or(Err(Reason::UnexpectedVerifyError));
        if let Err(r) = got {
            *refused.entry(r.code()).or_insert(0) += 1;
        }
        if got != s.expect.map_or(Ok(()), Err) {
            misjudged += 1;
        }
    }
    println!(
        "  {} accepted, {} refused, {} misjudged, in {:.1} ms on {} verify threads",
        accepted_items.len(),
        samples.len() - accepted_items.len(),
        misjudged,
        verify_seconds * 1e3,
        pool.thread_count()
    );
    for (code, n) in &refused {
        println!("    refused {n:>4} × {code}");
    }

    let first = accepted_items
        .first()
        .ok_or_else(|| DemoError::Mismatch("no sample was accepted, nothing to settle".into()))?;
    println!("settling one accepted payment through aggregate3 ...");
    let before = devnet.balance_of(payee).await?;
    let receipt = devnet.send_batch(std::slice::from_ref(first)).await?;
    let used = chain::authorizations_used(&receipt, devnet.token());
    let key = (first.authorization.from, first.authorization.nonce);
    if !receipt.status() || !used.contains(&key) {
        return Err(DemoError::Settle(format!(
            "transaction {} carried no AuthorizationUsed log for the payment",
            receipt.transaction_hash
        )));
    }
    let after = devnet.balance_of(payee).await?;
    let received = after.saturating_sub(before);
    if received != first.authorization.value {
        return Err(DemoError::Mismatch(format!(
            "payee received {received} instead of {}",
            first.authorization.value
        )));
    }
    let report = DemoReport {
        accepted: accepted_items.len(),
        refused,
        misjudged,
        verify_seconds,
        settled_tx: receipt.transaction_hash.to_string(),
        settled_block: receipt.block_number.unwrap_or_default(),
        settle_gas_used: receipt.gas_used,
    };
    println!(
        "  settled: tx {} in block {}, gas {}, AuthorizationUsed({}, {}) found, payee +{} base units",
        report.settled_tx,
        report.settled_block,
        report.settle_gas_used,
        key.0,
        key.1,
        first.authorization.value
    );
    if misjudged > 0 {
        return Err(DemoError::Mismatch(format!(
            "{misjudged} samples were judged differently than labelled"
        )));
    }
    println!("demo finished: every sample judged as labelled, one payment settled on chain");
    Ok(report)
}
