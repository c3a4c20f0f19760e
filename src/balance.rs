//! Payers' on-chain token balances and code, cached with a maximum age and refreshed in
//! bulk.
//!
//! The hot path never makes one RPC per request: a fresh cached balance is answered from
//! memory, and every miss that arrives while a refresh is running joins the next refresh
//! round, which reads all of them with one deployless `eth_call` per chain (chains in
//! parallel): `PayerProbe` answers each payer's `balanceOf` and its code, which decides how
//! its signature is judged ([`crate::payer`]).
//!
//! A node that browns out (accepts and never answers, or fails) must not hold submissions
//! until their clients give up: each read has its own short deadline
//! ([`crate::config::DEFAULT_BALANCE_READ_TIMEOUT_MS`]), and each chain a circuit breaker:
//! after a failed read, reads of that chain are refused at once (UNAVAILABLE naming the
//! chain) except one probe every [`PROBE_EVERY`], whose success closes the breaker. An
//! operator may opt in to answering from a stale balance meanwhile (`stale_ok_ms`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::chain::{RpcEndpoint, RpcError};
use crate::config::BalanceConfig;
use crate::ledger::PayerKey;
use crate::payer::{PayerState, probe_payers};

/// While a chain's breaker is open, one read is let through this often to see whether the
/// node is back: ingest recovers within this long of the node.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Why a balance could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalanceError {
    #[error("no RPC endpoint is configured for chain {chain_id}")]
    NoChain { chain_id: u64 },
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("chain {chain_id}: the RPC node did not answer a balance read within {after_ms} ms")]
    Timeout { chain_id: u64, after_ms: u64 },
    #[error(
        "chain {chain_id}: the RPC node is failing (for {failing_ms} ms; last: {last}); balance reads are refused until it answers again"
    )]
    NodeFailing { chain_id: u64, failing_ms: u64, last: String },
    #[error("token {token} did not return a balance for {from}")]
    Unreadable { token: String, from: String },
    #[error("the balance refresher has stopped")]
    Stopped,
}

/// Result of reading one payer.
pub type Read = Result<PayerState, BalanceError>;

/// Where balances come from: the chain in production, a table in unit tests.
pub trait BalanceSource: Send + Sync + 'static {
    /// The balances and code of `keys`' payers, in order; each may fail on its own.
    fn balances<'a>(&'a self, keys: &'a [PayerKey]) -> BoxFuture<'a, Vec<Read>>;
}

/// A chain whose last balance read failed: since when, why, and when a read last went out.
#[derive(Debug, Clone)]
struct Failing {
    since: Instant,
    last: String,
    probed_at: Instant,
}

/// One circuit breaker per chain (see the module docs). Pure bookkeeping over `Instant`s,
/// so its rules are tested without a node.
#[derive(Debug, Default)]
pub struct Breakers(Mutex<HashMap<u64, Failing>>);

impl Breakers {
    /// Whether a read of `chain_id` may go out at `now`; if not, the refusal. A read let
    /// through while the breaker is open is the probe (the next one waits `PROBE_EVERY`).
    pub fn admit(&self, chain_id: u64, now: Instant) -> Result<(), BalanceError> {
        let mut failing = self.0.lock();
        match failing.get_mut(&chain_id) {
            None => Ok(()),
            Some(f) if now.saturating_duration_since(f.probed_at) >= PROBE_EVERY => {
                f.probed_at = now;
                Ok(())
            }
            Some(f) => Err(BalanceError::NodeFailing {
                chain_id,
                failing_ms: now.saturating_duration_since(f.since).as_millis() as u64,
                last: f.last.clone(),
            }),
        }
    }

    /// A read of `chain_id` failed at `now` (a timeout or an RPC error): the breaker opens.
    pub fn failed(&self, chain_id: u64, now: Instant, why: &BalanceError) {
        let mut failing = self.0.lock();
        let f = failing.entry(chain_id).or_insert_with(|| {
            tracing::warn!(
                chain_id,
                "balance reads failing: refusing submissions that need one until the node answers ({why})"
            );
            Failing { since: now, last: String::new(), probed_at: now }
        });
        f.last = why.to_string();
        f.probed_at = now;
        metrics::gauge!("x402_batcher_balance_breaker_open", "chain_id" => chain_id.to_string()).set(1.0);
    }

