//! The six address-space syscalls, end to end through their shared entry and exit
//! programs: `syscall_mix.c` maps, grows (mremap), advises, protects, unmaps and moves the
//! break in known amounts, and the report's totals must be exact.

use std::{process::Command, time::Duration};

use integration_tests::{
    MIB, Memtrace, Report, StartGate, TestProcess, build_c_fixture, require_root, trace_gated,
};

const ROUNDS: u64 = 20;
const KIB: u64 = 1024;

#[test]
fn every_syscall_is_accounted_exactly() {
    if !require_root("every_syscall_is_accounted_exactly") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("syscall_mix", dir.path());
    let gate = StartGate::new(dir.path());
    let mut cmd = Command::new(&bin);
    cmd.arg(ROUNDS.to_string()).arg(gate.path());
    let mut fixture = TestProcess::spawn("syscall_mix", cmd);
    fixture.wait_for_stdout("waiting", Duration::from_secs(10));

    let json = dir.path().join("report.json");
    let pid = fixture.pid().to_string();
    let out = trace_gated(
        Memtrace::spawn(["attach", &pid, "--js-heap", "off", "--json", json.to_str().expect("utf-8 path")]),
        &mut fixture,
        &gate,
        Duration::from_mins(1),
        Duration::from_mins(1),
    );
    let report = Report::read(&json);
    let totals = &report.json["totals"];
    // Per round: mmap 1 MiB + mremap growth 3 MiB + brk up 256 KiB; munmap 1 MiB + brk
    // down 64 KiB. madvise and mprotect change no mapping.
    let expected = [
        ("allocated_bytes", ROUNDS * (4 * MIB + 256 * KIB)),
        ("freed_bytes", ROUNDS * (MIB + 64 * KIB)),
        ("outstanding_bytes", ROUNDS * (3 * MIB + 192 * KIB)),
    ];
    for (field, bytes) in expected {
        assert_eq!(totals[field].as_u64(), Some(bytes), "{field}: {totals}\n{}", out.combined());
    }
    assert_eq!(report.json["lost_events"], 0, "{}", out.combined());
}
