//! A stand-in for a flashblocks-aware endpoint of an OP-stack chain (Base: a block every
//! 2 s, a "flashblock" of it every 200 ms). Anvil mines a block every flashblock; this
//! JSON-RPC proxy in front of it seals a block every `block` interval: until then, the
//! blocks anvil made since the last seal are preconfirmed state only.
//!
//! What the proxy serves, as a flashblocks-aware node does: `latest` (as a tag anywhere in
//! the parameters, and `eth_blockNumber`) is the last sealed block, and a block above it
//! is not served by number or hash; a transaction's receipt is served as soon as it is in
//! a flashblock (the preconfirmation), `pending` is the flashblock state. Everything else
//! is anvil's answer.
//!
//! [`Flashblocks::renege`] makes the next seal drop every flashblock since the last one
//! (anvil reverts to its snapshot at that seal): preconfirmed transactions vanish, as when
//! a sequencer fails over before sealing what it preconfirmed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::DevnetError;

/// The proxy and its sealing loop; both stop when this is dropped.
pub struct Flashblocks {
    url: String,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Shared {
    anvil: String,
    http: reqwest::Client,
    /// The last sealed block.
    sealed: AtomicU64,
    /// Drop the flashblocks at the next seal.
    renege: AtomicBool,
    /// Anvil's snapshot at the last seal (what a renege goes back to); held while sealing.
    snapshot: tokio::sync::Mutex<Option<Value>>,
    /// Receipts served from a block above the sealed one (preconfirmations).
    preconfirmed_receipts: AtomicU64,
}

impl Flashblocks {
    /// A proxy on 127.0.0.1 port 0 in front of `anvil` (which mines a flashblock per block),
    /// sealing every `block`.
    pub(super) async fn start(anvil: &str, block: Duration) -> Result<Flashblocks, DevnetError> {
        let http = reqwest::Client::new();
        let shared = Arc::new(Shared {
            anvil: anvil.to_owned(),
            http,
            sealed: AtomicU64::new(0),
            renege: AtomicBool::new(false),
            snapshot: tokio::sync::Mutex::new(None),
            preconfirmed_receipts: AtomicU64::new(0),
        });
        shared.seal().await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(DevnetError::Proxy)?;
        let url = format!("http://{}", listener.local_addr().map_err(DevnetError::Proxy)?);
        let app = axum::Router::new().route("/", axum::routing::post(serve)).with_state(Arc::clone(&shared));
        let serving = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let sealer = Arc::clone(&shared);
        let sealing = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + block, block);
            loop {
                tick.tick().await;
                if let Err(e) = sealer.seal().await {
                    tracing::warn!("flashblocks stand-in: sealing failed: {e}");
                }
            }
        });
        Ok(Flashblocks { url, shared, tasks: vec![serving, sealing] })
    }

    /// The proxy's URL: the chain's RPC URL for everything that uses this devnet.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The last sealed block.
    pub fn sealed(&self) -> u64 {
        self.shared.sealed.load(Ordering::SeqCst)
    }

    /// The next seal drops what was preconfirmed since the last one.
    pub fn renege(&self) {
        self.shared.renege.store(true, Ordering::SeqCst);
    }

    /// Seals anvil's newest block now (besides the schedule); the sealed block.
    pub async fn seal_now(&self) -> Result<u64, DevnetError> {
        self.shared.seal().await?;
        Ok(self.sealed())
    }

    /// How many receipts were served from a block above the sealed one.
    pub fn preconfirmed_receipts(&self) -> u64 {
        self.shared.preconfirmed_receipts.load(Ordering::SeqCst)
    }
}

impl Drop for Flashblocks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Shared {
    async fn anvil_call(&self, method: &'static str, params: Value) -> Result<Value, DevnetError> {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let reply: Value = async { self.http.post(&self.anvil).json(&body).send().await?.json().await }
            .await
            .map_err(|e: reqwest::Error| DevnetError::Rpc { call: method, detail: e.to_string() })?;
        match reply.get("error") {
            Some(e) => Err(DevnetError::Rpc { call: method, detail: e.to_string() }),
            None => Ok(reply.get("result").cloned().unwrap_or(Value::Null)),
        }
    }

