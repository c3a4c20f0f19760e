//! A local chain for the tests and the demo: anvil on 127.0.0.1 with a free port, the
//! project's EIP-3009 test token deployed, and its `aggregate3` contract installed at the
//! canonical Multicall3 address. Anvil stops when the [`Devnet`] is dropped.
//!
//! The contracts come precompiled from `ops/devnet/artifacts` (built by
//! `ops/devnet/build-contracts.mjs`), so nothing here needs Node beyond the anvil binary.

mod by_hand;
mod flashblocks;

pub use by_hand::{ByHand, by_hand};
pub use flashblocks::Flashblocks;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, U256, keccak256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;

use crate::chain::{GAS_PRICE_ORACLE, IMulticall3, MULTICALL3};
use crate::config::TokenConfig;
use crate::x402::SignedAuthorization;
use crate::x402::eip712::TokenDomain;

/// The anvil version the project pins (ops/devnet/package.json).
pub const ANVIL_VERSION: &str = "1.7.1";

/// The chain id anvil uses by default.
pub const CHAIN_ID: u64 = 31337;

/// Base Sepolia's chain id: a devnet with it is `base-sepolia` to the x402 v1 packages,
/// which pay only on networks they name (v2 takes any `eip155:N`).
pub const X402_CHAIN_ID: u64 = 84532;

/// How long anvil may take to print its address. It starts in ~0.1 s; the margin covers
/// a loaded CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Anvil's first two well-known development keys (from its public default mnemonic). They
/// hold 10,000 ETH on every fresh anvil and are worthless anywhere else.
const DEPLOYER_KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const SETTLER_KEY: &str = "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";

const TEST_USDC_ARTIFACT: &str = include_str!("../../../ops/devnet/artifacts/TestUSDC.json");
const BATCH_CALL_ARTIFACT: &str = include_str!("../../../ops/devnet/artifacts/BatchCall.json");
const GAS_PRICE_ORACLE_STUB_ARTIFACT: &str =
    include_str!("../../../ops/devnet/artifacts/GasPriceOracleStub.json");

sol! {
    /// The devnet token's administration, beyond the EIP-3009 surface in `chain`.
    #[sol(rpc)]
    interface ITestUSDC {
        function mint(address to, uint256 value) external;
        function mintBatch(address[] calldata to, uint256[] calldata values) external;
        function transfer(address to, uint256 value) external returns (bool);
        function blacklist(address account) external;
        function pause() external;
        function unpause() external;
    }
}

