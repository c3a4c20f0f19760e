//! Several RPC endpoints of one chain as one transport (issue #28): operators run two or
//! three providers, and one that browns out must not stop payments.
//!
//! - **Reads** go to the best usable endpoint: usable means its breaker is closed (fewer
//!   than [`BREAKER_FAILURES`] failures in a row) and its head is at most [`MAX_LAG_BLOCKS`]
//!   behind the highest head any endpoint reports, so a lagging endpoint never answers for
//!   the chain's head, receipts or finality; among the usable ones the lowest latency
//!   (a moving average) wins. A read the best endpoint has not answered within
//!   [`HEDGE_AFTER`] is sent to the next one too and the first answer is taken, so a node
//!   that goes silent costs a fraction of a second, not a timeout. A transport error tries
//!   the next endpoint at once.
//! - **Signed transactions** (`eth_sendRawTransaction`) go to every endpoint at once: the
//!   first success answers (a second node saying "already known" is no failure).
//! - A **probe** asks every endpoint for its head every [`PROBE_INTERVAL`] (within
//!   [`PROBE_TIMEOUT`]), so the heads and the breakers are current even for endpoints no read
//!   went to; an endpoint whose probe fails counts a failure, one that answers again is
//!   usable again. Changes are logged (by the endpoint's position in the config: URLs may
//!   carry keys), and each probe sets `x402_batcher_rpc_endpoint_usable` and
//!   `x402_batcher_rpc_endpoint_lag_blocks` per endpoint.
//!
//! With one endpoint the daemon does not use this at all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::json_rpc::{RequestPacket, ResponsePacket};
use alloy::transports::http::Http;
use alloy::transports::http::reqwest::{Client, Url};
use alloy::transports::{TransportError, TransportFut};
use futures::FutureExt as _;
use parking_lot::Mutex;

/// Consecutive failures (calls or probes) that take an endpoint out of use until it answers
/// a probe again.
pub const BREAKER_FAILURES: u32 = 2;

/// Blocks an endpoint's head may be behind the highest before it is not used.
pub const MAX_LAG_BLOCKS: u64 = 2;

/// How long a read waits for the best endpoint before it is also sent to the next one.
pub const HEDGE_AFTER: Duration = Duration::from_millis(250);

/// How often every endpoint's head is read.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// Methods sent to every endpoint.
const BROADCAST: &[&str] = &["eth_sendRawTransaction", "eth_sendRawTransactionConditional"];

/// One endpoint and what is known of it.
struct Member {
    transport: Http<Client>,
    probe: DynProvider,
    state: Mutex<Health>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Health {
    failures: u32,
    /// Its head at the last probe (0: not known yet).
    head: u64,
    /// Moving average of its answer time, ms.
    latency_ms: f64,
    /// Whether it was usable at the last look (for logging changes).
    usable: bool,
}

/// The endpoints of one chain; cloned into every provider call.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    chain_id: u64,
    members: Vec<Member>,
}

impl Pool {
    /// The pool over `urls` (at least two), each reached with `client`. Starts its probe,
    /// which ends when the last clone of the pool is dropped.
    pub fn new(chain_id: u64, urls: &[Url], client: &Client) -> Pool {
        let members = urls
            .iter()
            .map(|url| Member {
                transport: Http::with_client(client.clone(), url.clone()),
                probe: ProviderBuilder::new().connect_reqwest(client.clone(), url.clone()).erased(),
                state: Mutex::new(Health { usable: true, ..Health::default() }),
            })
            .collect();
        let pool = Pool { inner: Arc::new(Inner { chain_id, members }) };
        let weak = Arc::downgrade(&pool.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROBE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.probe().await;
            }
        });
        pool
    }

    /// The endpoints' positions (from 1, as in the config), best first.
    pub fn order(&self) -> Vec<usize> {
        self.inner.order().into_iter().map(|i| i + 1).collect()
    }
}

impl Inner {
    fn highest_head(&self) -> u64 {
        self.members.iter().map(|m| m.state.lock().head).max().unwrap_or(0)
    }

