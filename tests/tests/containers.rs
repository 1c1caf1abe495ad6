//! A target in its own pid and mount namespaces, as in a container
//! (`unshare --pid --mount --fork`): node runs as pid 1 there, with its perf map in a /tmp
//! of its own that the host's /tmp does not show. memtrace reads the perf map through
//! `/proc/PID/root`, by the pid node knows itself by, names the JS function that keeps the
//! memory, and shows both pids.

use std::{path::Path, process::Command, time::Duration};

use integration_tests::{
    MIB, Memtrace, Report, StartGate, TestProcess, fixtures_dir, node_bin, require_root, workspace_root,
};

const BUFFERS: u64 = 24;

/// The host pid of the only child of `pid` (unshare's forked child).
fn only_child(pid: u32) -> u32 {
    for _ in 0..100 {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(child) = children.split_whitespace().next().and_then(|c| c.parse().ok()) {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("unshare (pid {pid}) forked no child");
}

#[test]
fn node_in_its_own_pid_and_mount_namespace_is_named_through_its_root() {
    if !require_root("node_in_its_own_pid_and_mount_namespace_is_named_through_its_root") {
        return;
    }
    // Not under /tmp: the fixture's own /tmp hides the host's.
    let scratch = workspace_root().join("target");
    let dir = tempfile::tempdir_in(&scratch).expect("create temp dir under target/");
    let gate = StartGate::new(dir.path());
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--mount-proc", "--fork", "--kill-child", "--", "sh", "-c"])
        .arg("mount -t tmpfs tmpfs /tmp && exec \"$0\" \"$@\"")
        .arg(node_bin())
        .args(["--perf-basic-prof", "--interpreted-frames-native-stack"])
        .arg(fixtures_dir().join("keep_buffers.js"))
        .arg(BUFFERS.to_string())
        .arg(gate.path())
        // V8 writes isolate-*.log files into the working directory.
        .current_dir(dir.path());
    let mut fixture = TestProcess::spawn("keep_buffers in namespaces", cmd);
    let waiting = fixture.wait_for_stdout("waiting", Duration::from_secs(20));
    assert_eq!(waiting.trim(), "waiting pid=1", "node is pid 1 in its own namespace");
    let node = only_child(fixture.pid());
    let ns_map = format!("/proc/{node}/root/tmp/perf-1.map");
    assert!(Path::new(&ns_map).is_file(), "node wrote its perf map in its own /tmp ({ns_map})");
    for host_map in [format!("/tmp/perf-{node}.map"), "/tmp/perf-1.map".to_string()] {
        assert!(
            !Path::new(&host_map).exists(),
            "{host_map} exists on the host: the test would not show anything"
        );
    }

    let json = dir.path().join("report.json");
    let node_pid = node.to_string();
    let mut memtrace = Memtrace::spawn([
        "-vv".as_ref(),
        "attach".as_ref(),
        node_pid.as_ref(),
        "--js-heap".as_ref(),
        "off".as_ref(),
        "--duration".as_ref(),
        "8s".as_ref(),
        "--json".as_ref(),
        json.as_os_str(),
    ]);
    memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    gate.open();
    fixture.wait_for_stdout("done", Duration::from_secs(30));
    let out = memtrace.wait(Duration::from_mins(1));
    assert!(out.status.success(), "memtrace attach exited with {}\n{}", out.status, out.combined());
    assert!(
        out.stderr.contains(&format!("reading JIT symbols from {ns_map}")),
        "the perf map was read through the process's root, by its namespace pid\n{}",
        out.stderr.lines().filter(|l| l.contains("perf")).collect::<Vec<_>>().join("\n")
    );
    let report = Report::read(&json);
    let summary = report.summary();
    eprintln!("{summary}");

    let keeping = report.leaks_with_frame(|f| f.names("keepBuffers") && f.kind() == "js");
    assert!(!keeping.is_empty(), "no suspect with a JS keepBuffers frame\n{summary}\n{}", out.stdout);
    // The mapped view's suspect (a faults-only one may name keepBuffers too).
    let mapped = keeping.iter().map(|l| l.bytes_in("mmap")).max().unwrap_or(0);
    assert!(
        mapped.abs_diff(BUFFERS * MIB) <= BUFFERS * MIB / 10,
        "keepBuffers holds {mapped} mapped bytes, expected {BUFFERS} MiB ±10%\n{summary}"
    );
    let processes = report.json.get("processes").and_then(|p| p.as_array()).expect("processes list");
    let entry = processes
        .iter()
        .find(|p| p.get("pid").and_then(serde_json::Value::as_u64) == Some(u64::from(node)))
        .unwrap_or_else(|| panic!("pid {node} not in {processes:?}"));
    assert_eq!(entry.get("ns_pid").and_then(serde_json::Value::as_u64), Some(1), "{entry}");
    assert!(
        out.stdout.starts_with(&format!("memtrace report for pid {node} (node, pid 1 in its namespace)")),
        "the text report shows both pids:\n{}",
        out.stdout.lines().next().unwrap_or_default()
    );
}