/// Why the devnet could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum DevnetError {
    #[error(
        "anvil not found at {path}; run `ops/setup.sh` (or set ANVIL_BIN to an anvil {ANVIL_VERSION} binary)"
    )]
    AnvilMissing { path: String },
    #[error("could not start anvil")]
    Spawn(#[source] std::io::Error),
    #[error("anvil did not report its address within {0:?}")]
    StartTimeout(Duration),
    #[error("anvil exited before listening")]
    EarlyExit,
    #[error("could not start the flashblocks stand-in's proxy")]
    Proxy(#[source] std::io::Error),
    #[error("devnet artifact {name} is malformed: {problem}")]
    Artifact { name: &'static str, problem: String },
    #[error("devnet RPC {call} failed: {detail}")]
    Rpc { call: &'static str, detail: String },
    #[error("cannot write {path}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn rpc_err(call: &'static str) -> impl FnOnce(String) -> DevnetError {
    move |detail| DevnetError::Rpc { call, detail }
}

/// The source tree: cargo's `CARGO_MANIFEST_DIR` at run time (`cargo test`, `cargo run`),
/// else the one this was built in. Clones sharing one target directory may reuse a library
/// built in another checkout, so the run-time one comes first.
pub fn source_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Where the anvil binary is: `$ANVIL_BIN`, else the copy `npm install` puts under
/// ops/devnet of the [`source_root`].
pub fn anvil_path() -> PathBuf {
    std::env::var_os("ANVIL_BIN").map(PathBuf::from).unwrap_or_else(|| {
        source_root().join("ops/devnet/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
    })
}

/// How to start a devnet.
#[derive(Debug, Clone)]
pub struct DevnetOptions {
    /// The chain id anvil reports (default [`CHAIN_ID`]). The x402 v1 packages only pay
    /// on networks they name: 84532 makes the devnet `base-sepolia` to them.
    pub chain_id: u64,
    /// A block every this many seconds (anvil `--block-time`); `None`: a block per
    /// transaction (with flashblocks: 2 s).
    pub block_time_secs: Option<u64>,
    /// A flashblocks stand-in ([`Flashblocks`]): anvil mines a block every this many
    /// milliseconds, and the devnet's RPC URL is a proxy that seals one every
    /// `block_time_secs`, serving receipts from the blocks in between as preconfirmations.
    pub flashblock_ms: Option<u64>,
    /// Anvil's `--slots-in-an-epoch`: its `safe` block is this many below the head, its
    /// `finalized` block twice as many (`None`: anvil's 32).
    pub slots_in_an_epoch: Option<u64>,
}

impl Default for DevnetOptions {
    fn default() -> Self {
        Self { chain_id: CHAIN_ID, block_time_secs: None, flashblock_ms: None, slots_in_an_epoch: None }
    }
}

/// A running local chain with the project's contracts.
pub struct Devnet {
    child: Child,
    chain_id: u64,
    rpc_url: String,
    token: Address,
    deployer: PrivateKeySigner,
    settler: PrivateKeySigner,
    provider: DynProvider,
    flashblocks: Option<Flashblocks>,
}

impl std::fmt::Debug for Devnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No keys: only what identifies the devnet.
        f.debug_struct("Devnet").field("rpc_url", &self.rpc_url).field("token", &self.token).finish()
    }
}

impl Devnet {
    /// Starts anvil on 127.0.0.1 port 0, deploys the token and installs aggregate3.
    pub async fn start() -> Result<Devnet, DevnetError> {
        Self::start_with(DevnetOptions::default()).await
    }

    /// [`Devnet::start`] with `options`.
    pub async fn start_with(options: DevnetOptions) -> Result<Devnet, DevnetError> {
        let path = anvil_path();
        if !path.exists() {
            return Err(DevnetError::AnvilMissing { path: path.display().to_string() });
        }
        let mut args = vec![
            "--host".to_owned(),
            "127.0.0.1".to_owned(),
            "--port".to_owned(),
            "0".to_owned(),
            "--chain-id".to_owned(),
            options.chain_id.to_string(),
        ];
        match (options.flashblock_ms, options.block_time_secs) {
            (Some(ms), _) => args.extend(["--block-time".to_owned(), format!("{}", ms as f64 / 1000.0)]),
            (None, Some(secs)) => args.extend(["--block-time".to_owned(), secs.to_string()]),
            (None, None) => {}
        }
        if let Some(slots) = options.slots_in_an_epoch {
            args.extend(["--slots-in-an-epoch".to_owned(), slots.to_string()]);
        }
        let mut child = Command::new(&path)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .map_err(DevnetError::Spawn)?;
        let stdout = child.stdout.take().ok_or(DevnetError::EarlyExit)?;

        // Read stdout on a thread until the address line, then keep draining so anvil
        // never blocks on a full pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.trim().strip_prefix("Listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let addr = match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => addr,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(match e {
                    std::sync::mpsc::RecvTimeoutError::Timeout => DevnetError::StartTimeout(START_TIMEOUT),
                    std::sync::mpsc::RecvTimeoutError::Disconnected => DevnetError::EarlyExit,
                });
            }
        };
        let rpc_url = format!("http://{addr}");

        let deployer: PrivateKeySigner = DEPLOYER_KEY.parse().expect("constant key parses");
        let settler: PrivateKeySigner = SETTLER_KEY.parse().expect("constant key parses");
        let provider = ProviderBuilder::new()
            .wallet(EthereumWallet::from(deployer.clone()))
            .connect_http(rpc_url.parse().expect("formatted URL parses"))
            .erased();
        // From here on, dropping `devnet` stops anvil on every error path.
        let mut devnet = Devnet {
            child,
            chain_id: options.chain_id,
            rpc_url,
            token: Address::ZERO,
            deployer,
            settler,
            provider,
            flashblocks: None,
        };

        devnet.token = devnet.deploy("TestUSDC", TEST_USDC_ARTIFACT, &[]).await?;

        let (_, runtime) = artifact("BatchCall", BATCH_CALL_ARTIFACT)?;
        devnet.raw::<_, ()>("anvil_setCode", (MULTICALL3, runtime)).await?;
        if options.flashblock_ms.is_some() {
            // The contracts are in place (anvil's own URL served the setup): from now on
            // the chain is seen through the stand-in.
            let block = Duration::from_secs(options.block_time_secs.unwrap_or(2).max(1));
            let stand_in = Flashblocks::start(&devnet.rpc_url, block).await?;
            devnet.rpc_url = stand_in.url().to_owned();
            devnet.flashblocks = Some(stand_in);
        }
        Ok(devnet)
    }

    /// Deploys the contract of a committed artifact (`json`) with ABI-encoded constructor
    /// `args`, from the deployer account; its address.
    pub async fn deploy(&self, name: &'static str, json: &str, args: &[u8]) -> Result<Address, DevnetError> {
        let (mut code, _) = artifact(name, json)?;
        if !args.is_empty() {
            code = [code.as_ref(), args].concat().into();
        }
        let receipt = self
            .provider
            .send_transaction(TransactionRequest::default().with_deploy_code(code))
            .await
            .map_err(|e| DevnetError::Rpc { call: "deploy", detail: format!("{name}: {e}") })?
            .get_receipt()
            .await
            .map_err(|e| DevnetError::Rpc { call: "deploy receipt", detail: format!("{name}: {e}") })?;
        receipt
            .contract_address
            .filter(|_| receipt.status())
            .ok_or_else(|| DevnetError::Rpc { call: "deploy", detail: format!("{name}: not deployed") })
    }

    /// Makes the devnet price an L1 data fee as an OP-stack chain does: the project's
    /// `GasPriceOracleStub` at the `GasPriceOracle` predeploy's address, answering
    /// `getL1Fee(data)` with `base + per_byte * data.length` wei. (Anvil itself charges no
    /// L1 fee: this is what a daemon configured with `op_stack = true` reads and plans by.)
    pub async fn install_l1_fee_oracle(&self, base: U256, per_byte: U256) -> Result<(), DevnetError> {
        let (_, runtime) = artifact("GasPriceOracleStub", GAS_PRICE_ORACLE_STUB_ARTIFACT)?;
        self.raw::<_, ()>("anvil_setCode", (GAS_PRICE_ORACLE, runtime)).await?;
        for (slot, value) in [(0u64, base), (1, per_byte)] {
            let value = alloy::primitives::B256::from(value);
            self.raw::<_, bool>("anvil_setStorageAt", (GAS_PRICE_ORACLE, U256::from(slot), value)).await?;
        }
        Ok(())
    }

    /// Sends an RPC the typed provider has no method for (anvil's own).
    pub async fn raw<P, R>(&self, method: &'static str, params: P) -> Result<R, DevnetError>
    where
        P: serde::Serialize + Clone + std::fmt::Debug + Send + Sync + Unpin,
        R: serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + Unpin + 'static,
    {
        self.provider
            .raw_request::<_, R>(method.into(), params)
            .await
            .map_err(|e| DevnetError::Rpc { call: method, detail: e.to_string() })
    }

    /// The chain's RPC URL (the flashblocks stand-in's, when there is one).
    pub fn rpc_url(&self) -> &str {
        &self.rpc_url
    }

    /// Anvil's WebSocket URL (the same port), for a head subscription; `None` behind the
    /// flashblocks stand-in (its proxy speaks HTTP only).
    pub fn ws_url(&self) -> Option<String> {
        match &self.flashblocks {
            Some(_) => None,
            None => Some(self.rpc_url.replacen("http://", "ws://", 1)),
        }
    }

    /// The flashblocks stand-in, if the devnet was started with one.
    pub fn flashblocks(&self) -> Option<&Flashblocks> {
        self.flashblocks.as_ref()
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// The test token's address.
    pub fn token(&self) -> Address {
        self.token
    }

    /// The test token's EIP-712 domain.
    pub fn token_domain(&self) -> TokenDomain {
        TokenDomain::new("USD Coin", "2", self.chain_id, self.token)
    }

    /// The test token as a config entry.
    /// The `[[chains]]` entry of this devnet (its RPC URL; not OP-stack; default finality).
    pub fn chain_config(&self) -> crate::config::ChainConfig {
        crate::config::ChainConfig {
            chain_id: self.chain_id,
            rpc_url: self.rpc_url.clone(),
            rpc_urls: Vec::new(),
            op_stack: false,
            finality: Default::default(),
            erc6492_factories: Vec::new(),
            preconfirmation_ms: None,
            ws_url: None,
        }
    }

    /// The `[[tokens]]` and `[[chains]]` tables of a daemon config over this devnet.
    pub fn token_and_chain_toml(&self) -> String {
        let t = self.token_config();
        format!(
            "[[tokens]]\nchain_id = {}\naddress = \"{}\"\neip712_name = \"{}\"\neip712_version = \"{}\"\n\
             decimals = {}\nsymbol = \"{}\"\n\n[[chains]]\nchain_id = {}\nrpc_url = \"{}\"\n{}",
            t.chain_id,
            t.address,
            t.eip712_name,
            t.eip712_version,
            t.decimals,
            t.symbol,
            self.chain_id,
            self.rpc_url,
            self.ws_url().map(|u| format!("ws_url = \"{u}\"\n")).unwrap_or_default(),
        )
    }

    pub fn token_config(&self) -> TokenConfig {
        TokenConfig {
            chain_id: self.chain_id,
            address: self.token,
            eip712_name: "USD Coin".into(),
            eip712_version: "2".into(),
            decimals: 6,
            symbol: "USDC".into(),
            contract_signatures: true,
        }
    }

    /// A provider signing as the token's owner (mints, pauses, blacklists).
    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }

    pub fn deployer(&self) -> Address {
        self.deployer.address()
    }

    /// A funded account for sending settlement transactions (anvil's second dev account).
    pub fn settler_signer(&self) -> PrivateKeySigner {
        self.settler.clone()
    }

    /// A provider that signs as the settler.
    pub fn settler_provider(&self) -> DynProvider {
        self.signing_provider(&self.settler)
    }

    fn signing_provider(&self, signer: &PrivateKeySigner) -> DynProvider {
        ProviderBuilder::new()
            .wallet(EthereumWallet::from(signer.clone()))
            .connect_http(self.rpc_url.parse().expect("formatted URL parses"))
            .erased()
    }

    /// Mints `amount` base units of the test token to each payer, in one transaction per
    /// 500 payers.
    pub async fn fund(&self, payers: &[Address], amount: U256) -> Result<(), DevnetError> {
        let token = ITestUSDC::new(self.token, &self.provider);
        for chunk in payers.chunks(500) {
            token
                .mintBatch(chunk.to_vec(), vec![amount; chunk.len()])
                .send()
                .await
                .map_err(|e| rpc_err("mintBatch")(e.to_string()))?
                .get_receipt()
                .await
                .map_err(|e| rpc_err("mintBatch receipt")(e.to_string()))?;
        }
        Ok(())
    }

    /// Sends `items` as one `aggregate3` batch from the settler account and waits for the
    /// receipt: the devnet's stand-in for the settlement engine in tests and the demo.
    pub async fn send_batch(&self, items: &[SignedAuthorization]) -> Result<TransactionReceipt, DevnetError> {
        self.send_batch_as(&self.settler, items).await
    }

    /// Sends `items` as one `aggregate3` batch signed by `sender` (which pays the gas) and
    /// waits for the receipt.
    pub async fn send_batch_as(
        &self,
        sender: &PrivateKeySigner,
        items: &[SignedAuthorization],
    ) -> Result<TransactionReceipt, DevnetError> {
        let settler = self.signing_provider(sender);
        let tx = IMulticall3::new(MULTICALL3, &settler)
            .aggregate3(crate::chain::batch_calls(items))
            .into_transaction_request()
            .with_gas_limit({
                let config = crate::config::SettlementConfig::default();
                config.with_deployments(config.seed_gas_limit(items.len()), crate::chain::deployments(items))
            });
        settler
            .send_transaction(tx)
            .await
            .map_err(|e| rpc_err("send batch")(e.to_string()))?
            .get_receipt()
            .await
            .map_err(|e| rpc_err("batch receipt")(e.to_string()))
    }

    /// Settler accounts for the daemon: keys derived from `seed`, each given 1,000 ETH.
    pub async fn new_settlers(&self, seed: &str, n: usize) -> Result<Vec<PrivateKeySigner>, DevnetError> {
        let keys = payer_keys(&format!("settler {seed}"), n);
        for k in &keys {
            let wei = U256::from(1_000u64) * U256::from(10u64).pow(U256::from(18u64));
            self.raw::<_, ()>("anvil_setBalance", (k.address(), wei)).await?;
        }
        Ok(keys)
    }

    /// A provider signing as `signer`, which is given 1 ETH for gas.
    pub async fn provider_for(&self, signer: &PrivateKeySigner) -> Result<DynProvider, DevnetError> {
        let wei = U256::from(10u64).pow(U256::from(18u64));
        self.raw::<_, ()>("anvil_setBalance", (signer.address(), wei)).await?;
        Ok(self.signing_provider(signer))
    }

    /// Mines one block now.
    pub async fn mine(&self) -> Result<(), DevnetError> {
        self.raw::<_, String>("evm_mine", ()).await.map(|_| ())
    }

    /// Turns mining on each transaction on or off (off: transactions wait in the pool
    /// until a block is mined).
    pub async fn set_automine(&self, on: bool) -> Result<(), DevnetError> {
        self.raw::<_, ()>("evm_setAutomine", (on,)).await
    }

    /// The hashes of the transactions waiting in the pool.
    pub async fn pool_hashes(&self) -> Result<Vec<B256>, DevnetError> {
        let content: serde_json::Value = self.raw("txpool_content", ()).await?;
        let mut out = Vec::new();
        for by_sender in
            content.get("pending").and_then(|p| p.as_object()).into_iter().flat_map(|m| m.values())
        {
            for tx in by_sender.as_object().into_iter().flat_map(|m| m.values()) {
                if let Some(h) = tx.get("hash").and_then(|h| h.as_str()).and_then(|h| h.parse().ok()) {
                    out.push(h);
                }
            }
        }
        Ok(out)
    }

    /// Removes a transaction from the pool, as a node that dropped it would.
    /// Whether the node held it: anvil answers the dropped transaction's hash, or null.
    pub async fn drop_transaction(&self, hash: B256) -> Result<bool, DevnetError> {
        self.raw::<_, Option<B256>>("anvil_dropTransaction", (hash,)).await.map(|h| h == Some(hash))
    }

    /// Replaces the newest `depth` blocks with empty ones (their transactions vanish).
    pub async fn reorg(&self, depth: u64) -> Result<(), DevnetError> {
        self.reorg_with(depth, &[]).await
    }

    /// Replaces the newest `depth` blocks with new ones holding `txs`: each a signed raw
    /// transaction and the new block (0-based, from the first replaced) it goes in. A
    /// transaction of the old blocks given here is mined again, in another block.
    pub async fn reorg_with(&self, depth: u64, txs: &[(Bytes, u64)]) -> Result<(), DevnetError> {
        let txs: Vec<(Bytes, u64)> = txs.to_vec();
        self.raw::<_, serde_json::Value>("anvil_reorg", (depth, txs)).await.map(|_| ())
    }

    /// The signed bytes of a transaction the node knows.
    pub async fn raw_transaction(&self, hash: B256) -> Result<Bytes, DevnetError> {
        self.raw("eth_getRawTransactionByHash", (hash,)).await
    }

    /// Sets the base fee of the next block (wei).
    pub async fn set_next_base_fee(&self, wei: u128) -> Result<(), DevnetError> {
        self.raw::<_, serde_json::Value>("anvil_setNextBlockBaseFeePerGas", (U256::from(wei),))
            .await
            .map(|_| ())
    }

    /// The latest block number.
    pub async fn block_number(&self) -> Result<u64, DevnetError> {
        self.provider.get_block_number().await.map_err(|e| rpc_err("eth_blockNumber")(e.to_string()))
    }

    /// Sends one authorization as its own `transferWithAuthorization` transaction straight
    /// to the token (the one-transaction-per-payment baseline) and waits for the receipt.
    pub async fn send_alone(&self, item: &SignedAuthorization) -> Result<TransactionReceipt, DevnetError> {
        let tx = TransactionRequest::default()
            .with_to(item.token)
            .with_input(crate::chain::transfer_calldata(item));
        self.provider
            .send_transaction(tx)
            .await
            .map_err(|e| rpc_err("send transferWithAuthorization")(e.to_string()))?
            .get_receipt()
            .await
            .map_err(|e| rpc_err("transferWithAuthorization receipt")(e.to_string()))
    }

    /// The payer's token balance.
    pub async fn balance_of(&self, who: Address) -> Result<U256, DevnetError> {
        crate::chain::IEip3009::new(self.token, &self.provider)
            .balanceOf(who)
            .call()
            .await
            .map_err(|e| rpc_err("balanceOf")(e.to_string()))
    }
}

impl Drop for Devnet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` payer keys derived from `seed`: deterministic, so a demo run can be repeated.
pub fn payer_keys(seed: &str, n: usize) -> Vec<PrivateKeySigner> {
    (0..n)
        .map(|i| {
            let key: B256 = keccak256(format!("x402-batcher devnet payer {seed} {i}"));
            PrivateKeySigner::from_bytes(&key)
                .expect("a keccak output is a valid key with overwhelming probability")
        })
        .collect()
}

/// Creation and runtime bytecode from a committed artifact.
fn artifact(name: &'static str, json: &str) -> Result<(Bytes, Bytes), DevnetError> {
    let bad = |problem: String| DevnetError::Artifact { name, problem };
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let field = |key: &str| -> Result<Bytes, DevnetError> {
        v.get(key)
            .and_then(|b| b.as_str())
            .ok_or_else(|| bad(format!("no {key}")))?
            .parse::<Bytes>()
            .map_err(|e| bad(format!("{key}: {e}")))
    };
    Ok((field("bytecode")?, field("deployedBytecode")?))
}
