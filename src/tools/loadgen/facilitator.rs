//! Load over the x402 facilitator's HTTP API: pre-signed `X-PAYMENT` headers sent to
//! `POST /verify` (and `/settle`) by concurrent callers, with latency percentiles.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::v1;
use crate::tools::testkit::{self};
use crate::x402::eip712::TokenDomain;

use super::{LoadOptions, percentile, presign};

/// Signs `opts.payments` facilitator request bodies (x402 v2, `POST /verify` or `/settle`)
/// up front, on every core: the HTTP facilitator's load.
pub fn presign_facilitator(domain: &TokenDomain, opts: &LoadOptions, now: u64) -> Vec<String> {
    presign(domain, opts, now)
        .into_iter()
        .map(|req| {
            let Some(v1::submit_request::Payment::Authorization(a)) = &req.payment else {
                unreachable!("presign makes typed submissions")
            };
            let signed = crate::api::signed_authorization(a).expect("presign makes well-formed submissions");
            testkit::facilitator_body(&signed, &testkit::requirements_for(&signed), domain)
        })
        .collect()
}

/// What a burst of `POST /verify` (or verify-then-settle) calls achieved.
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    pub sent: usize,
    /// Answered valid (verify) or success (settle).
    pub valid: usize,
    /// Refusals by x402 reason code (`isValid` or `success` false).
    pub invalid: BTreeMap<String, usize>,
    /// Answers other than 200, by HTTP status (0: no answer).
    pub errors: BTreeMap<u16, usize>,
    pub elapsed: Duration,
    /// Latencies of every call, sorted.
    pub latencies: Vec<Duration>,
}

impl VerifyReport {
    /// Verifications answered valid per second.
    pub fn throughput(&self) -> f64 {
        self.valid as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `p`-th latency percentile (0..=100).
    pub fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }

    pub fn summary(&self) -> String {
        format!(
            "sent {}, valid {}, invalid {:?}, errors {:?}, in {:.2} s: {:.0} verifications/s, latency p50 \
             {:.2} ms p99 {:.2} ms",
            self.sent,
            self.valid,
            self.invalid,
            self.errors,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            self.percentile(50.0).as_secs_f64() * 1e3,
            self.percentile(99.0).as_secs_f64() * 1e3,
        )
    }
}

/// Posts every body to `{url}/verify` (and, with `settle`, then to `{url}/settle`: the
/// facilitator's side of one paid request), `concurrency` payments at a time over kept-alive
/// connections, with `token` as a bearer credential if given. Latencies cover both calls.
pub async fn run_verify(
    url: &str,
    bodies: Vec<String>,
    concurrency: usize,
    token: Option<&str>,
    settle: bool,
) -> VerifyReport {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("a plain HTTP client builds");
    let base = url.trim_end_matches('/').to_owned();
    let bodies = Arc::new(std::sync::Mutex::new(bodies.into_iter()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (http, base, bodies) = (http.clone(), base.clone(), Arc::clone(&bodies));
        let token = token.map(str::to_owned);
        tasks.spawn(async move {
            let mut report = VerifyReport::default();
            let call = async |endpoint: &str, body: &String| -> Result<serde_json::Value, u16> {
                let mut req = http
                    .post(format!("{base}/{endpoint}"))
                    .header("content-type", "application/json")
                    .body(body.clone());
                if let Some(t) = &token {
                    req = req.bearer_auth(t);
                }
                let reply = req.send().await.map_err(|_| 0u16)?;
                let status = reply.status().as_u16();
                match (status, reply.json::<serde_json::Value>().await) {
                    (200, Ok(v)) => Ok(v),
                    (status, _) => Err(status),
                }
            };
            loop {
                let Some(body) = bodies.lock().expect("not poisoned").next() else { break };
                report.sent += 1;
                let at = Instant::now();
                let mut verdict = call("verify", &body).await;
                if settle && matches!(&verdict, Ok(v) if v["isValid"] == true) {
                    verdict = call("settle", &body).await;
                }
                report.latencies.push(at.elapsed());
                match verdict {
                    Ok(v) if v["isValid"] == true || v["success"] == true => report.valid += 1,
                    Ok(v) => {
                        let reason = v["invalidReason"].as_str().or(v["errorReason"].as_str());
                        *report.invalid.entry(reason.unwrap_or("(none)").to_owned()).or_default() += 1;
                    }
                    Err(status) => *report.errors.entry(status).or_default() += 1,
                }
            }
            report
        });
    }
    let mut total = VerifyReport::default();
    while let Some(Ok(r)) = tasks.join_next().await {
        total.sent += r.sent;
        total.valid += r.valid;
        for (k, v) in r.invalid {
            *total.invalid.entry(k).or_default() += v;
        }
        for (k, v) in r.errors {
            *total.errors.entry(k).or_default() += v;
        }
        total.latencies.extend(r.latencies);
    }
    total.elapsed = started.elapsed();
    total.latencies.sort();
    total
}
