//! The JS heap view on a Node process started with no flag: the JS function that keeps
//! objects on the V8 heap is the first culprit, and memtrace leaves no inspector and no
//! agent behind however it stops.

use std::{
    collections::HashSet,
    ffi::OsStr,
    fs,
    net::{TcpListener, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{Memtrace, Report, StartGate, TestProcess, fixtures_dir, node_bin, require_root};

/// V8 samples one allocation per 512 KiB (memtrace's default): 64 MiB kept is ~128
/// samples, a 9% standard error; the test allows 30%.
const KEEP_MIB: u64 = 64;
const TOLERANCE: f64 = 0.30;

fn fixture(flags: &[&str], seconds: u32, gate: &StartGate) -> TestProcess {
    let mut cmd = Command::new(node_bin());
    cmd.args(flags)
        .arg(fixtures_dir().join("js_heap_keep.js"))
        .arg(KEEP_MIB.to_string())
        .arg(gate.path())
        .arg(seconds.to_string());
    let mut node = TestProcess::spawn("js_heap_keep", cmd);
    node.wait_for_stdout("waiting", Duration::from_secs(30));
    node
}

fn kept_bytes(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("bytes="))
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("no bytes= in {line:?}"))
}

fn keep_job_line() -> u64 {
    let text = fs::read_to_string(fixtures_dir().join("js_heap_keep.js")).expect("read the fixture");
    let index =
        text.lines().position(|l| l.starts_with("function keepJob(")).expect("keepJob in the fixture");
    index as u64 + 1
}

/// Socket inodes among `pid`'s open files.
fn sockets(pid: u32) -> HashSet<u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| fs::read_link(e.path()).ok())
                .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Ports on which `pid` itself listens (TCP, IPv4 and IPv6).
