// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// A stand-in for the OP-stack `GasPriceOracle` predeploy (0x420000000000000000000000000000000000000F)
/// on the devnet: `getL1Fee` answers `base + perByte * data.length` with values a test sets,
/// so the daemon's L1 data fee accounting is tested against known numbers. The real oracle
/// prices compressed calldata against the L1 base and blob fees; the interface is the same.
contract GasPriceOracleStub {
    uint256 public base;
    uint256 public perByte;

    function set(uint256 base_, uint256 perByte_) external {
        base = base_;
        perByte = perByte_;
    }

    function getL1Fee(bytes calldata data) external view returns (uint256) {
        return base + perByte * data.length;
    }
}
