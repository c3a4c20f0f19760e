//! Settler keys: read from a file or an environment variable, never printed. Errors name
//! the source and the line, never the key material. A key file others could read (or
//! write) is refused: group and world permission bits must be clear (`chmod 600`).

use alloy::signers::local::PrivateKeySigner;

use crate::config::{SettlementConfig, loose_mode};

/// Why the settler keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read settler key file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "settler key file {path} is accessible to other users (mode {mode:o}): allow its owner only (chmod 600)"
    )]
    LoosePermissions { path: String, mode: u32 },
    #[error("environment variable {0} (settlement.settler_keys_env) is not set or not UTF-8")]
    Env(String),
    #[error("{source_name}: entry {entry} is not a 32-byte hex private key")]
    Malformed { source_name: String, entry: usize },
    #[error("{0}: no settler key found")]
    Empty(String),
    #[error("{source_name}: entry {entry} repeats the key of entry {first} (address {address})")]
    Duplicate { source_name: String, entry: usize, first: usize, address: alloy::primitives::Address },
}

/// Writes `signers`' keys to a new file at `path`, one per line, readable by its owner
/// only (what [`load`] accepts).
pub fn write_file(path: &std::path::Path, signers: &[PrivateKeySigner]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    for s in signers {
        writeln!(f, "{}", s.to_bytes())?;
    }
    f.sync_all()
}

/// The configured settler signers, in the order given. Empty when none is configured.
pub fn load(config: &SettlementConfig) -> Result<Vec<PrivateKeySigner>, KeyError> {
    let mut signers = Vec::new();
    if let Some(path) = &config.settler_keys_file {
        let read_err = |source| KeyError::Read { path: path.display().to_string(), source };
        if let Some(mode) = loose_mode(path).map_err(read_err)? {
            return Err(KeyError::LoosePermissions { path: path.display().to_string(), mode });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
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
        use std::os::unix::fs::PermissionsExt as _;
        for loose in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(loose)).unwrap();
            let err = load(&config).unwrap_err();
            assert!(matches!(err, KeyError::LoosePermissions { .. }), "mode {loose:o}: {err}");
            assert!(err.to_string().contains("chmod 600") && !err.to_string().contains(&KEY[..20]));
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
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
