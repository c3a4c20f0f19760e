//! A simulated chain behind the engine's [`Chain`] trait, in Rust, no anvil: blocks made
//! when the world says, a mempool with an EIP-1559 fee market (a transaction priced under
//! the base fee waits; a replacement needs a higher fee), the EIP-3009 token's rules
//! (nonce state, balances, validity window; signatures are the world's own, so valid),
//! `aggregate3` with `allowFailure` and gas (an item short of gas fails, a direct call
//! short of gas reverts), receipts with `AuthorizationUsed` logs, reorgs of any depth
//! (their transactions dropped or back in the pool), and faults at the RPC edge: errors, a
//! lagging node (a stale head, a receipt not served yet, a nonce not counted yet) and
//! crashes (a panic at a chosen
//! call, which the harness turns into a process restart).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use alloy::consensus::transaction::SignerRecoverable as _;
use alloy::consensus::{Transaction as _, TxEnvelope};
use alloy::eips::Decodable2718 as _;
use alloy::primitives::{Address, B256, Bytes, U256, keccak256};
use alloy::sol_types::{SolCall as _, SolError as _};
use parking_lot::Mutex;
use x402_batcher::chain::{IEip3009, IMulticall3, MULTICALL3, RpcError};
use x402_batcher::config::FinalityTag;
use x402_batcher::planner::L1Fees;
use x402_batcher::settle::{Chain, FeeReading, Head, Receipt};
use x402_batcher::simulate::{ItemFailure, classify};
use x402_batcher::x402::SignedAuthorization;

use super::rng::Rng;

/// Gas of a transaction's fixed part and of each transfer in it.
pub const FIXED_GAS: u64 = 30_000;
pub const ITEM_GAS: u64 = 45_000;
/// Whoever spends authorizations outside the daemon.
pub const FOREIGN: Address = Address::repeat_byte(0xf0);
/// Anvil-like `finalized`: this many blocks under the head.
pub const FINALITY_DEPTH: u64 = 6;

/// The token's state.
#[derive(Debug, Clone, Default)]
pub struct Token {
    pub balances: HashMap<Address, U256>,
    pub used: HashSet<(Address, B256)>,
}

/// One mined transaction's result.
#[derive(Debug, Clone)]
pub struct Mined {
    pub tx_hash: B256,
    pub from: Address,
    pub gas_used: u64,
    pub price: u128,
    pub success: bool,
    /// `(authorizer, nonce, log index)` of its `AuthorizationUsed` logs; with each the
    /// transfer `(to, value)`.
    pub used: Vec<(Address, B256, u64, Address, U256)>,
}

#[derive(Debug, Clone)]
pub struct Block {
    pub number: u64,
    pub hash: B256,
    pub timestamp: u64,
    pub base_fee: u128,
    pub txs: Vec<(Bytes, Mined)>,
    /// The state after this block.
    pub token: Token,
    pub nonces: HashMap<Address, u64>,
}

#[derive(Debug, Clone)]
struct Pooled {
    raw: Bytes,
    hash: B256,
    from: Address,
    nonce: u64,
    max_fee: u128,
    tip: u128,
}

/// What the world does to the node's answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Chance (per mille) that a call fails.
    pub error_per_mille: u32,
    /// Chance (per mille) that a head or receipt read lags one block.
    pub lag_per_mille: u32,
    /// Chance (per mille) that an account's nonce is read as of the block before (a
    /// receipt served before the nonce counts it).
    pub nonce_lag_per_mille: u32,
}

#[derive(Debug)]
pub struct World {
    pub chain_id: u64,
    pub token_address: Address,
    pub blocks: Vec<Block>,
    pool: Vec<Pooled>,
    pub faults: Faults,
    rng: Rng,
    /// The nonce lag's own stream: worlds without it replay as they did before it existed.
    nonce_rng: Rng,
    /// Calls answered so far, and the call at which the "process" crashes (a panic).
    pub calls: u64,
    pub crash_at: Option<u64>,
    pub injected: BTreeMap<&'static str, u64>,
    /// Foreign transactions' uses (a payer spending an authorization elsewhere).
    pub foreign: HashSet<(Address, B256)>,
    /// The highest block ever final: no reorg reaches it (finality means that).
    final_floor: u64,
    /// The latest block time ever: a block replacing others is not older (slots are wall
    /// clock time).
    max_time: u64,
}