    /// Member indices, best first: the usable ones by latency, then the others by how few
    /// failures they have (tried only when no usable one answers).
    fn order(&self) -> Vec<usize> {
        let highest = self.highest_head();
        let mut ranked: Vec<(bool, u32, u64, usize)> = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let h = *m.state.lock();
                let usable = usable(&h, highest);
                (!usable, h.failures, h.latency_ms.round() as u64, i)
            })
            .collect();
        ranked.sort();
        ranked.into_iter().map(|(.., i)| i).collect()
    }

    fn answered(&self, i: usize, took: Duration) {
        let mut h = self.members[i].state.lock();
        h.failures = 0;
        let ms = took.as_secs_f64() * 1e3;
        h.latency_ms = if h.latency_ms == 0.0 { ms } else { 0.8 * h.latency_ms + 0.2 * ms };
    }

    fn failed(&self, i: usize) {
        self.members[i].state.lock().failures += 1;
    }

    /// Reads every endpoint's head, and logs endpoints going out of or back into use.
    async fn probe(&self) {
        let reads = self.members.iter().map(|m| async move {
            let started = Instant::now();
            let head = tokio::time::timeout(PROBE_TIMEOUT, m.probe.get_block_number()).await;
            (head.ok().and_then(Result::ok), started.elapsed())
        });
        let heads = futures::future::join_all(reads).await;
        for (i, (head, took)) in heads.into_iter().enumerate() {
            match head {
                Some(n) => {
                    self.answered(i, took);
                    self.members[i].state.lock().head = n;
                }
                None => self.failed(i),
            }
        }
        let highest = self.highest_head();
        for (i, m) in self.members.iter().enumerate() {
            let mut h = m.state.lock();
            let now = usable(&h, highest);
            let labels = [("chain_id", self.chain_id.to_string()), ("endpoint", (i + 1).to_string())];
            metrics::gauge!("x402_batcher_rpc_endpoint_usable", &labels).set(if now { 1.0 } else { 0.0 });
            metrics::gauge!("x402_batcher_rpc_endpoint_lag_blocks", &labels)
                .set(highest.saturating_sub(h.head) as f64);
            if now != h.usable {
                h.usable = now;
                let (chain_id, endpoint, lag) = (self.chain_id, i + 1, highest.saturating_sub(h.head));
                if now {
                    tracing::info!(chain_id, endpoint, "RPC endpoint back in use");
                } else {
                    tracing::warn!(
                        chain_id,
                        endpoint,
                        failures = h.failures,
                        lag_blocks = lag,
                        "RPC endpoint out of use (failing, silent or behind the others' head)"
                    );
                }
            }
        }
    }

    /// A read: the best endpoint, hedged to the next after [`HEDGE_AFTER`]; a transport
    /// error moves on to the next at once.
    async fn read(self: Arc<Self>, request: RequestPacket) -> Result<ResponsePacket, TransportError> {
        let order = self.order();
        let mut next = order.into_iter();
        let mut running = futures::stream::FuturesUnordered::new();
        let mut last_error = None;
        let call = |i: usize| {
            let (inner, request) = (Arc::clone(&self), request.clone());
            async move {
                let started = Instant::now();
                let head_read =
                    matches!(&request, RequestPacket::Single(r) if r.method() == "eth_blockNumber");
                let mut transport = inner.members[i].transport.clone();
                let answer = tower::Service::call(&mut transport, request).await;
                match &answer {
                    Ok(_) => inner.answered(i, started.elapsed()),
                    Err(_) => inner.failed(i),
                }
                // A head behind the others' is never the chain's head: noted, and the read
                // goes on to the next endpoint.
                if head_read
                    && let Ok(response) = &answer
                    && let Some(head) = block_number(response)
                {
                    inner.members[i].state.lock().head = head;
                    if inner.highest_head().saturating_sub(head) > MAX_LAG_BLOCKS {
                        return Err(TransportError::local_usage_str(
                            "this RPC endpoint is behind the others' head",
                        ));
                    }
                }
                answer
            }
            .boxed()
        };
        if let Some(first) = next.next() {
            running.push(call(first));
        }
        use futures::StreamExt as _;
        loop {
            let hedge = tokio::time::sleep(HEDGE_AFTER);
            tokio::select! {
                answer = running.next() => match answer {
                    Some(Ok(response)) => return Ok(response),
                    Some(Err(e)) => {
                        last_error = Some(e);
                        match next.next() {
                            Some(i) => running.push(call(i)),
                            None if running.is_empty() => break,
                            None => {}
                        }
                    }
                    None => break,
                },
                _ = hedge => match next.next() {
                    Some(i) => running.push(call(i)),
                    None => {
                        // Every endpoint is asked: wait for the first answer.
                        if let Some(answer) = running.next().await {
                            match answer {
                                Ok(response) => return Ok(response),
                                Err(e) => last_error = Some(e),
                            }
                        }
                        if running.is_empty() {
                            break;
                        }
                    }
                },
            }
        }
        Err(last_error.unwrap_or_else(|| TransportError::local_usage_str("no RPC endpoint configured")))
    }

    /// A signed transaction: to every endpoint at once; the first accepted answers (the
    /// sends to the others go on in the background: a silent endpoint does not hold the
    /// settlement up for its timeout). If none accepts it, the first reply in the order of
    /// use (a node's refusal, such as "nonce too low"), else the first error.
    async fn broadcast(self: Arc<Self>, request: RequestPacket) -> Result<ResponsePacket, TransportError> {
        use futures::StreamExt as _;
        let order = self.order();
        let mut sends: futures::stream::FuturesUnordered<_> = order
            .iter()
            .enumerate()
            .map(|(rank, &i)| {
                let (inner, request) = (Arc::clone(&self), request.clone());
                let send = tokio::spawn(async move {
                    let mut transport = inner.members[i].transport.clone();
                    let answer = tower::Service::call(&mut transport, request).await;
                    match &answer {
                        Ok(_) => inner.answered(i, Duration::ZERO),
                        Err(_) => inner.failed(i),
                    }
                    answer
                });
                async move { (rank, send.await) }
            })
            .collect();
        let mut answers: Vec<(usize, Result<ResponsePacket, TransportError>)> = Vec::new();
        while let Some((rank, joined)) = sends.next().await {
            let answer = joined.unwrap_or_else(|e| Err(TransportError::local_usage_str(&e.to_string())));
            if answer.as_ref().is_ok_and(|r| !r.is_error()) {
                return answer;
            }
            answers.push((rank, answer));
        }
        answers.sort_by_key(|(rank, a)| (a.is_err(), *rank));
        answers
            .into_iter()
            .next()
            .map_or_else(|| Err(TransportError::local_usage_str("no RPC endpoint configured")), |(_, a)| a)
    }
}

