//! Prometheus metrics: what the daemon does, for operators and their alerts.
//!
//! One recorder per process ([`install`]), rendered on `GET /metrics` by a small HTTP
//! listener on `[metrics] listen` ([`app`]). Names follow Prometheus conventions: the
//! `x402_batcher_` prefix, base units (`_seconds`, `_wei`, `_base_units`, gas), `_total`
//! for counters. Handles on the submission path are registered once ([`Hot`]); the
//! settlement engine registers its own per chain ([`ChainMetrics`]).
//!
//! [`NAMES`] lists every metric the daemon exports; the dashboard and alert rules in
//! `ops/` are checked against it by a test.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;

/// Every metric the daemon exports (histograms add `_bucket`, `_sum`, `_count`).
pub const NAMES: &[&str] = &[
    "x402_batcher_submissions_total",
    "x402_batcher_refusals_total",
    "x402_batcher_verify_queue_depth",
    "x402_batcher_verify_seconds",
    "x402_batcher_payer_check_seconds",
    "x402_batcher_ledger_commit_seconds",
    "x402_batcher_ledger_commit_group_size",
    "x402_batcher_pending_payments",
    "x402_batcher_holds",
    "x402_batcher_pending_value_base_units",
    "x402_batcher_payments_near_deadline",
    "x402_batcher_batches_total",
    "x402_batcher_batch_size",
    "x402_batcher_batch_gas_per_payment",
    "x402_batcher_gas_limit_fallbacks_total",
    "x402_batcher_presimulation_refusals_total",
    "x402_batcher_head_block",
    "x402_batcher_base_fee_wei",
    "x402_batcher_settler_balance_wei",
    "x402_batcher_lease_held",
    "x402_batcher_transactions_pending",
    "x402_batcher_transactions_replaced_total",
    "x402_batcher_transactions_dropped_total",
    "x402_batcher_confirmation_lag_blocks",
    "x402_batcher_reorgs_total",
    "x402_batcher_preconfirmations_broken_total",
    "x402_batcher_settlement_corrections_total",
    "x402_batcher_settlement_reversals_total",
    "x402_batcher_finality_lag_blocks",
    "x402_batcher_accept_to_settled_seconds",
    "x402_batcher_payments_final_total",
    "x402_batcher_rpc_errors_total",
    "x402_batcher_balance_breaker_open",
    "x402_batcher_balance_stale_answers_total",
    "x402_batcher_settlement_round_seconds",
    "x402_batcher_settlement_last_round_timestamp_seconds",
    "x402_batcher_settlement_paused",
    "x402_batcher_policy_max_batch_size",
    "x402_batcher_policy_max_wait_seconds",
    "x402_batcher_policy_linger_seconds",
    "x402_batcher_policy_target_cost_per_payment_wei",
    "x402_batcher_policy_confirmations",
    "x402_batcher_policy_deadline_margin_seconds",
    "x402_batcher_auth_refused_total",
    "x402_batcher_facilitator_requests_total",
    "x402_batcher_facilitator_settle_wait_seconds",
    "x402_batcher_connections_open",
    "x402_batcher_connections_refused_total",
    "x402_batcher_connections_idle_closed_total",
    "x402_batcher_rpc_endpoint_usable",
    "x402_batcher_rpc_endpoint_lag_blocks",
];

/// How often histograms are compacted when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's recorder (once; later calls return the same handle). `None` if
/// another recorder was installed first (an embedding program's).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0, 900.0,
            ];
            let sizes = [1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0];
            let gas = [30e3, 35e3, 40e3, 45e3, 50e3, 60e3, 75e3, 100e3, 150e3];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), &sizes))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_gas_per_payment".into()), &gas));
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(e) => {
                    tracing::error!("metrics buckets refused: {e}");
                    return None;
                }
            };
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => Some(handle),
                Err(_) => {
                    tracing::warn!("another metrics recorder is installed; /metrics stays empty");
                    None
                }
            }
        })
        .clone()
}

/// The metrics listener's router (`GET /metrics`; any other path gets 404), and the task
/// that compacts histograms while nobody scrapes (stopped when the [`Upkeep`] is dropped).
/// The daemon serves it through the listener's caps and deadlines.
pub fn app(handle: PrometheusHandle) -> (axum::Router, Upkeep) {
    use axum::http::{StatusCode, header};

    let upkeep = {
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        })
    };
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || async move {
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render())
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "only GET /metrics is served here\n") });
    (app, Upkeep(upkeep))
}

