//! What each engine last saw, for operators: the chain's head and fees, what waits per
//! token (count, value, what a settlement costs there), and each settler account (native
//! balance, next nonce, its open batch and transaction). Engines publish a [`ChainView`]
//! after every round onto a shared [`StatusBoard`]; Admin `GetStatus` and
//! `x402-batcher status` read it.

use std::collections::BTreeMap;
use std::sync::Arc;

use alloy::primitives::{Address, B256, U256};
use parking_lot::Mutex;

use crate::planner::{GasModel, L1Fees};

/// One chain as its engine last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainView {
    pub chain_id: u64,
    pub head_block: u64,
    /// The head block's time (Unix seconds).
    pub head_time: u64,
    pub base_fee_wei: u128,
    /// The priority fee a transaction would offer now.
    pub priority_fee_wei: u128,
    pub tokens: Vec<TokenView>,
    pub settlers: Vec<SettlerView>,
    /// When the engine published this (Unix milliseconds).
    pub updated_at_ms: u64,
}

/// One token's payments waiting on a chain, and what settling them costs there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenView {
    pub token: Address,
    /// Payments accepted and not yet final.
    pub pending: u64,
    /// Their value (base units).
    pub pending_value: U256,
    /// The L1 data fee by shape, as last read (zero off OP-stack chains).
    pub l1_fees: L1Fees,
    /// Gas of a batch, as learnt from receipts (the seeds before any).
    pub batch_gas: GasModel,
    /// Gas of a direct call, as learnt.
    pub direct_gas: u64,
}

/// One settler account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettlerView {
    pub address: Address,
    /// Native balance for gas (wei), as last read.
    pub native_balance_wei: Option<U256>,
    /// The account's next transaction nonce on chain, as last read.
    pub next_nonce: Option<u64>,
    /// Its batch not yet included (at most one), and that batch's latest transaction.
    pub open_batch: Option<String>,
    pub open_tx: Option<B256>,
    /// Its transactions sent and not yet included (0 or 1).
    pub pending_transactions: u64,
}

/// The views of every chain, shared between the engines and the Admin service.
#[derive(Debug, Clone, Default)]
pub struct StatusBoard(Arc<Mutex<BTreeMap<u64, ChainView>>>);

impl StatusBoard {
    pub fn publish(&self, view: ChainView) {
        self.0.lock().insert(view.chain_id, view);
    }

    /// Every chain's latest view, by chain id.
    pub fn chains(&self) -> Vec<ChainView> {
        self.0.lock().values().cloned().collect()
    }
}
