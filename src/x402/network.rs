//! Network names. x402 v2 uses CAIP-2 ids (`eip155:8453`); v1 used short names
//! (`base-sepolia`). Both resolve to an EIP-155 chain id.

use std::collections::BTreeMap;

/// The x402 v1 EVM network names with their chain ids, as `@x402/evm` 2.27.0 maps them.
pub const V1_NETWORKS: &[(&str, u64)] = &[
    ("ethereum", 1),
    ("sepolia", 11_155_111),
    ("base", 8453),
    ("base-sepolia", 84532),
    ("abstract", 2741),
    ("abstract-testnet", 11124),
    ("avalanche", 43114),
    ("avalanche-fuji", 43113),
    ("iotex", 4689),
    ("sei", 1329),
    ("sei-testnet", 1328),
    ("polygon", 137),
    ("polygon-amoy", 80002),
    ("peaq", 3338),
    ("story", 1514),
    ("educhain", 41923),
    ("skale-base-sepolia", 324_705_682),
    ("megaeth", 4326),
    ("monad", 143),
    ("stable", 988),
    ("stable-testnet", 2201),
    ("celo", 42220),
    ("flare", 14),
];

/// Why a network name did not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("network {name:?} is neither a CAIP-2 eip155 id nor a known x402 v1 name")]
    Unknown { name: String },
    #[error("network {name:?} has a malformed eip155 chain id")]
    BadChainId { name: String },
}

/// Resolves a CAIP-2 `eip155:<id>` or a v1 name (built in, or an operator alias) to a chain id.
pub fn resolve(name: &str, aliases: &BTreeMap<String, u64>) -> Result<u64, NetworkError> {
    if let Some(id) = name.strip_prefix("eip155:") {
        // CAIP-2 references are decimal without sign or leading zeros, at most 32 chars.
        let well_formed = !id.is_empty()
            && id.len() <= 20
            && id.bytes().all(|b| b.is_ascii_digit())
            && !(id.len() > 1 && id.starts_with('0'));
        return match id.parse::<u64>() {
            Ok(chain_id) if well_formed && chain_id > 0 => Ok(chain_id),
            _ => Err(NetworkError::BadChainId { name: name.to_owned() }),
        };
    }
    if let Some(&chain_id) = aliases.get(name) {
        return Ok(chain_id);
    }
    V1_NETWORKS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, id)| id)
        .ok_or_else(|| NetworkError::Unknown { name: name.to_owned() })
}

/// The x402 v1 names of `chain_id`: the operator's aliases, then the built-in name.
pub fn v1_names(chain_id: u64, aliases: &BTreeMap<String, u64>) -> Vec<String> {
    let aliased = aliases.iter().filter(|(_, id)| **id == chain_id).map(|(n, _)| n.clone());
    let built_in = V1_NETWORKS.iter().filter(|(_, id)| *id == chain_id).map(|(n, _)| (*n).to_owned());
    aliased.chain(built_in).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_caip2_v1_and_aliases() {
        let mut aliases = BTreeMap::new();
        aliases.insert("devnet".to_owned(), 31337);
        assert_eq!(resolve("eip155:8453", &aliases), Ok(8453));
        assert_eq!(resolve("base-sepolia", &aliases), Ok(84532));
        assert_eq!(resolve("devnet", &aliases), Ok(31337));
        for bad in
            ["eip155:", "eip155:0", "eip155:01", "eip155:-1", "eip155:1e3", "eip155:99999999999999999999999"]
        {
            assert!(matches!(resolve(bad, &aliases), Err(NetworkError::BadChainId { .. })), "{bad}");
        }
        for bad in ["solana:mainnet", "Base", "", "base "] {
            assert!(matches!(resolve(bad, &aliases), Err(NetworkError::Unknown { .. })), "{bad}");
        }
    }

    #[test]
    fn v1_names_of_a_chain() {
        let mut aliases = BTreeMap::new();
        aliases.insert("my-sepolia".to_owned(), 84532);
        assert_eq!(v1_names(84532, &aliases), ["my-sepolia", "base-sepolia"]);
        assert!(v1_names(31337, &aliases).is_empty());
    }
}
