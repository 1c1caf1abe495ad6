//! Per-thread tables are cleaned when a thread ends, and what was left is counted: a
//! thread that ends inside an allocator call (the fixture `exit_inside_new.cpp` ends each
//! of its threads from the `new_handler` of `operator new`) is named in the report's warnings,
//! once per call.

use std::{path::Path, process::Command, time::Duration};

use integration_tests::{Memtrace, Report, StartGate, TestProcess, fixtures_dir, require_root, trace_gated};

const THREADS: u64 = 6;

fn build_fixture(out_dir: &Path) -> std::path::PathBuf {
    let src = fixtures_dir().join("exit_inside_new.cpp");
    let bin = out_dir.join("exit_inside_new");
    let output = Command::new("g++")
        // Static: memtrace probes the operator new of a C++ runtime linked into the
        // executable; a shared libstdc++'s is walked through by its unwind table instead,
        // and a thread ending in its new_handler ends outside any probed call.
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-static", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("run g++ for {}: {e} (is g++ installed?)", src.display()));
    assert!(
        output.status.success(),
        "g++ failed for {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    bin
}

#[test]
fn threads_ending_inside_new_are_counted_in_the_report() {
    if !require_root("threads_ending_inside_new_are_counted_in_the_report") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_fixture(dir.path());
    let gate = StartGate::new(dir.path());
    let mut cmd = Command::new(&bin);
    cmd.arg(THREADS.to_string()).arg(gate.path());
    let mut fixture = TestProcess::spawn("exit_inside_new", cmd);
    fixture.wait_for_stdout("waiting", Duration::from_secs(10));

    let json = dir.path().join("report.json");
    let pid = fixture.pid().to_string();
    let out = trace_gated(
        Memtrace::spawn(["attach", &pid, "--track", "malloc", "--json", json.to_str().expect("utf-8 path")]),
        &mut fixture,
        &gate,
        Duration::from_mins(1),
        Duration::from_mins(1),
    );
    let report = Report::read(&json);
    let warnings: Vec<&str> = report.json["warnings"]
        .as_array()
        .map_or_else(Vec::new, |w| w.iter().filter_map(|w| w["message"].as_str()).collect());
    let expected =
        format!("kernel: {THREADS} allocator calls never returned: their thread exited inside them");
    assert!(
        warnings.iter().any(|w| w.starts_with(&expected)),
        "no warning `{expected}` in the report's warnings {warnings:?}\n{}",
        out.combined()
    );
    assert!(out.stderr.contains(&expected), "the warning is not on stderr\n{}", out.combined());
    assert!(
        out.stdout.contains(&format!("  lost events:  0\n  warning:      {expected}")),
        "the warning is not under the text report's lost events\n{}",
        out.combined()
    );
    // Nothing was lost: the calls failed, and their entries were cleaned, not dropped.
    assert_eq!(report.json["lost_events"], 0, "{}", out.combined());
}
