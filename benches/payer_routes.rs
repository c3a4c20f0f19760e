//! Admission latency per payer route (issue #15): how long one `Submit` takes, end to end
//! over gRPC against an in-process daemon on a devnet, for a payer that is
//!
//! - `eoa_cached`: a key whose balance and code are cached (no RPC);
//! - `eoa_first_seen`: a key seen for the first time (one `PayerProbe` read);
//! - `erc1271`: a deployed contract wallet (state cached; one `SignatureProbe` call);
//! - `eip7702`: an EIP-7702 account delegated to an ERC-1271 delegate (the same);
//! - `erc6492`: a wallet not deployed yet, from an allow-listed factory (one probe read and
//!   one `SignatureProbe` call that deploys it inside the call).
//!
//! Submissions are sent one at a time (latency, not throughput), after a warm-up.
//! Run: `cargo bench --bench payer_routes` (needs anvil: `ops/setup.sh`). Results:
//! BENCHMARKS.md.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use x402_batcher::api::v1;
use x402_batcher::client::{self, Client};
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::config::Config;
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::tools::testkit::{self, PaymentBuilder};
use x402_batcher::tools::wallets::{Wallets, erc6492_signature, owned_wallet_signature};
use x402_batcher::x402::{RawSignature, SignedAuthorization};

/// Payments per route.
const N: usize = 200;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run());
}

async fn run() {
    let net = Arc::new(Devnet::start().await.expect("anvil (run ops/setup.sh)"));
    let w = Wallets::deploy(&net).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::parse("").unwrap();
    config.tokens.push(net.token_config());
    let mut chain = net.chain_config();
    chain.erc6492_factories = vec![w.factory];
    config.chains.push(chain);
    config.ledger.path = Some(dir.path().join("ledger"));
    // Cached state stays fresh for the whole run: the cached route measures no RPC.
    config.balances.max_age_ms = 600_000;
    let listeners = x402_batcher::daemon::Listeners::loopback().await.unwrap();
    let url = format!("http://{}", listeners.api.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(x402_batcher::daemon::serve(config, listeners, Arc::new(SystemClock), async {
        let _ = stopped.await;
    }));
    let domain = net.token_domain();
    let now = SystemClock.now_unix();
    let pay = |key: &PrivateKeySigner, from: Address, i: u64| {
        PaymentBuilder::new(key, &domain, now).from(from).value(1_000).nonce_index(i)
    };

    // Payers: keys (each pays twice: first seen, then cached), wallets, 7702 accounts,
    // counterfactual wallets (each pays once: its first payment is the 6492 route).
    let keys = devnet::payer_keys("routes eoa", N + 20);
    let owners = devnet::payer_keys("routes owner", 10);
    let accounts = devnet::payer_keys("routes 7702", 10);
    let mut wallets = Vec::new();
    for o in &owners {
        wallets.push(w.create_wallet(&net, o.address(), 1).await.unwrap());
    }
    for a in &accounts {
        w.delegate(&net, a, w.self_signed).await.unwrap();
    }
    let owner = &owners[0];
    let mut counterfactual = Vec::new();
    for salt in 0..(N as u64 + 20) {
        counterfactual.push(w.wallet_address(&net, owner.address(), 100 + salt).await.unwrap());
    }
    let mut funded: Vec<Address> = keys.iter().map(|k| k.address()).collect();
    funded.extend(&wallets);
    funded.extend(accounts.iter().map(|a| a.address()));
    funded.extend(&counterfactual);
    net.fund(&funded, U256::from(10_000_000u64)).await.unwrap();

    let client = Client::connect(url).await.unwrap();
    let mut table = Vec::new();

    // Warm-up (connections, caches of the daemon's own), then each route.
    let warm: Vec<_> =
        keys[N..].iter().enumerate().map(|(i, k)| pay(k, k.address(), i as u64).build()).collect();
    latencies(&client, &warm).await;
    let first: Vec<_> = keys[..N].iter().map(|k| pay(k, k.address(), 1).build()).collect();
    table.push(("eoa_first_seen", latencies(&client, &first).await));
    let cached: Vec<_> = keys[..N].iter().map(|k| pay(k, k.address(), 2).build()).collect();
    table.push(("eoa_cached", latencies(&client, &cached).await));
    let wallet_pays: Vec<_> = (0..N)
        .map(|i| {
            let j = i % owners.len();
            pay(&owners[j], wallets[j], 10 + i as u64).wrap_signature(owned_wallet_signature).build()
        })
        .collect();
    table.push(("erc1271", latencies(&client, &wallet_pays).await));
    let delegated: Vec<_> = (0..N)
        .map(|i| {
            pay(&accounts[i % accounts.len()], accounts[i % accounts.len()].address(), 10 + i as u64).build()
        })
        .collect();
    table.push(("eip7702", latencies(&client, &delegated).await));
    let wrapped: Vec<_> = (0..N)
        .map(|i| {
            let mut p = pay(owner, counterfactual[i], 1).wrap_signature(owned_wallet_signature).build();
            let sig = erc6492_signature(
                w.factory,
                Wallets::create_calldata(owner.address(), 100 + i as u64),
                p.signature.bytes().clone(),
            );
            p.signature = RawSignature::new(sig).unwrap();
            p
        })
        .collect();
    table.push(("erc6492", latencies(&client, &wrapped).await));

    println!(
        "admission latency per payer route, {N} sequential Submit calls each (gRPC, in-process daemon, anvil)"
    );
    println!("| route | p50 | p90 | p99 | mean |");
    println!("|---|---:|---:|---:|---:|");
    let base = table.iter().find(|(r, _)| *r == "eoa_cached").map(|(_, l)| mean(l)).unwrap();
    for (route, l) in &table {
        println!(
            "| {route} | {} | {} | {} | {} ({:.1} × eoa_cached) |",
            ms(pct(l, 50)),
            ms(pct(l, 90)),
            ms(pct(l, 99)),
            ms(mean(l)),
            mean(l).as_secs_f64() / base.as_secs_f64()
        );
    }
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// Each payment's Submit latency, one at a time; every one must be accepted.
async fn latencies(client: &Client, items: &[SignedAuthorization]) -> Vec<Duration> {
    let mut out = Vec::with_capacity(items.len());
    for (i, s) in items.iter().enumerate() {
        let req = client::typed_request(format!("r{i}"), s, &testkit::requirements_for(s));
        let started = Instant::now();
        let reply = client.ingest.clone().submit(req).await.expect("no transport error").into_inner();
        out.push(started.elapsed());
        assert!(
            matches!(reply.outcome, Some(v1::submit_reply::Outcome::Accepted(_))),
            "{}: {reply:?}",
            s.authorization.from
        );
    }
    out
}

fn pct(l: &[Duration], p: usize) -> Duration {
    let mut v = l.to_vec();
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn mean(l: &[Duration]) -> Duration {
    l.iter().sum::<Duration>() / l.len() as u32
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}
