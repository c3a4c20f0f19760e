//! Stopping, after the drain: background tasks, then the ledger writer (the engines stop
//! in between, see [`super::start::Engines::stop`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::ingest::Ingest;

/// How long shutdown waits for the ledger writer after the server stopped. Every answered
/// submission is already on disk; this only bounds a clean exit.
const WRITER_JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops background tasks (the nonce audit, the metrics server, the reload listener).
pub(super) async fn background(tasks: impl IntoIterator<Item = Option<JoinHandle<()>>>) {
    for task in tasks.into_iter().flatten() {
        task.abort();
        let _ = task.await;
    }
}

/// Every request has been answered: the writer commits what it still holds and stops
/// (connection tasks that linger may still hold handles; they get UNAVAILABLE).
pub(super) async fn writer(ingest: Arc<Ingest>, thread: std::thread::JoinHandle<()>) {
    let writer = ingest.ledger().clone();
    drop(ingest);
    let joined = tokio::task::spawn_blocking(move || {
        writer.stop();
        thread.join()
    });
    if tokio::time::timeout(WRITER_JOIN_TIMEOUT, joined).await.is_err() {
        tracing::warn!(
            "ledger writer still busy after {WRITER_JOIN_TIMEOUT:?}; exiting anyway (answered writes are on disk)"
        );
    }
}
