//! Payers with code on the devnet, for tests and the vector scripts: the project's own
//! ERC-1271 wallet (`OwnedWallet`, one owner key) and its CREATE2 factory, and EIP-7702
//! accounts delegated (by a real type-4 transaction) to a delegate that implements ERC-1271
//! (`SelfSignedDelegate`) or to one that does not (`StrictDelegate`).
//! Contracts: ops/devnet/contracts/Wallets.sol.

use alloy::eips::eip7702::Authorization as Delegation;
use alloy::network::{TransactionBuilder, TransactionBuilder7702};
use alloy::primitives::{Address, Bytes, U256};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionRequest;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;
use alloy::sol_types::{SolCall, SolValue};

use super::devnet::{Devnet, DevnetError};

const FACTORY_ARTIFACT: &str = include_str!("../../ops/devnet/artifacts/OwnedWalletFactory.json");
const SELF_SIGNED_ARTIFACT: &str = include_str!("../../ops/devnet/artifacts/SelfSignedDelegate.json");
const STRICT_ARTIFACT: &str = include_str!("../../ops/devnet/artifacts/StrictDelegate.json");

sol! {
    #[sol(rpc)]
    interface IOwnedWalletFactory {
        function createWallet(address owner, uint256 salt) external returns (address wallet);
        function walletAddress(address owner, uint256 salt) external view returns (address);
    }

    #[sol(rpc)]
    interface IOwnedWallet {
        function owner() external view returns (address);
        function setOwner(address next) external;
    }
}

fn rpc(call: &'static str) -> impl FnOnce(String) -> DevnetError {
    move |detail| DevnetError::Rpc { call, detail }
}

/// The wallet contracts, deployed on one devnet.
#[derive(Debug, Clone, Copy)]
pub struct Wallets {
    pub factory: Address,
    /// An EIP-7702 delegate implementing ERC-1271 as the account's own key signing.
    pub self_signed: Address,
    /// An EIP-7702 delegate without ERC-1271.
    pub strict: Address,
}

impl Wallets {
    pub async fn deploy(devnet: &Devnet) -> Result<Wallets, DevnetError> {
        Ok(Wallets {
            factory: devnet.deploy("OwnedWalletFactory", FACTORY_ARTIFACT, &[]).await?,
            self_signed: devnet.deploy("SelfSignedDelegate", SELF_SIGNED_ARTIFACT, &[]).await?,
            strict: devnet.deploy("StrictDelegate", STRICT_ARTIFACT, &[]).await?,
        })
    }

    /// The factory call that deploys `owner`'s wallet number `salt` (ERC-6492's
    /// `factoryCalldata`).
    pub fn create_calldata(owner: Address, salt: u64) -> Bytes {
        IOwnedWalletFactory::createWalletCall { owner, salt: U256::from(salt) }.abi_encode().into()
    }

    /// Where `owner`'s wallet number `salt` is (or will be, once created).
    pub async fn wallet_address(
        &self,
        devnet: &Devnet,
        owner: Address,
        salt: u64,
    ) -> Result<Address, DevnetError> {
        IOwnedWalletFactory::new(self.factory, devnet.provider())
            .walletAddress(owner, U256::from(salt))
            .call()
            .await
            .map_err(|e| rpc("walletAddress")(e.to_string()))
    }

    /// Deploys `owner`'s wallet number `salt` (the deployer pays) and returns its address.
    pub async fn create_wallet(
        &self,
        devnet: &Devnet,
        owner: Address,
        salt: u64,
    ) -> Result<Address, DevnetError> {
        let receipt = IOwnedWalletFactory::new(self.factory, devnet.provider())
            .createWallet(owner, U256::from(salt))
            .send()
            .await
            .map_err(|e| rpc("createWallet")(e.to_string()))?
            .get_receipt()
            .await
            .map_err(|e| rpc("createWallet receipt")(e.to_string()))?;
        if !receipt.status() {
            return Err(rpc("createWallet")("reverted".into()));
        }
        self.wallet_address(devnet, owner, salt).await
    }

    /// Hands `wallet` from `owner` to `next` (a transaction from the owner's key).
    pub async fn set_owner(
        &self,
        devnet: &Devnet,
        wallet: Address,
        owner: &PrivateKeySigner,
        next: Address,
    ) -> Result<(), DevnetError> {
        let provider = devnet.provider_for(owner).await?;
        let receipt = IOwnedWallet::new(wallet, &provider)
            .setOwner(next)
            .send()
            .await
            .map_err(|e| rpc("setOwner")(e.to_string()))?
            .get_receipt()
            .await
            .map_err(|e| rpc("setOwner receipt")(e.to_string()))?;
        if receipt.status() { Ok(()) } else { Err(rpc("setOwner")("reverted".into())) }
    }

    /// Delegates `account` to `delegate` with an EIP-7702 (type-4) transaction: the account
    /// signs the authorization, the deployer sends and pays for it.
    pub async fn delegate(
        &self,
        devnet: &Devnet,
        account: &PrivateKeySigner,
        delegate: Address,
    ) -> Result<(), DevnetError> {
        let nonce = devnet
            .provider()
            .get_transaction_count(account.address())
            .await
            .map_err(|e| rpc("eth_getTransactionCount")(e.to_string()))?;
        let delegation = Delegation { chain_id: U256::from(devnet.chain_id()), address: delegate, nonce };
        let sig = account
            .sign_hash_sync(&delegation.signature_hash())
            .map_err(|e| rpc("sign 7702 authorization")(e.to_string()))?;
        // Sent to the sponsor itself: a call to the account would run the delegate, which
        // may have nothing to run on empty calldata.
        let tx = TransactionRequest::default()
            .with_to(devnet.deployer())
            .with_authorization_list(vec![delegation.into_signed(sig)]);
        let receipt = devnet
            .provider()
            .send_transaction(tx)
            .await
            .map_err(|e| rpc("send 7702 delegation")(e.to_string()))?
            .get_receipt()
            .await
            .map_err(|e| rpc("7702 delegation receipt")(e.to_string()))?;
        if !receipt.status() {
            return Err(rpc("7702 delegation")("reverted".into()));
        }
        // A bad authorization is skipped, not refused: look for the delegation itself.
        let code = devnet
            .provider()
            .get_code_at(account.address())
            .await
            .map_err(|e| rpc("eth_getCode")(e.to_string()))?;
        let expected = [&[0xef, 0x01, 0x00][..], delegate.as_slice()].concat();
        if code.as_ref() != expected.as_slice() {
            return Err(rpc("7702 delegation")(format!(
                "the account's code is {code}, not a delegation to {delegate}"
            )));
        }
        Ok(())
    }
}

/// An `OwnedWallet` signature: the owner's 65-byte ECDSA signature wrapped as
/// `abi.encode(uint256 ownerIndex = 0, bytes signature)` (192 bytes).
pub fn owned_wallet_signature(ecdsa: &[u8]) -> Bytes {
    (U256::ZERO, Bytes::copy_from_slice(ecdsa)).abi_encode_params().into()
}

/// `inner` wrapped for a wallet not yet deployed (ERC-6492): `abi.encode(factory,
/// factoryCalldata, inner) ‖ magic suffix`.
pub fn erc6492_signature(factory: Address, factory_calldata: Bytes, inner: Bytes) -> Bytes {
    let mut out = (factory, factory_calldata, inner).abi_encode_params();
    out.extend_from_slice(&crate::x402::ERC6492_SUFFIX);
    out.into()
}