/// The histogram upkeep of [`app`]; stops when dropped.
pub struct Upkeep(tokio::task::JoinHandle<()>);

impl Drop for Upkeep {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---- the submission path ----------------------------------------------------------------

/// Handles on the submission path, registered once.
pub struct Hot {
    pub accepted: Counter,
    pub duplicate: Counter,
    pub held: Counter,
    pub rejected: Counter,
    pub error: Counter,
    pub verify_queue_depth: Gauge,
    pub verify_seconds: Histogram,
    pub commit_seconds: Histogram,
    pub commit_group_size: Histogram,
    pub pending_payments: Gauge,
    /// Verified payments held for their settlement (the HTTP facilitator's `/verify`).
    pub holds: Gauge,
    /// How long reading a payer and judging its signature took, by route
    /// ([`PAYER_CHECK_ROUTES`], same order).
    pub payer_check_seconds: [Histogram; 5],
    refusals: Mutex<HashMap<&'static str, Counter>>,
}

/// The `route` labels of `x402_batcher_payer_check_seconds`: a key whose balance and code
/// were cached, a key read now, then the payers with code.
pub const PAYER_CHECK_ROUTES: [&str; 5] = ["eoa_cached", "eoa_read", "erc1271", "eip7702", "erc6492"];

static HOT: OnceLock<Hot> = OnceLock::new();

/// The submission path's handles (registered on first use, after [`install`]).
pub fn hot() -> &'static Hot {
    HOT.get_or_init(|| {
        let outcome = |o: &'static str| metrics::counter!("x402_batcher_submissions_total", "outcome" => o);
        Hot {
            accepted: outcome("accepted"),
            duplicate: outcome("duplicate"),
            held: outcome("held"),
            rejected: outcome("rejected"),
            error: outcome("error"),
            verify_queue_depth: metrics::gauge!("x402_batcher_verify_queue_depth"),
            verify_seconds: metrics::histogram!("x402_batcher_verify_seconds"),
            commit_seconds: metrics::histogram!("x402_batcher_ledger_commit_seconds"),
            commit_group_size: metrics::histogram!("x402_batcher_ledger_commit_group_size"),
            pending_payments: metrics::gauge!("x402_batcher_pending_payments"),
            holds: metrics::gauge!("x402_batcher_holds"),
            payer_check_seconds: PAYER_CHECK_ROUTES
                .map(|route| metrics::histogram!("x402_batcher_payer_check_seconds", "route" => route)),
            refusals: Mutex::new(HashMap::new()),
        }
    })
}

impl Hot {
    /// Counts a refusal under its reason code (an x402 code, or a gRPC code's name).
    pub fn refused(&self, reason: &'static str) {
        let mut map = self.refusals.lock();
        map.entry(reason)
            .or_insert_with(|| metrics::counter!("x402_batcher_refusals_total", "reason" => reason))
            .increment(1);
    }
}

// ---- the settlement engine --------------------------------------------------------------

/// One chain's settlement metrics.
#[derive(Clone)]
pub struct ChainMetrics {
    chain: String,
    pub head_block: Gauge,
    pub base_fee_wei: Gauge,
    pub transactions_pending: Gauge,
    pub transactions_replaced: Counter,
    pub transactions_dropped: Counter,
    pub confirmation_lag_blocks: Gauge,
    pub reorgs: Counter,
    /// Batches counted included at a preconfirmation whose transaction the sealed block did
    /// not hold (their payments were settled again, or expired).
    pub preconfirmations_broken: Counter,
    /// Settled payments whose evidence a reorg moved, and whose settlement it undid.
    pub corrections: Counter,
    pub reversals: Counter,
    /// How far the oldest settled payment not yet final is below the head.
    pub finality_lag_blocks: Gauge,
    pub accept_to_settled_seconds: Histogram,
    pub batch_size: Histogram,
    pub batch_gas_per_payment: Histogram,
    /// Batches sent with the seeds' gas limit because the learnt one looked short.
    pub gas_limit_fallbacks: Counter,
    pub near_deadline: Gauge,
    pub round_seconds: Histogram,
    pub last_round: Gauge,
}