/// The marker of a simulated crash (the harness recognises and silences it).
pub const CRASH: &str = "simulated crash";

impl World {
    pub fn new(chain_id: u64, token: Address, start_time: u64, seed: u64) -> World {
        let genesis = Block {
            number: 0,
            hash: keccak256(seed.to_be_bytes()),
            timestamp: start_time,
            base_fee: 1_000_000_000,
            txs: Vec::new(),
            token: Token::default(),
            nonces: HashMap::new(),
        };
        World {
            chain_id,
            token_address: token,
            blocks: vec![genesis],
            pool: Vec::new(),
            faults: Faults::default(),
            rng: Rng::new(seed ^ 0x5eed),
            nonce_rng: Rng::new(seed ^ 0x404ce),
            calls: 0,
            crash_at: None,
            injected: BTreeMap::new(),
            foreign: HashSet::new(),
            final_floor: 0,
            max_time: start_time,
        }
    }

    pub fn pool_len(&self) -> usize {
        self.pool.len()
    }

    pub fn head(&self) -> &Block {
        self.blocks.last().expect("genesis")
    }

    pub fn fund(&mut self, who: Address, value: U256) {
        let head = self.blocks.last_mut().expect("genesis");
        *head.token.balances.entry(who).or_default() += value;
    }

    fn count(&mut self, what: &'static str) {
        *self.injected.entry(what).or_default() += 1;
    }

    /// Mines a block `dt` seconds after the head with `base_fee`.
    pub fn mine(&mut self, dt: u64, base_fee: u128) {
        let parent = self.head().clone();
        let mut token = parent.token.clone();
        let mut nonces = parent.nonces.clone();
        let timestamp = (parent.timestamp + dt.max(1)).max(self.max_time + 1);
        self.max_time = timestamp;
        let number = parent.number + 1;
        let mut txs = Vec::new();
        let mut pool = std::mem::take(&mut self.pool);
        pool.sort_by_key(|p| (p.from, p.nonce, std::cmp::Reverse(p.max_fee)));
        let mut left = Vec::new();
        for p in pool {
            let next = nonces.get(&p.from).copied().unwrap_or(0);
            if p.nonce < next {
                continue; // replaced or already mined: gone
            }
            if p.nonce > next || p.max_fee < base_fee {
                left.push(p);
                continue;
            }
            let mined = execute(&p.raw, &mut token, timestamp, base_fee, self.token_address);
            if let Some(mined) = mined {
                nonces.insert(p.from, next + 1);
                txs.push((p.raw, mined));
            }
        }
        // Log indexes run over the block.
        let mut index = 0;
        for (_, m) in &mut txs {
            for u in &mut m.used {
                u.2 = index;
                index += 1;
            }
        }
        self.pool = left;
        let hash = keccak256(
            [parent.hash.as_slice(), &number.to_be_bytes(), &self.rng.next().to_be_bytes()].concat(),
        );
        self.blocks.push(Block { number, hash, timestamp, base_fee, txs, token, nonces });
        self.final_floor = self.final_floor.max(number.saturating_sub(FINALITY_DEPTH));
    }

    /// Replaces the newest `depth` blocks (not genesis): their transactions go back to the
    /// pool (`requeue`) or vanish.
    pub fn reorg(&mut self, depth: u64, requeue: bool) {
        // Never below a block that was final, never genesis.
        let depth = depth.min(self.head().number.saturating_sub(self.final_floor));
        if depth == 0 {
            return;
        }
        for _ in 0..depth {
            let b = self.blocks.pop().expect("above genesis");
            if requeue {
                for (raw, _) in b.txs {
                    if let Some(p) = pooled(&raw) {
                        self.pool.push(p);
                    }
                }
            }
        }
        self.count("reorg");
    }

    /// Drops a pending transaction of ours from the pool (a node forgetting it).
    pub fn drop_pending(&mut self) {
        if !self.pool.is_empty() {
            let i = (self.rng.next() % self.pool.len() as u64) as usize;
            self.pool.remove(i);
            self.count("drop");
        }
    }

