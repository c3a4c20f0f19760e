//! What a payer is on chain, and how its signatures are judged there.
//!
//! An EIP-3009 token with ERC-1271 support (FiatToken V2.2: USDC) recovers an ECDSA signer
//! only when the payer has **no code**; a payer with code (a contract wallet, or an
//! EIP-7702 account whose code is `0xef0100 ‖ delegate`) is asked by ERC-1271
//! `isValidSignature`. The daemon decides the same way: the payer's code is read with its
//! balance (one deployless `eth_call` of `PayerProbe` per chain for every payer waiting,
//! cached as long as the balance), and a payer with code has its signature judged by
//! [`check_signatures`] (one deployless `eth_call` of `SignatureProbe` per chain for every
//! check waiting, [`BatchedSignatures`]), never by ECDSA recovery alone.
//! Contracts: ops/devnet/contracts/Probes.sol.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionRequest;
use alloy::sol;
use alloy::sol_types::{SolType, SolValue, sol_data};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use crate::chain::{RpcEndpoint, RpcError};

sol! {
    /// One answer of the `PayerProbe` contract (ops/devnet/contracts/Probes.sol).
    struct ProbeAnswer {
        bool balanceRead;
        uint256 balance;
        uint256 codeSize;
        bytes32 codeHead;
    }
}

/// The creation code of a contract from its committed artifact (ops/devnet/artifacts).
fn creation_code(artifact: &str) -> Bytes {
    let json: serde_json::Value = serde_json::from_str(artifact).expect("a committed artifact is JSON");
    json["bytecode"].as_str().and_then(|h| h.parse().ok()).expect("a committed artifact has bytecode")
}

static PAYER_PROBE: LazyLock<Bytes> =
    LazyLock::new(|| creation_code(include_str!("../ops/devnet/artifacts/PayerProbe.json")));
static SIGNATURE_PROBE: LazyLock<Bytes> =
    LazyLock::new(|| creation_code(include_str!("../ops/devnet/artifacts/SignatureProbe.json")));

/// A payer's code, as the token's signature check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayerCode {
    /// No code: ECDSA recovery.
    None,
    /// An EIP-7702 account delegated to this contract: ERC-1271 through the delegate.
    Delegated(Address),
    /// A contract (a smart wallet): ERC-1271.
    Contract,
}

impl PayerCode {
    /// From the code's size and its first 32 bytes (zero-padded).
    pub fn from_probe(size: U256, head: B256) -> PayerCode {
        if size.is_zero() {
            PayerCode::None
        } else if size == U256::from(23) && head[..3] == [0xef, 0x01, 0x00] {
            PayerCode::Delegated(Address::from_slice(&head[3..23]))
        } else {
            PayerCode::Contract
        }
    }

    pub fn has_code(self) -> bool {
        self != PayerCode::None
    }
}

/// What a payer's balance read also tells: the balance and the payer's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayerState {
    pub balance: U256,
    pub code: PayerCode,
}

/// How a payment's signature was judged: the token will judge it the same way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    /// A payer without code: ECDSA recovery.
    #[default]
    Eoa,
    /// A contract wallet: ERC-1271.
    Erc1271,
    /// An EIP-7702 account: ERC-1271 through its delegate.
    Eip7702,
    /// A contract wallet not deployed yet: ERC-6492, deployed in the settlement batch.
    Erc6492,
}

