//! A client of Node's inspector: its HTTP endpoints (`/json/version`, `/json/list`) and one
//! `WebSocket` session of the Chrome `DevTools` Protocol.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};

use super::{JsHeapError, net::NetNs};

/// Bytes of an HTTP reply we read at most (`/json/list` of one target is < 1 KiB).
const MAX_HTTP_BODY: usize = 64 << 10;

fn protocol(what: &str, e: impl std::fmt::Display) -> JsHeapError {
    JsHeapError::Protocol(format!("{what}: {e}"))
}

/// A TCP connection made inside the target's network namespace. Blocking, which on
/// loopback means microseconds (refused or accepted at once).
pub fn connect(netns: &NetNs, addr: SocketAddr) -> Result<TcpStream, JsHeapError> {
    let stream = netns
        .run(|| {
            let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            stream.set_nonblocking(true)?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
        .map_err(|e| JsHeapError::Connect { addr, reason: e.to_string() })?;
    TcpStream::from_std(stream).map_err(|e| JsHeapError::Connect { addr, reason: e.to_string() })
}

/// `GET path` on the inspector's HTTP server, its JSON body.
pub async fn get_json(netns: &NetNs, addr: SocketAddr, path: &str) -> Result<Value, JsHeapError> {
    let stream = connect(netns, addr)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| protocol("HTTP", e))?;
    // The connection task ends when the response is read and `sender` is dropped.
    let driver = tokio::spawn(conn);
    // Node checks the Host header against DNS rebinding: an IP literal passes.
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| protocol("HTTP request", e))?;
    let response = sender.send_request(request).await.map_err(|e| protocol(&format!("GET {path}"), e))?;
    if !response.status().is_success() {
        return Err(JsHeapError::Protocol(format!("GET {path} on {addr}: HTTP {}", response.status())));
    }
    let body = http_body_util::Limited::new(response.into_body(), MAX_HTTP_BODY)
        .collect()
        .await
        .map_err(|e| protocol(&format!("GET {path}"), e))?
        .to_bytes();
    drop(sender);
    driver.abort();
    serde_json::from_slice(&body).map_err(|e| protocol(&format!("GET {path} on {addr}"), e))
}

/// Whether `addr` is Node's inspector (`/json/version` names `node.js`).
pub async fn is_node_inspector(netns: &NetNs, addr: SocketAddr) -> bool {
    let version = tokio::time::timeout(Duration::from_secs(2), get_json(netns, addr, "/json/version")).await;
    matches!(version, Ok(Ok(v)) if v.get("Browser").and_then(Value::as_str).is_some_and(|b| b.starts_with("node.js")))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListedTarget {
    #[serde(default)]
    id: String,
    #[serde(default)]
    web_socket_debugger_url: String,
}

/// The WebSocket path of a listed target. The URL's host is whatever Host header we sent;
/// only its path matters.
pub(crate) fn websocket_path(target: &ListedTarget) -> String {
    target
        .web_socket_debugger_url
        .strip_prefix("ws://")
        .and_then(|rest| rest.find('/').map(|i| rest[i..].to_string()))
        .unwrap_or_else(|| format!("/{}", target.id))
}

/// What the inspector's answer to `Runtime.evaluate` says.
pub(crate) fn evaluation(reply: &Value) -> Result<Evaluated, JsHeapError> {
    if let Some(error) = reply.get("error") {
        return Err(JsHeapError::Protocol(format!("Runtime.evaluate: {error}")));
    }
    if let Some(details) = reply.pointer("/result/exceptionDetails") {
        let text = details
            .pointer("/exception/description")
            .or_else(|| details.get("text"))
            .and_then(Value::as_str)
            .unwrap_or("an exception");
        return Ok(Evaluated::Threw(text.lines().next().unwrap_or(text).to_string()));
    }
    Ok(Evaluated::Returned)
}

/// A WebSocket session of the inspector.
pub struct Session {
    ws: WebSocketStream<TcpStream>,
    next_id: u64,
}

/// What `Runtime.evaluate` returned.
pub enum Evaluated {
    Returned,
    /// The script threw: V8's description of the exception.
    Threw(String),
}

impl Session {
    /// Finds the target's session path (`/json/list`) and opens its WebSocket.
    pub async fn open(netns: &NetNs, addr: SocketAddr) -> Result<Self, JsHeapError> {
        let list = get_json(netns, addr, "/json/list").await?;
        let targets: Vec<ListedTarget> =
            serde_json::from_value(list).map_err(|e| protocol("/json/list", e))?;
        let target =
            targets.first().ok_or_else(|| JsHeapError::Protocol(format!("{addr}/json/list is empty")))?;
        let path = websocket_path(target);
        let stream = connect(netns, addr)?;
        let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}{path}"), stream)
            .await
            .map_err(|e| protocol("WebSocket handshake", e))?;
        Ok(Self { ws, next_id: 1 })
    }

    fn message(&mut self, method: &str, params: &Value) -> (u64, Message) {
        let id = self.next_id;
        self.next_id += 1;
        (id, Message::text(json!({ "id": id, "method": method, "params": params }).to_string()))
    }

    /// Evaluates `expression` with the console's command-line API (which has `require`
    /// in Node whatever the application's module system), without waiting for the
    /// answer; `then_close` sends `process._debugEnd()` in the same write, in case the
    /// expression failed before it could close the listener itself. Returns the id.
    pub async fn send_evaluate(&mut self, expression: &str, then_close: bool) -> Result<u64, JsHeapError> {
        let params =
            json!({ "expression": expression, "includeCommandLineAPI": true, "returnByValue": true });
        let (id, first) = self.message("Runtime.evaluate", &params);
        let send = |e| protocol("WebSocket send", e);
        self.ws.feed(first).await.map_err(send)?;
        if then_close {
            let (_, close) =
                self.message("Runtime.evaluate", &json!({ "expression": "process._debugEnd()" }));
            self.ws.feed(close).await.map_err(send)?;
        }
        self.ws.flush().await.map_err(send)?;
        Ok(id)
    }

    /// The answer to evaluation `id`.
    pub async fn evaluated(&mut self, id: u64, wait: Duration) -> Result<Evaluated, JsHeapError> {
        let reply = tokio::time::timeout(wait, self.reply(id)).await.map_err(|_| {
            JsHeapError::Timeout(format!("the answer to Runtime.evaluate (waited {wait:?})"))
        })??;
        evaluation(&reply)
    }

    /// The reply with `id` (events in between are skipped).
    async fn reply(&mut self, id: u64) -> Result<Value, JsHeapError> {
        while let Some(message) = self.ws.next().await {
            let message = message.map_err(|e| protocol("WebSocket", e))?;
            let Message::Text(text) = message else { continue };
            let value: Value =
                serde_json::from_str(text.as_str()).map_err(|e| protocol("inspector message", e))?;
            if value.get("id").and_then(Value::as_u64) == Some(id) {
                return Ok(value);
            }
        }
        Err(JsHeapError::Protocol("the inspector closed the WebSocket before it answered".into()))
    }

    /// Waits until the inspector ends the session (as it does when its listener closes).
    pub async fn wait_closed(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, async { while let Some(Ok(_)) = self.ws.next().await {} }).await.is_ok()
    }

    /// Closes the listener through this session (`process._debugEnd()`), for the paths
    /// that opened it and failed before the agent could be installed.
    pub async fn close_listener(mut self, wait: Duration) -> bool {
        let (_, close) = self.message("Runtime.evaluate", &json!({ "expression": "process._debugEnd()" }));
        if self.ws.send(close).await.is_err() {
            return false;
        }
        self.wait_closed(wait).await
    }
}
