//! The settlement engine: takes accepted payments from the ledger to the chain and back.
//!
//! One engine per chain runs a loop that wakes on events, not on a clock
//! ([`wake`](self) and `pace.rs`): a payment arriving (the ledger's arrival count moves),
//! the next look at the chain (soon after a send; with a learnt block cadence, just before
//! and at the expected block; at the poll interval when nothing is in flight), or the end
//! of a hold the planner asked for. A look that finds a new head (or the poll interval
//! passed) runs a full round; an arrival or a hold ending only plans. A full round reads the
//! head block and, when it needs them, the fee history (once per head), then:
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
//! 4. **plans** the accepted payments of each token ([`crate::planner::plan_held`], a cheap
//!    batch held as the chain's cadence and the arrival rate say: until the send moment of
//!    the next block when company is expected, else at once) and, for
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
//! | `engine.rs` | the engine: what it holds between rounds, how it is built |
//! | [`rpc`] | what the engine reads from a chain and sends to it, behind the [`Chain`] trait |
//! | `wake.rs` | the loop: when the engine wakes (arrivals, the next look at the chain, a hold ending), recovery after a cut-short round |
//! | [`heads`] | heads pushed by the node (`newHeads` over WebSocket), the engine's wake-up when configured |
//! | `pace.rs` | the chain's cadence, the send lead, the last call, the arrival rate: how long a batch is held, when to look next |
//! | `work.rs` | how long a cut of a given size takes from decision to the node (the send lead's first part) |
//! | `round.rs` | a round: leases, what it reads and follows, writes and their metrics, gauges |
//! | `follow.rs` | signed → submitted → included → settled, replacements, reorgs |
//! | `preconfirm.rs` | which receipts count; preconfirmed inclusions looked for, and judged again once sealed |
//! | `sweep.rs` | included payments no open batch follows, on their own evidence |
//! | `finality.rs` | settled payments followed to finality: corrected or reversed after a reorg |
//! | `outcome.rs` | a receipt → each payment's outcome and evidence (the one fee-share rule) |
//! | `cut.rs` | expiry, which settlers are idle, cutting a batch and recording it |
//! | `sign.rs` | the fee of a (replacement) transaction, signing it, replacing a stuck one |
//! | `status.rs` | what the engine last saw, published for operators |
//!
//! Each decision is a plain function of what was read (receipts, heads, the clock) that
//! returns what to write or send, with unit tests; the `impl Engine` blocks beside them do
//! the reading, writing and sending.

mod cut;
mod engine;
mod finality;
#[cfg(test)]
mod fixtures;
mod follow;
pub mod heads;
mod keys;
mod outcome;
mod pace;
mod preconfirm;
mod round;
pub mod rpc;
mod sign;
mod status;
mod sweep;
mod wake;
mod work;

use alloy::network::{Ethereum, TransactionBuilderError};
use alloy::primitives::Address;

pub use engine::{Engine, LEADER};
pub use keys::{KeyError, load as load_keys, write_file as write_key_file};
pub use outcome::{fee_share, gas_share};
pub use rpc::{Chain, FeeReading, Head, Receipt, RpcChain};
pub use status::{ChainView, SettlerView, StatusBoard, TokenView};

use engine::Settler;

use crate::chain::RpcError;
use crate::ledger::LedgerError;

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
