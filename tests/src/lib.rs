//! Helpers for memtrace's integration tests.
//!
//! The tests run the real `memtrace` binary (built by the workspace) against fixture
//! programs with known behaviour and check its JSON report, as a user would. They load
//! BPF programs, so they need root; without it each test says so loudly and returns.
//!
//! Fixtures wait for a start file before they allocate: the test attaches memtrace,
//! waits for its "attached" status line, then creates the file ([`StartGate`]). Polling a
//! file is simpler than a signal handshake and cannot be lost if it happens early.
#![allow(
    clippy::missing_panics_doc,
    reason = "test helpers panic with a message instead of returning errors, to keep the backtrace"
)]

use std::{
    env,
    ffi::OsStr,
    fmt::Write as _,
    fs,
    io::{self, BufRead as _, BufReader, Read, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::Value;

pub const MIB: u64 = 1024 * 1024;

/// Returns `false`, after a loud message on stderr, when the test cannot run as this user.
#[must_use]
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    // Straight to fd 2: the test harness captures eprintln! of passing tests.
    let _ = write!(
        io::stderr(),
        "\n==================================================================\n\
         SKIPPED: needs root: {test} loads BPF programs (euid is {euid}).\n\
         Run the integration tests as root: sudo -E cargo test -p integration-tests\n\
         ==================================================================\n"
    );
    false
}

/// The workspace root (the parent of this crate).
#[must_use]
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

#[must_use]
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The binary under test: `$MEMTRACE_BIN`, else `memtrace` in the workspace's debug
/// target directory (`$CARGO_TARGET_DIR` respected).
#[must_use]
pub fn memtrace_bin() -> PathBuf {
    if let Some(bin) = env::var_os("MEMTRACE_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "MEMTRACE_BIN={} is not a file", bin.display());
        return bin;
    }
    let root = workspace_root();
    let target = env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir));
    let bin = target.join("debug").join("memtrace");
    assert!(
        bin.is_file(),
        "memtrace binary not found at {}: run `cargo build -p tracer` first (or set MEMTRACE_BIN)",
        bin.display()
    );
    bin
}

/// Compiles a C fixture from `tests/fixtures/<name>.c` into `out_dir`, with the flags the
/// fixtures are written for (frame pointers, no inlining, debug info).
#[must_use]
pub fn build_c_fixture(name: &str, out_dir: &Path) -> PathBuf {
    let src = fixtures_dir().join(format!("{name}.c"));
    let bin = out_dir.join(name);
    let output = Command::new("gcc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-fno-inline", "-fno-optimize-sibling-calls"])
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("run gcc for {}: {e} (is gcc installed?)", src.display()));
    assert!(
        output.status.success(),
        "gcc failed for {} ({}):\n{}",
        src.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    bin
}

/// The node binary: `$NODE`, else `node` on `PATH`.
#[must_use]
pub fn node_bin() -> PathBuf {
    env::var_os("NODE").map_or_else(|| PathBuf::from("node"), PathBuf::from)
}

/// Debian's node 18 (V8 10.2 in libnode, no `.symtab`) unpacked by `cargo xtask setup`:
/// a wrapper script that runs it. Panics, saying how to get it, when it is missing.
#[must_use]
pub fn node18_bin() -> PathBuf {
    let root = workspace_root();
    let target = env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir));
    let wrapper = target.join("fixtures/node18/node");
    assert!(
        wrapper.is_file(),
        "{} is missing: run `cargo xtask setup` (it unpacks Debian's node 18 there)",
        wrapper.display()
    );
    wrapper
}

/// The file a fixture waits for before it starts allocating.
pub struct StartGate {
    path: PathBuf,
}

impl StartGate {
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self { path: dir.join("start") }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn open(&self) {
        fs::write(&self.path, b"go\n")
            .unwrap_or_else(|e| panic!("create start file {}: {e}", self.path.display()));
    }
}

