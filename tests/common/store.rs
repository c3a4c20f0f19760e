//! Where a test's ledger lives: RocksDB in a temp dir, or PostgreSQL (a schema of its own
//! on a throw-away server shared by the tests of this binary). Integration tests that
//! hold for both backends run once on each ([`both_backends!`]).

use std::sync::Arc;

use x402_batcher::config::{Config, LedgerBackend};
use x402_batcher::ledger::{BatchRecord, LedgerStore, PaymentRecord, PgConnect, PgLedger, RocksLedger};
use x402_batcher::tools::postgres::TestPostgres;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Rocksdb,
    Postgres,
}

/// A test's ledger; shared by the daemons a test restarts on it.
pub struct TestLedger {
    /// A temp dir for the test's files: the RocksDB ledger (`ledger/`), key files.
    pub dir: Arc<tempfile::TempDir>,
    pg: Option<(Arc<TestPostgres>, String)>,
}

impl TestLedger {
    pub fn new(backend: Backend) -> Arc<TestLedger> {
        Self::in_dir(backend, Arc::new(tempfile::tempdir().unwrap()))
    }

    pub fn in_dir(backend: Backend, dir: Arc<tempfile::TempDir>) -> Arc<TestLedger> {
        let pg = (backend == Backend::Postgres).then(|| {
            let pg = TestPostgres::shared().unwrap();
            let url = pg.new_schema_url().unwrap();
            (pg, url)
        });
        Arc::new(TestLedger { dir, pg })
    }

    pub fn backend(&self) -> Backend {
        if self.pg.is_some() { Backend::Postgres } else { Backend::Rocksdb }
    }

    /// Points `config` at this ledger.
    pub fn configure(&self, config: &mut Config) {
        match &self.pg {
            None => config.ledger.path = Some(self.dir.path().join("ledger")),
            Some((_, url)) => {
                config.ledger.backend = LedgerBackend::Postgres;
                config.ledger.path = None;
                config.ledger.url = Some(url.clone());
            }
        }
    }

    /// Opens it (no daemon may have it open when it is RocksDB).
    pub fn open(&self) -> Box<dyn LedgerStore> {
        match &self.pg {
            None => Box::new(RocksLedger::open(&self.dir.path().join("ledger")).unwrap()),
            Some((_, url)) => Box::new(PgLedger::open(PgConnect::new(url, None).unwrap()).unwrap()),
        }
    }

    /// Each payment's standing outcome in the settlement log, and the batches of `chain_id`.
    pub fn books(&self, chain_id: u64) -> (Vec<PaymentRecord>, Vec<BatchRecord>) {
        books_and_batches(&*self.open(), chain_id)
    }
}

/// Each payment's standing outcome (reversals undone, corrections and finality applied),
/// and the batches of `chain_id`.
pub fn books_and_batches(ledger: &dyn LedgerStore, chain_id: u64) -> (Vec<PaymentRecord>, Vec<BatchRecord>) {
    let log = x402_batcher::ledger::books(
        ledger.settlement_log(0, usize::MAX).unwrap().into_iter().map(|(_, r)| r),
    );
    (log, ledger.batches(chain_id).unwrap())
}

/// Declares, for each named `async fn name(backend: Backend)`, a module `name` with two
/// tests, `rocksdb` and `postgres`, that run it on each backend.
#[macro_export]
macro_rules! both_backends {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {$(
        mod $name {
            use super::common::store::Backend;

            $(#[$attr])*
            async fn rocksdb() {
                super::$name(Backend::Rocksdb).await
            }

            $(#[$attr])*
            async fn postgres() {
                super::$name(Backend::Postgres).await
            }
        }
    )*};
}
