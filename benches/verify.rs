//! Signature verification against its ceiling, measured in one run:
//!
//! - `raw_recovery`: libsecp256k1 public-key recovery alone (parse + recover), the ceiling;
//! - `full_check`: the daemon's whole per-signature check (v and low-s rules, EIP-712
//!   digest, recovery, address derivation, comparison), decoding excluded;
//! - `pool/threads=1` and `pool/threads=2`: throughput of the verify pool on batches.
//!
//! After the measurements it prints the two ratios BENCHMARKS.md records: full check over
//! raw recovery (target ≤ 1.15) and pool 2 threads over 1 (target ≥ 1.7).
//!
//! Run: `cargo bench --bench verify`.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use criterion::{BenchmarkId, Criterion, Throughput};
use secp256k1::Message;
use secp256k1::ecdsa::{RecoverableSignature, RecoveryId};
use x402_batcher::admission::Admitted;
use x402_batcher::tools::testkit::PaymentBuilder;
use x402_batcher::verify::{self, VerifyPool};
use x402_batcher::x402::eip712::TokenDomain;

const SAMPLES: usize = 256;
const POOL_BATCH: usize = 2048;

fn samples() -> Vec<Admitted> {
    let domain = TokenDomain::new("USD Coin", "2", 8453, Address::repeat_byte(0x0c));
    (0..SAMPLES)
        .map(|i| {
            let payer = PrivateKeySigner::random();
            let signed = PaymentBuilder::new(&payer, &domain, 1_800_000_000).nonce_index(i as u64).build();
            Admitted { signed, domain_separator: domain.separator(), contract_signatures: true }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let items = samples();
    let digests: Vec<_> = items
        .iter()
        .map(|a| x402_batcher::x402::eip712::signing_hash(a.domain_separator, &a.signed.authorization))
        .collect();
    for item in &items {
        assert_eq!(verify::check(item.domain_separator, &item.signed), Ok(()));
    }

    let mut single = c.benchmark_group("signature");
    single.throughput(Throughput::Elements(1));
    let mut i = 0;
    single.bench_function("raw_recovery", |b| {
        b.iter(|| {
            i = (i + 1) % SAMPLES;
            let sig = items[i].signed.signature.ecdsa().unwrap();
            let recid = RecoveryId::try_from(i32::from(sig[64]) - 27).unwrap();
            let rsig = RecoverableSignature::from_compact(&sig[..64], recid).unwrap();
            rsig.recover(Message::from_digest(digests[i].0)).unwrap()
        })
    });
    let mut i = 0;
    single.bench_function("full_check", |b| {
        b.iter(|| {
            i = (i + 1) % SAMPLES;
            verify::check(items[i].domain_separator, &items[i].signed)
        })
    });
    single.finish();

    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let batch: Vec<Admitted> = items.iter().cycle().take(POOL_BATCH).cloned().collect();
    let mut pool_group = c.benchmark_group("pool");
    pool_group.throughput(Throughput::Elements(POOL_BATCH as u64));
    pool_group.sample_size(20);
    for threads in [1, 2] {
        let pool = VerifyPool::new(threads, POOL_BATCH).unwrap();
        pool_group.bench_with_input(BenchmarkId::new("threads", threads), &threads, |b, _| {
            b.iter(|| {
                let verified = runtime.block_on(pool.verify(batch.clone()));
                assert_eq!(verified.len(), POOL_BATCH);
            })
        });
    }
    pool_group.finish();
}

/// The mean time of a benchmark from criterion's saved estimates, in nanoseconds.
fn mean_ns(id: &str) -> Option<f64> {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target"));
    let text = std::fs::read_to_string(target.join("criterion").join(id).join("new/estimates.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5));
    bench(&mut c);
    c.final_summary();

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    if let (Some(raw), Some(full), Some(p1), Some(p2)) = (
        mean_ns("signature/raw_recovery"),
        mean_ns("signature/full_check"),
        mean_ns("pool/threads/1"),
        mean_ns("pool/threads/2"),
    ) {
        let per_sec = |ns: f64, n: usize| n as f64 / (ns / 1e9);
        println!("\nsummary ({cores} cores):");
        println!(
            "  raw libsecp256k1 recovery   {:>8.2} µs  ({:>7.0}/s, one core)",
            raw / 1e3,
            per_sec(raw, 1)
        );
        println!(
            "  full per-signature check    {:>8.2} µs  ratio to raw {:.3} (target <= 1.15)",
            full / 1e3,
            full / raw
        );
        println!("  pool, 1 thread              {:>8.0} /s", per_sec(p1, POOL_BATCH));
        println!(
            "  pool, 2 threads             {:>8.0} /s  ratio to 1 thread {:.3} (target >= 1.7); {:.0}% of 2 × raw ceiling",
            per_sec(p2, POOL_BATCH),
            p1 / p2,
            100.0 * per_sec(p2, POOL_BATCH) / (2.0 * per_sec(raw, 1))
        );
    }
}