/// `node keep_buffers.js BUFFERS GATE`, with the flags that let memtrace name JS frames
/// (a perf map, interpreted frames on the native stack): keeps `buffers` 1 MiB Buffers
/// from `keepBuffers` once the gate opens.
#[must_use]
pub fn keep_buffers_command(buffers: u64, gate: &StartGate) -> Command {
    let mut cmd = Command::new(node_bin());
    cmd.args(["--perf-basic-prof", "--interpreted-frames-native-stack"])
        .arg(fixtures_dir().join("keep_buffers.js"))
        .arg(buffers.to_string())
        .arg(gate.path());
    cmd
}

/// Lines of a child's output, read on a thread, both kept and streamed.
struct LineReader {
    lines: Receiver<String>,
    all: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl LineReader {
    fn spawn(stream: impl Read + Send + 'static) -> Self {
        let (tx, lines) = mpsc::channel();
        let all = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&all);
        let thread = thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut kept) = kept.lock() {
                    kept.push(line.clone());
                }
                // The receiver may be gone; the line is still kept.
                let _ = tx.send(line);
            }
        });
        Self { lines, all, thread: Some(thread) }
    }

    /// Waits for a line containing `needle` (case-insensitive).
    fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        let needle = needle.to_lowercase();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.to_lowercase().contains(&needle) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("timed out after {timeout:?}"));
                }
                Err(RecvTimeoutError::Disconnected) => return Err("the stream closed".to_owned()),
            }
        }
    }

    fn text(&self) -> String {
        self.all.lock().map(|lines| lines.join("\n")).unwrap_or_default()
    }

    fn finish(&mut self) -> String {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.text()
    }
}

/// A fixture process, killed (by its pid) when dropped.
pub struct TestProcess {
    name: String,
    child: Child,
    stdout: LineReader,
    remove_on_drop: Vec<PathBuf>,
}

impl TestProcess {
    /// Spawns `cmd` with stdout piped (for [`Self::wait_for_stdout`]) and stderr inherited.
    #[must_use]
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn fixture {name} ({cmd:?}): {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("fixture {name}: no stdout pipe"));
        Self { name: name.to_owned(), child, stdout: LineReader::spawn(stdout), remove_on_drop: Vec::new() }
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stdout line containing `needle`; panics on timeout or exit.
    pub fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) -> String {
        match self.stdout.wait_for(needle, timeout) {
            Ok(line) => line,
            Err(why) => {
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "fixture {} (pid {}) did not print {needle:?}: {why}; exit status {status:?}; stdout so far:\n{}",
                    self.name,
                    self.pid(),
                    self.stdout.text()
                );
            }
        }
    }

    /// Deletes `path` when the process is dropped (e.g. node's `/tmp/perf-<pid>.map`).
    pub fn remove_on_drop(&mut self, path: PathBuf) {
        self.remove_on_drop.push(path);
    }
}

impl Drop for TestProcess {
    fn drop(&mut self) {
        // Child::kill signals this child's pid only.
        let _ = self.child.kill();
        let _ = self.child.wait();
        for path in &self.remove_on_drop {
            let _ = fs::remove_file(path);
        }
    }
}

/// A memory cgroup made for one test; removed on drop (after its process was killed).
pub struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    /// `None` when the machine has no memory controller (v1 or v2).
    #[must_use]
    pub fn new(name: &str, limit: u64) -> Option<Self> {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let (parent, limit_file) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.to_path_buf(), "memory.limit_in_bytes")
        } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (PathBuf::from("/sys/fs/cgroup"), "memory.max")
        } else {
            return None;
        };
        let cgroup = Self::under(&parent, name);
        let dir = &cgroup.dir;
        fs::write(dir.join(limit_file), limit.to_string())
            .unwrap_or_else(|e| panic!("set {limit_file} in {}: {e}", dir.display()));
        // No swap: the limit is reached by resident memory, fast and deterministically.
        let _ = fs::write(dir.join("memory.swappiness"), "0");
        let _ = fs::write(dir.join("memory.swap.max"), "0");
        Some(cgroup)
    }

    /// A cgroup for one test under `root` (any hierarchy), with no limit set.
    #[must_use]
    pub fn under(root: &Path, name: &str) -> Self {
        let dir = root.join(format!("memtrace-test-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create cgroup {}: {e}", dir.display()));
        Self { dir }
    }

    /// Its directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn add(&self, pid: u32) {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", self.dir.display()));
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove cgroup {}", self.dir.display());
    }
}

