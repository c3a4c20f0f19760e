//! The settlement engine: takes accepted payments from the ledger to the chain and back.
//!
//! One engine per chain runs a loop of rounds. Each round reads the head block and the fee
//! history, then:
//!
//! 1. **confirms** every open batch: a `Signed` batch is broadcast; a `Submitted` one is
//!    looked for by every signed attempt's receipt, replaced with a higher fee after
//!    `replace_after_blocks` blocks (or when the base fee rose above its cap), rebroadcast
//!    if the node no longer knows it, re-signed at the account's nonce if a gap opened, and
//!    abandoned if its nonce was consumed by something else; an `Included` one is checked
//!    against the canonical block hash at its height (a reorg: its transaction is looked
//!    for again, else its payments go back to accepted or expire) and settled once
//!    `confirmations` blocks deep;
//! 2. **sweeps** included payments no open batch follows (their evidence is another
//!    transaction of ours, found when their nonce turned out used): each is settled at
//!    depth on its own block, or back to accepted if that block was reorged away;
//! 3. **expires** accepted payments whose `validBefore` the chain has passed;
//! 4. **plans** the accepted payments of each token ([`crate::planner::plan`]) and, for
//!    each cut, pre-simulates the batch ([`crate::simulate`]), fails the items the token
//!    would refuse, signs the transaction for an idle settler account, records the batch
//!    with its raw signed bytes, and only then broadcasts it.
//!
//! Every decision is written to the ledger before it is acted on, with `only_from` the
//! state it was decided on, so a crash at any point leaves a state the next round (or the
//! next process) resumes from: a signed batch is broadcast again (same bytes, same hash),
//! a submitted one is found by its receipts. Each settler account has at most one batch
//! not yet included, so its nonces never gap; several accounts settle in parallel.
//!
//! An item's outcome comes from its own `AuthorizationUsed` log in the receipt (settled
//! once deep enough), or from its absence: the item is simulated again alone and fails
//! with the token's reason, expires, or returns to accepted if it would now succeed.

//! ## The parts
//!
//! | file | job |
//! |---|---|
//! | [`rpc`] | what the engine reads from a chain and sends to it, behind the [`Chain`] trait |
//! | `round.rs` | the loop, recovery after a cut-short round, writes and their metrics, gauges |
//! | `follow.rs` | signed → submitted → included → settled, replacements, reorgs |
//! | `sweep.rs` | included payments no open batch follows, on their own evidence |
//! | `finality.rs` | settled payments followed to finality: corrected or reversed after a reorg |
//! | `outcome.rs` | a receipt → each payment's outcome and evidence (the one fee-share rule) |
//! | `plan.rs` | expiry, which settlers are idle, cutting a batch and recording it |
//! | `sign.rs` | the fee of a (replacement) transaction, and signing it |
//! | `status.rs` | what the engine last saw, published for operators |
//!
//! Each decision is a plain function of what was read (receipts, heads, the clock) that
//! returns what to write or send, with unit tests; the `impl Engine` blocks beside them do
//! the reading, writing and sending.

mod finality;
#[cfg(test)]
mod fixtures;
mod follow;
mod keys;
mod outcome;
mod plan;
mod round;
pub mod rpc;
mod sign;
mod status;
mod sweep;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use alloy::network::{Ethereum, EthereumWallet, TransactionBuilderError};
use alloy::primitives::Address;
use tokio::sync::watch;

pub use keys::{KeyError, load as load_keys, write_file as write_key_file};
pub use outcome::{fee_share, gas_share};
pub use rpc::{Chain, FeeReading, Head, Receipt, RpcChain};
pub use status::{ChainView, SettlerView, StatusBoard, TokenView};

use crate::balance::BalanceCache;
use crate::chain::RpcError;
use crate::clock::Clock;
use crate::config::{Finality, SettlementConfig};
use crate::ledger::{BatchRecord, LedgerError, LedgerHandle};
use crate::planner::{GasBook, L1Fees};
use crate::policy::SettlementPolicy;
use crate::telemetry::ChainMetrics;

