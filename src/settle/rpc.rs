//! What the settlement engine reads from a chain and sends to it, behind a trait
//! ([`Chain`]): the round does its I/O through it, its decisions never do. [`RpcChain`] is
//! the JSON-RPC implementation (alloy over HTTP); tests drive it with alloy's mock
//! transport, and the engine with any other implementation.
//!
//! Receipts are read into [`Receipt`]: the parts the engine judges, with the token's
//! `AuthorizationUsed` logs already decoded.

use std::future::Future;

use alloy::eips::{BlockId, BlockNumberOrTag};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use alloy::rpc::types::{Filter, TransactionReceipt};
use alloy::sol_types::SolEvent;

use crate::chain::{self, GAS_PRICE_ORACLE, IEip3009, IGasPriceOracle, RpcEndpoint, RpcError};
use crate::config::FinalityTag;
use crate::planner::L1Fees;
use crate::simulate::{self, ItemFailure};
use crate::x402::SignedAuthorization;

/// The head block as a round sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub number: u64,
    pub hash: B256,
    pub timestamp: u64,
    pub gas_limit: u64,
    /// The block's own base fee (wei per gas), when the node says (EIP-1559 chains).
    pub base_fee: Option<u128>,
}

impl Head {
    /// The head a node's block header describes (read, or pushed by a subscription).
    pub fn of(header: &alloy::rpc::types::Header) -> Head {
        Head {
            number: header.number,
            hash: header.hash,
            timestamp: header.timestamp,
            gas_limit: header.gas_limit,
            base_fee: header.base_fee_per_gas.map(u128::from),
        }
    }
}

/// A mined transaction, as the engine judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub tx_hash: B256,
    /// Who sent it.
    pub from: Address,
    pub block_number: u64,
    pub block_hash: B256,
    pub gas_used: u64,
    /// Wei per gas actually paid.
    pub effective_gas_price: u128,
    /// Whether the transaction itself succeeded (items are judged by their own logs).
    pub success: bool,
    /// The L1 data fee paid besides gas (OP-stack chains; 0 elsewhere), wei.
    pub l1_fee: u128,
    /// The token's `AuthorizationUsed` logs: `(authorizer, nonce, log index)`, in log order.
    pub used: Vec<(Address, B256, u64)>,
}

impl Receipt {
    /// The receipt of a mined transaction, with `token`'s logs and the L1 fee it paid;
    /// `None` for a pending one.
    pub fn of(receipt: &TransactionReceipt, token: Address, l1_fee: u128) -> Option<Receipt> {
        let mut used = chain::authorization_logs(receipt, token);
        used.sort_by_key(|&(_, _, index)| index);
        Some(Receipt {
            tx_hash: receipt.transaction_hash,
            from: receipt.from,
            block_number: receipt.block_number?,
            block_hash: receipt.block_hash?,
            gas_used: receipt.gas_used,
            effective_gas_price: receipt.effective_gas_price,
            success: receipt.status(),
            l1_fee,
            used,
        })
    }

    /// What the transaction cost its sender (wei): its gas, and its L1 data fee on an
    /// OP-stack chain.
    pub fn fee(&self) -> U256 {
        U256::from(self.gas_used) * U256::from(self.effective_gas_price) + U256::from(self.l1_fee)
    }
}

/// The last block's base fee and its median priority fee (wei per gas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeeReading {
    pub base_fee: u128,
    pub median_tip: u128,
}