/// What a finished memtrace run printed.
#[derive(Debug)]
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    /// Both streams, for messages and for searching.
    #[must_use]
    pub fn combined(&self) -> String {
        format!("--- stdout ---\n{}\n--- stderr ---\n{}", self.stdout, self.stderr)
    }
}

/// A running `memtrace`, killed when dropped if it is still running.
pub struct Memtrace {
    child: Child,
    stdout: LineReader,
    stderr: LineReader,
}

impl Memtrace {
    #[must_use]
    pub fn spawn<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_with_env(args, std::iter::empty::<(&str, &str)>())
    }

    /// [`Self::spawn`] with extra environment variables.
    #[must_use]
    pub fn spawn_with_env<I, S, E, K, V>(args: I, env: E) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
        E: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let bin = memtrace_bin();
        let mut cmd = Command::new(&bin);
        cmd.args(args).envs(env).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("memtrace: no stdout pipe"));
        let stderr = child.stderr.take().unwrap_or_else(|| panic!("memtrace: no stderr pipe"));
        Self { child, stdout: LineReader::spawn(stdout), stderr: LineReader::spawn(stderr) }
    }

    /// `memtrace attach <pid> --duration <duration> --json <json>`.
    #[must_use]
    pub fn attach(pid: u32, duration: &str, json: &Path) -> Self {
        let pid = pid.to_string();
        let args: [&OsStr; 6] = [
            "attach".as_ref(),
            pid.as_ref(),
            "--duration".as_ref(),
            duration.as_ref(),
            "--json".as_ref(),
            json.as_os_str(),
        ];
        Self::spawn(args)
    }

    /// Runs memtrace to completion with `args`.
    #[must_use]
    pub fn run<I, S>(args: I, timeout: Duration) -> RunOutput
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn(args).wait(timeout)
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stderr line containing `needle` (case-insensitive); panics with what
    /// memtrace printed if it does not come in time.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        match self.stderr.wait_for(needle, timeout) {
            Ok(line) => line,
            Err(why) => {
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "memtrace did not print {needle:?} on stderr: {why}; exit status {status:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.stdout.text(),
                    self.stderr.text()
                );
            }
        }
    }

    /// Stops memtrace the way a user does (SIGINT, Ctrl-C) and waits for it to write its
    /// outputs and exit; kills it and panics after `timeout`. For tests that read memtrace
    /// while it runs (metrics, the live view): a fixed `--duration` would race the reading.
    #[must_use]
    pub fn stop(mut self, timeout: Duration) -> RunOutput {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: signals the memtrace process this harness spawned, by its pid.
            unsafe { libc::kill(self.pid().cast_signed(), libc::SIGINT) };
        }
        self.wait(timeout)
    }

    /// Waits for memtrace to exit; kills it and panics after `timeout`.
    #[must_use]
    pub fn wait(mut self, timeout: Duration) -> RunOutput {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "memtrace still running after {timeout:?}; killed it\n--- stdout ---\n{}\n--- stderr ---\n{}",
                        self.stdout.text(),
                        self.stderr.text()
                    );
                }
                Err(e) => panic!("wait for memtrace: {e}"),
            }
        };
        RunOutput { status, stdout: self.stdout.finish(), stderr: self.stderr.finish() }
    }
}