/// The block number a successful `eth_blockNumber` answer carries.
fn block_number(response: &ResponsePacket) -> Option<u64> {
    let ResponsePacket::Single(r) = response else { return None };
    let hex: String = serde_json::from_str(r.payload.as_success()?.get()).ok()?;
    u64::from_str_radix(hex.trim_start_matches("0x"), 16).ok()
}

/// Whether an endpoint with `h` is used, when the highest head known is `highest`.
fn usable(h: &Health, highest: u64) -> bool {
    h.failures < BREAKER_FAILURES && highest.saturating_sub(h.head) <= MAX_LAG_BLOCKS
}

impl tower::Service<RequestPacket> for Pool {
    type Response = ResponsePacket;
    type Error = TransportError;
    type Future = TransportFut<'static>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RequestPacket) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        let broadcast = request.method_names().any(|m| BROADCAST.contains(&m));
        if broadcast { inner.broadcast(request).boxed() } else { inner.read(request).boxed() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_failing_or_behind_is_not_used() {
        let ok = Health { failures: 0, head: 100, latency_ms: 5.0, usable: true };
        assert!(usable(&ok, 100));
        assert!(usable(&ok, 100 + MAX_LAG_BLOCKS));
        assert!(!usable(&ok, 101 + MAX_LAG_BLOCKS), "lagging");
        assert!(!usable(&Health { failures: BREAKER_FAILURES, ..ok }, 100), "failing");
    }
}