impl Route {
    pub const ALL: [Route; 4] = [Route::Eoa, Route::Erc1271, Route::Eip7702, Route::Erc6492];

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Eoa => "eoa",
            Route::Erc1271 => "erc1271",
            Route::Eip7702 => "eip7702",
            Route::Erc6492 => "erc6492",
        }
    }

    /// The route a payer's code and signature take.
    pub fn of(code: PayerCode, wrapped_6492: bool) -> Route {
        match code {
            PayerCode::None if wrapped_6492 => Route::Erc6492,
            PayerCode::None => Route::Eoa,
            PayerCode::Delegated(_) => Route::Eip7702,
            PayerCode::Contract => Route::Erc1271,
        }
    }

    /// The ledger's number for it (0, the default, for records written before routes).
    pub fn to_disk(self) -> u32 {
        match self {
            Route::Eoa => 0,
            Route::Erc1271 => 1,
            Route::Eip7702 => 2,
            Route::Erc6492 => 3,
        }
    }

    pub fn from_disk(n: u32) -> Option<Route> {
        Route::ALL.into_iter().find(|r| r.to_disk() == n)
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A deployless call's answer is returned as if it were the code of a new contract, so it is
/// bound by the contract size limit (EIP-170: 24,576 bytes), and its input by the initcode
/// limit (EIP-3860: 49,152 bytes): nodes refuse anything larger. Rounds are split into
/// calls within both, run at once.
const MAX_ANSWER_BYTES: usize = 24_576;
const MAX_INITCODE_BYTES: usize = 49_152;

/// Payers per `PayerProbe` call: 128 bytes of answer each.
pub const PAYERS_PER_PROBE: usize = (MAX_ANSWER_BYTES - 64) / 128;

/// Splits `items` into runs whose encoded input (`size` bytes each, plus `fixed`) and
/// answer (`answer` bytes each) fit one deployless call.
fn chunks<T>(items: &[T], fixed: usize, size: impl Fn(&T) -> usize, answer: usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut input) = (0, fixed);
    for (i, item) in items.iter().enumerate() {
        let n = size(item);
        let answer_full = (i - start + 1) * answer + 64 > MAX_ANSWER_BYTES;
        if i > start && (input + n > MAX_INITCODE_BYTES || answer_full) {
            out.push(&items[start..i]);
            (start, input) = (i, fixed);
        }
        input += n;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// Runs a deployless contract: `creation ‖ args` as an `eth_call` without a target.
async fn deployless(
    endpoint: &RpcEndpoint,
    call: &'static str,
    creation: &Bytes,
    args: Vec<u8>,
) -> Result<Bytes, RpcError> {
    let mut data = creation.to_vec();
    data.extend_from_slice(&args);
    let tx = TransactionRequest::default().into_create().with_input(data);
    endpoint.provider.call(tx).await.map_err(|e| endpoint.error(call, e))
}

/// For each `(token, account)`: the token balance (`None` if the token did not return one)
/// and the account's code. One `eth_call`.
pub async fn probe_payers(
    endpoint: &RpcEndpoint,
    pairs: &[(Address, Address)],
) -> Result<Vec<(Option<U256>, PayerCode)>, RpcError> {
    const CALL: &str = "eth_call PayerProbe (balances and code)";
    let calls = chunks(pairs, PAYER_PROBE.len() + 128, |_| 64, 128).into_iter().map(|chunk| async move {
        let (tokens, accounts): (Vec<Address>, Vec<Address>) = chunk.iter().copied().unzip();
        let raw = deployless(endpoint, CALL, &PAYER_PROBE, (tokens, accounts).abi_encode_params()).await?;
        let answers = <Vec<ProbeAnswer>>::abi_decode(&raw).map_err(|e| endpoint.error(CALL, e))?;
        if answers.len() != chunk.len() {
            return Err(endpoint.error(CALL, format!("{} answers for {} payers", answers.len(), chunk.len())));
        }
        Ok(answers
            .into_iter()
            .map(|a| (a.balanceRead.then_some(a.balance), PayerCode::from_probe(a.codeSize, a.codeHead)))
            .collect::<Vec<_>>())
    });
    let mut out = Vec::with_capacity(pairs.len());
    for answers in futures::future::join_all(calls).await {
        out.extend(answers?);
    }
    Ok(out)
}

/// The chain's verdict on one signature (`SignatureProbe`'s numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainVerdict {
    Valid,
    /// The signer has no code and the signature does not recover to it.
    EcdsaMismatch,
    /// The signer's `isValidSignature` reverted or did not return the magic value.
    Erc1271Refused,
    /// ERC-6492: the factory call left the signer without code.
    NotDeployed,
}

impl ChainVerdict {
    fn from_probe(n: u8) -> Option<ChainVerdict> {
        Some(match n {
            0 => ChainVerdict::Valid,
            1 => ChainVerdict::EcdsaMismatch,
            2 => ChainVerdict::Erc1271Refused,
            3 => ChainVerdict::NotDeployed,
            _ => return None,
        })
    }
}

/// Judges each `(signer, digest, signature)` as a token with ERC-1271 support will, on the
/// latest block; ERC-6492 wrappers are deployed inside the call (nothing persists). The
/// caller has checked their factories. One `eth_call`.
pub async fn check_signatures(
    endpoint: &RpcEndpoint,
    items: &[(Address, B256, Bytes)],
) -> Result<Vec<ChainVerdict>, RpcError> {
    const CALL: &str = "eth_call SignatureProbe (ERC-1271)";
    // Per item: signer, digest, offset, length and the signature padded to words.
    let size = |i: &(Address, B256, Bytes)| 128 + i.2.len().div_ceil(32) * 32;
    let calls = chunks(items, SIGNATURE_PROBE.len() + 192, size, 32).into_iter().map(|chunk| async move {
        let signers: Vec<Address> = chunk.iter().map(|i| i.0).collect();
        let digests: Vec<B256> = chunk.iter().map(|i| i.1).collect();
        let signatures: Vec<Bytes> = chunk.iter().map(|i| i.2.clone()).collect();
        let args = (signers, digests, signatures).abi_encode_params();
        let raw = deployless(endpoint, CALL, &SIGNATURE_PROBE, args).await?;
        // `uint8[]`, not `bytes` (which a `Vec<u8>` would decode as, reading the first
        // verdict's high byte: always "valid").
        type Verdicts = sol_data::Array<sol_data::Uint<8>>;
        let verdicts = Verdicts::abi_decode(&raw).map_err(|e| endpoint.error(CALL, e))?;
        if verdicts.len() != chunk.len() {
            let shape = format!("{} verdicts for {} signatures", verdicts.len(), chunk.len());
            return Err(endpoint.error(CALL, shape));
        }
        verdicts
            .into_iter()
            .map(|v| {
                ChainVerdict::from_probe(v)
                    .ok_or_else(|| endpoint.error(CALL, format!("unknown verdict {v}")))
            })
            .collect::<Result<Vec<_>, _>>()
    });
    let mut out = Vec::with_capacity(items.len());
    for verdicts in futures::future::join_all(calls).await {
        out.extend(verdicts?);
    }
    Ok(out)
}

/// Why a signature could not be judged on chain. Says nothing about the signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JudgeError {
    #[error("no RPC endpoint is configured for chain {chain_id}")]
    NoChain { chain_id: u64 },
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("chain {chain_id}: the RPC node did not answer a signature check within {after_ms} ms")]
    Timeout { chain_id: u64, after_ms: u64 },
    #[error("the signature checker has stopped")]
    Stopped,
}