impl ChainMetrics {
    pub fn new(chain_id: u64) -> Self {
        let chain = chain_id.to_string();
        let c = chain.clone();
        ChainMetrics {
            head_block: metrics::gauge!("x402_batcher_head_block", "chain_id" => c.clone()),
            base_fee_wei: metrics::gauge!("x402_batcher_base_fee_wei", "chain_id" => c.clone()),
            transactions_pending: metrics::gauge!("x402_batcher_transactions_pending", "chain_id" => c.clone()),
            transactions_replaced: metrics::counter!("x402_batcher_transactions_replaced_total", "chain_id" => c.clone()),
            transactions_dropped: metrics::counter!("x402_batcher_transactions_dropped_total", "chain_id" => c.clone()),
            confirmation_lag_blocks: metrics::gauge!("x402_batcher_confirmation_lag_blocks", "chain_id" => c.clone()),
            reorgs: metrics::counter!("x402_batcher_reorgs_total", "chain_id" => c.clone()),
            preconfirmations_broken: metrics::counter!("x402_batcher_preconfirmations_broken_total", "chain_id" => c.clone()),
            corrections: metrics::counter!("x402_batcher_settlement_corrections_total", "chain_id" => c.clone()),
            reversals: metrics::counter!("x402_batcher_settlement_reversals_total", "chain_id" => c.clone()),
            finality_lag_blocks: metrics::gauge!("x402_batcher_finality_lag_blocks", "chain_id" => c.clone()),
            accept_to_settled_seconds: metrics::histogram!("x402_batcher_accept_to_settled_seconds", "chain_id" => c.clone()),
            batch_size: metrics::histogram!("x402_batcher_batch_size", "chain_id" => c.clone()),
            batch_gas_per_payment: metrics::histogram!("x402_batcher_batch_gas_per_payment", "chain_id" => c.clone()),
            gas_limit_fallbacks: metrics::counter!("x402_batcher_gas_limit_fallbacks_total", "chain_id" => c.clone()),
            near_deadline: metrics::gauge!("x402_batcher_payments_near_deadline", "chain_id" => c.clone()),
            round_seconds: metrics::histogram!("x402_batcher_settlement_round_seconds", "chain_id" => c.clone()),
            last_round: metrics::gauge!("x402_batcher_settlement_last_round_timestamp_seconds", "chain_id" => c),
            chain,
        }
    }

    /// A batch cut for `reason`.
    pub fn batch_cut(&self, reason: &'static str, size: usize) {
        metrics::counter!("x402_batcher_batches_total", "chain_id" => self.chain.clone(), "reason" => reason)
            .increment(1);
        self.batch_size.record(size as f64);
    }

    /// Payments that reached a final state; `reason` is empty for settled ones.
    pub fn finals(&self, status: &'static str, reason: &str, n: usize) {
        finals(&self.chain, status, reason, n);
    }

    /// A payment the token would refuse, found by pre-simulating its batch: by the route its
    /// payer's signature took (a smart wallet whose owner changed, a 7702 account that
    /// re-delegated) and the reason.
    pub fn presimulation_refused(&self, route: &'static str, reason: &'static str) {
        metrics::counter!(
            "x402_batcher_presimulation_refusals_total",
            "chain_id" => self.chain.clone(),
            "route" => route,
            "reason" => reason
        )
        .increment(1);
    }

    pub fn rpc_error(&self, call: &'static str) {
        metrics::counter!("x402_batcher_rpc_errors_total", "chain_id" => self.chain.clone(), "call" => call)
            .increment(1);
    }

    /// Fleet mode: whether this daemon holds the lease on `account` (a settler, or the
    /// zero address for the chain's leader: sweeping, expiry, finality).
    pub fn lease_held(&self, account: alloy::primitives::Address, held: bool) {
        metrics::gauge!(
            "x402_batcher_lease_held",
            "chain_id" => self.chain.clone(),
            "account" => account.to_string()
        )
        .set(if held { 1.0 } else { 0.0 });
    }

    pub fn settler_balance(&self, settler: alloy::primitives::Address, wei: f64) {
        metrics::gauge!(
            "x402_batcher_settler_balance_wei",
            "chain_id" => self.chain.clone(),
            "settler" => settler.to_string()
        )
        .set(wei);
    }

    /// The sum of pending payments' values per token, in the token's base units.
    pub fn pending_value(&self, token: alloy::primitives::Address, base_units: f64) {
        metrics::gauge!(
            "x402_batcher_pending_value_base_units",
            "chain_id" => self.chain.clone(),
            "token" => token.to_string()
        )
        .set(base_units);
    }
}

/// Counts payments of `chain` that reached a final state (the engine's and the audit's).
pub fn finals(chain: &str, status: &'static str, reason: &str, n: usize) {
    if n == 0 {
        return;
    }
    metrics::counter!(
        "x402_batcher_payments_final_total",
        "chain_id" => chain.to_owned(),
        "status" => status,
        "reason" => reason.to_owned()
    )
    .increment(n as u64);
}