/// A chain as the settlement engine uses it.
pub trait Chain: Send + Sync + 'static {
    fn chain_id(&self) -> u64;

    /// The latest block.
    fn head(&self) -> impl Future<Output = Result<Head, RpcError>> + Send;

    /// The canonical block at `number`: its hash and time, if the node has it.
    fn block_at(&self, number: u64) -> impl Future<Output = Result<Option<(B256, u64)>, RpcError>> + Send;

    fn fees(&self) -> impl Future<Output = Result<FeeReading, RpcError>> + Send;

    /// The account's next nonce, as of the latest block.
    fn nonce(&self, account: Address) -> impl Future<Output = Result<u64, RpcError>> + Send;

    /// The transaction's receipt, with `token`'s logs; `None` while it is not mined.
    fn receipt(
        &self,
        tx: B256,
        token: Address,
    ) -> impl Future<Output = Result<Option<Receipt>, RpcError>> + Send;

    /// Whether the node knows the transaction (pending or mined).
    fn is_known(&self, tx: B256) -> impl Future<Output = Result<bool, RpcError>> + Send;

    /// Sends a signed transaction; the error is the node's refusal.
    fn broadcast(&self, raw: &Bytes) -> impl Future<Output = Result<(), RpcError>> + Send;

    /// Simulates `items` as one batch with `gas_limit` on the state of block `at` (`None`:
    /// the latest); per item, whether the token would accept it there.
    fn simulate(
        &self,
        items: &[SignedAuthorization],
        gas_limit: u64,
        at: Option<u64>,
    ) -> impl Future<Output = Result<Vec<Result<(), ItemFailure>>, RpcError>> + Send;

    /// The transactions in `[from_block, to_block]` in which `token` emitted
    /// `AuthorizationUsed` for `(authorizer, nonce)` (reorged-out logs left out);
    /// `to_block` `u64::MAX`: up to the latest block.
    fn uses_of(
        &self,
        token: Address,
        authorizer: Address,
        nonce: B256,
        from_block: u64,
        to_block: u64,
    ) -> impl Future<Output = Result<Vec<B256>, RpcError>> + Send;

    /// The account's native balance (wei).
    fn native_balance(&self, account: Address) -> impl Future<Output = Result<U256, RpcError>> + Send;

    /// The number of the block the chain calls `tag` (`finalized`, `safe`); `None` if the
    /// node has none yet.
    fn tagged_block(&self, tag: FinalityTag) -> impl Future<Output = Result<Option<u64>, RpcError>> + Send;

    /// The L1 data fee settlements like `sample` pay, by shape (all zero except on an
    /// OP-stack chain).
    fn l1_fees(&self, sample: &SignedAuthorization) -> impl Future<Output = Result<L1Fees, RpcError>> + Send;
}

/// [`Chain`] over JSON-RPC. Every error is redacted (node URLs carry keys).
#[derive(Debug, Clone)]
pub struct RpcChain {
    endpoint: RpcEndpoint,
    op_stack: bool,
}

impl RpcChain {
    pub fn new(endpoint: RpcEndpoint) -> Self {
        Self { endpoint, op_stack: false }
    }

    /// The chain charges an L1 data fee, read from the `GasPriceOracle` predeploy.
    pub fn op_stack(mut self, op_stack: bool) -> Self {
        self.op_stack = op_stack;
        self
    }

    async fn l1_fee(&self, data: Bytes) -> Result<u128, RpcError> {
        let fee = IGasPriceOracle::new(GAS_PRICE_ORACLE, &self.endpoint.provider)
            .getL1Fee(data)
            .call()
            .await
            .map_err(|e| self.endpoint.error("eth_call GasPriceOracle.getL1Fee", e))?;
        Ok(u128::try_from(fee).unwrap_or(u128::MAX))
    }
}

/// The L1 fees of each shape from the oracle's fee of three transactions' calldata: a
/// direct call, and batches of one and two items (the batch's fixed part and the part per
/// item by difference).
pub fn l1_fees_from(direct: u128, batch_of_one: u128, batch_of_two: u128) -> L1Fees {
    let per_item = batch_of_two.saturating_sub(batch_of_one);
    L1Fees { direct, batch_fixed: batch_of_one.saturating_sub(per_item), batch_per_item: per_item }
}

impl Chain for RpcChain {
    fn chain_id(&self) -> u64 {
        self.endpoint.chain_id
    }

    async fn head(&self) -> Result<Head, RpcError> {
        let block = self
            .endpoint
            .provider
            .get_block_by_number(BlockNumberOrTag::Latest)
            .await
            .map_err(|e| self.endpoint.error("eth_getBlockByNumber", e))?
            .ok_or_else(|| self.endpoint.error("eth_getBlockByNumber", "the node has no latest block"))?;
        Ok(Head::of(&block.header))
    }

    async fn block_at(&self, number: u64) -> Result<Option<(B256, u64)>, RpcError> {
        Ok(self
            .endpoint
            .provider
            .get_block_by_number(BlockNumberOrTag::Number(number))
            .await
            .map_err(|e| self.endpoint.error("eth_getBlockByNumber", e))?
            .map(|b| (b.header.hash, b.header.timestamp)))
    }

    async fn fees(&self) -> Result<FeeReading, RpcError> {
        let history = self
            .endpoint
            .provider
            .get_fee_history(1, BlockNumberOrTag::Latest, &[50.0])
            .await
            .map_err(|e| self.endpoint.error("eth_feeHistory", e))?;
        let base_fee = history.base_fee_per_gas.last().copied().unwrap_or_default();
        let median_tip = history
            .reward
            .as_ref()
            .and_then(|r| r.last())
            .and_then(|r| r.first())
            .copied()
            .unwrap_or_default();
        Ok(FeeReading { base_fee, median_tip })
    }