/// Where signatures of payers with code are judged: the chain in production, a table in
/// unit tests.
pub trait SignatureJudge: Send + Sync + 'static {
    /// [`check_signatures`] on `chain_id`.
    fn judge<'a>(
        &'a self,
        chain_id: u64,
        items: &'a [(Address, B256, Bytes)],
    ) -> BoxFuture<'a, Result<Vec<ChainVerdict>, JudgeError>>;
}

/// [`check_signatures`] on each chain's endpoint, within a deadline.
pub struct ChainSignatures {
    endpoints: HashMap<u64, RpcEndpoint>,
    timeout: Duration,
}

impl ChainSignatures {
    pub fn new(endpoints: HashMap<u64, RpcEndpoint>, timeout: Duration) -> Self {
        Self { endpoints, timeout }
    }
}

impl SignatureJudge for ChainSignatures {
    fn judge<'a>(
        &'a self,
        chain_id: u64,
        items: &'a [(Address, B256, Bytes)],
    ) -> BoxFuture<'a, Result<Vec<ChainVerdict>, JudgeError>> {
        async move {
            let endpoint = self.endpoints.get(&chain_id).ok_or(JudgeError::NoChain { chain_id })?;
            match tokio::time::timeout(self.timeout, check_signatures(endpoint, items)).await {
                Ok(verdicts) => Ok(verdicts?),
                Err(_) => Err(JudgeError::Timeout { chain_id, after_ms: self.timeout.as_millis() as u64 }),
            }
        }
        .boxed()
    }
}

type Pending = (u64, (Address, B256, Bytes), oneshot::Sender<Result<ChainVerdict, JudgeError>>);

/// Judges signatures that arrive together in one call per chain: a check asked for while
/// another runs joins the next round (up to `max_batch`), as balance reads do. Cloning
/// shares the rounds.
#[derive(Clone)]
pub struct BatchedSignatures {
    tx: mpsc::Sender<Pending>,
}

impl BatchedSignatures {
    /// Starts the rounds over `inner`.
    pub fn start(inner: Arc<dyn SignatureJudge>, max_batch: usize) -> Self {
        let max_batch = max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch * 4);
        tokio::spawn(rounds(inner, rx, max_batch));
        Self { tx }
    }
}

async fn rounds(inner: Arc<dyn SignatureJudge>, mut rx: mpsc::Receiver<Pending>, max_batch: usize) {
    while let Some(first) = rx.recv().await {
        let mut waiting = vec![first];
        while waiting.len() < max_batch {
            match rx.try_recv() {
                Ok(p) => waiting.push(p),
                Err(_) => break,
            }
        }
        let mut by_chain: HashMap<u64, Vec<Pending>> = HashMap::new();
        for p in waiting {
            by_chain.entry(p.0).or_default().push(p);
        }
        // Chains in parallel: one failing node does not hold another chain's payers.
        let inner = &inner;
        futures::future::join_all(by_chain.into_iter().map(|(chain_id, pending)| async move {
            let items: Vec<_> = pending.iter().map(|p| p.1.clone()).collect();
            let verdicts = inner.judge(chain_id, &items).await;
            for (i, (_, _, reply)) in pending.into_iter().enumerate() {
                let _ = reply.send(match &verdicts {
                    Ok(v) => v.get(i).copied().ok_or(JudgeError::Stopped),
                    Err(e) => Err(e.clone()),
                });
            }
        }))
        .await;
    }
}