/// Why a round stopped early (or a transaction could not be made). Nothing half-done is
/// left: every step is written first.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error(
        "batch {batch}: the fee is already at settlement.max_fee_per_gas_wei ({cap}); the transaction waits for the base fee to fall"
    )]
    FeeAtCap { batch: String, cap: u128 },
    #[error("batch {batch}: its settler {settler} is no longer configured")]
    SettlerGone { batch: String, settler: Address },
    #[error("batch {batch}: could not sign its transaction")]
    Sign {
        batch: String,
        #[source]
        source: TransactionBuilderError<Ethereum>,
    },
    #[error("chain {chain_id}: the ledger scan task failed")]
    Scan { chain_id: u64 },
}

/// What a round did (for logs and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoundReport {
    pub batches_sent: usize,
    pub included: usize,
    pub settled: usize,
    pub failed: usize,
    pub expired: usize,
    pub replaced: usize,
    pub rebroadcast: usize,
    pub requeued: usize,
    /// Settled payments whose block became final, whose evidence a reorg moved, and whose
    /// settlement a reorg undid.
    pub finalized: usize,
    pub corrected: usize,
    pub reversed: usize,
}

impl RoundReport {
    /// Counts the failures, expiries and requeues among `transitions` judged from a receipt.
    fn count_judged(&mut self, transitions: &[crate::ledger::TransitionRequest]) {
        for t in transitions {
            match t.to {
                crate::ledger::Status::Failed => self.failed += 1,
                crate::ledger::Status::Expired => self.expired += 1,
                crate::ledger::Status::Accepted => self.requeued += 1,
                _ => {}
            }
        }
    }
}

/// A settler account.
#[derive(Clone)]
struct Settler {
    address: Address,
    wallet: EthereumWallet,
}

/// The engine of one chain, over any [`Chain`] (JSON-RPC in the daemon).
pub struct Engine<C: Chain = RpcChain> {
    chain_id: u64,
    chain: C,
    ledger: LedgerHandle,
    clock: Arc<dyn Clock>,
    balances: Option<BalanceCache>,
    settlers: Vec<Settler>,
    config: SettlementConfig,
    /// What settlements cost, learnt per token and shape from receipts.
    gas: GasBook,
    /// The L1 data fees last read per token (OP-stack chains).
    l1: BTreeMap<Address, L1Fees>,
    /// When the planner asked to decide again (a linger or a wait ending before the next
    /// poll), Unix milliseconds.
    wake_at_ms: Option<u64>,
    /// Where this engine's view is published for operators, and the view's settler parts
    /// read every few seconds.
    board: StatusBoard,
    settler_views: BTreeMap<Address, SettlerView>,
    /// When a settled payment's block counts as final.
    finality: Finality,
    /// The head at which every watched block at or below it was last found canonical.
    checked_head: Option<(u64, alloy::primitives::B256)>,
    /// Batches not yet done or abandoned, by counter.
    open: BTreeMap<u64, BatchRecord>,
    next_counter: u64,
    /// Round-robin start among settlers, so every account takes its share of batches.
    next_settler: usize,
    /// Batches whose nonce was seen consumed without a receipt of ours, with the head then.
    consumed: HashMap<u64, u64>,
    /// The operators' runtime policy, and the copy this round uses.
    policy_rx: watch::Receiver<SettlementPolicy>,
    policy: SettlementPolicy,
    metrics: ChainMetrics,
    /// When settler balances were last read for the metrics (engine clock, ms), and how
    /// often they are read.
    balances_read_at_ms: Option<u64>,
    settler_reads_every_ms: u64,
    /// Tokens whose pending value the metrics last showed.
    value_tokens: Vec<Address>,
    /// Fleet mode (a ledger shared with other daemons): the leases this engine holds.
    fleet: Option<Leases>,
}

/// The chain-wide work of a fleet (sweeping, expiring, following settled payments to
/// finality) is done by the holder of this pseudo-settler's lease alone.
pub const LEADER: Address = Address::ZERO;

/// What an engine in a fleet holds: a lease per settler account it may act for (and
/// [`LEADER`] when it does the chain-wide work), renewed every round.
#[derive(Debug, Clone)]
struct Leases {
    owner: String,
    ttl_ms: u64,
    /// Held accounts and the epoch of each holding.
    held: BTreeMap<Address, u64>,
}

impl<C: Chain> std::fmt::Debug for Engine<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("chain_id", &self.chain_id)
            .field("settlers", &self.settlers.iter().map(|s| s.address).collect::<Vec<_>>())
            .field("open", &self.open.len())
            .finish_non_exhaustive()
    }
}
