//! The EIP-712 digest an EIP-3009 `transferWithAuthorization` signature covers.
//!
//! `digest = keccak256(0x19 ‖ 0x01 ‖ domainSeparator ‖ hashStruct(authorization))`. The domain
//! separator depends only on the token, so it is computed once per token ([`TokenDomain`]):
//! recomputing it costs ~4.5 µs against ~1.9 µs for the whole cached digest.

use alloy::primitives::{Address, B256, U256, b256, keccak256};

use super::Authorization;

/// `keccak256("TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)")`.
pub const TRANSFER_WITH_AUTHORIZATION_TYPEHASH: B256 =
    b256!("7c7c6cdb67a18743f49ec6fa9b35f50d52ed05cbed4cc592e13b44501c1a2267");

/// `keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")`.
pub const EIP712_DOMAIN_TYPEHASH: B256 =
    b256!("8b73c3c69bb8fe3d512ecc4cf759cc79239f7b179b0ffacaa9a75d522b39400f");

/// A token's EIP-712 domain with its separator precomputed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenDomain {
    pub name: String,
    pub version: String,
    pub chain_id: u64,
    pub verifying_contract: Address,
    separator: B256,
}

impl TokenDomain {
    pub fn new(name: &str, version: &str, chain_id: u64, verifying_contract: Address) -> Self {
        let separator = domain_separator(name, version, chain_id, verifying_contract);
        Self { name: name.to_owned(), version: version.to_owned(), chain_id, verifying_contract, separator }
    }

    /// What the token's `DOMAIN_SEPARATOR()` must return.
    pub fn separator(&self) -> B256 {
        self.separator
    }

    /// The digest the payer signs for `authorization` on this token.
    pub fn signing_hash(&self, authorization: &Authorization) -> B256 {
        signing_hash(self.separator, authorization)
    }
}

/// Computes an EIP-712 domain separator from its four fields.
pub fn domain_separator(name: &str, version: &str, chain_id: u64, verifying_contract: Address) -> B256 {
    let mut buf = [0u8; 5 * 32];
    buf[..32].copy_from_slice(EIP712_DOMAIN_TYPEHASH.as_slice());
    buf[32..64].copy_from_slice(keccak256(name.as_bytes()).as_slice());
    buf[64..96].copy_from_slice(keccak256(version.as_bytes()).as_slice());
    buf[96..128].copy_from_slice(&U256::from(chain_id).to_be_bytes::<32>());
    buf[140..160].copy_from_slice(verifying_contract.as_slice());
    keccak256(buf)
}

/// `hashStruct(TransferWithAuthorization)`.
pub fn struct_hash(a: &Authorization) -> B256 {
    // Seven static 32-byte words; a stack buffer avoids the allocation a generic encoder makes.
    let mut buf = [0u8; 7 * 32];
    buf[..32].copy_from_slice(TRANSFER_WITH_AUTHORIZATION_TYPEHASH.as_slice());
    buf[44..64].copy_from_slice(a.from.as_slice());
    buf[76..96].copy_from_slice(a.to.as_slice());
    buf[96..128].copy_from_slice(&a.value.to_be_bytes::<32>());
    buf[128..160].copy_from_slice(&a.valid_after.to_be_bytes::<32>());
    buf[160..192].copy_from_slice(&a.valid_before.to_be_bytes::<32>());
    buf[192..224].copy_from_slice(a.nonce.as_slice());
    keccak256(buf)
}

/// The final EIP-712 digest from a precomputed domain separator.
pub fn signing_hash(domain_separator: B256, a: &Authorization) -> B256 {
    let mut buf = [0u8; 2 + 32 + 32];
    buf[0] = 0x19;
    buf[1] = 0x01;
    buf[2..34].copy_from_slice(domain_separator.as_slice());
    buf[34..66].copy_from_slice(struct_hash(a).as_slice());
    keccak256(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::address;
    use alloy::sol;
    use alloy::sol_types::{SolStruct, eip712_domain};

    sol! {
        struct TransferWithAuthorization {
            address from;
            address to;
            uint256 value;
            uint256 validAfter;
            uint256 validBefore;
            bytes32 nonce;
        }
    }

    #[test]
    fn typehashes_match_their_definitions() {
        assert_eq!(
            TRANSFER_WITH_AUTHORIZATION_TYPEHASH,
            keccak256(
                "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
            )
        );
        assert_eq!(
            EIP712_DOMAIN_TYPEHASH,
            keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
        );
    }

    /// Our hand-rolled encoding agrees with alloy's generic EIP-712 implementation.
    #[test]
    fn digest_matches_alloy_eip712() {
        let token = address!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913");
        let a = Authorization {
            from: address!("0x857b06519E91e3A54538791bDbb0E22373e36b66"),
            to: address!("0x209693Bc6afc0C5328bA36FaF03C514EF312287C"),
            value: U256::from(10_000u64),
            valid_after: U256::from(1_740_672_089u64),
            valid_before: U256::MAX,
            nonce: b256!("f3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"),
        };
        let domain = eip712_domain! {
            name: "USD Coin",
            version: "2",
            chain_id: 8453,
            verifying_contract: token,
        };
        let typed = TransferWithAuthorization {
            from: a.from,
            to: a.to,
            value: a.value,
            validAfter: a.valid_after,
            validBefore: a.valid_before,
            nonce: a.nonce,
        };
        let ours = TokenDomain::new("USD Coin", "2", 8453, token);
        assert_eq!(ours.separator(), domain.separator());
        assert_eq!(ours.signing_hash(&a), typed.eip712_signing_hash(&domain));
    }
}