impl Drop for Memtrace {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The run every gated fixture test makes: `memtrace` is started (it must print
/// "attached"), then the fixture is let go and runs until it prints "done" (within
/// `done_within`), then memtrace must exit successfully (within `exit_within`).
pub fn trace_gated(
    memtrace: Memtrace,
    fixture: &mut TestProcess,
    gate: &StartGate,
    done_within: Duration,
    exit_within: Duration,
) -> RunOutput {
    let mut memtrace = memtrace;
    memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    gate.open();
    fixture.wait_for_stdout("done", done_within);
    let out = memtrace.wait(exit_within);
    assert!(out.status.success(), "memtrace attach exited with {}\n{}", out.status, out.combined());
    out
}

/// The JSON report (`--json`), read as an outside tool would: by the documented schema.
pub struct Report {
    pub json: Value,
}

impl Report {
    #[must_use]
    pub fn read(path: &Path) -> Self {
        let text =
            fs::read_to_string(path).unwrap_or_else(|e| panic!("read JSON report {}: {e}", path.display()));
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("parse JSON report {}: {e}", path.display()));
        Self { json }
    }

    #[must_use]
    pub fn target_pid(&self) -> Option<u64> {
        self.json.pointer("/target/pid").and_then(Value::as_u64)
    }

    /// Flagged suspects (`leaks` of the JSON), most suspect first.
    #[must_use]
    pub fn leaks(&self) -> Vec<Leak<'_>> {
        self.list("/leaks")
    }

    /// Every suspect: flagged ones, then the others (warm-up, churn, unattributed), then
    /// the stacks that extended segments.
    #[must_use]
    pub fn suspects(&self) -> Vec<Leak<'_>> {
        let mut all = self.leaks();
        all.extend(self.list("/other_suspects"));
        if let Some(segments) = self.json.get("segments").and_then(Value::as_array) {
            for seg in segments {
                all.extend(
                    seg.get("extended_by")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .map(|json| Leak { json }),
                );
            }
        }
        all
    }

    /// Segments (`malloc-arena`, `v8-heap`) with their verdicts.
    #[must_use]
    pub fn segments(&self) -> Vec<(&str, &str)> {
        self.json
            .get("segments")
            .and_then(Value::as_array)
            .map(|s| {
                s.iter()
                    .map(|seg| {
                        let field = |k| seg.get(k).and_then(Value::as_str).unwrap_or("");
                        (field("kind"), field("verdict"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn list(&self, pointer: &str) -> Vec<Leak<'_>> {
        self.json
            .pointer(pointer)
            .and_then(Value::as_array)
            .map(|leaks| leaks.iter().map(|json| Leak { json }).collect())
            .unwrap_or_default()
    }

    /// Suspects (any list) with a frame for which `pred` holds.
    #[must_use]
    pub fn leaks_with_frame(&self, pred: impl Fn(&Frame<'_>) -> bool) -> Vec<Leak<'_>> {
        self.suspects().into_iter().filter(|leak| leak.frames().iter().any(&pred)).collect()
    }

    /// A readable summary of the top leaks, for assertion messages.
    #[must_use]
    pub fn summary(&self) -> String {
        let leaks = self.suspects();
        let mut out = format!(
            "{} suspect(s), {} flagged, segments {:?}, lost_events={}, target={}\n",
            leaks.len(),
            self.leaks().len(),
            self.segments(),
            self.json.get("lost_events").unwrap_or(&Value::Null),
            self.json.get("target").unwrap_or(&Value::Null)
        );
        for leak in leaks.iter().take(15) {
            let frames: Vec<String> = leak.frames().iter().take(32).map(Frame::label).collect();
            let _ = writeln!(
                out,
                "  {:>12} bytes {:>6} allocs {:?} {} culprit {} pids {:?}: {}",
                leak.bytes(),
                leak.count(),
                leak.sources(),
                leak.verdict(),
                leak.culprit(),
                leak.processes(),
                frames.join(" <- ")
            );
        }
        out
    }
}

pub struct Leak<'a> {
    pub json: &'a Value,
}

impl<'a> Leak<'a> {
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.json.get("bytes").and_then(Value::as_u64).unwrap_or(0)
    }

    #[must_use]
    pub fn count(&self) -> u64 {
        self.json.get("count").and_then(Value::as_u64).unwrap_or(0)
    }

    #[must_use]
    pub fn sources(&self) -> Vec<&'a str> {
        self.json
            .get("sources")
            .and_then(Value::as_array)
            .map(|s| s.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }

    #[must_use]
    pub fn verdict(&self) -> &'a str {
        self.json.get("verdict").and_then(Value::as_str).unwrap_or("")
    }

    /// The culprit's function name.
    #[must_use]
    pub fn culprit(&self) -> &'a str {
        self.json.pointer("/culprit/function").and_then(Value::as_str).unwrap_or("")
    }

    /// Bytes in one view (`mmap`, `faults`, `malloc`, `js-heap`, `brk`).
    #[must_use]
    pub fn bytes_in(&self, source: &str) -> u64 {
        self.json
            .get("evidence")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|e| e.get("source").and_then(Value::as_str) == Some(source))
            .filter_map(|e| e.get("bytes").and_then(Value::as_u64))
            .sum()
    }

    /// The process holding the most of it.
    #[must_use]
    pub fn pid(&self) -> u64 {
        self.json.get("pid").and_then(Value::as_u64).unwrap_or(0)
    }

    /// Its memory per process: (pid, bytes, exited), most first.
    #[must_use]
    pub fn processes(&self) -> Vec<(u64, u64, bool)> {
        self.json
            .get("processes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|p| {
                let int = |k| p.get(k).and_then(Value::as_u64).unwrap_or(0);
                (int("pid"), int("bytes"), p.get("exited").and_then(Value::as_bool).unwrap_or(false))
            })
            .collect()
    }

    /// Leaf first.
    #[must_use]
    pub fn frames(&self) -> Vec<Frame<'a>> {
        self.json
            .get("frames")
            .and_then(Value::as_array)
            .map(|frames| frames.iter().map(|json| Frame { json }).collect())
            .unwrap_or_default()
    }
}

