//! Pre-simulation of a batch: one `eth_call` of its `aggregate3` (every item allowed to
//! fail) tells, item by item, which authorizations the token would refuse right now, and
//! why, so they can be taken out and marked failed with a precise reason before the batch
//! is sent.
//!
//! Reasons come from the token's revert string. FiatTokenV2_2 (USDC) and the devnet's
//! TestUSDC use the same strings, so one table serves both.

use alloy::eips::BlockId;
use alloy::sol_types::{Revert, SolError};

use crate::chain::{self, IMulticall3, MULTICALL3, RpcEndpoint, RpcError};
use crate::x402::{Reason, SignedAuthorization};

/// Why the token would refuse one authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemFailure {
    pub reason: Reason,
    /// The token's own words (its revert string), or a description of the revert data.
    pub message: String,
}

/// The message of an item that reverted with no data at all: what an inner call that ran
/// out of gas returns (a token refusal always says why).
const NO_DATA: &str = "reverted without data (out of gas, or a revert without a reason)";

impl ItemFailure {
    /// Whether the item may only have run short of gas: it reverted without any data.
    pub fn maybe_out_of_gas(&self) -> bool {
        self.reason == Reason::UnexpectedSettleError && self.message == NO_DATA
    }
}

/// The token's revert strings and the x402 reason each means. Anything else is an
/// unexpected settlement error carrying the token's message.
const REVERTS: &[(&str, Reason)] = &[
    ("authorization is used or canceled", Reason::NonceAlreadyUsed),
    ("transfer amount exceeds balance", Reason::InsufficientFunds),
    ("invalid signature", Reason::InvalidSignature),
    ("authorization is not yet valid", Reason::InvalidValidAfter),
    ("authorization is expired", Reason::InvalidValidBefore),
];

/// Classifies an inner call's revert data.
pub fn classify(revert_data: &[u8]) -> ItemFailure {
    match Revert::abi_decode(revert_data) {
        Ok(revert) => {
            let message = revert.reason;
            let reason = REVERTS
                .iter()
                .find(|(needle, _)| message.contains(needle))
                .map_or(Reason::UnexpectedSettleError, |&(_, r)| r);
            ItemFailure { reason, message }
        }
        Err(_) if revert_data.is_empty() => {
            ItemFailure { reason: Reason::UnexpectedSettleError, message: NO_DATA.to_owned() }
        }
        Err(_) => ItemFailure {
            reason: Reason::UnexpectedSettleError,
            message: format!("reverted without a reason string (0x{})", alloy::hex::encode(revert_data)),
        },
    }
}

/// Simulates settling `items` in one batch with `gas_limit` (the limit the batch will be
/// sent with: estimation under-funds `allowFailure` items), at the latest block; per item,
/// `Ok` if the token would accept it. An error means nothing about the items is known.
pub async fn simulate(
    endpoint: &RpcEndpoint,
    items: &[SignedAuthorization],
    gas_limit: u64,
) -> Result<Vec<Result<(), ItemFailure>>, RpcError> {
    simulate_at(endpoint, items, gas_limit, None).await
}

/// [`simulate`] on the state of block `at` (`None`: the latest).
pub async fn simulate_at(
    endpoint: &RpcEndpoint,
    items: &[SignedAuthorization],
    gas_limit: u64,
    at: Option<u64>,
) -> Result<Vec<Result<(), ItemFailure>>, RpcError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let block = at.map_or(BlockId::latest(), BlockId::number);
    let calls = chain::batch_calls(items);
    let expected = calls.len();
    let results = IMulticall3::new(MULTICALL3, &endpoint.provider)
        .aggregate3(calls)
        .gas(gas_limit)
        .block(block)
        .call()
        .await
        .map_err(|e| endpoint.error("eth_call aggregate3", e))?;
    if results.len() != expected {
        let shape = format!("returned {} results for {expected} calls", results.len());
        return Err(endpoint.error("eth_call aggregate3", shape));
    }
    // A wallet deployment's own result does not matter (it may exist already): its
    // transfer's does.
    Ok(chain::transfer_positions(items)
        .into_iter()
        .map(|at| {
            let r = &results[at];
            if r.success { Ok(()) } else { Err(classify(&r.returnData)) }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revert_strings_map_to_reasons() {
        let data = |s: &str| Revert::from(s).abi_encode();
        assert_eq!(
            classify(&data("FiatTokenV2: authorization is used or canceled")).reason,
            Reason::NonceAlreadyUsed
        );
        assert_eq!(
            classify(&data("ERC20: transfer amount exceeds balance")).reason,
            Reason::InsufficientFunds
        );
        assert_eq!(classify(&data("FiatTokenV2: invalid signature")).reason, Reason::InvalidSignature);
        assert_eq!(classify(&data("Pausable: paused")).reason, Reason::UnexpectedSettleError);
        let odd = classify(&[0xde, 0xad]);
        assert_eq!(odd.reason, Reason::UnexpectedSettleError);
        assert!(odd.message.contains("0xdead"), "{}", odd.message);
        assert!(!odd.maybe_out_of_gas());
        assert!(classify(&[]).maybe_out_of_gas(), "no data at all: perhaps out of gas");
        assert!(!classify(&data("")).maybe_out_of_gas(), "an empty reason is still a reason");
    }
}
