//! memtrace stays responsive in an event storm: one `benches/mmap_storm.c` per core maps,
//! touches and unmaps as fast as it can, and a SIGTERM still stops memtrace, with its
//! report written, within a second.

use std::{
    fs,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{Memtrace, TestProcess, require_root, workspace_root};

/// What the user is promised is a second, storm or not; the bound allows for a machine
/// shared with other work (before the drain loop yielded, the stop took 8–20 s here).
const STOP_WITHIN: Duration = Duration::from_secs(2);

fn build_storm(dir: &std::path::Path) -> std::path::PathBuf {
    let src = workspace_root().join("benches/mmap_storm.c");
    let bin = dir.join("mmap_storm");
    let out = Command::new("gcc")
        .args(["-O2", "-fno-omit-frame-pointer", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("run gcc for {}: {e} (is gcc installed?)", src.display()));
    assert!(
        out.status.success(),
        "gcc failed for {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// Events per second the storm produced, from memtrace's last status line
/// (`   5.0s  events N (R/s) … lost L`): the events read and those lost, over the time.
/// Lost ones count: a storm memtrace cannot keep up with is still a storm.
fn storm_rate(stderr: &str) -> f64 {
    stderr
        .lines()
        .rev()
        .find_map(|l| {
            let (head, rest) = l.split_once(" events ")?;
            let secs: f64 = head.trim_end().rsplit(' ').next()?.strip_suffix('s')?.parse().ok()?;
            let events: f64 = rest.split_whitespace().next()?.parse().ok()?;
            let lost: f64 = rest.rsplit_once(" lost ")?.1.split_whitespace().next()?.parse().ok()?;
            Some((events + lost) / secs.max(0.1))
        })
        .unwrap_or(0.0)
}

#[test]
fn sigterm_in_a_storm_writes_the_report_within_a_second() {
    if !require_root("sigterm_in_a_storm_writes_the_report_within_a_second") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_storm(dir.path());
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let storms: Vec<TestProcess> = (0..cores)
        .map(|_| {
            let mut cmd = Command::new(&bin);
            cmd.args(["120", "0"]);
            TestProcess::spawn("mmap_storm", cmd)
        })
        .collect();
    let json = dir.path().join("report.json");
    let mut args: Vec<String> = vec!["attach".into()];
    args.extend(storms.iter().map(|s| s.pid().to_string()));
    // Every first touch sampled: 18 events with stacks a round, more than memtrace reads.
    args.extend(["--duration", "60s", "--js-heap", "off", "--fault-sample", "1", "--json"].map(String::from));
    args.push(json.display().to_string());
    let mut memtrace = Memtrace::spawn(&args);
    memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    // The first status line (5 s in, off a terminal) comes once the storm's stacks are
    // named: a module's first symbolization still runs on the event loop (seconds in a
    // debug build), and this test is about reading the storm.
    memtrace.wait_for_stderr(" events ", Duration::from_secs(30));
    // SAFETY: signals the memtrace process this test spawned, by its pid.
    unsafe { libc::kill(memtrace.pid().cast_signed(), libc::SIGTERM) };
    let signalled = Instant::now();
    let out = memtrace.wait(Duration::from_secs(30));
    let took = signalled.elapsed();
    drop(storms);
    let rate = storm_rate(&out.stderr);
    eprintln!("storm: {rate:.0} events/s (read and lost); memtrace exited {took:.3?} after SIGTERM");
    assert!(out.status.success(), "memtrace exited with {} after SIGTERM\n{}", out.status, out.combined());
    assert!(rate > 2000.0, "only {rate:.0} events/s: no storm, so this proves nothing\n{}", out.combined());
    let report: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&json).expect("the report is written"))
            .expect("parse report");
    assert!(
        report["totals"]["allocated_bytes"].as_u64().unwrap_or(0) > 0,
        "the storm's mappings are in the report"
    );
    assert!(took < STOP_WITHIN, "SIGTERM took {took:?} to stop memtrace in a storm\n{}", out.combined());
}

#[test]
fn the_storm_rate_counts_lost_events() {
    let line = "memtrace:    5.0s  events 843 (168/s)  stacks 145  mapped 54.7 MiB  touched 56.2 MiB  rss 98.8 MiB  lost 157";
    assert!((storm_rate(line) - 200.0).abs() < 0.01, "{}", storm_rate(line));
}
