// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {Ecdsa} from "Ecdsa.sol";

/// @title OwnedWallet
/// @notice A minimal ERC-1271 smart-contract wallet for x402-batcher's tests: one owner key.
///         Its signatures are wrapped the way Coinbase Smart Wallet wraps its owners'
///         (`abi.encode(uint256 ownerIndex, bytes signature)`, index 0 only), so they are
///         longer than 65 bytes and settle through the token's `bytes` overload.
contract OwnedWallet {
    bytes4 internal constant MAGIC_VALUE = 0x1626ba7e;

    address public owner;

    event OwnerChanged(address indexed previous, address indexed next);

    constructor(address owner_) {
        owner = owner_;
    }

    /// @notice Hands the wallet to another key; signatures by the old one stop being valid.
    function setOwner(address next) external {
        require(msg.sender == owner, "OwnedWallet: caller is not the owner");
        emit OwnerChanged(owner, next);
        owner = next;
    }

    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        if (signature.length < 64) return 0xffffffff;
        (uint256 index, bytes memory inner) = abi.decode(signature, (uint256, bytes));
        if (index == 0 && owner != address(0) && Ecdsa.recover(hash, inner) == owner) return MAGIC_VALUE;
        return 0xffffffff;
    }
}

/// @title OwnedWalletFactory
/// @notice Deploys OwnedWallets with CREATE2, so a wallet's address is known (and can sign,
///         through ERC-6492) before it exists. Deploying one that exists returns it.
contract OwnedWalletFactory {
    event WalletCreated(address indexed wallet, address indexed owner, uint256 salt);

    function createWallet(address owner, uint256 salt) external returns (OwnedWallet wallet) {
        address at = walletAddress(owner, salt);
        if (at.code.length > 0) return OwnedWallet(at);
        wallet = new OwnedWallet{salt: bytes32(salt)}(owner);
        emit WalletCreated(address(wallet), owner, salt);
    }

    function walletAddress(address owner, uint256 salt) public view returns (address) {
        bytes32 codeHash = keccak256(abi.encodePacked(type(OwnedWallet).creationCode, abi.encode(owner)));
        return address(uint160(uint256(keccak256(abi.encodePacked(bytes1(0xff), address(this), bytes32(salt), codeHash)))));
    }
}

/// @title SelfSignedDelegate
/// @notice An EIP-7702 delegate that implements ERC-1271 as the account's own key signing:
///         a 65-byte ECDSA signature recovering to the account itself is valid.
contract SelfSignedDelegate {
    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        return Ecdsa.recover(hash, signature) == address(this) ? bytes4(0x1626ba7e) : bytes4(0xffffffff);
    }
}

/// @title StrictDelegate
/// @notice An EIP-7702 delegate without ERC-1271: a token that checks accounts with code by
///         ERC-1271 refuses every authorization such an account signs, however well its
///         ECDSA signature recovers.
contract StrictDelegate {
    function execute(address target, uint256 value, bytes calldata data) external returns (bytes memory) {
        require(msg.sender == address(this), "StrictDelegate: only the account itself");
        (bool ok, bytes memory result) = target.call{value: value}(data);
        require(ok, "StrictDelegate: call failed");
        return result;
    }
}
