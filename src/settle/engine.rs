//! The engine of one chain: what it holds between rounds, and how it is built (the open
//! batches resumed from the ledger, the settler accounts, the optional parts: leases in a
//! fleet, finality, the status board).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use alloy::network::EthereumWallet;
use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use tokio::sync::watch;

use super::heads::FeedState;
use super::pace::Pace;
use super::rpc::{Chain, Head, RpcChain};
use super::{SettleError, SettlerView, StatusBoard};
use crate::balance::BalanceCache;
use crate::clock::Clock;
use crate::config::{Finality, SettlementConfig};
use crate::ledger::{Arrivals, BatchRecord, LedgerHandle};
use crate::planner::{Fees, GasBook, L1Fees};
use crate::policy::SettlementPolicy;
use crate::telemetry::ChainMetrics;

/// Receipts the gas model learns from (the most recent ones).
const GAS_WINDOW: usize = 32;

/// How often settler balances are read for the metrics, by default.
const SETTLER_READS_EVERY_MS: u64 = 30_000;

/// A settler account.
#[derive(Clone)]
pub(super) struct Settler {
    pub(super) address: Address,
    pub(super) wallet: EthereumWallet,
}

/// The engine of one chain, over any [`Chain`] (JSON-RPC in the daemon).
pub struct Engine<C: Chain = RpcChain> {
    pub(super) chain_id: u64,
    pub(super) chain: C,
    pub(super) ledger: LedgerHandle,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) balances: Option<BalanceCache>,
    pub(super) settlers: Vec<Settler>,
    pub(super) config: SettlementConfig,
    /// What settlements cost, learnt per token and shape from receipts.
    pub(super) gas: GasBook,
    /// The L1 data fees last read per token (OP-stack chains).
    pub(super) l1: BTreeMap<Address, L1Fees>,
    /// The head each token's L1 fees were last read at: read once per head, in the round
    /// the head brings, not again in the rounds that cut at a send moment.
    pub(super) l1_read_at: BTreeMap<Address, u64>,
    /// When the planner asked to decide again (a linger or a wait ending before the next
    /// poll), Unix milliseconds.
    pub(super) wake_at_ms: Option<u64>,
    /// Where this engine's view is published for operators, and the view's settler parts
    /// read every few seconds.
    pub(super) board: StatusBoard,
    pub(super) settler_views: BTreeMap<Address, SettlerView>,
    /// When a settled payment's block counts as final.
    pub(super) finality: Finality,
    /// The head at which every watched block at or below it was last found canonical.
    pub(super) checked_head: Option<(u64, alloy::primitives::B256)>,
    /// Batches not yet done or abandoned, by counter.
    pub(super) open: BTreeMap<u64, BatchRecord>,
    pub(super) next_counter: u64,
    /// Round-robin start among settlers, so every account takes its share of batches.
    pub(super) next_settler: usize,
    /// Batches whose nonce was seen consumed without a receipt of ours, with the head then.
    pub(super) consumed: HashMap<u64, u64>,
    /// The operators' runtime policy, and the copy this round uses.
    pub(super) policy_rx: watch::Receiver<SettlementPolicy>,
    pub(super) policy: SettlementPolicy,
    pub(super) metrics: ChainMetrics,
    /// When settler balances were last read for the metrics (engine clock, ms), and how
    /// often they are read.
    pub(super) balances_read_at_ms: Option<u64>,
    pub(super) settler_reads_every_ms: u64,
    /// Tokens whose pending value the metrics last showed.
    pub(super) value_tokens: Vec<Address>,
    /// Fleet mode (a ledger shared with other daemons): the leases this engine holds.
    pub(super) fleet: Option<Leases>,
    /// The chain's cadence, the send lead and the arrival rate, learnt.
    pub(super) pace: Pace,
    /// Payments that became accepted, per chain (the ledger's count), and this chain's
    /// count when last looked.
    pub(super) arrivals: watch::Receiver<Arrivals>,
    pub(super) arrivals_seen: u64,
    /// The newest head read and when (engine clock): a round started by an arrival plans
    /// with it instead of reading the chain again.
    pub(super) last_head: Option<(Head, u64)>,
    /// The fees for a head's number: worked out again only when a new head came.
    pub(super) fees_at: Option<(u64, Fees)>,
    /// The last fee reading: the head it was read at, when (engine clock), and the fees.
    pub(super) fee_reading: Option<(u64, u64, Fees)>,
    /// When the last full round (every open batch followed, sweeps, finality) ran.
    pub(super) full_round_at_ms: Option<u64>,
    /// Accepted payments of this chain left waiting by the last plan.
    pub(super) waiting: usize,
    /// The last final block read, and the head it was read at.
    pub(super) final_seen: Option<(u64, u64)>,
    /// The chain's flashblock interval when its preconfirmations count (opt-in, see
    /// [`crate::config::ChainConfig::preconfirmation_ms`]).
    pub(super) preconfirm_ms: Option<u64>,
    /// When the receipts of the batches in flight were last looked for (engine clock).
    pub(super) receipts_at_ms: Option<u64>,
    /// When the current look began (engine clock): a cut's work is counted from there.
    pub(super) look_at_ms: u64,
    /// Batches counted included at a preconfirmation whose block is not sealed yet: a
    /// block hash that changes at the seal is no reorg.
    pub(super) preconfirmed: BTreeSet<u64>,
    /// Heads pushed by the node (a `newHeads` subscription), if configured; whether it is
    /// live, the head pushed and not yet looked at, and when the last one came.
    pub(super) feed: Option<watch::Receiver<FeedState>>,
    pub(super) feed_up: bool,
    pub(super) pushed: Option<Head>,
    pub(super) pushed_at_ms: u64,
}

