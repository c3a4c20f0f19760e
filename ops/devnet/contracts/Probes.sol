// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {Ecdsa} from "Ecdsa.sol";

/// Both contracts here are run "deployless": an `eth_call` without a target whose data is
/// the creation code followed by the ABI-encoded constructor arguments. The constructor
/// does the reads and returns its answer as if it were runtime code; nothing is deployed,
/// so they work on any chain, one round trip for many items.

/// @title PayerProbe
/// @notice For each (token, account): the account's token balance and its code (size and
///         first 32 bytes: an EIP-7702 account's code is `0xef0100 || delegate`).
/// @dev Returns `abi.encode(Answer[])`.
contract PayerProbe {
    struct Answer {
        bool balanceRead;
        uint256 balance;
        uint256 codeSize;
        bytes32 codeHead;
    }

    constructor(address[] memory tokens, address[] memory accounts) {
        require(tokens.length == accounts.length, "PayerProbe: lengths differ");
        Answer[] memory answers = new Answer[](accounts.length);
        for (uint256 i = 0; i < accounts.length; i++) {
            address account = accounts[i];
            (bool ok, bytes memory result) =
                tokens[i].staticcall(abi.encodeWithSelector(0x70a08231, account));
            if (ok && result.length == 32) {
                answers[i].balanceRead = true;
                answers[i].balance = abi.decode(result, (uint256));
            }
            uint256 size;
            bytes32 head;
            assembly {
                size := extcodesize(account)
                let p := mload(0x40)
                mstore(p, 0)
                extcodecopy(account, p, 0, 32)
                head := mload(p)
            }
            answers[i].codeSize = size;
            answers[i].codeHead = head;
        }
        bytes memory encoded = abi.encode(answers);
        assembly {
            return(add(encoded, 0x20), mload(encoded))
        }
    }
}

/// @title SignatureProbe
/// @notice Judges signatures the way an EIP-3009 token with ERC-1271 support will (ECDSA for
///         a signer without code, ERC-1271 for one with code), after deploying ERC-6492
///         counterfactual wallets inside the call (nothing persists). The caller checks the
///         6492 factories against its allow-list first.
/// @dev Returns `abi.encode(uint8[])`, one verdict per item: see the constants.
contract SignatureProbe {
    uint8 internal constant VALID = 0;
    uint8 internal constant ECDSA_MISMATCH = 1; // no code: the signature does not recover to the signer
    uint8 internal constant ERC1271_REFUSED = 2; // code: isValidSignature reverted or did not return the magic value
    uint8 internal constant NOT_DEPLOYED = 3; // ERC-6492: the factory call left the signer without code

    bytes32 internal constant ERC6492_SUFFIX = 0x6492649264926492649264926492649264926492649264926492649264926492;

    constructor(address[] memory signers, bytes32[] memory digests, bytes[] memory signatures) {
        require(signers.length == digests.length && digests.length == signatures.length, "SignatureProbe: lengths differ");
        uint8[] memory verdicts = new uint8[](signers.length);
        for (uint256 i = 0; i < signers.length; i++) {
            verdicts[i] = _judge(signers[i], digests[i], signatures[i]);
        }
        bytes memory encoded = abi.encode(verdicts);
        assembly {
            return(add(encoded, 0x20), mload(encoded))
        }
    }

    function _judge(address signer, bytes32 digest, bytes memory signature) private returns (uint8) {
        if (_isWrapped(signature)) {
            bytes memory body = new bytes(signature.length - 32);
            for (uint256 j = 0; j < body.length; j++) body[j] = signature[j];
            (address factory, bytes memory factoryCall, bytes memory inner) = abi.decode(body, (address, bytes, bytes));
            if (signer.code.length == 0) {
                (bool deployed,) = factory.call(factoryCall);
                deployed; // judged by the code it left, below
                if (signer.code.length == 0) return NOT_DEPLOYED;
            }
            signature = inner;
        }
        if (signer.code.length == 0) {
            return Ecdsa.recover(digest, signature) == signer && signer != address(0) ? VALID : ECDSA_MISMATCH;
        }
        (bool ok, bytes memory result) =
            signer.staticcall(abi.encodeWithSelector(0x1626ba7e, digest, signature));
        if (ok && result.length >= 32 && abi.decode(result, (bytes32)) == bytes32(bytes4(0x1626ba7e))) {
            return VALID;
        }
        return ERC1271_REFUSED;
    }

    function _isWrapped(bytes memory signature) private pure returns (bool wrapped) {
        if (signature.length < 32) return false;
        bytes32 tail;
        assembly {
            tail := mload(add(signature, mload(signature)))
        }
        return tail == ERC6492_SUFFIX;
    }
}