    async fn nonce(&self, account: Address) -> Result<u64, RpcError> {
        self.endpoint
            .provider
            .get_transaction_count(account)
            .block_id(BlockId::latest())
            .await
            .map_err(|e| self.endpoint.error("eth_getTransactionCount", e))
    }

    async fn receipt(&self, tx: B256, token: Address) -> Result<Option<Receipt>, RpcError> {
        let receipt = chain::receipt_with_l1_fee(&self.endpoint, tx, self.op_stack).await?;
        Ok(receipt.as_ref().and_then(|(r, l1_fee)| Receipt::of(r, token, *l1_fee)))
    }

    async fn is_known(&self, tx: B256) -> Result<bool, RpcError> {
        Ok(self
            .endpoint
            .provider
            .get_transaction_by_hash(tx)
            .await
            .map_err(|e| self.endpoint.error("eth_getTransactionByHash", e))?
            .is_some())
    }

    async fn broadcast(&self, raw: &Bytes) -> Result<(), RpcError> {
        self.endpoint
            .provider
            .send_raw_transaction(raw)
            .await
            .map(|_| ())
            .map_err(|e| self.endpoint.error("eth_sendRawTransaction", e))
    }

    async fn simulate(
        &self,
        items: &[SignedAuthorization],
        gas_limit: u64,
        at: Option<u64>,
    ) -> Result<Vec<Result<(), ItemFailure>>, RpcError> {
        simulate::simulate_at(&self.endpoint, items, gas_limit, at).await
    }

    async fn uses_of(
        &self,
        token: Address,
        authorizer: Address,
        nonce: B256,
        from_block: u64,
        to_block: u64,
    ) -> Result<Vec<B256>, RpcError> {
        let filter = Filter::new()
            .address(token)
            .event_signature(IEip3009::AuthorizationUsed::SIGNATURE_HASH)
            .topic1(authorizer.into_word())
            .topic2(nonce)
            .from_block(from_block)
            .to_block(if to_block == u64::MAX { BlockNumberOrTag::Latest } else { to_block.into() });
        let logs = self
            .endpoint
            .provider
            .get_logs(&filter)
            .await
            .map_err(|e| self.endpoint.error("eth_getLogs", e))?;
        Ok(logs.into_iter().filter(|l| !l.removed).filter_map(|l| l.transaction_hash).collect())
    }

    async fn native_balance(&self, account: Address) -> Result<U256, RpcError> {
        self.endpoint
            .provider
            .get_balance(account)
            .await
            .map_err(|e| self.endpoint.error("eth_getBalance", e))
    }

    async fn tagged_block(&self, tag: FinalityTag) -> Result<Option<u64>, RpcError> {
        let tag = match tag {
            FinalityTag::Finalized => BlockNumberOrTag::Finalized,
            FinalityTag::Safe => BlockNumberOrTag::Safe,
        };
        Ok(self
            .endpoint
            .provider
            .get_block_by_number(tag)
            .await
            .map_err(|e| self.endpoint.error("eth_getBlockByNumber", e))?
            .map(|b| b.header.number))
    }