    /// A read of `chain_id` succeeded: the breaker closes.
    pub fn succeeded(&self, chain_id: u64, now: Instant) {
        if let Some(f) = self.0.lock().remove(&chain_id) {
            let after = now.saturating_duration_since(f.since);
            tracing::info!(chain_id, ?after, "balance reads answered again: the node is back");
            metrics::gauge!("x402_batcher_balance_breaker_open", "chain_id" => chain_id.to_string()).set(0.0);
        }
    }
}

/// Reads balances and code with `PayerProbe`, one `eth_call` per chain per round, each
/// within the read deadline and behind its chain's breaker.
pub struct ChainBalances {
    endpoints: HashMap<u64, RpcEndpoint>,
    timeout: Duration,
    breakers: Breakers,
}

impl ChainBalances {
    pub fn new(endpoints: HashMap<u64, RpcEndpoint>, timeout: Duration) -> Self {
        for chain_id in endpoints.keys() {
            let chain = chain_id.to_string();
            metrics::gauge!("x402_batcher_balance_breaker_open", "chain_id" => chain.clone()).set(0.0);
            metrics::counter!("x402_batcher_balance_stale_answers_total", "chain_id" => chain).increment(0);
        }
        Self { endpoints, timeout, breakers: Breakers::default() }
    }

    async fn read_chain(&self, chain_id: u64, keys: &[PayerKey]) -> Vec<Read> {
        let all = |e: BalanceError| keys.iter().map(|_| Err(e.clone())).collect();
        let Some(endpoint) = self.endpoints.get(&chain_id) else {
            return all(BalanceError::NoChain { chain_id });
        };
        if let Err(refused) = self.breakers.admit(chain_id, Instant::now()) {
            return all(refused);
        }
        let pairs: Vec<_> = keys.iter().map(|k| (k.token(), k.from())).collect();
        let failure = match tokio::time::timeout(self.timeout, probe_payers(endpoint, &pairs)).await {
            Ok(Ok(answers)) => {
                self.breakers.succeeded(chain_id, Instant::now());
                return keys
                    .iter()
                    .zip(answers)
                    .map(|(k, (balance, code))| match balance {
                        Some(balance) => Ok(PayerState { balance, code }),
                        None => Err(BalanceError::Unreadable {
                            token: k.token().to_string(),
                            from: k.from().to_string(),
                        }),
                    })
                    .collect();
            }
            // The detail reaches API servers in UNAVAILABLE replies: no URL, no key.
            Ok(Err(e)) => BalanceError::Rpc(e),
            Err(_) => BalanceError::Timeout { chain_id, after_ms: self.timeout.as_millis() as u64 },
        };
        self.breakers.failed(chain_id, Instant::now(), &failure);
        all(failure)
    }
}

impl BalanceSource for ChainBalances {
    fn balances<'a>(&'a self, keys: &'a [PayerKey]) -> BoxFuture<'a, Vec<Read>> {
        async move {
            let mut by_chain: HashMap<u64, Vec<usize>> = HashMap::new();
            for (i, k) in keys.iter().enumerate() {
                by_chain.entry(k.chain_id()).or_default().push(i);
            }
            // Chains in parallel: one failing node does not hold another chain's payers.
            let reads = by_chain.into_iter().map(|(chain_id, idx)| async move {
                let chain_keys: Vec<PayerKey> = idx.iter().map(|&i| keys[i]).collect();
                (idx, self.read_chain(chain_id, &chain_keys).await)
            });
            let mut out = vec![Err(BalanceError::Stopped); keys.len()];
            for (idx, results) in futures::future::join_all(reads).await {
                for (i, r) in idx.into_iter().zip(results) {
                    out[i] = r;
                }
            }
            out
        }
        .boxed()
    }
}

type Waiter = (PayerKey, oneshot::Sender<Read>);
type Entries = Arc<Mutex<HashMap<PayerKey, (PayerState, Instant)>>>;

/// Cached balances and code with bulk refresh. Cloning shares the cache.
#[derive(Clone)]
pub struct BalanceCache {
    entries: Entries,
    max_age: Duration,
    /// How much older than `max_age` a balance may be to answer while reads fail.
    stale_ok: Duration,
    /// Longest a caller waits for its read (its own round and the one before it).
    wait: Duration,
    tx: mpsc::Sender<Waiter>,
}