    /// A payer uses an authorization outside the daemon: someone else's transaction in the
    /// head block spends its nonce (with its `AuthorizationUsed` log; nothing paid to us).
    pub fn spend_elsewhere(&mut self, from: Address, nonce: B256) {
        let head = self.blocks.last_mut().expect("genesis");
        head.token.used.insert((from, nonce));
        let index = head.txs.iter().map(|(_, m)| m.used.len() as u64).sum();
        let tx_hash = keccak256([from.as_slice(), nonce.as_slice(), b"elsewhere"].concat());
        let used = vec![(from, nonce, index, FOREIGN, U256::ZERO)];
        head.txs.push((
            Bytes::new(),
            Mined { tx_hash, from: FOREIGN, gas_used: 21_000, price: 1, success: true, used },
        ));
        self.foreign.insert((from, nonce));
        self.count("spent_elsewhere");
    }

    /// A payer moves `value` of its balance away outside the daemon (someone else's
    /// transaction in the head block, a plain transfer: no authorization used).
    pub fn drain(&mut self, from: Address, value: U256) {
        let head = self.blocks.last_mut().expect("genesis");
        let balance = head.token.balances.entry(from).or_default();
        *balance = balance.saturating_sub(value);
        *head.token.balances.entry(FOREIGN).or_default() += value;
        let tx_hash = keccak256([from.as_slice(), &head.txs.len().to_be_bytes(), b"drain"].concat());
        head.txs.push((
            Bytes::new(),
            Mined { tx_hash, from, gas_used: 21_000, price: 1, success: true, used: Vec::new() },
        ));
        self.count("drain");
    }

    /// Every canonical mined transaction by hash.
    pub fn mined(&self) -> HashMap<B256, (u64, B256, &Mined)> {
        let mut out = HashMap::new();
        for b in &self.blocks {
            for (_, m) in &b.txs {
                out.insert(m.tx_hash, (b.number, b.hash, m));
            }
        }
        out
    }

    fn before_call(&mut self, call: &'static str) -> Result<(), RpcError> {
        self.calls += 1;
        if self.crash_at == Some(self.calls) {
            self.crash_at = None;
            self.count("crash");
            panic!("{CRASH}");
        }
        if self.faults.error_per_mille > 0 && self.rng.below(1000) < u64::from(self.faults.error_per_mille) {
            self.count("rpc_error");
            return Err(RpcError { chain_id: self.chain_id, call, detail: "simulated node error".into() });
        }
        Ok(())
    }

    fn lags(&mut self) -> bool {
        let lag =
            self.faults.lag_per_mille > 0 && self.rng.below(1000) < u64::from(self.faults.lag_per_mille);
        if lag {
            self.count("lag");
        }
        lag
    }
}

fn pooled(raw: &Bytes) -> Option<Pooled> {
    let tx = TxEnvelope::decode_2718(&mut raw.as_ref()).ok()?;
    let from = tx.recover_signer().ok()?;
    Some(Pooled {
        raw: raw.clone(),
        hash: *tx.tx_hash(),
        from,
        nonce: tx.nonce(),
        max_fee: tx.max_fee_per_gas(),
        tip: tx.max_priority_fee_per_gas().unwrap_or_default(),
    })
}

/// One transfer against `token` at block time `now`: `Ok(log)` or the revert string.
fn transfer(
    call: &IEip3009::transferWithAuthorizationCall,
    token: &mut Token,
    now: u64,
) -> Result<(Address, B256, Address, U256), &'static str> {
    if U256::from(now) <= call.validAfter {
        return Err("FiatTokenV2: authorization is not yet valid");
    }
    if U256::from(now) >= call.validBefore {
        return Err("FiatTokenV2: authorization is expired");
    }
    if token.used.contains(&(call.from, call.nonce)) {
        return Err("FiatTokenV2: authorization is used or canceled");
    }
    let balance = token.balances.get(&call.from).copied().unwrap_or_default();
    if balance < call.value {
        return Err("ERC20: transfer amount exceeds balance");
    }
    token.used.insert((call.from, call.nonce));
    token.balances.insert(call.from, balance - call.value);
    *token.balances.entry(call.to).or_default() += call.value;
    Ok((call.from, call.nonce, call.to, call.value))
}

/// The calls a transaction makes to the token: `(allow failure, call)`.
fn calls_of(
    to: Address,
    input: &[u8],
    token: Address,
) -> Option<Vec<(bool, IEip3009::transferWithAuthorizationCall)>> {
    if to == MULTICALL3 {
        let agg = IMulticall3::aggregate3Call::abi_decode(input).ok()?;
        agg.calls
            .iter()
            .map(|c| {
                (c.target == token)
                    .then(|| IEip3009::transferWithAuthorizationCall::abi_decode(&c.callData).ok())
                    .flatten()
                    .map(|t| (c.allowFailure, t))
            })
            .collect()
    } else if to == token {
        Some(vec![(false, IEip3009::transferWithAuthorizationCall::abi_decode(input).ok()?)])
    } else {
        None
    }
}