fn listening_ports(pid: u32) -> Vec<u16> {
    let own = sockets(pid);
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|t| fs::read_to_string(format!("/proc/{pid}/net/{t}")).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    let inode: u64 = f.get(9)?.parse().ok()?;
                    let port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
                    (f.get(3) == Some(&"0A") && own.contains(&inode)).then_some(port)
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Within `within`, the target listens on no port and holds no socket it did not hold
/// before memtrace (the agent's): nothing memtrace opened is left.
fn assert_nothing_left(pid: u32, before: &HashSet<u64>, within: Duration, when: &str) {
    let deadline = Instant::now() + within;
    loop {
        let ports = listening_ports(pid);
        let extra: Vec<u64> = sockets(pid).difference(before).copied().collect();
        if ports.is_empty() && extra.is_empty() {
            assert!(
                TcpStream::connect("127.0.0.1:9229").is_err(),
                "{when}: something listens on 127.0.0.1:9229"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{when}: after {within:?} pid {pid} still listens on {ports:?} and holds sockets {extra:?} it did not hold before memtrace"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory effects; `pid` is a memtrace this test started.
    let rc = unsafe { libc::kill(pid.cast_signed(), sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

#[test]
fn the_keeping_js_function_is_the_first_culprit_and_no_inspector_is_left_after_sigint() {
    if !require_root("the_keeping_js_function_is_the_first_culprit_and_no_inspector_is_left_after_sigint") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = StartGate::new(dir.path());
    // Kept over 20 s, so that the growth spans most snapshots (a debug memtrace takes
    // seconds to symbolize node the first time).
    let mut node = fixture(&[], 20, &gate);
    let pid = node.pid();
    let before = sockets(pid);
    let json = dir.path().join("report.json");
    let pid_arg = pid.to_string();
    let mut memtrace = Memtrace::spawn::<_, &OsStr>([
        "attach".as_ref(),
        pid_arg.as_ref(),
        "--interval".as_ref(),
        "1s".as_ref(),
        // A point of the view's growth every second (30 s by default, for the target's
        // sake: each read is a full GC in it).
        "--js-heap-every".as_ref(),
        "1s".as_ref(),
        "--json".as_ref(),
        json.as_os_str(),
    ]);
    let opened = memtrace.wait_for_stderr("js-heap:", Duration::from_mins(1));
    eprintln!("{opened}");
    assert!(opened.contains("sampling heap profiler on") && opened.contains("is closed"), "{opened}");
    memtrace.wait_for_stderr("attached", Duration::from_mins(1));
    gate.open();
    let kept = kept_bytes(&node.wait_for_stdout("kept", Duration::from_mins(2)));
    signal(memtrace.pid(), libc::SIGINT);
    let out = memtrace.wait(Duration::from_mins(1));
    assert!(out.status.success(), "memtrace exited with {}\n{}", out.status, out.combined());

    let report = Report::read(&json);
    let summary = report.summary();
    let leaks = report.leaks();
    let first = leaks.first().unwrap_or_else(|| panic!("no leak flagged:\n{summary}"));
    assert_eq!(first.culprit(), "keepJob", "first culprit:\n{summary}");
    let culprit = first.json.get("culprit").expect("culprit frame");
    assert!(
        culprit["file"].as_str().is_some_and(|f| f.ends_with("js_heap_keep.js"))
            && culprit["line"] == keep_job_line(),
        "keepJob's file:line is {culprit}, expected js_heap_keep.js:{}",
        keep_job_line()
    );
    let held = first.bytes_in("js-heap");
    let ratio = held as f64 / kept as f64;
    assert!(
        (1.0 - TOLERANCE..=1.0 + TOLERANCE).contains(&ratio),
        "keepJob holds {held} bytes in the js-heap view; the fixture's garbage collector says {kept} ({ratio:.2})\n{summary}"
    );
    assert!(report.leaks().iter().all(|l| l.culprit() != "dropJob"), "dropJob flagged:\n{summary}");
    let timeline = report.json["timeline"].as_array().expect("timeline");
    let used = timeline.last().and_then(|p| p["v8_heap_used_bytes"].as_u64()).unwrap_or(0);
    assert!(used >= kept, "the timeline's V8 heap used ({used}) is below what the fixture keeps ({kept})");
    eprintln!(
        "keepJob: {held} bytes by the js-heap view, {kept} by the GC ({ratio:.2}); V8 heap used {used}"
    );
    assert_nothing_left(pid, &before, Duration::from_secs(5), "after SIGINT");
}

#[test]
fn nothing_is_left_after_a_normal_exit_for_two_node_processes_one_after_the_other() {
    if !require_root("nothing_is_left_after_a_normal_exit_for_two_node_processes_one_after_the_other") {
        return;
    }
    for round in 1..=2 {
        let dir = tempfile::tempdir().expect("temp dir");
        let gate = StartGate::new(dir.path());
        let mut node = fixture(&[], 2, &gate);
        let pid = node.pid();
        let before = sockets(pid);
        let json = dir.path().join("report.json");
        let memtrace = Memtrace::attach(pid, "8s", &json);
        let out = integration_tests::trace_gated(
            memtrace,
            &mut node,
            &gate,
            Duration::from_mins(1),
            Duration::from_mins(1),
        );
        let report = Report::read(&json);
        assert!(
            report.suspects().iter().any(|s| s.culprit() == "keepJob" && s.bytes_in("js-heap") > 0),
            "round {round}: no js-heap evidence for keepJob\n{}\n{}",
            report.summary(),
            out.stderr
        );
        assert_nothing_left(
            pid,
            &before,
            Duration::from_secs(5),
            &format!("round {round}, after --duration"),
        );
    }
}

/// A fixture held at its gate for the whole test, and a memtrace attached to it, its JS
/// heap view open.
struct Held {
    _dir: tempfile::TempDir,
    _gate: StartGate,
    _node: TestProcess,
    pid: u32,
    /// The fixture's sockets before memtrace.
    before: HashSet<u64>,
    memtrace: Memtrace,
}

fn attach_to_held_fixture(extra: &[&str]) -> Held {
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = StartGate::new(dir.path());
    let node = fixture(&[], 2, &gate);
    let pid = node.pid();
    let before = sockets(pid);
    let pid_arg = pid.to_string();
    let mut memtrace = Memtrace::spawn(["attach", pid_arg.as_str()].into_iter().chain(extra.iter().copied()));
    memtrace.wait_for_stderr("attached", Duration::from_mins(1));
    Held { _dir: dir, _gate: gate, _node: node, pid, before, memtrace }
}

#[test]
fn the_agent_goes_within_seconds_of_a_sigkilled_memtrace() {
    if !require_root("the_agent_goes_within_seconds_of_a_sigkilled_memtrace") {
        return;
    }
    // Bound whole: the fixture lives as long as `held` (a `..` pattern would drop it here).
    let held = attach_to_held_fixture(&[]);
    let (pid, before, memtrace) = (held.pid, &held.before, held.memtrace);
    assert!(
        sockets(pid).len() > before.len(),
        "the agent holds no socket in pid {pid}: was the view opened?"
    );
    signal(memtrace.pid(), libc::SIGKILL);
    let _ = memtrace.wait(Duration::from_secs(10));
    assert_nothing_left(pid, before, Duration::from_secs(5), "after SIGKILL");
    assert!(fs::metadata(format!("/proc/{pid}")).is_ok(), "the target died with memtrace");
}

/// One SIGUSR1 asks node to start its inspector by several paths, and a late one (or any
/// later SIGUSR1) opens it again after memtrace's window closed: memtrace closes it again
/// within seconds, says so, and leaves nothing at exit.
#[test]
fn an_inspector_opened_again_during_the_trace_is_closed_again() {
    if !require_root("an_inspector_opened_again_during_the_trace_is_closed_again") {
        return;
    }
    let held = attach_to_held_fixture(&["--duration", "2m"]);
    let (pid, before, mut memtrace) = (held.pid, &held.before, held.memtrace);
    assert!(
        listening_ports(pid).is_empty(),
        "pid {pid} listens after memtrace's window: {:?}",
        listening_ports(pid)
    );
    // What a late start path does: the inspector opens on the same address.
    // (memtrace may close it before this test sees it: what memtrace says is the proof.)
    signal(pid, libc::SIGUSR1);
    let said = memtrace.wait_for_stderr("listened again", Duration::from_secs(10));
    assert!(said.contains("127.0.0.1:9229") && said.contains("closed it again"), "{said}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !listening_ports(pid).is_empty() {
        assert!(Instant::now() < deadline, "pid {pid} still listens on {:?}", listening_ports(pid));
        thread::sleep(Duration::from_millis(20));
    }
    let out = memtrace.stop(Duration::from_mins(1));
    assert!(out.status.success(), "memtrace exited with {}\n{}", out.status, out.combined());
    assert_nothing_left(pid, before, Duration::from_secs(5), "after SIGINT");
}

#[test]
fn a_target_started_with_inspect_keeps_its_inspector() {
    if !require_root("a_target_started_with_inspect_keeps_its_inspector") {
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = StartGate::new(dir.path());
    let inspect = format!("--inspect=127.0.0.1:{port}");
    let mut node = fixture(&[&inspect], 2, &gate);
    let pid = node.pid();
    let json = dir.path().join("report.json");
    let memtrace = Memtrace::attach(pid, "6s", &json);
    let out = integration_tests::trace_gated(
        memtrace,
        &mut node,
        &gate,
        Duration::from_mins(1),
        Duration::from_mins(1),
    );
    assert!(out.stderr.contains("left open"), "memtrace did not use the open inspector:\n{}", out.stderr);
    let report = Report::read(&json);
    assert!(
        report.suspects().iter().any(|s| s.culprit() == "keepJob" && s.bytes_in("js-heap") > 0),
        "no js-heap evidence for keepJob\n{}",
        report.summary()
    );
    assert_eq!(listening_ports(pid), [port], "the --inspect listener of pid {pid}");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok(), "--inspect's port {port} no longer accepts");
}

#[test]
fn memtrace_run_opens_the_view_once_node_is_up() {
    if !require_root("memtrace_run_opens_the_view_once_node_is_up") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = StartGate::new(dir.path());
    let json = dir.path().join("report.json");
    let script = fixtures_dir().join("js_heap_keep.js");
    let node = node_bin();
    let mut memtrace = Memtrace::spawn::<_, &OsStr>([
        "run".as_ref(),
        "--duration".as_ref(),
        "15s".as_ref(),
        "--json".as_ref(),
        json.as_os_str(),
        "--".as_ref(),
        node.as_os_str(),
        script.as_os_str(),
        "16".as_ref(),
        gate.path().as_os_str(),
        "1".as_ref(),
    ]);
    let opened = memtrace.wait_for_stderr("js-heap:", Duration::from_mins(1));
    assert!(opened.contains("sampling heap profiler on"), "{opened}");
    gate.open();
    let out = memtrace.wait(Duration::from_mins(1));
    assert!(out.status.success(), "memtrace run exited with {}\n{}", out.status, out.combined());
    let report = Report::read(&json);
    assert!(
        report.suspects().iter().any(|s| s.culprit() == "keepJob" && s.bytes_in("js-heap") > 0),
        "no js-heap evidence for keepJob\n{}",
        report.summary()
    );
}
