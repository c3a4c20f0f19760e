//! A fault-injecting TCP proxy in front of the devnet's RPC port, on 127.0.0.1: the daemon
//! talks to the chain through it, and the test switches what the "node" does.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards to the node.
    Up,
    /// Stopped: connections are closed at once, open ones are cut.
    Down,
    /// Answers every HTTP request with 503.
    Errors,
    /// Accepts and reads, never answers (timeouts); open connections stay open and go
    /// silent too (a node that hangs does not close them, so no client sees an error).
    Blackhole,
}

pub struct FaultProxy {
    pub url: String,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy to `upstream` (`http://127.0.0.1:PORT`), up.
    pub async fn start(upstream: &str) -> FaultProxy {
        let target: Arc<str> = upstream.trim_start_matches("http://").trim_end_matches('/').into();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (mode, rx) = watch::channel(Mode::Up);
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else { continue };
                let (target, rx) = (Arc::clone(&target), rx.clone());
                tokio::spawn(serve(conn, target, rx));
            }
        });
        FaultProxy { url, mode, task }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut conn: TcpStream, target: Arc<str>, mut mode: watch::Receiver<Mode>) {
    let current = *mode.borrow_and_update();
    match current {
        Mode::Down => {}
        Mode::Up => {
            let Ok(mut upstream) = TcpStream::connect(&*target).await else { return };
            // Forward until either side closes or the mode changes (a node that stops
            // takes its open connections with it; a node that hangs keeps them, silent).
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream) => {}
                _ = mode.changed() => {
                    if *mode.borrow_and_update() == Mode::Blackhole {
                        drop(upstream);
                        swallow(&mut conn, &mut mode).await;
                    }
                }
            }
        }
        Mode::Errors => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                // One reply per request read (requests are small and arrive whole).
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let reply = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
                if conn.write_all(reply.as_bytes()).await.is_err() || *mode.borrow() != Mode::Errors {
                    return;
                }
            }
        }
        Mode::Blackhole => swallow(&mut conn, &mut mode).await,
    }
}

/// Reads and discards what the client sends, never answering, until it closes or the mode
/// changes (then the connection is closed).
async fn swallow(conn: &mut TcpStream, mode: &mut watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            r = conn.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
            _ = mode.changed() => return,
        }
    }
}

/// A JSON-RPC proxy to `upstream` on 127.0.0.1 that counts the calls made through it, by
/// method and first parameter (`eth_getBlockByNumber latest`).
pub struct CountingProxy {
    pub url: String,
    calls: Arc<parking_lot::Mutex<std::collections::HashMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    pub async fn start(upstream: &str) -> CountingProxy {
        type Calls = Arc<parking_lot::Mutex<std::collections::HashMap<String, u64>>>;
        let calls: Calls = Arc::default();
        let (target, http, counted) = (upstream.to_owned(), reqwest::Client::new(), Arc::clone(&calls));
        let forward = move |body: axum::body::Bytes| {
            let (target, http, counted) = (target.clone(), http.clone(), Arc::clone(&counted));
            async move {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                    let all = if let serde_json::Value::Array(a) = v { a } else { vec![v] };
                    let mut calls = counted.lock();
                    for call in all {
                        let method = call["method"].as_str().unwrap_or_default().to_owned();
                        let first = call["params"][0].as_str().unwrap_or_default().to_owned();
                        *calls.entry(method.clone()).or_default() += 1;
                        *calls.entry(format!("{method} {first}")).or_default() += 1;
                    }
                }
                let reply = http.post(&target).header("content-type", "application/json").body(body);
                let bytes = reply.send().await.unwrap().bytes().await.unwrap();
                ([(axum::http::header::CONTENT_TYPE, "application/json")], bytes)
            }
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().route("/", axum::routing::post(forward));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        CountingProxy { url, calls, task }
    }

