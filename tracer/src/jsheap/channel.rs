//! memtrace's end of the agent's socket.
//!
//! memtrace listens on an abstract Unix socket in the target's network namespace under a
//! random name, accepts one connection, and only from the target itself (the kernel's
//! `SO_PEERCRED` pid, which a peer cannot forge), then stops listening. Nothing lingers
//! on a file system, and no other process can stand in for either end. The agent sends
//! one JSON line per `snapshot` line memtrace sends.

use std::{
    fmt::Write as _,
    io::{self, Read as _},
    os::{linux::net::SocketAddrExt as _, unix::net::SocketAddr},
    time::Duration,
};

use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{
        UnixListener, UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use super::{JsHeapError, net::NetNs, profile::FlatProfile};

/// A reply larger than this is not a profile the agent would send.
const MAX_REPLY: u64 = 256 << 20;

/// Random hex, from the kernel's generator.
fn random_hex(bytes: usize) -> io::Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

/// Bytes of `sun_path` after the leading NUL of an abstract name.
const ABSTRACT_NAME_MAX: usize = 107;

/// The listening end, before the agent connects.
pub struct AgentListener {
    /// Node up to v20 connects to an abstract name padded with NULs to the whole
    /// `sun_path` (libuv's `uv_pipe_connect`); later ones to the exact name. memtrace
    /// listens on both.
    padded: UnixListener,
    exact: UnixListener,
    name: String,
    token: String,
}

impl AgentListener {
    pub fn bind(netns: &NetNs) -> Result<Self, JsHeapError> {
        let io = |e: io::Error| JsHeapError::Channel(format!("listen for the agent: {e}"));
        let name = format!("memtrace-jsheap-{}-{}", std::process::id(), random_hex(12).map_err(io)?);
        let token = random_hex(16).map_err(io)?;
        let mut padded_name = name.clone().into_bytes();
        padded_name.resize(ABSTRACT_NAME_MAX, 0);
        let bind = |abstract_name: &[u8]| -> io::Result<std::os::unix::net::UnixListener> {
            let addr = SocketAddr::from_abstract_name(abstract_name)?;
            let listener = std::os::unix::net::UnixListener::bind_addr(&addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        };
        let (padded, exact) = netns.run(|| Ok((bind(&padded_name)?, bind(name.as_bytes())?))).map_err(io)?;
        Ok(Self {
            padded: UnixListener::from_std(padded).map_err(io)?,
            exact: UnixListener::from_std(exact).map_err(io)?,
            name,
            token,
        })
    }

    /// The path the agent connects to (Node writes abstract names with a leading NUL).
    #[must_use]
    pub fn agent_path(&self) -> String {
        format!("\0{}", self.name)
    }

    /// What the agent must say first, so that memtrace knows it is this agent.
    #[must_use]
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Waits for the target's agent and its hello; connections from any other process
    /// are dropped.
    pub async fn accept(self, pid: u32, wait: Duration) -> Result<(AgentConn, Hello), JsHeapError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let either = async {
                tokio::select! {
                    a = self.padded.accept() => a,
                    a = self.exact.accept() => a,
                }
            };
            let accepted = tokio::time::timeout_at(deadline, either).await.map_err(|_| {
                JsHeapError::Channel(format!("the agent in pid {pid} did not connect within {wait:?}"))
            })?;
            let (stream, _) = accepted.map_err(|e| JsHeapError::Channel(format!("accept the agent: {e}")))?;
            let peer = stream.peer_cred().ok().and_then(|c| c.pid());
            if peer != i32::try_from(pid).ok() {
                log::warn!(
                    "js-heap: refused a connection to the agent socket from pid {peer:?} (expected {pid})"
                );
                continue;
            }
            let mut conn = AgentConn::new(stream);
            let hello: Hello = conn.read_reply(deadline).await?;
            if hello.token != self.token {
                return Err(JsHeapError::Channel(format!("pid {pid} answered with a wrong token")));
            }
            if let Some(reason) = hello.error {
                return Err(JsHeapError::AgentFailed { pid, reason });
            }
            return Ok((conn, hello));
        }
    }
}

/// The agent's first line.
#[derive(Debug, Deserialize)]
pub struct Hello {
    #[serde(rename = "hello")]
    token: String,
    #[serde(default)]
    error: Option<String>,
    /// The sampling interval in force (an earlier memtrace's, when shared).
    #[serde(default)]
    pub interval: u64,
    #[serde(default)]
    pub node: String,
    /// memtraces the agent serves, this one included.
    #[serde(default)]
    pub clients: u64,
}

/// What the agent answers to `snapshot`.
#[derive(Debug, Deserialize)]
pub struct AgentReply {
    #[serde(default)]
    pub profile: Option<FlatProfile>,
    #[serde(default)]
    pub memory: Option<MemoryUsage>,
    #[serde(default)]
    pub interval: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
}

/// `process.memoryUsage()`, the fields the timeline keeps.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryUsage {
    pub heap_used: u64,
    pub heap_total: u64,
    pub external: u64,
    pub array_buffers: u64,
}

/// The connection to the agent. Dropping it closes the socket, and the agent stops.
pub struct AgentConn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// A reply read in part by a call that was cancelled or timed out; the next call
    /// goes on with it, so that requests and replies stay paired.
    partial: Vec<u8>,
    awaiting_reply: bool,
}

impl AgentConn {
    fn new(stream: UnixStream) -> Self {
        let (reader, writer) = stream.into_split();
        Self { reader: BufReader::new(reader), writer, partial: Vec::new(), awaiting_reply: false }
    }

    /// Asks for a snapshot (unless the last request is still unanswered) and reads it.
    pub async fn snapshot(&mut self, wait: Duration) -> Result<AgentReply, JsHeapError> {
        let deadline = tokio::time::Instant::now() + wait;
        if !self.awaiting_reply {
            self.writer.write_all(b"snapshot\n").await.map_err(|e| JsHeapError::AgentGone(e.to_string()))?;
            self.awaiting_reply = true;
        }
        let reply = self.read_reply(deadline).await?;
        self.awaiting_reply = false;
        Ok(reply)
    }

    async fn read_reply<T: for<'de> Deserialize<'de>>(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<T, JsHeapError> {
        let left = MAX_REPLY.saturating_sub(self.partial.len() as u64);
        let mut limited = (&mut self.reader).take(left);
        let read = tokio::time::timeout_at(deadline, limited.read_until(b'\n', &mut self.partial))
            .await
            .map_err(|_| JsHeapError::Timeout("the agent's reply".into()))?;
        match read {
            Ok(0) => return Err(JsHeapError::AgentGone("it closed the connection".into())),
            Ok(_) if self.partial.last() != Some(&b'\n') => {
                return Err(JsHeapError::AgentGone(format!(
                    "a reply longer than {MAX_REPLY} bytes or cut short"
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(JsHeapError::AgentGone(e.to_string())),
        }
        let line = std::mem::take(&mut self.partial);
        serde_json::from_slice(&line).map_err(|e| JsHeapError::Protocol(format!("agent reply: {e}")))
    }

    /// Ends the connection and waits (briefly) for the agent to close its end: it has
    /// stopped sampling by then.
    pub async fn close(mut self, wait: Duration) {
        let _ = self.writer.shutdown().await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(wait, self.reader.read_to_end(&mut rest)).await;
    }
}
