//! The JS heap view: live objects on a Node target's V8 heap, by JS stack, from V8's
//! sampling heap profiler, with no restart and no flag.
//!
//! V8 bump-allocates JS objects inside its own pages, so the syscall, fault and malloc
//! views only ever see its page allocator and garbage collector. V8's sampling heap
//! profiler sees the objects: one sample per `interval` allocated bytes (Poisson), kept
//! while its object lives, with the JS stack that allocated it.
//!
//! Reaching it takes Node's inspector, which is a code-execution door for whoever
//! connects while it listens. [`JsHeapView::open`] therefore keeps the network listener
//! open for one round trip: SIGUSR1 opens it, memtrace reads `/json/list`, connects,
//! and sends in one write the agent ([`agent.js`](agent.js)) and `process._debugEnd()`,
//! which closes the listener again. The agent samples through an in-process session,
//! reachable by no one outside the process, and answers memtrace over a Unix socket that
//! only the target may connect to; when that socket closes (memtrace stopped, crashed or
//! was `SIGKILLed`) it stops sampling and removes itself. A target that had an inspector
//! open before keeps it as it was. One window at a time opens per network namespace.

pub(crate) mod channel;
pub(crate) mod inspector;
mod net;
pub(crate) mod profile;
mod target;
#[cfg(test)]
mod tests;

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use serde_json::json;
use tokio::time::Instant;

use self::{
    channel::{AgentConn, AgentListener, MemoryUsage},
    inspector::{Evaluated, Session},
    net::{Listener, NetNs},
};
pub use self::{
    profile::{FlatProfile, JsStack, live_stacks},
    target::{NodeTarget, detect},
};

/// The agent, evaluated as `(agent)(require, options)`.
const AGENT_JS: &str = include_str!("agent.js");

/// How long SIGUSR1 may take to open the listener (node opens it on its main thread).
const LISTEN_WAIT: Duration = Duration::from_secs(5);
/// How long the agent's evaluation may take (a busy main thread runs it at its next
/// interrupt check).
const EVALUATE_WAIT: Duration = Duration::from_secs(10);
/// How long to wait for another memtrace's window in the same network namespace.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// How long a snapshot may take (the agent answers from the target's event loop; a
/// reply that comes later is read by the next snapshot).
const SNAPSHOT_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum JsHeapError {
    #[error("process {pid} is not a Node.js process: the JS heap view does not apply")]
    NotNode { pid: u32 },
    #[error("node was started with --disable-sigusr1: the JS heap view is off; native views go on")]
    Sigusr1Disabled { pid: u32 },
    #[error(
        "process {pid} has no SIGUSR1 handler (a Node built without the inspector?), and the signal would end it: the JS heap view is off; native views go on"
    )]
    Sigusr1NotCaught { pid: u32 },
    #[error(
        "port {port} is held by pid {holder} ({comm}), so SIGUSR1 cannot open the inspector of pid {pid} there: the JS heap view is off; native views go on"
    )]
    PortHeld { pid: u32, port: u16, holder: u32, comm: String },
    #[error(
        "pid {pid} opened no inspector within {wait:?} of SIGUSR1 (does the application handle SIGUSR1 itself, or did another tool open the inspector?): the JS heap view is off; native views go on"
    )]
    NoListener { pid: u32, wait: Duration },
    #[error("the JS heap agent failed in pid {pid}: {reason}")]
    AgentFailed { pid: u32, reason: String },
    #[error(
        "the inspector of pid {pid} on {addr} may still be open: memtrace could not close it ({reason}); restarting the process closes it"
    )]
    LeftOpen { pid: u32, addr: SocketAddr, reason: String },
    #[error("the JS heap agent stopped answering: {0}")]
    AgentGone(String),
    #[error("read /proc/{pid}/{what}: {reason}")]
    Proc { pid: u32, what: String, reason: String },
    #[error("lock {path} (one inspector window per network namespace): {reason}")]
    Lock { path: String, reason: String },
    #[error("connect to the inspector on {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("inspector protocol: {0}")]
    Protocol(String),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("agent socket: {0}")]
    Channel(String),
}