    /// Calls of `key` so far: a method, or a method and its first parameter.
    pub fn calls(&self, key: &str) -> u64 {
        self.calls.lock().get(key).copied().unwrap_or(0)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A JSON-RPC proxy to `upstream` on 127.0.0.1 that can answer as a node `lag` blocks
/// behind (its head, its `latest` block, and no block, receipt or transaction above that),
/// and delays every answer by `delay` (a farther provider).
pub struct LaggingProxy {
    pub url: String,
    lag: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LaggingProxy {
    pub async fn start(upstream: &str, delay: std::time::Duration) -> LaggingProxy {
        let lag = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (target, http, lagging) = (upstream.to_owned(), reqwest::Client::new(), Arc::clone(&lag));
        let forward = move |body: axum::body::Bytes| {
            let (target, http, lagging) = (target.clone(), http.clone(), Arc::clone(&lagging));
            async move {
                tokio::time::sleep(delay).await;
                let lag = lagging.load(std::sync::atomic::Ordering::Relaxed);
                let post = |body: Vec<u8>| {
                    let request = http.post(&target).header("content-type", "application/json").body(body);
                    async move { request.send().await.ok()?.bytes().await.ok() }
                };
                let reply = if lag == 0 {
                    post(body.to_vec()).await.unwrap_or_default()
                } else {
                    behind(&body, lag, &post).await
                };
                ([(axum::http::header::CONTENT_TYPE, "application/json")], reply)
            }
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().route("/", axum::routing::post(forward));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        LaggingProxy { url, lag, task }
    }

    /// Answers as a node `blocks` behind from now on (0: up to date).
    pub fn lag(&self, blocks: u64) {
        self.lag.store(blocks, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for LaggingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer to `body` (one call or a batch) of a node `lag` blocks behind the upstream
/// that `post` reaches.
async fn behind<F, Fut>(body: &[u8], lag: u64, post: &F) -> axum::body::Bytes
where
    F: Fn(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Option<axum::body::Bytes>>,
{
    use serde_json::{Value, json};
    let number =
        |v: &Value| v.as_str().and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok());
    let call_upstream = |call: Value| async move {
        let bytes = post(serde_json::to_vec(&call).unwrap()).await?;
        serde_json::from_slice::<Value>(&bytes).ok()
    };
    let head = call_upstream(json!({"jsonrpc": "2.0", "id": 0, "method": "eth_blockNumber", "params": []}))
        .await
        .and_then(|v| number(&v["result"]));
    let Some(head) = head else { return axum::body::Bytes::new() };
    let seen = head.saturating_sub(lag);
    let Ok(request) = serde_json::from_slice::<Value>(body) else { return axum::body::Bytes::new() };
    let batch = request.is_array();
    let calls = if let Value::Array(a) = request { a } else { vec![request] };
    let mut answers = Vec::new();
    for mut call in calls {
        let id = call["id"].clone();
        let answer = match call["method"].as_str().unwrap_or_default() {
            "eth_blockNumber" => json!({"jsonrpc": "2.0", "id": id, "result": format!("{seen:#x}")}),
            "eth_getBlockByNumber" => {
                let tag = call["params"][0].clone();
                if matches!(tag.as_str(), Some("latest" | "pending")) {
                    call["params"][0] = json!(format!("{seen:#x}"));
                }
                if number(&call["params"][0]).is_some_and(|n| n > seen) {
                    json!({"jsonrpc": "2.0", "id": id, "result": null})
                } else {
                    call_upstream(call).await.unwrap_or(Value::Null)
                }
            }
            "eth_getTransactionReceipt" | "eth_getTransactionByHash" => {
                let mut answer = call_upstream(call).await.unwrap_or(Value::Null);
                if number(&answer["result"]["blockNumber"]).is_some_and(|n| n > seen) {
                    answer["result"] = Value::Null;
                }
                answer
            }
            _ => call_upstream(call).await.unwrap_or(Value::Null),
        };
        answers.push(answer);
    }
    let reply = if batch { Value::Array(answers) } else { answers.pop().unwrap_or(Value::Null) };
    axum::body::Bytes::from(serde_json::to_vec(&reply).unwrap())
}