impl SignatureJudge for BatchedSignatures {
    fn judge<'a>(
        &'a self,
        chain_id: u64,
        items: &'a [(Address, B256, Bytes)],
    ) -> BoxFuture<'a, Result<Vec<ChainVerdict>, JudgeError>> {
        async move {
            let mut replies = Vec::with_capacity(items.len());
            for item in items {
                let (tx, rx) = oneshot::channel();
                self.tx.send((chain_id, item.clone(), tx)).await.map_err(|_| JudgeError::Stopped)?;
                replies.push(rx);
            }
            let mut verdicts = Vec::with_capacity(items.len());
            for rx in replies {
                verdicts.push(rx.await.map_err(|_| JudgeError::Stopped)??);
            }
            Ok(verdicts)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_read_as_the_token_reads_it() {
        assert_eq!(PayerCode::from_probe(U256::ZERO, B256::ZERO), PayerCode::None);
        let delegate = Address::repeat_byte(0xd1);
        let mut head = [0u8; 32];
        head[..3].copy_from_slice(&[0xef, 0x01, 0x00]);
        head[3..23].copy_from_slice(delegate.as_slice());
        assert_eq!(PayerCode::from_probe(U256::from(23), B256::from(head)), PayerCode::Delegated(delegate));
        // Any other code, or a 23-byte contract that merely starts the same way, is a contract.
        assert_eq!(PayerCode::from_probe(U256::from(1160), B256::from(head)), PayerCode::Contract);
        assert_eq!(PayerCode::from_probe(U256::from(23), B256::repeat_byte(0x60)), PayerCode::Contract);
    }

    #[test]
    fn routes_round_trip_through_the_ledger_numbers() {
        for r in Route::ALL {
            assert_eq!(Route::from_disk(r.to_disk()), Some(r));
        }
        assert_eq!(Route::from_disk(0), Some(Route::Eoa), "records from before routes are EOA payments");
        assert_eq!(Route::from_disk(9), None);
    }

    /// Answers `Valid` for signers ending in an even byte, counts its calls.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl SignatureJudge for Counting {
        fn judge<'a>(
            &'a self,
            _chain_id: u64,
            items: &'a [(Address, B256, Bytes)],
        ) -> BoxFuture<'a, Result<Vec<ChainVerdict>, JudgeError>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                tokio::task::yield_now().await;
                Ok(items
                    .iter()
                    .map(
                        |i| if i.0[19] % 2 == 0 { ChainVerdict::Valid } else { ChainVerdict::Erc1271Refused },
                    )
                    .collect())
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn concurrent_checks_share_calls_and_each_gets_its_own_verdict() {
        let inner = Arc::new(Counting(std::sync::atomic::AtomicUsize::new(0)));
        let batched = BatchedSignatures::start(inner.clone(), 256);
        let items: Vec<_> =
            (0..100u8).map(|i| [(Address::with_last_byte(i), B256::ZERO, Bytes::new())]).collect();
        let all = futures::future::join_all(items.iter().map(|i| batched.judge(1, i))).await;
        for (i, v) in all.into_iter().enumerate() {
            let want = if i % 2 == 0 { ChainVerdict::Valid } else { ChainVerdict::Erc1271Refused };
            assert_eq!(v, Ok(vec![want]));
        }
        let calls = inner.0.load(std::sync::atomic::Ordering::SeqCst);
        assert!(calls < 100, "100 concurrent checks took {calls} calls");
    }

    #[test]
    fn rounds_split_into_calls_within_the_size_limits() {
        let payers = vec![0u8; 500];
        let split = chunks(&payers, 2_000, |_| 64, 128);
        assert_eq!(split.iter().map(|c| c.len()).sum::<usize>(), 500);
        assert!(split.iter().all(|c| c.len() * 128 + 64 <= MAX_ANSWER_BYTES));
        assert_eq!(split[0].len(), PAYERS_PER_PROBE);
        // Long signatures split by input size; one that alone fills a call still goes.
        let sizes = [8_300usize, 8_300, 8_300, 8_300, 8_300, 8_300, 60_000, 100];
        let split = chunks(&sizes, 2_000, |s| *s, 32);
        assert_eq!(split.iter().map(|c| c.len()).collect::<Vec<_>>(), [5, 1, 1, 1]);
        assert!(chunks::<u8>(&[], 0, |_| 1, 1).is_empty());
    }

    #[test]
    fn the_probes_are_built_from_their_artifacts() {
        assert!(PAYER_PROBE.len() > 100);
        assert!(SIGNATURE_PROBE.len() > 100);
    }
}
