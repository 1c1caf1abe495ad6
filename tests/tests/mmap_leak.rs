//! A C program leaks 40 MiB in 1 MiB mmaps from `leak_mappings` and maps and unmaps as
//! much from `transient_mappings`. memtrace must name the first and not the second.

use std::{process::Command, time::Duration};

use integration_tests::{
    MIB, Memtrace, Report, StartGate, TestProcess, build_c_fixture, require_root, trace_gated,
};

const REGIONS: u64 = 40;

#[test]
fn mmap_leak() {
    if !require_root("mmap_leak") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("mmap_leak", dir.path());
    let gate = StartGate::new(dir.path());
    let mut cmd = Command::new(&bin);
    cmd.arg(REGIONS.to_string()).arg(gate.path());
    let mut fixture = TestProcess::spawn("mmap_leak", cmd);
    fixture.wait_for_stdout("waiting", Duration::from_secs(10));

    let json = dir.path().join("report.json");
    let memtrace = Memtrace::attach(fixture.pid(), "10s", &json);
    let out = trace_gated(memtrace, &mut fixture, &gate, Duration::from_secs(20), Duration::from_mins(1));
    let report = Report::read(&json);
    let summary = report.summary();
    eprintln!("{summary}");
    assert_eq!(report.target_pid(), Some(u64::from(fixture.pid())), "target.pid\n{summary}");

    let expected = REGIONS * MIB;
    let leaking = report.leaks_with_frame(|f| f.names("leak_mappings"));
    assert!(!leaking.is_empty(), "no leak has a frame `leak_mappings`\n{summary}\n{}", out.combined());
    let tolerance = expected / 20;
    assert!(
        leaking.iter().any(|leak| leak.bytes().abs_diff(expected) <= tolerance),
        "no leak through `leak_mappings` holds {expected} bytes ±5% (got {:?})\n{summary}",
        leaking.iter().map(integration_tests::Leak::bytes).collect::<Vec<_>>()
    );

    let transient = report.leaks_with_frame(|f| f.names("transient_mappings"));
    assert!(
        transient.is_empty(),
        "memory mapped and unmapped by `transient_mappings` is reported as a leak ({} leak(s))\n{summary}",
        transient.len()
    );
}
