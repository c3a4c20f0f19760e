//! Payers' on-chain token balances, cached with a maximum age and refreshed in bulk.
//!
//! The hot path never makes one RPC per request: a fresh cached balance is answered from
//! memory, and every miss that arrives while a refresh is running joins the next refresh
//! round, which reads all of them with one `aggregate3` `eth_call` of `balanceOf`s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Bytes, U256};
use alloy::sol_types::SolCall;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::chain::{IEip3009, IMulticall3, MULTICALL3, RpcEndpoint, RpcError};
use crate::ledger::PayerKey;

/// Why a balance could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalanceError {
    #[error("no RPC endpoint is configured for chain {chain_id}")]
    NoChain { chain_id: u64 },
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("token {token} did not return a balance for {from}")]
    Unreadable { token: String, from: String },
    #[error("the balance refresher has stopped")]
    Stopped,
}

/// Where balances come from: the chain in production, a table in unit tests.
pub trait BalanceSource: Send + Sync + 'static {
    /// The balances of `keys`, in order; each may fail on its own.
    fn balances<'a>(&'a self, keys: &'a [PayerKey]) -> BoxFuture<'a, Vec<Result<U256, BalanceError>>>;
}

/// Reads balances with `aggregate3` of `balanceOf` calls, one `eth_call` per chain per round.
pub struct ChainBalances {
    endpoints: HashMap<u64, RpcEndpoint>,
}

impl ChainBalances {
    pub fn new(endpoints: HashMap<u64, RpcEndpoint>) -> Self {
        Self { endpoints }
    }

    async fn read_chain(&self, chain_id: u64, keys: &[PayerKey]) -> Vec<Result<U256, BalanceError>> {
        let Some(endpoint) = self.endpoints.get(&chain_id) else {
            return keys.iter().map(|_| Err(BalanceError::NoChain { chain_id })).collect();
        };
        let calls = keys
            .iter()
            .map(|k| IMulticall3::Call3 {
                target: k.token(),
                allowFailure: true,
                callData: Bytes::from(IEip3009::balanceOfCall { account: k.from() }.abi_encode()),
            })
            .collect();
        match IMulticall3::new(MULTICALL3, &endpoint.provider).aggregate3(calls).call().await {
            Err(e) => {
                // The detail reaches API servers in UNAVAILABLE replies: no URL, no key.
                let err = endpoint.error("eth_call aggregate3 balanceOf", e);
                keys.iter().map(|_| Err(BalanceError::Rpc(err.clone()))).collect()
            }
            Ok(results) => keys
                .iter()
                .zip(results.into_iter().map(Some).chain(std::iter::repeat_with(|| None)))
                .map(|(k, r)| match r {
                    Some(r) if r.success && r.returnData.len() == 32 => {
                        Ok(U256::from_be_slice(&r.returnData))
                    }
                    _ => Err(BalanceError::Unreadable {
                        token: k.token().to_string(),
                        from: k.from().to_string(),
                    }),
                })
                .collect(),
        }
    }
}

impl BalanceSource for ChainBalances {
    fn balances<'a>(&'a self, keys: &'a [PayerKey]) -> BoxFuture<'a, Vec<Result<U256, BalanceError>>> {
        async move {
            let mut by_chain: HashMap<u64, Vec<usize>> = HashMap::new();
            for (i, k) in keys.iter().enumerate() {
                by_chain.entry(k.chain_id()).or_default().push(i);
            }
            let mut out = vec![Err(BalanceError::Stopped); keys.len()];
            for (chain_id, idx) in by_chain {
                let chain_keys: Vec<PayerKey> = idx.iter().map(|&i| keys[i]).collect();
                for (i, r) in idx.into_iter().zip(self.read_chain(chain_id, &chain_keys).await) {
                    out[i] = r;
                }
            }
            out
        }
        .boxed()
    }
}

type Waiter = (PayerKey, oneshot::Sender<Result<U256, BalanceError>>);

/// Cached balances with bulk refresh. Cloning shares the cache.
#[derive(Clone)]
pub struct BalanceCache {
    entries: Arc<Mutex<HashMap<PayerKey, (U256, Instant)>>>,
    max_age: Duration,
    tx: mpsc::Sender<Waiter>,
}

impl BalanceCache {
    /// Starts the refresher task. `max_batch` bounds the balances read in one call.
    pub fn start(source: Arc<dyn BalanceSource>, max_age: Duration, max_batch: usize) -> Self {
        let entries = Arc::new(Mutex::new(HashMap::new()));
        // Misses queue here while a refresh runs; a full queue makes callers wait, which
        // bounds memory and slows ingest only while the RPC node is slow.
        let (tx, rx) = mpsc::channel(max_batch.max(1) * 4);
        tokio::spawn(refresh(source, Arc::clone(&entries), rx, max_batch.max(1)));
        Self { entries, max_age, tx }
    }

    /// The payer's balance: cached if younger than the maximum age, else read in the next
    /// refresh round.
    pub async fn get(&self, key: PayerKey) -> Result<U256, BalanceError> {
        if let Some((balance, at)) = self.entries.lock().get(&key).copied()
            && at.elapsed() <= self.max_age
        {
            return Ok(balance);
        }
        let (tx, rx) = oneshot::channel();
        self.tx.send((key, tx)).await.map_err(|_| BalanceError::Stopped)?;
        rx.await.map_err(|_| BalanceError::Stopped)?
    }

    /// Forgets a cached balance (after the payer's balance is known to have changed).
    pub fn invalidate(&self, key: &PayerKey) {
        self.entries.lock().remove(key);
    }
}

async fn refresh(
    source: Arc<dyn BalanceSource>,
    entries: Arc<Mutex<HashMap<PayerKey, (U256, Instant)>>>,
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
        let by_key: HashMap<PayerKey, Result<U256, BalanceError>> = keys.into_iter().zip(results).collect();
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
    use alloy::primitives::Address;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        calls: AtomicUsize,
        keys: AtomicUsize,
    }

    impl BalanceSource for Counting {
        fn balances<'a>(&'a self, keys: &'a [PayerKey]) -> BoxFuture<'a, Vec<Result<U256, BalanceError>>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.keys.fetch_add(keys.len(), Ordering::SeqCst);
            async move {
                // Give concurrent misses time to queue behind this round.
                tokio::task::yield_now().await;
                keys.iter().map(|k| Ok(U256::from(k.from().0[19]))).collect()
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn misses_are_read_in_bulk_and_then_cached() {
        let source = Arc::new(Counting { calls: AtomicUsize::new(0), keys: AtomicUsize::new(0) });
        let cache = BalanceCache::start(source.clone(), Duration::from_secs(60), 1000);
        let keys: Vec<PayerKey> =
            (0..200u8).map(|i| PayerKey::new(1, Address::ZERO, Address::with_last_byte(i))).collect();
        let all = futures::future::join_all(keys.iter().map(|k| cache.get(*k))).await;
        for (i, b) in all.into_iter().enumerate() {
            assert_eq!(b, Ok(U256::from(i)));
        }
        let calls = source.calls.load(Ordering::SeqCst);
        assert!(calls < 200, "200 concurrent misses took {calls} reads");
        assert_eq!(source.keys.load(Ordering::SeqCst), 200, "each key read once");
        assert_eq!(cache.get(keys[5]).await, Ok(U256::from(5)));
        assert_eq!(source.calls.load(Ordering::SeqCst), calls, "a fresh entry is answered from memory");
    }
}