pub struct Frame<'a> {
    pub json: &'a Value,
}

impl<'a> Frame<'a> {
    fn str_field(&self, key: &str) -> &'a str {
        self.json.get(key).and_then(Value::as_str).unwrap_or("")
    }

    #[must_use]
    pub fn function(&self) -> &'a str {
        self.str_field("function")
    }

    #[must_use]
    pub fn module(&self) -> &'a str {
        self.str_field("module")
    }

    #[must_use]
    pub fn file(&self) -> &'a str {
        self.str_field("file")
    }

    #[must_use]
    pub fn line(&self) -> u64 {
        self.json.get("line").and_then(Value::as_u64).unwrap_or(0)
    }

    #[must_use]
    pub fn kind(&self) -> &'a str {
        self.str_field("kind")
    }

    /// Whether this frame names `name`: exactly, or as V8 writes it in perf maps
    /// (`~name`, `*name`, `JS:*name file:line`).
    #[must_use]
    pub fn names(&self, name: &str) -> bool {
        let function = self.function();
        function == name
            || function
                .split(|c: char| c.is_whitespace() || c == ':')
                .any(|word| word.trim_start_matches(['~', '*', '^', '+']) == name)
    }

    #[must_use]
    pub fn label(&self) -> String {
        // C++ names with their parameter lists drown the stack; keep the name.
        let function = self.function().replace("(anonymous namespace)", "{anon}");
        let function = match function.split_once('(') {
            Some((name, _)) if self.kind() == "native" => name,
            _ => function.as_str(),
        };
        let mut label = format!("{function}[{}]", self.kind());
        if !self.file().is_empty() {
            let file = Path::new(self.file()).file_name().map_or(self.file().into(), |f| f.to_string_lossy());
            let _ = write!(label, " {file}:{}", self.line());
        }
        label
    }
}