impl BalanceCache {
    /// Starts the refresher task over `source` with the freshness and batch size of
    /// `config`.
    pub fn start(source: Arc<dyn BalanceSource>, config: &BalanceConfig) -> Self {
        let max_batch = config.max_batch.max(1);
        let entries = Arc::new(Mutex::new(HashMap::new()));
        // Misses queue here while a refresh runs; a full queue makes callers wait, which
        // bounds memory and slows ingest only while the RPC node is slow.
        let (tx, rx) = mpsc::channel(max_batch * 4);
        tokio::spawn(refresh(source, Arc::clone(&entries), rx, max_batch));
        Self {
            entries,
            max_age: Duration::from_millis(config.max_age_ms),
            stale_ok: Duration::from_millis(config.stale_ok_ms),
            wait: Duration::from_millis(config.read_timeout_ms.saturating_mul(2)),
            tx,
        }
    }

    /// The payer's balance and code: cached if younger than the maximum age, else read in
    /// the next refresh round. When the read fails, a balance at most `stale_ok` older than
    /// the maximum age answers instead (never, by default).
    pub async fn get(&self, key: PayerKey) -> Read {
        self.get_noting_cache(key).await.0
    }

    /// [`BalanceCache::get`], and whether the answer came from memory.
    pub async fn get_noting_cache(&self, key: PayerKey) -> (Read, bool) {
        let cached = self.entries.lock().get(&key).copied();
        if let Some((balance, at)) = cached
            && at.elapsed() <= self.max_age
        {
            return (Ok(balance), true);
        }
        let read = async {
            let (tx, rx) = oneshot::channel();
            self.tx.send((key, tx)).await.map_err(|_| BalanceError::Stopped)?;
            rx.await.map_err(|_| BalanceError::Stopped)?
        };
        let result = match tokio::time::timeout(self.wait, read).await {
            Ok(result) => result,
            Err(_) => Err(BalanceError::Timeout {
                chain_id: key.chain_id(),
                after_ms: self.wait.as_millis() as u64,
            }),
        };
        let read = match (result, cached) {
            (Err(e), Some((balance, at)))
                if !self.stale_ok.is_zero() && at.elapsed() <= self.max_age + self.stale_ok =>
            {
                tracing::debug!(chain_id = key.chain_id(), "answering from a stale balance: {e}");
                metrics::counter!("x402_batcher_balance_stale_answers_total", "chain_id" => key.chain_id().to_string())
                    .increment(1);
                Ok(balance)
            }
            (result, _) => result,
        };
        (read, false)
    }

    /// Forgets a cached balance (after the payer's balance is known to have changed).
    pub fn invalidate(&self, key: &PayerKey) {
        self.entries.lock().remove(key);
    }
}

