//! The load generator: pre-signs `N` authorizations from `M` payers, submits them over
//! `SubmitStream`s at a target rate or flat out, and reports throughput and acknowledgement
//! latency percentiles. Used by `x402-batcher loadgen`, the crash test and the benchmark.
//!
//! - [`facilitator`]: the same over the x402 facilitator's HTTP API (`/verify`, `/settle`);
//! - [`command`]: `x402-batcher loadgen` itself: its own devnet and daemons (in process or
//!   capped processes), the ceilings, the report.

pub mod command;
pub mod facilitator;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::v1;
use crate::client::{self, Client};
use crate::tools::testkit::{self, PaymentBuilder};
use crate::x402::eip712::TokenDomain;

pub use command::{Command, LoadgenError, OwnLedger, Target, command};
pub use facilitator::{VerifyReport, presign_facilitator, run_verify};

/// What load to offer.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub payments: usize,
    /// Payers, each funded by the caller with enough for its share.
    pub payers: Vec<PrivateKeySigner>,
    /// Submissions per second over all streams; `None` sends flat out.
    pub rate: Option<f64>,
    /// Concurrent SubmitStreams.
    pub streams: usize,
    /// Base units per payment.
    pub value: u64,
    /// Payees, taken in turn (empty: the test kit's default payee).
    pub payees: Vec<Address>,
    /// Makes nonces differ between runs over the same payers.
    pub run_id: u64,
}

/// Signs every submission up front, on every core, so signing never throttles the load.
/// No payers, no payments.
pub fn presign(domain: &TokenDomain, opts: &LoadOptions, now: u64) -> Vec<v1::SubmitRequest> {
    if opts.payers.is_empty() {
        return Vec::new();
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let per = opts.payments.div_ceil(threads.max(1)).max(1);
    let mut out: Vec<Vec<v1::SubmitRequest>> = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..opts.payments)
            .step_by(per)
            .map(|start| {
                s.spawn(move || {
                    (start..(start + per).min(opts.payments))
                        .map(|i| {
                            let payer = &opts.payers[i % opts.payers.len()];
                            let b = PaymentBuilder::new(payer, domain, now)
                                .to(opts
                                    .payees
                                    .get(i % opts.payees.len().max(1))
                                    .copied()
                                    .unwrap_or(testkit::DEFAULT_PAYEE))
                                .value(opts.value)
                                .nonce_index((opts.run_id << 32) | i as u64);
                            let signed = b.build();
                            client::typed_request(i.to_string(), &signed, &testkit::requirements_for(&signed))
                        })
                        .collect()
                })
            })
            .collect();
        out = handles.into_iter().map(|h| h.join().expect("signing thread does not panic")).collect();
    });
    out.into_iter().flatten().collect()
}

/// What the load achieved.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub sent: usize,
    /// Indices (request ids) of acknowledged submissions, new or duplicate.
    pub acked: Vec<usize>,
    pub duplicates: usize,
    /// Refusals by x402 reason code.
    pub rejected: BTreeMap<String, usize>,
    /// Per-request system conditions by gRPC code.
    pub errors: BTreeMap<i32, usize>,
    /// Streams that ended with a transport error (the daemon went away).
    pub broken_streams: usize,
    pub elapsed: Duration,
    /// Acknowledgement latencies, sorted.
    pub latencies: Vec<Duration>,
}

impl LoadReport {
    /// Acknowledged payments per second.
    pub fn throughput(&self) -> f64 {
        self.acked.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `p`-th latency percentile (0..=100).
    pub fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }

    pub fn summary(&self) -> String {
        format!(
            "sent {}, acked {} ({} duplicates), rejected {:?}, errors {:?}, broken streams {}, in {:.2} s: \
             {:.0} acks/s, latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
            self.sent,
            self.acked.len(),
            self.duplicates,
            self.rejected,
            self.errors,
            self.broken_streams,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            self.percentile(50.0).as_secs_f64() * 1e3,
            self.percentile(99.0).as_secs_f64() * 1e3,
            self.latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        )
    }
}

/// The `p`-th percentile (0..=100) of sorted latencies (zero for none).
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Submits `requests` (request ids must be their indices) over `streams` SubmitStreams.
pub async fn run(
    client: &Client,
    requests: Vec<v1::SubmitRequest>,
    rate: Option<f64>,
    streams: usize,
) -> LoadReport {
    run_spread(std::slice::from_ref(client), requests, rate, streams).await
}

/// As [`run`], with the streams spread over `clients` in turn (several daemons).
pub async fn run_spread(
    clients: &[Client],
    requests: Vec<v1::SubmitRequest>,
    rate: Option<f64>,
    streams: usize,
) -> LoadReport {
    let streams = streams.max(1);
    let n = requests.len();
    let started = Instant::now();
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let mut shards: Vec<Vec<v1::SubmitRequest>> = (0..streams).map(|_| Vec::new()).collect();
    for (i, r) in requests.into_iter().enumerate() {
        shards[i % streams].push(r);
    }
    let interval = rate.map(|r| Duration::from_secs_f64(streams as f64 / r.max(1e-3)));

    let mut tasks = tokio::task::JoinSet::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let mut ingest = clients[i % clients.len().max(1)].ingest.clone();
        let sent_at = Arc::clone(&sent_at);
        tasks.spawn(async move {
            let (tx, rx) = mpsc::channel(1024);
            let sender = {
                let sent_at = Arc::clone(&sent_at);
                tokio::spawn(async move {
                    let mut tick = interval.map(tokio::time::interval);
                    for req in shard {
                        if let Some(t) = tick.as_mut() {
                            t.tick().await;
                        }
                        if let Ok(i) = req.request_id.parse::<usize>() {
                            sent_at[i].store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        }
                        if tx.send(req).await.is_err() {
                            break;
                        }
                    }
                })
            };
            let mut report = LoadReport::default();
            match ingest.submit_stream(ReceiverStream::new(rx)).await {
                Err(_) => report.broken_streams += 1,
                Ok(replies) => {
                    let mut replies = replies.into_inner();
                    while let Some(reply) = replies.next().await {
                        let Ok(reply) = reply else {
                            report.broken_streams += 1;
                            break;
                        };
                        let Ok(i) = reply.request_id.parse::<usize>() else { continue };
                        let at = Duration::from_nanos(sent_at[i].load(Ordering::Relaxed));
                        report.latencies.push(started.elapsed().saturating_sub(at));
                        match reply.outcome {
                            Some(v1::submit_reply::Outcome::Accepted(a)) => {
                                report.acked.push(i);
                                report.duplicates += a.duplicate as usize;
                            }
                            Some(v1::submit_reply::Outcome::Rejected(r)) => {
                                *report.rejected.entry(r.reason).or_default() += 1
                            }
                            Some(v1::submit_reply::Outcome::Error(e)) => {
                                *report.errors.entry(e.code).or_default() += 1
                            }
                            None => {}
                        }
                    }
                }
            }
            sender.abort();
            report
        });
    }
    let mut total = LoadReport { sent: n, ..LoadReport::default() };
    while let Some(Ok(r)) = tasks.join_next().await {
        total.acked.extend(r.acked);
        total.duplicates += r.duplicates;
        for (k, v) in r.rejected {
            *total.rejected.entry(k).or_default() += v;
        }
        for (k, v) in r.errors {
            *total.errors.entry(k).or_default() += v;
        }
        total.broken_streams += r.broken_streams;
        total.latencies.extend(r.latencies);
    }
    total.elapsed = started.elapsed();
    total.latencies.sort();
    total.acked.sort();
    total
}