/// Path of the perf map node writes with `--perf-basic-prof`.
#[must_use]
pub fn perf_map_path(pid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/perf-{pid}.map"))
}

/// A pid that no process has now.
#[must_use]
pub fn unused_pid() -> u32 {
    (100_000..=999_999).rev().find(|pid| !Path::new(&format!("/proc/{pid}")).exists()).unwrap_or(999_999)
}

/// A browser for the tests that open memtrace's SVG: `$CHROMIUM`, else `chromium`,
/// `chromium-browser` or `google-chrome` on `PATH`.
#[must_use]
pub fn chromium_bin() -> Option<PathBuf> {
    if let Some(bin) = env::var_os("CHROMIUM") {
        return Some(PathBuf::from(bin));
    }
    let path = env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// The browser, or `None` after a loud message on stderr when there is none.
#[must_use]
pub fn require_chromium(test: &str) -> Option<PathBuf> {
    let bin = chromium_bin();
    if bin.is_none() {
        eprintln!();
        eprintln!("==================================================================");
        eprintln!("SKIPPED: needs a browser: {test} opens an SVG in headless Chromium.");
        eprintln!("Install it (apt-get install -y chromium; `cargo xtask setup` does) or set CHROMIUM.");
        eprintln!("==================================================================");
    }
    bin
}

/// What headless Chromium made of a page.
#[derive(Debug)]
pub struct BrowserPage {
    /// The document after its load handlers ran (`--dump-dom`).
    pub dom: String,
    /// Uncaught exceptions, failed assertions and `console.error` lines.
    pub script_errors: Vec<String>,
    /// Everything the browser logged, for assertion messages.
    pub log: String,
}

/// Loads `file` (plus `query`, e.g. `?s=term`) in headless Chromium with a fresh
/// profile under `scratch`, and returns the DOM after `onload` and the script errors
/// the page logged. Panics if the browser fails or takes longer than `timeout`.
#[must_use]
pub fn load_in_chromium(
    chromium: &Path,
    file: &Path,
    query: &str,
    scratch: &Path,
    timeout: Duration,
) -> BrowserPage {
    let file = file.canonicalize().unwrap_or_else(|e| panic!("resolve {}: {e}", file.display()));
    let profile = tempfile::tempdir_in(scratch).unwrap_or_else(|e| panic!("make a browser profile: {e}"));
    let out_path = profile.path().join("dom.out");
    let log_path = profile.path().join("browser.log");
    let out = fs::File::create(&out_path).unwrap_or_else(|e| panic!("create {}: {e}", out_path.display()));
    let log = fs::File::create(&log_path).unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
    let mut cmd = Command::new(chromium);
    cmd.args([
        "--headless",
        // Tests run as root, where Chromium's sandbox refuses to start.
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-first-run",
        "--no-default-browser-check",
        // Console messages, uncaught exceptions included, go to stderr as CONSOLE lines.
        "--enable-logging=stderr",
        "--v=0",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg("--dump-dom")
    .arg(format!("file://{}{query}", file.display()))
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(log);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {}: {e}", chromium.display()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} still running after {timeout:?}; killed it\n{}",
                    chromium.display(),
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            Err(e) => panic!("wait for {}: {e}", chromium.display()),
        }
    };
    let dom = fs::read_to_string(&out_path).unwrap_or_default();
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "{} exited with {status}\n{log}", chromium.display());
    let script_errors = log
        .lines()
        .filter(|line| line.contains("CONSOLE"))
        .filter(|line| {
            line.contains("Uncaught") || line.contains("Assertion failed") || line.contains("ERROR:CONSOLE")
        })
        .map(str::to_owned)
        .collect();
    BrowserPage { dom, script_errors, log }
}