async fn refresh(
    source: Arc<dyn BalanceSource>,
    entries: Entries,
    mut rx: mpsc::Receiver<Waiter>,
    max_batch: usize,
) {
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while waiters.len() < max_batch {
            match rx.try_recv() {
                Ok(w) => waiters.push(w),
                Err(_) => break,
            }
        }
        let mut keys: Vec<PayerKey> = waiters.iter().map(|(k, _)| *k).collect();
        keys.sort();
        keys.dedup();
        let read_at = Instant::now();
        let results = source.balances(&keys).await;
        let by_key: HashMap<PayerKey, Read> = keys.into_iter().zip(results).collect();
        {
            let mut entries = entries.lock();
            for (k, r) in &by_key {
                if let Ok(b) = r {
                    entries.insert(*k, (*b, read_at));
                }
            }
        }
        for (k, tx) in waiters {
            let _ = tx.send(by_key.get(&k).cloned().unwrap_or(Err(BalanceError::Stopped)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payer::PayerCode;
    use alloy::primitives::{Address, U256};

    fn eoa(balance: u64) -> PayerState {
        PayerState { balance: U256::from(balance), code: PayerCode::None }
    }
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        calls: AtomicUsize,
        keys: AtomicUsize,
    }

    impl BalanceSource for Counting {
        fn balances<'a>(&'a self, keys: &'a [PayerKey]) -> BoxFuture<'a, Vec<Read>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.keys.fetch_add(keys.len(), Ordering::SeqCst);
            async move {
                // Give concurrent misses time to queue behind this round.
                tokio::task::yield_now().await;
                keys.iter().map(|k| Ok(eoa(u64::from(k.from().0[19])))).collect()
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn misses_are_read_in_bulk_and_then_cached() {
        let source = Arc::new(Counting { calls: AtomicUsize::new(0), keys: AtomicUsize::new(0) });
        let config = BalanceConfig { max_age_ms: 60_000, max_batch: 1000, ..BalanceConfig::default() };
        let cache = BalanceCache::start(source.clone(), &config);
        let keys: Vec<PayerKey> =
            (0..200u8).map(|i| PayerKey::new(1, Address::ZERO, Address::with_last_byte(i))).collect();
        let all = futures::future::join_all(keys.iter().map(|k| cache.get(*k))).await;
        for (i, b) in all.into_iter().enumerate() {
            assert_eq!(b, Ok(eoa(i as u64)));
        }
        let calls = source.calls.load(Ordering::SeqCst);
        assert!(calls < 200, "200 concurrent misses took {calls} reads");
        assert_eq!(source.keys.load(Ordering::SeqCst), 200, "each key read once");
        assert_eq!(cache.get(keys[5]).await, Ok(eoa(5)));
        assert_eq!(source.calls.load(Ordering::SeqCst), calls, "a fresh entry is answered from memory");
    }

    #[test]
    fn a_failed_read_opens_the_breaker_until_a_probe_succeeds() {
        let b = Breakers::default();
        let t0 = Instant::now();
        assert_eq!(b.admit(8453, t0), Ok(()));
        b.failed(8453, t0, &BalanceError::Timeout { chain_id: 8453, after_ms: 1000 });
        let refused = b.admit(8453, t0 + Duration::from_millis(100)).unwrap_err();
        assert!(refused.to_string().starts_with("chain 8453: the RPC node is failing"), "{refused}");
        assert!(refused.to_string().contains("did not answer"), "the last failure is named: {refused}");
        assert_eq!(b.admit(1, t0), Ok(()), "another chain is not affected");
        // One probe after PROBE_EVERY; the next waits again.
        assert_eq!(b.admit(8453, t0 + PROBE_EVERY), Ok(()));
        assert!(b.admit(8453, t0 + PROBE_EVERY + Duration::from_millis(1)).is_err());
        b.succeeded(8453, t0 + PROBE_EVERY * 2);
        assert_eq!(b.admit(8453, t0 + PROBE_EVERY * 2), Ok(()), "closed again");
    }

    /// A source whose reads never answer (a node that accepts and hangs), or fail at once.
    struct Broken {
        hang: bool,
    }

    impl BalanceSource for Broken {
        fn balances<'a>(&'a self, keys: &'a [PayerKey]) -> BoxFuture<'a, Vec<Read>> {
            async move {
                if self.hang {
                    futures::future::pending::<()>().await;
                }
                keys.iter().map(|_| Err(BalanceError::Timeout { chain_id: 1, after_ms: 1 })).collect()
            }
            .boxed()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_never_waits_past_two_read_deadlines() {
        let config = BalanceConfig { read_timeout_ms: 1_000, ..BalanceConfig::default() };
        let cache = BalanceCache::start(Arc::new(Broken { hang: true }), &config);
        let started = tokio::time::Instant::now();
        let e = cache.get(PayerKey::new(1, Address::ZERO, Address::ZERO)).await.unwrap_err();
        assert_eq!(e, BalanceError::Timeout { chain_id: 1, after_ms: 2_000 });
        assert_eq!(started.elapsed(), Duration::from_millis(2_000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_balance_answers_only_when_the_operator_allows_it() {
        let key = PayerKey::new(1, Address::ZERO, Address::with_last_byte(7));
        for (stale_ok_ms, expected) in [(0, None), (10_000, Some(eoa(7)))] {
            let config = BalanceConfig { max_age_ms: 1_000, stale_ok_ms, ..BalanceConfig::default() };
            let cache = BalanceCache::start(Arc::new(Broken { hang: false }), &config);
            let read_at = Instant::now().checked_sub(Duration::from_millis(1_500)).unwrap();
            cache.entries.lock().insert(key, (eoa(7), read_at));
            assert_eq!(cache.get(key).await.ok(), expected, "stale_ok_ms {stale_ok_ms}");
        }
    }
}
