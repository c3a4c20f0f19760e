// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @title BatchCall
/// @notice x402-batcher's own implementation of Multicall3's `aggregate3`, ABI-compatible
///         with the canonical contract, for installation at
///         0xcA11bde05977b3631167028862bE2a173976CA11 on the devnet with `anvil_setCode`.
/// @dev Has no constructor and no storage, so its runtime code works when placed directly.
contract BatchCall {
    struct Call3 {
        address target;
        bool allowFailure;
        bytes callData;
    }

    struct Result {
        bool success;
        bytes returnData;
    }

    /// @notice Calls each target in order. An item with `allowFailure` may fail on its own;
    ///         any other failing item reverts the whole call, as Multicall3 does.
    function aggregate3(Call3[] calldata calls) external payable returns (Result[] memory returnData) {
        uint256 length = calls.length;
        returnData = new Result[](length);
        for (uint256 i = 0; i < length; i++) {
            Call3 calldata call = calls[i];
            (bool success, bytes memory ret) = call.target.call(call.callData);
            require(success || call.allowFailure, "Multicall3: call failed");
            returnData[i] = Result(success, ret);
        }
    }

    function getBlockNumber() external view returns (uint256) {
        return block.number;
    }

    function getCurrentBlockTimestamp() external view returns (uint256) {
        return block.timestamp;
    }
}
