//! Heads pushed by the node: a `newHeads` subscription over WebSocket (`[[chains]]
//! ws_url`). Each head wakes the engine the moment the node has it, and while the
//! subscription lives the engine reads no head of its own (`wake.rs`): no looks near the
//! expected block, no idle poll but a slow safety one. Before the first head, while the
//! connection is down and while it is made again (1 s, doubling to 30 s), the feed is not
//! live and the engine polls as it does without one.

use std::time::Duration;

use alloy::providers::{Provider, ProviderBuilder, WsConnect};
use futures::StreamExt as _;
use tokio::sync::watch;

use super::rpc::Head;

/// First wait before the subscription is made again; doubled after each failure.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What the subscription last delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedState {
    /// Subscribed, and a head arrived since.
    pub live: bool,
    /// The newest head pushed.
    pub head: Option<Head>,
}

/// Follows `ws_url`'s heads until `stop` turns true; the feed to give the engine
/// ([`super::Engine::with_head_feed`]) and the task. The URL (it may carry a key) is never
/// logged: errors are redacted.
pub fn follow(
    chain_id: u64,
    ws_url: String,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<FeedState>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(FeedState::default());
    let secrets = crate::chain::url_secrets(&ws_url).unwrap_or_else(|| vec![ws_url.clone()]);
    let task = tokio::spawn(async move {
        let mut wait = RETRY_FIRST;
        loop {
            let ended = tokio::select! {
                ended = subscribe(&ws_url, &tx, &mut wait) => ended,
                _ = stop.wait_for(|s| *s) => return,
            };
            tx.send_modify(|s| s.live = false);
            match ended {
                Ok(()) => tracing::warn!(chain_id, "head subscription ended; polling until it is made again"),
                Err(e) => tracing::warn!(
                    chain_id,
                    "head subscription failed: {}; polling until it is made again",
                    crate::chain::redact(&secrets, &e)
                ),
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            wait = (wait * 2).min(RETRY_MAX);
        }
    });
    (rx, task)
}

/// Subscribes and publishes every head until the stream ends.
async fn subscribe(url: &str, tx: &watch::Sender<FeedState>, wait: &mut Duration) -> Result<(), String> {
    // No retries inside the transport: a lost connection ends the stream, and the feed
    // says so at once (the engine polls meanwhile).
    let connect = WsConnect::new(url).with_max_retries(0);
    let provider = ProviderBuilder::new().connect_ws(connect).await.map_err(|e| e.to_string())?;
    let mut heads = provider.subscribe_blocks().await.map_err(|e| e.to_string())?.into_stream();
    while let Some(h) = heads.next().await {
        *wait = RETRY_FIRST;
        tx.send_replace(FeedState { live: true, head: Some(Head::of(&h)) });
    }
    Ok(())
}
