//! The nonce audit: finds accepted payments whose nonce was used on chain outside the
//! daemon (the payer spent it elsewhere, another facilitator settled it) and fails them,
//! so they can never be reported as settled. Runs off the hot path, periodically. Payments
//! that were in a batch of ours are left to the settlement engine, which tells its own
//! transactions' use of a nonce from someone else's.
//!
//! Reads are bulk: one `aggregate3` `eth_call` of `authorizationState` per chain per
//! [`AUDIT_CHUNK`] payments.

use std::collections::HashMap;
use std::time::Duration;

use alloy::primitives::Bytes;
use alloy::sol_types::SolCall;

use crate::chain::{IEip3009, IMulticall3, MULTICALL3, RpcEndpoint, RpcError};
use crate::ledger::{LedgerError, LedgerHandle, PaymentRecord, Status, TransitionRequest};
use crate::x402::Reason;

/// Authorization states read in one `eth_call`: ~10k gas each, far below node limits.
pub const AUDIT_CHUNK: usize = 500;

/// Why an audit round failed. Nothing is marked failed on a read error.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("the ledger scan task failed")]
    Scan,
}

/// What a round found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AuditReport {
    pub checked: usize,
    /// Payments marked failed because their nonce was already used on chain.
    pub failed: usize,
}

/// The audit over a ledger and the chains' RPC endpoints.
#[derive(Clone)]
pub struct NonceAudit {
    ledger: LedgerHandle,
    endpoints: HashMap<u64, RpcEndpoint>,
}

impl NonceAudit {
    pub fn new(ledger: LedgerHandle, endpoints: HashMap<u64, RpcEndpoint>) -> Self {
        Self { ledger, endpoints }
    }

    /// Checks every accepted payment never batched once.
    pub async fn run_once(&self, now_ms: u64) -> Result<AuditReport, AuditError> {
        let ledger = std::sync::Arc::clone(self.ledger.ledger());
        let accepted: Vec<PaymentRecord> = tokio::task::spawn_blocking(move || ledger.pending_records())
            .await
            .map_err(|_| AuditError::Scan)??
            .into_iter()
            // A payment that was in a batch of ours may have been settled by that batch's
            // transaction (mined after all, or mined again after a reorg): the settlement
            // engine judges it, with the chain's logs, before it is batched again.
            .filter(|r| r.status == Status::Accepted && r.batch_id.is_empty())
            .collect();
        let mut report = AuditReport::default();
        let mut by_chain: HashMap<u64, Vec<&PaymentRecord>> = HashMap::new();
        for r in &accepted {
            by_chain.entry(r.signed.chain_id).or_default().push(r);
        }
        for (chain_id, records) in by_chain {
            let Some(endpoint) = self.endpoints.get(&chain_id) else { continue };
            for chunk in records.chunks(AUDIT_CHUNK) {
                let used = authorization_states(endpoint, chunk).await?;
                report.checked += chunk.len();
                for (record, used) in chunk.iter().zip(used) {
                    if !used {
                        continue;
                    }
                    let mut t = TransitionRequest::new(record.key(), Status::Failed, now_ms);
                    t.only_from = Some(Status::Accepted);
                    t.failure = Some((
                        Reason::NonceAlreadyUsed,
                        "the nonce was used on chain outside this daemon (authorizationState is true)".into(),
                    ));
                    match self.ledger.transition(t).await {
                        Ok(_) => {
                            report.failed += 1;
                            crate::telemetry::finals(
                                &chain_id.to_string(),
                                "failed",
                                Reason::NonceAlreadyUsed.code(),
                                1,
                            );
                        }
                        // Moved on meanwhile (a settlement began): not ours to fail here.
                        Err(LedgerError::IllegalTransition { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(report)
    }

    /// Runs a round every `interval` until the task is dropped; a failed round is logged
    /// and retried at the next tick. Daemons sharing a ledger take turns (one round per
    /// interval for the fleet, [`crate::ledger::Fleet::claim_turn`]).
    pub async fn run_every(self, interval: Duration, clock: std::sync::Arc<dyn crate::clock::Clock>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Daemons sharing a ledger take turns: one audit per interval for the fleet.
            let ledger = std::sync::Arc::clone(self.ledger.ledger());
            // A little under the interval: a tick a few ms early still finds its turn.
            let every = u64::try_from(interval.as_millis() * 9 / 10).unwrap_or(u64::MAX);
            // A ledger of one daemon: always its turn.
            let turn = move || ledger.fleet().map_or(Ok(true), |f| f.claim_turn("nonce_audit", every));
            match tokio::task::spawn_blocking(turn).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => continue,
                Ok(Err(e)) => {
                    tracing::warn!("nonce audit: {e}");
                    continue;
                }
                Err(_) => continue,
            }
            match self.run_once(clock.now_unix().saturating_mul(1000)).await {
                Ok(r) if r.failed > 0 => {
                    tracing::warn!(checked = r.checked, failed = r.failed, "nonces used outside the daemon")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("nonce audit failed: {e}"),
            }
        }
    }
}

async fn authorization_states(
    endpoint: &RpcEndpoint,
    records: &[&PaymentRecord],
) -> Result<Vec<bool>, AuditError> {
    let calls = records
        .iter()
        .map(|r| IMulticall3::Call3 {
            target: r.signed.token,
            allowFailure: true,
            callData: Bytes::from(
                IEip3009::authorizationStateCall {
                    authorizer: r.signed.authorization.from,
                    nonce: r.signed.authorization.nonce,
                }
                .abi_encode(),
            ),
        })
        .collect();
    let results = IMulticall3::new(MULTICALL3, &endpoint.provider)
        .aggregate3(calls)
        .call()
        .await
        .map_err(|e| endpoint.error("eth_call aggregate3 authorizationState", e))?;
    if results.len() != records.len() {
        let shape = format!("{} results for {} calls", results.len(), records.len());
        return Err(endpoint.error("eth_call aggregate3 authorizationState", shape).into());
    }
    // An unreadable state counts as unused: failing a payment needs positive evidence.
    Ok(results.iter().map(|r| r.success && r.returnData.len() == 32 && r.returnData[31] == 1).collect())
}
