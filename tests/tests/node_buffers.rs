//! A Node script keeps forty 1 MiB Buffers from `keepBuffers`. memtrace must name the
//! JavaScript function, through glibc's malloc and V8, and count the bytes.

use std::time::Duration;

use integration_tests::{
    Leak, MIB, Memtrace, Report, StartGate, TestProcess, keep_buffers_command, perf_map_path, require_root,
    trace_gated,
};

const BUFFERS: u64 = 40;

#[test]
fn node_buffers() {
    if !require_root("node_buffers") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let gate = StartGate::new(dir.path());
    let mut cmd = keep_buffers_command(BUFFERS, &gate);
    // The perf-map flags make V8 write isolate-*.log files into the working directory.
    cmd.current_dir(dir.path());
    let mut fixture = TestProcess::spawn("keep_buffers.js", cmd);
    fixture.remove_on_drop(perf_map_path(fixture.pid()));
    fixture.wait_for_stdout("waiting", Duration::from_secs(20));

    let json = dir.path().join("report.json");
    let memtrace = Memtrace::attach(fixture.pid(), "10s", &json);
    let out = trace_gated(memtrace, &mut fixture, &gate, Duration::from_secs(20), Duration::from_mins(1));
    let report = Report::read(&json);
    let summary = report.summary();
    eprintln!("{summary}");
    assert_eq!(report.target_pid(), Some(u64::from(fixture.pid())), "target.pid\n{summary}");

    let keeping = report.leaks_with_frame(|f| f.kind() == "js" && f.names("keepBuffers"));
    assert!(!keeping.is_empty(), "no leak has a JS frame `keepBuffers`\n{summary}\n{}", out.combined());
    let bytes: u64 = keeping.iter().map(Leak::bytes).sum();
    let expected = BUFFERS * MIB;
    assert!(
        bytes * 10 >= expected * 9,
        "stacks through `keepBuffers` hold {bytes} bytes, want at least 90% of {expected}\n{summary}"
    );
}