/// Executes a signed transaction; `None` if it cannot be included at all.
fn execute(
    raw: &Bytes,
    token: &mut Token,
    now: u64,
    base_fee: u128,
    token_address: Address,
) -> Option<Mined> {
    let tx = TxEnvelope::decode_2718(&mut raw.as_ref()).ok()?;
    let from = tx.recover_signer().ok()?;
    let calls = calls_of(tx.to()?, tx.input(), token_address)?;
    let price = tx.max_fee_per_gas().min(base_fee + tx.max_priority_fee_per_gas().unwrap_or_default());
    let limit = tx.gas_limit();
    let mut gas = FIXED_GAS;
    let mut used = Vec::new();
    let before = token.clone();
    let mut success = gas <= limit;
    for (allow_failure, call) in &calls {
        if !success {
            break;
        }
        if gas + ITEM_GAS > limit {
            // Out of gas: an allowed failure inside aggregate3; the direct call reverts.
            gas = limit;
            if !allow_failure {
                success = false;
            }
            break;
        }
        gas += ITEM_GAS;
        match transfer(call, token, now) {
            Ok((from, nonce, to, value)) => used.push((from, nonce, 0, to, value)),
            Err(_) if *allow_failure => gas -= ITEM_GAS / 2,
            Err(_) => success = false,
        }
    }
    if !success {
        *token = before;
        used.clear();
    }
    Some(Mined { tx_hash: *tx.tx_hash(), from, gas_used: gas.min(limit), price, success, used })
}

/// [`Chain`] over a shared [`World`].
#[derive(Clone)]
pub struct SimChain(pub Arc<Mutex<World>>);

impl Chain for SimChain {
    fn chain_id(&self) -> u64 {
        self.0.lock().chain_id
    }

    async fn head(&self) -> Result<Head, RpcError> {
        let mut w = self.0.lock();
        w.before_call("eth_getBlockByNumber")?;
        let lag = w.lags() && w.blocks.len() > 1;
        let b = if lag { &w.blocks[w.blocks.len() - 2] } else { w.head() };
        Ok(Head {
            number: b.number,
            hash: b.hash,
            timestamp: b.timestamp,
            gas_limit: 30_000_000,
            base_fee: None,
        })
    }

    async fn block_at(&self, number: u64) -> Result<Option<(B256, u64)>, RpcError> {
        let mut w = self.0.lock();
        w.before_call("eth_getBlockByNumber")?;
        Ok(w.blocks.get(number as usize).map(|b| (b.hash, b.timestamp)))
    }

    async fn fees(&self) -> Result<FeeReading, RpcError> {
        let mut w = self.0.lock();
        w.before_call("eth_feeHistory")?;
        Ok(FeeReading { base_fee: w.head().base_fee, median_tip: 100_000_000 })
    }

    async fn nonce(&self, account: Address) -> Result<u64, RpcError> {
        let mut w = self.0.lock();
        w.before_call("eth_getTransactionCount")?;
        let lag = w.faults.nonce_lag_per_mille > 0
            && w.nonce_rng.below(1000) < u64::from(w.faults.nonce_lag_per_mille)
            && w.blocks.len() > 1;
        let block = if lag {
            w.count("nonce_lag");
            &w.blocks[w.blocks.len() - 2]
        } else {
            w.head()
        };
        Ok(block.nonces.get(&account).copied().unwrap_or(0))
    }

    async fn receipt(&self, tx: B256, token: Address) -> Result<Option<Receipt>, RpcError> {
        let mut w = self.0.lock();
        w.before_call("eth_getTransactionReceipt")?;
        if w.lags() {
            return Ok(None);
        }
        let found = w.blocks.iter().find_map(|b| {
            b.txs.iter().find(|(_, m)| m.tx_hash == tx).map(|(_, m)| (b.number, b.hash, m.clone()))
        });
        Ok(found.map(|(number, hash, m)| Receipt {
            tx_hash: m.tx_hash,
            from: m.from,
            block_number: number,
            block_hash: hash,
            gas_used: m.gas_used,
            effective_gas_price: m.price,
            success: m.success,
            l1_fee: 0,
            used: if token == w.token_address {
                m.used.iter().map(|u| (u.0, u.1, u.2)).collect()
            } else {
                Vec::new()
            },
        }))
    }