    async fn l1_fees(&self, sample: &SignedAuthorization) -> Result<L1Fees, RpcError> {
        if !self.op_stack {
            return Ok(L1Fees::default());
        }
        let one = std::slice::from_ref(sample);
        let two = [sample.clone(), sample.clone()];
        let (direct, batch_of_one, batch_of_two) = tokio::try_join!(
            self.l1_fee(chain::settlement_call(one).1),
            self.l1_fee(chain::aggregate3_calldata(one)),
            self.l1_fee(chain::aggregate3_calldata(&two)),
        )?;
        Ok(l1_fees_from(direct, batch_of_one, batch_of_two))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::providers::ProviderBuilder;
    use alloy::transports::mock::Asserter;
    use serde_json::json;

    fn mocked() -> (RpcChain, Asserter) {
        let asserter = Asserter::new();
        let provider = ProviderBuilder::new().connect_mocked_client(asserter.clone()).erased();
        (RpcChain::new(RpcEndpoint::from_provider(8453, provider)), asserter)
    }

    #[tokio::test]
    async fn fees_read_the_last_base_fee_and_median_tip() {
        let (chain, asserter) = mocked();
        asserter.push_success(&json!({
            "oldestBlock": "0x10",
            "baseFeePerGas": ["0x3b9aca00", "0x77359400"],
            "gasUsedRatio": [0.5],
            "reward": [["0x5f5e100"]]
        }));
        let fees = chain.fees().await.unwrap();
        assert_eq!(fees, FeeReading { base_fee: 2_000_000_000, median_tip: 100_000_000 });
    }

    #[tokio::test]
    async fn a_receipt_keeps_the_tokens_authorization_logs_in_log_order() {
        let (chain, asserter) = mocked();
        let token = Address::repeat_byte(0x70);
        let topic = IEip3009::AuthorizationUsed::SIGNATURE_HASH;
        let log = |address: Address, from: u8, nonce: u8, index: u64| {
            json!({
                "address": address,
                "topics": [topic, Address::repeat_byte(from).into_word(), B256::repeat_byte(nonce)],
                "data": "0x",
                "blockNumber": "0x20", "blockHash": B256::repeat_byte(0xbb),
                "transactionHash": B256::repeat_byte(0xaa), "transactionIndex": "0x0",
                "logIndex": format!("0x{index:x}"), "removed": false
            })
        };
        asserter.push_success(&json!({
            "transactionHash": B256::repeat_byte(0xaa), "transactionIndex": "0x0",
            "blockHash": B256::repeat_byte(0xbb), "blockNumber": "0x20",
            "from": Address::repeat_byte(0x5e), "to": crate::chain::MULTICALL3,
            "cumulativeGasUsed": "0x30d40", "gasUsed": "0x30d40", "effectiveGasPrice": "0x3b9aca00",
            "contractAddress": null, "type": "0x2", "status": "0x1", "logsBloom": format!("0x{}", "00".repeat(256)),
            "logs": [log(token, 2, 2, 5), log(Address::repeat_byte(0x71), 9, 9, 6), log(token, 1, 1, 3)]
        }));
        let r = chain.receipt(B256::repeat_byte(0xaa), token).await.unwrap().unwrap();
        assert_eq!(r.block_number, 0x20);
        assert_eq!(r.from, Address::repeat_byte(0x5e));
        assert!(r.success);
        assert_eq!(r.fee(), U256::from(200_000u64) * U256::from(1_000_000_000u64));
        assert_eq!(
            r.used,
            [
                (Address::repeat_byte(1), B256::repeat_byte(1), 3),
                (Address::repeat_byte(2), B256::repeat_byte(2), 5)
            ],
            "the token's logs only, by log index"
        );
        asserter.push_success(&serde_json::Value::Null);
        assert_eq!(chain.receipt(B256::repeat_byte(0xcc), token).await.unwrap(), None, "not mined");
    }

    #[tokio::test]
    async fn on_an_op_stack_chain_a_receipt_carries_its_l1_fee_into_the_fee() {
        let (chain, asserter) = mocked();
        let chain = chain.op_stack(true);
        let receipt = |l1_fee: serde_json::Value| {
            json!({
                "transactionHash": B256::repeat_byte(0xaa), "transactionIndex": "0x1",
                "blockHash": B256::repeat_byte(0xbb), "blockNumber": "0x20",
                "from": Address::repeat_byte(0x5e), "to": crate::chain::MULTICALL3,
                "cumulativeGasUsed": "0x30d40", "gasUsed": "0x30d40", "effectiveGasPrice": "0x3b9aca00",
                "contractAddress": null, "type": "0x2", "status": "0x1", "logsBloom": format!("0x{}", "00".repeat(256)),
                "logs": [],
                // What OP-stack nodes add to a receipt.
                "l1Fee": l1_fee, "l1GasPrice": "0x1", "l1GasUsed": "0x640", "l1BaseFeeScalar": "0x558"
            })
        };
        let gas_fee = U256::from(200_000u64) * U256::from(1_000_000_000u64);
        asserter.push_success(&receipt(json!("0x2386f26fc10000")));
        let r = chain.receipt(B256::repeat_byte(0xaa), Address::ZERO).await.unwrap().unwrap();
        assert_eq!(r.l1_fee, 10_000_000_000_000_000);
        assert_eq!(r.fee(), gas_fee + U256::from(10_000_000_000_000_000u128));
        asserter.push_success(&receipt(serde_json::Value::Null));
        let r = chain.receipt(B256::repeat_byte(0xaa), Address::ZERO).await.unwrap().unwrap();
        assert_eq!((r.l1_fee, r.fee()), (0, gas_fee), "no L1 fee said: none counted");
        asserter.push_success(&receipt(json!("lots")));
        let err = chain.receipt(B256::repeat_byte(0xaa), Address::ZERO).await.unwrap_err();
        assert!(err.detail.contains("l1Fee"), "a malformed fee is an error, never a guess: {err}");
    }

    #[tokio::test]
    async fn an_rpc_failure_names_the_call() {
        let (chain, asserter) = mocked();
        asserter.push_failure_msg("header not found");
        let err = chain.nonce(Address::repeat_byte(1)).await.unwrap_err();
        assert_eq!((err.chain_id, err.call), (8453, "eth_getTransactionCount"));
        assert!(err.detail.contains("header not found"), "{err}");
    }
}