impl JsHeapError {
    fn proc(pid: u32, what: &str, e: &std::io::Error) -> Self {
        Self::Proc { pid, what: what.to_string(), reason: e.to_string() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsHeapOptions {
    /// V8 keeps one sample per this many allocated bytes on average.
    pub interval_bytes: u64,
}

impl Default for JsHeapOptions {
    fn default() -> Self {
        Self { interval_bytes: 512 * 1024 }
    }
}

/// `process.memoryUsage()` of the target, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V8HeapStats {
    pub used: u64,
    pub total: u64,
    pub external: u64,
    pub array_buffers: u64,
}

impl From<MemoryUsage> for V8HeapStats {
    fn from(m: MemoryUsage) -> Self {
        Self { used: m.heap_used, total: m.heap_total, external: m.external, array_buffers: m.array_buffers }
    }
}

/// Live JS objects by stack at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JsHeapSnapshot {
    /// Most bytes first.
    pub stacks: Vec<JsStack>,
    pub stats: V8HeapStats,
    /// The sampling interval in force (another memtrace may have set it).
    pub interval_bytes: u64,
}

/// How the view was opened, for the status line and the README's claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenInfo {
    /// Where the inspector listened.
    pub inspector: SocketAddr,
    /// memtrace sent SIGUSR1 (and closed the listener again); `false` when the target
    /// had its inspector open already, which memtrace leaves open.
    pub opened_by_memtrace: bool,
    /// From SIGUSR1 to the listener gone from the target's socket table.
    pub window: Option<Duration>,
    pub node_version: String,
    /// The sampling interval in force (that of an earlier memtrace's agent, if shared).
    pub interval_bytes: u64,
    /// Another memtrace's agent was there already and is shared.
    pub shared: bool,
    /// The target has a network namespace of its own (a container): memtrace connected
    /// from inside it.
    pub in_other_netns: bool,
}

/// An open JS heap view. Dropping it closes the agent's socket: the agent stops.
pub struct JsHeapView {
    pid: u32,
    conn: AgentConn,
    info: OpenInfo,
    netns: NetNs,
}

impl JsHeapView {
    /// Opens the view on `pid` (see the module's doc for how and for how long the
    /// inspector listens). `Err(NotNode)` for a process that is not Node.js.
    pub async fn open(pid: u32, options: JsHeapOptions) -> Result<Self, JsHeapError> {
        let target = detect(pid)?;
        let netns = NetNs::of(pid)?;
        let _window_lock = netns.lock_inspector(LOCK_WAIT).await?;
        let agent = AgentListener::bind(&netns)?;
        let listeners = netns.listeners()?;
        if let Some(existing) = existing_inspector(&target, &netns, &listeners).await? {
            let (conn, info) =
                install(&target, &netns, existing.connect_addr(), agent, options, None).await?;
            return Ok(Self { pid, conn, info, netns });
        }
        check_can_signal(&target, &listeners)?;
        let before: HashSet<u64> = listeners.iter().map(|l| l.inode).collect();
        let signalled = Instant::now();
        // SAFETY: kill has no memory effects; the target catches SIGUSR1 (checked above).
        if unsafe { libc::kill(pid.cast_signed(), libc::SIGUSR1) } != 0 {
            return Err(JsHeapError::Proc {
                pid,
                what: "(SIGUSR1)".into(),
                reason: std::io::Error::last_os_error().to_string(),
            });
        }
        let listener = wait_for_listener(pid, &netns, &before).await?;
        log::debug!("js-heap: pid {pid} listens on {} after {:?}", listener.addr, signalled.elapsed());
        let addr = listener.connect_addr();
        match install(&target, &netns, addr, agent, options, Some(signalled)).await {
            Ok((conn, mut info)) => {
                info.window = Some(wait_closed(pid, &netns, &listener, signalled).await?);
                Ok(Self { pid, conn, info, netns })
            }
            Err(e) => {
                close_after_failure(pid, &netns, &listener).await?;
                Err(e)
            }
        }
    }