    async fn is_known(&self, tx: B256) -> Result<bool, RpcError> {
        let mut w = self.0.lock();
        w.before_call("eth_getTransactionByHash")?;
        Ok(w.pool.iter().any(|p| p.hash == tx) || w.mined().contains_key(&tx))
    }

    async fn broadcast(&self, raw: &Bytes) -> Result<(), RpcError> {
        let mut w = self.0.lock();
        w.before_call("eth_sendRawTransaction")?;
        let err =
            |detail: &str| RpcError { chain_id: 0, call: "eth_sendRawTransaction", detail: detail.into() };
        let p = pooled(raw).ok_or_else(|| err("undecodable transaction"))?;
        if w.pool.iter().any(|q| q.hash == p.hash) || w.mined().contains_key(&p.hash) {
            return Err(err("already known"));
        }
        if p.nonce < w.head().nonces.get(&p.from).copied().unwrap_or(0) {
            return Err(err("nonce too low"));
        }
        if let Some(i) = w.pool.iter().position(|q| q.from == p.from && q.nonce == p.nonce) {
            let q = &w.pool[i];
            // A replacement must beat both fees by 10 %.
            if p.max_fee * 10 < q.max_fee * 11 || p.tip * 10 < q.tip * 11 {
                return Err(err("replacement transaction underpriced"));
            }
            w.pool.remove(i);
        }
        w.pool.push(p);
        Ok(())
    }

    async fn simulate(
        &self,
        items: &[SignedAuthorization],
        gas_limit: u64,
        at: Option<u64>,
    ) -> Result<Vec<Result<(), ItemFailure>>, RpcError> {
        let mut w = self.0.lock();
        w.before_call("eth_call aggregate3")?;
        let block = match at {
            Some(n) => w.blocks.get(n as usize).ok_or_else(|| RpcError {
                chain_id: w.chain_id,
                call: "eth_call aggregate3",
                detail: format!("no block {n}"),
            })?,
            None => w.head(),
        };
        let mut token = block.token.clone();
        let now = block.timestamp;
        let mut gas = FIXED_GAS;
        Ok(items
            .iter()
            .map(|s| {
                if gas + ITEM_GAS > gas_limit {
                    return Err(classify(&[]));
                }
                gas += ITEM_GAS;
                // The calldata the engine would send for it, read back as the token would.
                let call = IEip3009::transferWithAuthorizationCall::abi_decode(
                    &x402_batcher::chain::transfer_calldata(s),
                )
                .expect("our own encoding decodes");
                transfer(&call, &mut token, now)
                    .map(|_| ())
                    .map_err(|why| classify(&alloy::sol_types::Revert::from(why).abi_encode()))
            })
            .collect())
    }

    async fn uses_of(
        &self,
        token: Address,
        authorizer: Address,
        nonce: B256,
        from_block: u64,
        to_block: u64,
    ) -> Result<Vec<B256>, RpcError> {
        let mut w = self.0.lock();
        w.before_call("eth_getLogs")?;
        if token != w.token_address {
            return Ok(Vec::new());
        }
        Ok(w.blocks
            .iter()
            .filter(|b| (from_block..=to_block).contains(&b.number))
            .flat_map(|b| &b.txs)
            .filter(|(_, m)| m.used.iter().any(|u| u.0 == authorizer && u.1 == nonce))
            .map(|(_, m)| m.tx_hash)
            .collect())
    }

    async fn native_balance(&self, _account: Address) -> Result<U256, RpcError> {
        let mut w = self.0.lock();
        w.before_call("eth_getBalance")?;
        Ok(U256::from(10u128.pow(21)))
    }

    async fn tagged_block(&self, _tag: FinalityTag) -> Result<Option<u64>, RpcError> {
        let mut w = self.0.lock();
        w.before_call("eth_getBlockByNumber")?;
        // After a reorg the head may be lower, but what was final stays final.
        Ok(w.head()
            .number
            .checked_sub(FINALITY_DEPTH)
            .map(|f| f.max(w.final_floor))
            .or(Some(w.final_floor))
            .filter(|f| *f > 0))
    }

    async fn l1_fees(&self, _sample: &SignedAuthorization) -> Result<L1Fees, RpcError> {
        Ok(L1Fees::default())
    }
}
