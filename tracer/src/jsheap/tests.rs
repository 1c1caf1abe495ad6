//! The view against a real Node process (no root needed: memtrace signals and connects
//! to a child of the same user). Node is part of the toolchain here (DESIGN.md); a
//! machine without it fails these tests rather than skipping them.

use std::{
    collections::HashSet,
    io::{BufRead as _, BufReader},
    net::TcpStream,
    path::PathBuf,
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use super::{JsHeapOptions, JsHeapView, JsStack, net::socket_inodes};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// `node js_heap_keep.js`, killed when dropped.
struct Node {
    child: Child,
    stdout: BufReader<ChildStdout>,
    gate: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    fn spawn(flags: &[&str], entry: &str, keep_mib: u32) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let gate = dir.path().join("start");
        let mut child = Command::new("node")
            .args(flags)
            .arg(fixture(entry))
            .arg(keep_mib.to_string())
            .arg(&gate)
            .arg("1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn node (is node on PATH?)");
        let stdout = BufReader::new(child.stdout.take().expect("node stdout"));
        let mut node = Self { child, stdout, gate, _dir: dir };
        node.wait_for("waiting");
        node
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_for(&mut self, word: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).expect("read node stdout");
            assert!(n > 0, "node exited before printing {word:?}");
            if line.starts_with(word) {
                return line;
            }
        }
    }

    /// Releases the fixture and returns the bytes its kept jobs retain.
    fn keep(&mut self) -> u64 {
        std::fs::write(&self.gate, b"go").expect("open the gate");
        let line = self.wait_for("kept");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("bytes="))
            .and_then(|b| b.parse().ok())
            .unwrap_or_else(|| panic!("no bytes= in {line:?}"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes of the stacks whose first frame in the fixture is `function`.
fn held_by(stacks: &[JsStack], function: &str) -> u64 {
    stacks
        .iter()
        .filter(|s| {
            s.frames
                .iter()
                .find(|f| f.file.ends_with("js_heap_keep.js"))
                .is_some_and(|f| f.function == function)
        })
        .map(|s| s.bytes)
        .sum()
}

fn line_of(needle: &str) -> u32 {
    let text = std::fs::read_to_string(fixture("js_heap_keep.js")).expect("read fixture");
    let index = text.lines().position(|l| l.contains(needle)).expect("line in fixture");
    u32::try_from(index + 1).expect("line number")
}

/// Waits until the target holds no socket that it did not hold before the view.
fn assert_agent_gone(pid: u32, before: &HashSet<u64>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = socket_inodes(pid).expect("target sockets");
        if now.is_subset(before) {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} still holds the agent's socket: {now:?} vs {before:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn the_keeping_function_holds_the_live_js_heap_and_the_window_closes() {
    let mut node = Node::spawn(&[], "js_heap_keep.js", 48);
    let pid = node.pid();
    let sockets_before = socket_inodes(pid).expect("target sockets");
    let mut view =
        JsHeapView::open(pid, JsHeapOptions { interval_bytes: 32 * 1024 }).await.expect("open the view");
    let info = view.info().clone();
    assert!(info.opened_by_memtrace);
    let window = info.window.expect("a measured window");
    eprintln!("inspector listened {window:?} on {}", info.inspector);
    assert!(window < Duration::from_secs(1), "the inspector listened {window:?}");
    assert!(TcpStream::connect(info.inspector).is_err(), "the inspector still listens on {}", info.inspector);

    let kept = node.keep();
    let snapshot = view.snapshot().await.expect("snapshot");
    let keep = held_by(&snapshot.stacks, "keepJob");
    let drop = held_by(&snapshot.stacks, "dropJob");
    let total: u64 = snapshot.stacks.iter().map(|s| s.bytes).sum();
    // 48 MiB at a 32 KiB interval is ~1500 samples: a 2.6% standard error.
    let ratio = keep as f64 / kept as f64;
    assert!(
        (0.8..=1.2).contains(&ratio),
        "keepJob holds {keep} bytes by the profile, {kept} by the GC ({ratio:.2})"
    );
    assert!(drop < keep / 10, "dropJob holds {drop} bytes, keepJob {keep}");
    let top = snapshot
        .stacks
        .iter()
        .find(|s| s.frames.iter().any(|f| f.file.ends_with("js_heap_keep.js")))
        .expect("a fixture stack");
    let frame = top.frames.iter().find(|f| f.file.ends_with("js_heap_keep.js")).expect("fixture frame");
    assert_eq!((frame.function.as_str(), frame.line), ("keepJob", line_of("function keepJob(")));
    assert!(snapshot.stats.used >= kept, "heapUsed {} below the kept {kept}", snapshot.stats.used);
    assert!(snapshot.stats.total >= snapshot.stats.used);
    eprintln!(
        "keepJob {keep} of {total} sampled live bytes; GC says {kept}; heap used {}",
        snapshot.stats.used
    );

    view.close().await;
    assert_agent_gone(pid, &sockets_before);
}

#[tokio::test]
async fn dropping_the_view_stops_the_agent_and_a_second_view_opens_again() {
    let node = Node::spawn(&[], "js_heap_keep.js", 8);
    let pid = node.pid();
    let sockets_before = socket_inodes(pid).expect("target sockets");
    let view = JsHeapView::open(pid, JsHeapOptions::default()).await.expect("open the view");
    drop(view);
    assert_agent_gone(pid, &sockets_before);
    let mut again = JsHeapView::open(pid, JsHeapOptions::default()).await.expect("open the view again");
    assert!(!again.info().shared, "the first agent should be gone");
    again.snapshot().await.expect("snapshot");
    again.close().await;
    assert_agent_gone(pid, &sockets_before);
}

#[tokio::test]
async fn an_inspector_open_before_stays_open() {
    let mut node = Node::spawn(&["--inspect=127.0.0.1:0"], "js_heap_keep.js", 8);
    let pid = node.pid();
    let view = JsHeapView::open(pid, JsHeapOptions::default()).await.expect("open the view");
    let info = view.info().clone();
    assert!(!info.opened_by_memtrace);
    assert_eq!(info.window, None);
    node.keep();
    view.close().await;
    assert!(
        TcpStream::connect(info.inspector).is_ok(),
        "--inspect's listener on {} was closed",
        info.inspector
    );
}

#[tokio::test]
async fn an_esm_application_gets_the_view_too() {
    let mut node = Node::spawn(&[], "js_heap_keep.mjs", 16);
    let mut view = JsHeapView::open(node.pid(), JsHeapOptions { interval_bytes: 64 * 1024 })
        .await
        .expect("open the view");
    node.keep();
    let snapshot = view.snapshot().await.expect("snapshot");
    assert!(held_by(&snapshot.stacks, "keepJob") > 0, "no keepJob in {:?}", snapshot.stacks.first());
    view.close().await;
}

#[tokio::test]
async fn two_views_share_one_agent() {
    let mut node = Node::spawn(&[], "js_heap_keep.js", 8);
    let pid = node.pid();
    let sockets_before = socket_inodes(pid).expect("target sockets");
    let first =
        JsHeapView::open(pid, JsHeapOptions { interval_bytes: 128 * 1024 }).await.expect("first view");
    let mut second =
        JsHeapView::open(pid, JsHeapOptions { interval_bytes: 4096 }).await.expect("second view");
    assert!(second.info().shared);
    assert_eq!(second.info().interval_bytes, 128 * 1024, "the agent samples at the first view's interval");
    node.keep();
    first.close().await;
    let snapshot = second.snapshot().await.expect("the second view still samples");
    assert!(held_by(&snapshot.stacks, "keepJob") > 0);
    second.close().await;
    assert_agent_gone(pid, &sockets_before);
}
