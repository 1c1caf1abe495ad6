//! `--metrics`: the Prometheus endpoint served while tracing.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use log::warn;

/// Binds the metrics listener; anything but loopback is said out loud.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("serve metrics on {addr} (--metrics)"))?;
    if !addr.ip().is_loopback() {
        warn!("metrics are served on {addr}, reachable from other machines");
    }
    eprintln!("memtrace: Prometheus metrics at http://{addr}/metrics");
    Ok(listener)
}

/// Answers one HTTP request on the metrics listener: `GET /metrics` gets `body`.
pub async fn serve(mut stream: tokio::net::TcpStream, body: String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut head = [0u8; 2048];
    let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut head)).await else {
        return;
    };
    let request = String::from_utf8_lossy(&head[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let response = if request.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 404 Not Found\r\nContent-Length: 24\r\nConnection: close\r\n\r\nmetrics are at /metrics\n"
            .to_string()
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(response.as_bytes())).await;
}
