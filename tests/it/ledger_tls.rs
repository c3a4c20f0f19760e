//! The PostgreSQL ledger over TLS: with `ledger.ca_file` the connection is TLS only, the
//! server's certificate checked against that CA and the host's name (here 127.0.0.1);
//! a server signed by another CA, or one without TLS, is refused, never used in plaintext.

use crate::common;

use common::pki::Ca;
use x402_batcher::config::{LedgerBackend, LedgerConfig};
use x402_batcher::ledger::LedgerError;
use x402_batcher::tools::postgres::TestPostgres;

fn config(port: u16, ca_file: &std::path::Path) -> LedgerConfig {
    LedgerConfig {
        backend: LedgerBackend::Postgres,
        url: Some(format!("host=127.0.0.1 port={port} user=postgres dbname=postgres")),
        ca_file: Some(ca_file.to_owned()),
        ..LedgerConfig::default()
    }
}

/// Connections the server has over TLS, asked over a plaintext one.
fn tls_connections(pg: &TestPostgres) -> u64 {
    let plain = format!("{} sslmode=disable", pg.url());
    let out = std::process::Command::new(x402_batcher::tools::postgres::bin_dir().unwrap().join("psql"))
        .args(["-X", "-q", "-A", "-t", "-d", &plain, "-c", "SELECT count(*) FROM pg_stat_ssl WHERE ssl"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn the_ledger_connects_over_tls_to_a_server_its_ca_signed_and_refuses_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("x402 test database CA");
    let leaf = ca.server("127.0.0.1");
    let pg = TestPostgres::start_with_tls(&leaf.cert, &leaf.key).unwrap();
    let ca_file = dir.path().join("db-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let ledger = x402_batcher::ledger::open(&config(pg.port(), &ca_file)).unwrap();
    assert_eq!(ledger.last_seq(), 0);
    assert!(ledger.records().unwrap().is_empty());
    assert!(tls_connections(&pg) >= 1, "the ledger's connections are TLS");
    drop(ledger);

    // Signed by another CA: refused at connect.
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, Ca::new("someone else").pem()).unwrap();
    let err = x402_batcher::ledger::open(&config(pg.port(), &other)).unwrap_err();
    assert!(matches!(err, LedgerError::Unreachable { op: "connect", .. }), "{err}");

    // A server without TLS: refused, not used in plaintext.
    let plain = TestPostgres::start().unwrap();
    let err = x402_batcher::ledger::open(&config(plain.port(), &ca_file)).unwrap_err();
    assert!(matches!(err, LedgerError::Unreachable { op: "connect", .. }), "{err}");

    // Not a CA file.
    std::fs::write(&other, "not a certificate").unwrap();
    let err = x402_batcher::ledger::open(&config(pg.port(), &other)).unwrap_err();
    assert!(err.to_string().contains("ledger.ca_file"), "{err}");
}
