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