/// The chain-wide work of a fleet (sweeping, expiring, following settled payments to
/// finality) is done by the holder of this pseudo-settler's lease alone.
pub const LEADER: Address = Address::ZERO;

/// What an engine in a fleet holds: a lease per settler account it may act for (and
/// [`LEADER`] when it does the chain-wide work), renewed every round.
#[derive(Debug, Clone)]
pub(super) struct Leases {
    pub(super) owner: String,
    pub(super) ttl_ms: u64,
    /// Held accounts and the epoch of each holding.
    pub(super) held: BTreeMap<Address, u64>,
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

impl<C: Chain> Engine<C> {
    /// An engine over `chain`, resuming the open batches the ledger holds.
    pub fn new(
        chain: C,
        ledger: LedgerHandle,
        clock: Arc<dyn Clock>,
        balances: Option<BalanceCache>,
        signers: &[PrivateKeySigner],
        config: SettlementConfig,
        policy_rx: watch::Receiver<SettlementPolicy>,
    ) -> Result<Engine<C>, SettleError> {
        let chain_id = chain.chain_id();
        let open = ledger
            .ledger()
            .batches(chain_id)?
            .into_iter()
            .filter(|b| !b.status.is_final())
            .map(|b| (b.counter, b))
            .collect::<BTreeMap<_, _>>();
        let next_counter = ledger.ledger().last_batch_counter(chain_id)? + 1;
        let settlers = signers
            .iter()
            .map(|s| Settler { address: s.address(), wallet: EthereumWallet::from(s.clone()) })
            .collect();
        if !open.is_empty() {
            tracing::info!(chain_id, open = open.len(), "resuming open settlement batches");
        }
        let policy = policy_rx.borrow().clone();
        let arrivals = ledger.arrivals();
        let arrivals_seen = super::wake::arrivals_of(chain_id, &arrivals.borrow());
        Ok(Engine {
            chain_id,
            chain,
            ledger,
            clock,
            balances,
            settlers,
            gas: GasBook::new(config.seed_gas(), GAS_WINDOW),
            l1: BTreeMap::new(),
            l1_read_at: BTreeMap::new(),
            wake_at_ms: None,
            board: StatusBoard::default(),
            settler_views: BTreeMap::new(),
            finality: Finality::default(),
            checked_head: None,
            config,
            open,
            next_counter,
            next_settler: 0,
            consumed: Default::default(),
            policy,
            policy_rx,
            metrics: ChainMetrics::new(chain_id),
            balances_read_at_ms: None,
            settler_reads_every_ms: SETTLER_READS_EVERY_MS,
            value_tokens: Vec::new(),
            fleet: None,
            pace: Pace::default(),
            arrivals,
            arrivals_seen,
            last_head: None,
            fees_at: None,
            fee_reading: None,
            full_round_at_ms: None,
            waiting: 0,
            final_seen: None,
            preconfirm_ms: None,
            receipts_at_ms: None,
            look_at_ms: 0,
            preconfirmed: BTreeSet::new(),
            feed: None,
            feed_up: false,
            pushed: None,
            pushed_at_ms: 0,
        })
    }

    /// Fleet mode: this engine acts only for the settler accounts whose lease (of `ttl_ms`,
    /// renewed every round) it holds as `owner`, and does the chain-wide work only while it
    /// holds the [`LEADER`] lease. Every write for an account is fenced with its lease.
    pub fn with_leases(mut self, owner: &str, ttl_ms: u64) -> Self {
        self.fleet = Some(Leases { owner: owner.to_owned(), ttl_ms, held: BTreeMap::new() });
        self
    }

    /// Follows settled payments to `finality` (the chain's `finalized` block by default).
    pub fn with_finality(mut self, finality: Finality) -> Self {
        self.finality = finality;
        self
    }

    /// Counts a payment included at its preconfirmation, on a chain whose RPC endpoint
    /// serves preconfirmed receipts (flashblocks every `ms`): while a transaction is in
    /// flight its receipt is looked for every quarter interval; a batch is never held for
    /// the sealed block.
    pub fn with_preconfirmations(mut self, ms: Option<u64>) -> Self {
        self.preconfirm_ms = ms;
        self.pace.preconfirmed(ms.is_some());
        self
    }

    /// Heads come pushed by the node ([`super::heads::follow`]): each wakes the engine,
    /// and while the feed is live the engine reads no head of its own but a slow safety
    /// look.
    pub fn with_head_feed(mut self, feed: watch::Receiver<FeedState>) -> Self {
        self.feed = Some(feed);
        self
    }

    /// Reads settler balances and nonces for the metrics and status every `ms` of the
    /// engine's clock (30 s by default).
    pub fn with_settler_reads_every_ms(mut self, ms: u64) -> Self {
        self.settler_reads_every_ms = ms;
        self
    }

    /// Publishes this engine's view on `board` after every round (Admin `GetStatus`).
    pub fn with_board(mut self, board: StatusBoard) -> Self {
        self.board = board;
        self
    }
}
