//! Reading the daemon's Prometheus endpoint.

use std::collections::HashMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /metrics` over plain TCP.
pub async fn scrape(addr: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// Series of the exposition text: `name{labels}` -> value.
pub fn series(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_owned(), v.parse().ok()?))))
        .collect()
}

/// The sum of `name`'s series whose labels contain every `label="value"` given.
pub fn sum(s: &HashMap<String, f64>, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for (k, v) in s {
        let base = k.split('{').next().unwrap();
        if base == name && labels.iter().all(|l| k.contains(l)) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}