    /// Seals anvil's newest block, after dropping the flashblocks since the last seal if
    /// told to renege.
    async fn seal(&self) -> Result<(), DevnetError> {
        let mut snapshot = self.snapshot.lock().await;
        if let Some(id) = snapshot.take().filter(|_| self.renege.swap(false, Ordering::SeqCst)) {
            self.anvil_call("evm_revert", json!([id])).await?;
        }
        let number = self.anvil_call("eth_blockNumber", json!([])).await?;
        let number = block_number(Some(&number))
            .ok_or(DevnetError::Rpc { call: "eth_blockNumber", detail: "not a number".into() })?;
        *snapshot = Some(self.anvil_call("evm_snapshot", json!([])).await?);
        self.sealed.store(number, Ordering::SeqCst);
        Ok(())
    }

    /// One request's answer: made here, or anvil's to the request as rewritten.
    async fn answer(&self, mut request: Value) -> Value {
        let sealed = self.sealed.load(Ordering::SeqCst);
        let id = request.get("id").cloned().unwrap_or(Value::Null);
        let made = |result: Value| json!({"jsonrpc": "2.0", "id": id, "result": result});
        let method = request.get("method").and_then(Value::as_str).unwrap_or_default().to_owned();
        if method == "eth_blockNumber" {
            return made(json!(format!("{sealed:#x}")));
        }
        if let Some(params) = request.get_mut("params") {
            if method == "eth_getBlockByNumber" && block_number(params.get(0)).is_some_and(|n| n > sealed) {
                return made(Value::Null);
            }
            seal_tags(params, sealed);
        }
        let reply = async { self.http.post(&self.anvil).json(&request).send().await?.json::<Value>().await };
        let mut reply = match reply.await {
            Ok(reply) => reply,
            Err(e) => {
                return json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32603, "message": e.to_string()}});
            }
        };
        let above =
            block_number(reply.get("result").and_then(|r| r.get("number").or_else(|| r.get("blockNumber"))))
                .is_some_and(|n| n > sealed);
        if above && method == "eth_getBlockByHash" {
            // A block above the sealed one is not served by hash either.
            reply["result"] = Value::Null;
        } else if above && method == "eth_getTransactionReceipt" {
            self.preconfirmed_receipts.fetch_add(1, Ordering::SeqCst);
        }
        reply
    }
}

/// A hex block number.
fn block_number(v: Option<&Value>) -> Option<u64> {
    u64::from_str_radix(v?.as_str()?.strip_prefix("0x")?, 16).ok()
}

/// Every `latest` tag in `params` becomes the sealed block's number.
fn seal_tags(params: &mut Value, sealed: u64) {
    match params {
        Value::String(s) if s == "latest" => *s = format!("{sealed:#x}"),
        Value::Array(items) => items.iter_mut().for_each(|v| seal_tags(v, sealed)),
        Value::Object(fields) => fields.values_mut().for_each(|v| seal_tags(v, sealed)),
        _ => {}
    }
}

async fn serve(State(shared): State<Arc<Shared>>, body: Bytes) -> impl IntoResponse {
    let reply = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(requests)) => {
            let mut replies = Vec::with_capacity(requests.len());
            for r in requests {
                replies.push(shared.answer(r).await);
            }
            Value::Array(replies)
        }
        Ok(request) => shared.answer(request).await,
        Err(e) => json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": e.to_string()}}),
    };
    ([(header::CONTENT_TYPE, "application/json")], reply.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_tags_anywhere_in_the_parameters_become_the_sealed_block() {
        let mut params = json!(["latest", {"toBlock": "latest", "fromBlock": "0x1"}, "pending", ["latest"]]);
        seal_tags(&mut params, 0x2a);
        assert_eq!(params, json!(["0x2a", {"toBlock": "0x2a", "fromBlock": "0x1"}, "pending", ["0x2a"]]));
        assert_eq!(block_number(Some(&json!("0x2a"))), Some(42));
        assert_eq!(block_number(Some(&json!("latest"))), None);
    }
}