    #[must_use]
    pub fn info(&self) -> &OpenInfo {
        &self.info
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The live JS objects now. A snapshot that times out is still read by the next call
    /// (requests and replies stay paired).
    pub async fn snapshot(&mut self) -> Result<JsHeapSnapshot, JsHeapError> {
        let reply = self.conn.snapshot(SNAPSHOT_WAIT).await?;
        if let Some(reason) = reply.error {
            return Err(JsHeapError::AgentFailed { pid: self.pid, reason });
        }
        let profile =
            reply.profile.ok_or_else(|| JsHeapError::Protocol("a snapshot without a profile".into()))?;
        let interval_bytes = reply.interval.unwrap_or(self.info.interval_bytes);
        Ok(JsHeapSnapshot {
            stacks: live_stacks(&profile),
            stats: reply.memory.map(V8HeapStats::from).unwrap_or_default(),
            interval_bytes,
        })
    }

    /// Closes the inspector again when it listens anew where memtrace's window was, and
    /// returns where. One SIGUSR1 asks node's main thread to start the inspector by three
    /// paths (a libuv async, an environment interrupt and a second async send); one that
    /// runs after the agent's `_debugEnd()` starts it again, and so does a SIGUSR1 from
    /// anyone else. memtrace keeps closed the door it opened for as long as its agent is
    /// in the target. `Ok(None)` when nothing listens there, when the target had its
    /// inspector open before memtrace, and while another memtrace holds the namespace's
    /// window (that listener may be its own window).
    pub async fn keep_closed(&self) -> Result<Option<SocketAddr>, JsHeapError> {
        if !self.info.opened_by_memtrace || self.at_window()?.is_empty() {
            return Ok(None);
        }
        let _window_lock = match self.netns.lock_inspector(Duration::ZERO).await {
            Ok(lock) => lock,
            Err(JsHeapError::Lock { reason, .. }) => {
                log::debug!("js-heap: inspector check of pid {} skipped: {reason}", self.pid);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        // Again under the lock (another memtrace's window may have just closed), and only
        // then the target's open files (a busy service has thousands).
        let at_window = self.at_window()?;
        let owned = net::socket_inodes(self.pid)?;
        let Some(listener) = at_window.into_iter().find(|l| owned.contains(&l.inode)) else {
            return Ok(None);
        };
        close_after_failure(self.pid, &self.netns, &listener).await?;
        Ok(Some(listener.addr))
    }

    /// Listeners of the namespace where memtrace's window was.
    fn at_window(&self) -> Result<Vec<Listener>, JsHeapError> {
        Ok(self.netns.listeners()?.into_iter().filter(|l| l.connect_addr() == self.info.inspector).collect())
    }

    /// Stops the agent (it stops sampling and removes itself) and waits for it briefly.
    pub async fn close(self) {
        self.conn.close(Duration::from_secs(2)).await;
    }
}

/// A listener of the target that answers as Node's inspector: on the port its options
/// name, or any of its listeners when it was started with `--inspect=0`.
async fn existing_inspector(
    target: &NodeTarget,
    netns: &NetNs,
    listeners: &[Listener],
) -> Result<Option<Listener>, JsHeapError> {
    let owned = net::socket_inodes(target.pid)?;
    let port = target.options.inspect_port;
    for listener in listeners.iter().filter(|l| owned.contains(&l.inode)) {
        let candidate = listener.addr.port() == port || (port == 0 && target.options.inspect_at_start);
        if candidate && inspector::is_node_inspector(netns, listener.connect_addr()).await {
            return Ok(Some(*listener));
        }
    }
    Ok(None)
}

/// Refuses, with the reason, a target that SIGUSR1 would not open (or would kill).
fn check_can_signal(target: &NodeTarget, listeners: &[Listener]) -> Result<(), JsHeapError> {
    let pid = target.pid;
    if target.options.disable_sigusr1 {
        return Err(JsHeapError::Sigusr1Disabled { pid });
    }
    if !target.catches_sigusr1 {
        return Err(JsHeapError::Sigusr1NotCaught { pid });
    }
    let port = target.options.inspect_port;
    if port != 0
        && let Some(taken) = listeners.iter().find(|l| l.addr.port() == port)
    {
        let (holder, comm) = net::socket_holder(taken.inode).unwrap_or((0, "unknown".into()));
        return Err(JsHeapError::PortHeld { pid, port, holder, comm });
    }
    Ok(())
}

/// The listener that appeared after SIGUSR1: new in the namespace and the target's own.
async fn wait_for_listener(pid: u32, netns: &NetNs, before: &HashSet<u64>) -> Result<Listener, JsHeapError> {
    let deadline = Instant::now() + LISTEN_WAIT;
    let mut not_ours = HashSet::new();
    loop {
        let fresh: Vec<Listener> = netns
            .listeners()?
            .into_iter()
            .filter(|l| !before.contains(&l.inode) && !not_ours.contains(&l.inode))
            .collect();
        if !fresh.is_empty() {
            let owned = net::socket_inodes(pid)?;
            if let Some(l) = fresh.iter().find(|l| owned.contains(&l.inode)) {
                return Ok(*l);
            }
            not_ours.extend(fresh.iter().map(|l| l.inode));
        }
        if Instant::now() >= deadline {
            return Err(JsHeapError::NoListener { pid, wait: LISTEN_WAIT });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Connects, installs the agent (which first closes the listener when memtrace opened
/// it) and accepts the agent's connection.
async fn install(
    target: &NodeTarget,
    netns: &NetNs,
    addr: SocketAddr,
    agent: AgentListener,
    options: JsHeapOptions,
    signalled: Option<Instant>,
) -> Result<(AgentConn, OpenInfo), JsHeapError> {
    let pid = target.pid;
    let opened = signalled.is_some();
    let mut session = Session::open(netns, addr).await?;
    let agent_options = json!({
        "interval": options.interval_bytes,
        "socket": agent.agent_path(),
        "token": agent.token(),
        "closeInspector": opened,
    });
    let expression = bootstrap(&agent_options);
    let id = session.send_evaluate(&expression, opened).await?;
    if let Some(at) = signalled {
        log::debug!("js-heap: agent sent to pid {pid} {:?} after SIGUSR1", at.elapsed());
    }
    let (conn, hello) = if opened {
        // The agent closes the listener, and the session with it, before it answers:
        // its hello on the agent socket is the answer. The session is read meanwhile:
        // node's main thread waits in `_debugEnd()` until its I/O thread has closed every
        // WebSocket, which takes our answer to its close frame.
        let (accepted, _) =
            tokio::join!(agent.accept(pid, EVALUATE_WAIT), session.wait_closed(EVALUATE_WAIT));
        accepted?
    } else {
        if let Evaluated::Threw(reason) = session.evaluated(id, EVALUATE_WAIT).await? {
            return Err(JsHeapError::AgentFailed { pid, reason });
        }
        agent.accept(pid, EVALUATE_WAIT).await?
    };
    let info = OpenInfo {
        inspector: addr,
        opened_by_memtrace: opened,
        window: None,
        node_version: hello.node,
        interval_bytes: if hello.interval > 0 { hello.interval } else { options.interval_bytes },
        shared: hello.clients > 1,
        in_other_netns: netns.is_foreign(),
    };
    Ok((conn, info))
}

/// What memtrace evaluates: first of all, when memtrace opened the listener, it closes
/// it (the window ends as this evaluation starts; the in-process session does not need
/// it, and the answer to the evaluation is lost with the connection: the agent answers
/// over its socket). Then it compiles the agent under its own script name. `require` is
/// the console's (`includeCommandLineAPI`), there for ES module and `CommonJS` applications
/// alike; `process.mainModule`'s is the fallback.
fn bootstrap(options: &serde_json::Value) -> String {
    let source = serde_json::Value::String(AGENT_JS.trim_end().to_string());
    let url = profile::AGENT_URL;
    format!(
        "((load, options) => {{ \
           if (options.closeInspector) process._debugEnd(); \
           if (typeof load !== 'function') load = process.mainModule.require.bind(process.mainModule); \
           return load('vm').runInThisContext({source}, {{ filename: '{url}' }})(load, options); \
         }})(typeof require === 'function' ? require : undefined, {options})"
    )
}

/// Waits for `listener` to leave the target's socket table; the window it was open.
async fn wait_closed(
    pid: u32,
    netns: &NetNs,
    listener: &Listener,
    signalled: Instant,
) -> Result<Duration, JsHeapError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if !netns.listeners()?.iter().any(|l| l.inode == listener.inode) {
            return Ok(signalled.elapsed());
        }
        if Instant::now() >= deadline {
            close_after_failure(pid, netns, listener).await?;
            return Ok(signalled.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Closes a listener memtrace opened when installing the agent failed. Loud if it cannot.
async fn close_after_failure(pid: u32, netns: &NetNs, listener: &Listener) -> Result<(), JsHeapError> {
    let addr = listener.connect_addr();
    let still_open = || netns.listeners().map(|all| all.iter().any(|l| l.inode == listener.inode));
    if !still_open()? {
        return Ok(());
    }
    let reason = match Session::open(netns, addr).await {
        Ok(session) => (!session.close_listener(Duration::from_secs(2)).await)
            .then(|| "process._debugEnd() did not close it".to_string()),
        Err(e) => Some(e.to_string()),
    };
    if still_open()? {
        return Err(JsHeapError::LeftOpen {
            pid,
            addr,
            reason: reason.unwrap_or_else(|| "it still listens".into()),
        });
    }
    Ok(())
}
