//! Continuous tracing: a steady leak, a cache filled once and churn run side by side for
//! 20 s. The leak must rank first with the verdict "leak"; the cache is a warm-up and
//! the churn is not called a leak.

use std::{fmt::Write as _, process::Command, time::Duration};

use integration_tests::{Memtrace, StartGate, TestProcess, build_c_fixture, require_root};
use serde_json::Value;

const SECONDS: u32 = 20;

fn functions(leak: &Value) -> Vec<&str> {
    leak["frames"]
        .as_array()
        .map_or(Vec::new(), |f| f.iter().filter_map(|fr| fr["function"].as_str()).collect())
}

fn describe(report: &Value) -> String {
    let mut out = String::new();
    let all = report["leaks"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(report["other_suspects"].as_array().into_iter().flatten());
    for leak in all.take(12) {
        let _ = writeln!(
            out,
            "  {:>10} B score {:>8.3} {:<8} {:?} {}",
            leak["bytes"],
            leak["score"].as_f64().unwrap_or(0.0),
            leak["verdict"].as_str().unwrap_or(""),
            functions(leak).iter().take(4).collect::<Vec<_>>(),
            leak["reason"].as_str().unwrap_or("")
        );
    }
    out
}

#[test]
fn steady_leak_ranks_first_cache_and_churn_are_not_leaks() {
    if !require_root("steady_leak_ranks_first_cache_and_churn_are_not_leaks") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("growth", dir.path());
    let gate = StartGate::new(dir.path());
    let mut cmd = Command::new(&bin);
    cmd.arg(SECONDS.to_string()).arg(gate.path());
    let mut fixture = TestProcess::spawn("growth", cmd);
    fixture.wait_for_stdout("waiting", Duration::from_secs(10));

    let json = dir.path().join("report.json");
    let pid = fixture.pid().to_string();
    let mut memtrace = Memtrace::spawn([
        "attach",
        &pid,
        "--duration",
        &format!("{}s", SECONDS - 1),
        "--interval",
        "1s",
        "--json",
        json.to_str().expect("utf-8 temp path"),
    ]);
    memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    gate.open();
    let out = memtrace.wait(Duration::from_mins(2));
    assert!(out.status.success(), "memtrace attach exited with {}\n{}", out.status, out.combined());

    let text = std::fs::read_to_string(&json).expect("read report");
    let report: Value = serde_json::from_str(&text).expect("report is JSON");
    let leaks = report["leaks"].as_array().expect("leaks array");
    let summary = describe(&report);
    eprintln!("{summary}");

    let top = &leaks[0];
    assert!(functions(top).contains(&"leak_steadily"), "the top suspect is not the steady leak\n{summary}");
    assert_eq!(top["verdict"], "leak", "verdict of the steady leak\n{summary}");
    assert!(
        top["reason"].as_str().is_some_and(|r| r.contains("still growing")),
        "the reason says why it was ranked\n{summary}"
    );
    // 256 KiB every 100 ms is 2.5 MiB/s; scheduling and the attach delay make it a bit less.
    let growth = top["growth_bytes_per_s"].as_f64().unwrap_or(0.0);
    assert!((1.8e6..=3.2e6).contains(&growth), "growth {growth} B/s is not ~2.6 MB/s\n{summary}");

    // Warm-up and churn are not flagged: they are among the other suspects.
    let others = report["other_suspects"].as_array().expect("other_suspects array");
    let all: Vec<&Value> = leaks.iter().chain(others).collect();
    assert!(
        !leaks.iter().any(|l| functions(l).contains(&"fill_cache") || functions(l).contains(&"churn")),
        "the cache or the churn is flagged\n{summary}"
    );
    for leak in all.iter().filter(|l| functions(l).contains(&"fill_cache")) {
        assert_ne!(leak["verdict"], "leak", "the cache filled once is called a leak\n{summary}");
        assert!(
            leak["score"].as_f64().unwrap_or(0.0) < top["score"].as_f64().unwrap_or(0.0) / 4.0,
            "the cache scores close to the leak\n{summary}"
        );
    }
    assert!(
        all.iter().any(|l| functions(l).contains(&"fill_cache") && l["verdict"] == "warm-up"),
        "the cache is not reported as a warm-up\n{summary}"
    );
    for leak in all.iter().filter(|l| functions(l).contains(&"churn")) {
        assert_ne!(leak["verdict"], "leak", "churn is called a leak\n{summary}");
    }
    let timeline = report["timeline"].as_array().expect("timeline");
    assert!(timeline.len() >= 15, "a snapshot every second: {} points", timeline.len());
}
