//! Settler keys: read from a file or an environment variable, never printed. Errors name
//! the source and the line, never the key material.

use alloy::signers::local::PrivateKeySigner;

use crate::config::SettlementConfig;

/// Why the settler keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read settler key file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("environment variable {0} (settlement.settler_keys_env) is not set or not UTF-8")]
    Env(String),
    #[error("{source_name}: entry {entry} is not a 32-byte hex private key")]
    Malformed { source_name: String, entry: usize },
    #[error("{0}: no settler key found")]
    Empty(String),
    #[error("{source_name}: entry {entry} repeats the key of entry {first} (address {address})")]
    Duplicate { source_name: String, entry: usize, first: usize, address: alloy::primitives::Address },
}

/// The configured settler signers, in the order given. Empty when none is configured.
pub fn load(config: &SettlementConfig) -> Result<Vec<PrivateKeySigner>, KeyError> {
    let mut signers = Vec::new();
    if let Some(path) = &config.settler_keys_file {
        let text = std::fs::read_to_string(path)
            .map_err(|source| KeyError::Read { path: path.display().to_string(), source })?;
        let entries: Vec<&str> = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .collect();
        signers.extend(parse(&format!("settler key file {}", path.display()), &entries)?);
    }
    if let Some(var) = &config.settler_keys_env {
        let value = std::env::var(var).map_err(|_| KeyError::Env(var.clone()))?;
        let entries: Vec<&str> = value.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        signers.extend(parse(&format!("environment variable {var}"), &entries)?);
    }
    let mut seen = std::collections::HashMap::new();
    for (i, s) in signers.iter().enumerate() {
        if let Some(first) = seen.insert(s.address(), i) {
            return Err(KeyError::Duplicate {
                source_name: "settler keys".into(),
                entry: i + 1,
                first: first + 1,
                address: s.address(),
            });
        }
    }
    Ok(signers)
}

fn parse(source_name: &str, entries: &[&str]) -> Result<Vec<PrivateKeySigner>, KeyError> {
    if entries.is_empty() {
        return Err(KeyError::Empty(source_name.to_owned()));
    }
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let hex = e.strip_prefix("0x").unwrap_or(e);
            // Parse errors may echo their input: replace them with the entry's position.
            hex.parse::<PrivateKeySigner>()
                .map_err(|_| KeyError::Malformed { source_name: source_name.to_owned(), entry: i + 1 })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";

    #[test]
    fn keys_from_file_and_env_never_echo_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("# settlers\n0x{KEY}\n")).unwrap();
        let mut config = SettlementConfig { settler_keys_file: Some(path.clone()), ..Default::default() };
        let signers = load(&config).unwrap();
        assert_eq!(signers.len(), 1);
        assert!(!format!("{:?}", signers[0]).contains(KEY), "a signer's Debug shows no key");

        let bad = format!("{}zz", &KEY[..62]);
        std::fs::write(&path, format!("{KEY}\n{bad}\n")).unwrap();
        let err = load(&config).unwrap_err().to_string();
        assert!(err.contains("entry 2") && !err.contains(&KEY[..20]), "{err}");

        std::fs::write(&path, format!("{KEY}\n0x{KEY}\n")).unwrap();
        assert!(matches!(load(&config).unwrap_err(), KeyError::Duplicate { entry: 2, first: 1, .. }));

        config.settler_keys_file = None;
        config.settler_keys_env = Some("X402_BATCHER_TEST_UNSET_SETTLER_KEYS".into());
        assert!(matches!(load(&config).unwrap_err(), KeyError::Env(_)));
    }
}
