//! `memtrace report` on recordings, as a user runs it: the same JSON as the live run,
//! clear errors for damaged files, and `--diff` naming what grew.
//!
//! The recordings are written with memtrace's library from fixed reports, so these
//! tests need the `memtrace` binary but not root. `mmap_leak.rs` records a real run.

use std::{fs, path::Path, time::Duration};

use integration_tests::{Memtrace, RunOutput};
use memtrace::report::{Frame, FrameKind, Leak, REPORT_VERSION, Report, Target, Totals};
use serde_json::Value;

fn js_stack(leaf: &str, line: u32) -> Vec<Frame> {
    let js = |function: &str, line| Frame {
        function: function.into(),
        file: "/srv/app.js".into(),
        line,
        kind: FrameKind::Js,
        ..Frame::default()
    };
    vec![
        js(leaf, line),
        js("handleRequest", 22),
        Frame {
            function: "main".into(),
            module: "/usr/bin/node".into(),
            kind: FrameKind::Native,
            ..Frame::default()
        },
    ]
}

fn report(leaks: &[(&str, u32, u64)]) -> Report {
    let leaks: Vec<Leak> = leaks
        .iter()
        .map(|&(leaf, line, bytes)| Leak {
            bytes,
            count: bytes / 4096,
            oldest_age_s: 10.0,
            growth_bytes_per_s: bytes as f64 / 3.0,
            score: bytes as f64 / 7.0,
            sources: vec![memtrace::report::Source::Mmap],
            frames: js_stack(leaf, line),
            ..Leak::default()
        })
        .collect();
    Report {
        version: REPORT_VERSION,
        target: Target { pid: 77, comm: "node".into(), exited: true, ..Target::default() },
        duration_s: 0.1 + 0.2,
        tracked: vec!["mmap".into(), "brk".into(), "oom".into()],
        totals: Totals { outstanding_bytes: leaks.iter().map(|l| l.bytes).sum(), ..Totals::default() },
        leaks,
        lost_events: 3,
        ..Report::default()
    }
}

fn record(dir: &Path, name: &str, report: &Report) -> std::path::PathBuf {
    let path = dir.join(name);
    memtrace::record::write_report(&path, report).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

fn memtrace(args: &[&Path]) -> RunOutput {
    Memtrace::run(args.iter().map(|a| a.as_os_str()), Duration::from_mins(1))
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

#[test]
fn report_renders_the_recorded_json() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let original = report(&[("rememberOrder", 9, 12 << 20), ("cacheSession", 31, 4096)]);
    let recording = record(dir.path(), "run.mtr", &original);
    let json = dir.path().join("again.json");
    let out = memtrace(&["report".as_ref(), &recording, "--json".as_ref(), &json]);
    assert!(out.status.success(), "memtrace report failed\n{}", out.combined());
    let expected = serde_json::to_value(&original).unwrap_or_else(|e| panic!("serialize: {e}"));
    assert_eq!(read_json(&json), expected, "the recording renders other JSON than the report it holds");
    assert!(out.stdout.contains("rememberOrder"), "text report lacks the leak\n{}", out.combined());
}

#[test]
fn damaged_recordings_fail_clearly() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let recording = record(dir.path(), "run.mtr", &report(&[("rememberOrder", 9, 1 << 20)]));
    let bytes = fs::read(&recording).unwrap_or_else(|e| panic!("read recording: {e}"));

    let cut = dir.path().join("cut.mtr");
    fs::write(&cut, &bytes[..bytes.len() - 40]).unwrap_or_else(|e| panic!("write: {e}"));
    let out = memtrace(&["report".as_ref(), &cut]);
    assert!(!out.status.success(), "a truncated recording was accepted\n{}", out.combined());
    let needle = format!("cut.mtr: truncated at byte {} (expected ", bytes.len() - 40);
    assert!(out.stderr.contains(&needle), "no clear truncation error ({needle})\n{}", out.combined());

    let json = dir.path().join("report.json");
    fs::write(&json, b"{\"version\": 1}").unwrap_or_else(|e| panic!("write: {e}"));
    let out = memtrace(&["report".as_ref(), &json]);
    assert!(!out.status.success(), "JSON was accepted as a recording\n{}", out.combined());
    assert!(out.stderr.contains("report.json: not a memtrace recording"), "{}", out.combined());

    let mut future = bytes.clone();
    future[8..12].copy_from_slice(&9u32.to_le_bytes());
    let newer = dir.path().join("newer.mtr");
    fs::write(&newer, future).unwrap_or_else(|e| panic!("write: {e}"));
    let out = memtrace(&["report".as_ref(), &newer]);
    assert!(!out.status.success(), "a version-9 recording was accepted\n{}", out.combined());
    assert!(
        out.stderr.contains("recording format version 9 is newer than this memtrace (1)"),
        "{}",
        out.combined()
    );
}

#[test]
fn diff_shows_what_grew() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let a =
        record(dir.path(), "a.mtr", &report(&[("rememberOrder", 9, 1 << 20), ("warmCache", 40, 8 << 20)]));
    let b =
        record(dir.path(), "b.mtr", &report(&[("rememberOrder", 9, 33 << 20), ("warmCache", 40, 2 << 20)]));
    let json = dir.path().join("diff.json");
    let folded = dir.path().join("diff.folded");
    let out = memtrace(&[
        "report".as_ref(),
        &a,
        "--diff".as_ref(),
        &b,
        "--json".as_ref(),
        &json,
        "--folded".as_ref(),
        &folded,
    ]);
    assert!(out.status.success(), "memtrace report --diff failed\n{}", out.combined());
    let grew =
        out.stdout.find("Grew (1 stack, +32.0 MiB in all)").unwrap_or_else(|| panic!("{}", out.combined()));
    let leak = out.stdout.find("rememberOrder app.js:9").unwrap_or_else(|| panic!("{}", out.combined()));
    let shrank =
        out.stdout.find("Shrank (1 stack, -6.0 MiB in all)").unwrap_or_else(|| panic!("{}", out.combined()));
    assert!(grew < leak && leak < shrank, "growth is not listed first\n{}", out.combined());

    let diff = read_json(&json);
    assert_eq!(diff["diff_version"], 1);
    assert_eq!(diff["stacks"][0]["delta_bytes"], 32 << 20);
    assert_eq!(diff["stacks"][0]["frames"][0]["function"], "rememberOrder");
    assert_eq!(diff["stacks"][1]["delta_bytes"], -(6 << 20));
    let folded = fs::read_to_string(&folded).unwrap_or_else(|e| panic!("read folded: {e}"));
    assert_eq!(folded, "main [node];handleRequest app.js:22;rememberOrder app.js:9 33554432\n");
}
