//! OOM forensics: a process in a small memory cgroup leaks until the kernel kills it
//! while `memtrace attach` traces it and `memtrace oom` watches the machine. The report
//! must record the kill with the victim's pid and a plausible anon RSS, name the leaking
//! function, and be complete on disk; `memtrace oom` must record the same kill.
//! Only a memory cgroup is ever exhausted, never the machine.

use std::{fs, path::Path, process::Command, time::Duration};

use integration_tests::{
    MIB, MemoryCgroup, Memtrace, StartGate, TestProcess, build_c_fixture, keep_buffers_command,
    perf_map_path, require_root,
};
use serde_json::Value;

fn functions(leak: &Value) -> Vec<String> {
    leak["frames"]
        .as_array()
        .map_or(Vec::new(), |f| f.iter().filter_map(|fr| fr["function"].as_str().map(String::from)).collect())
}

/// Runs `fixture` in a cgroup limited to `limit` bytes under `memtrace attach` and
/// `memtrace oom` until it is OOM-killed; returns (attach report, oom records, pid).
fn trace_until_oom(
    name: &str,
    mut cmd: Command,
    gate: &StartGate,
    limit: u64,
    dir: &Path,
) -> Option<(Value, Value, u32)> {
    let cgroup = MemoryCgroup::new(name, limit)?;
    cmd.current_dir(dir);
    let mut fixture = TestProcess::spawn(name, cmd);
    fixture.remove_on_drop(perf_map_path(fixture.pid()));
    fixture.wait_for_stdout("waiting", Duration::from_secs(20));
    cgroup.add(fixture.pid());
    let pid = fixture.pid();

    let oom_json = dir.join("oom.json");
    let mut watcher =
        Memtrace::spawn(["oom", "--duration", "90s", "--json", oom_json.to_str().expect("utf-8")]);
    watcher.wait_for_stderr("watching", Duration::from_secs(30));

    let json = dir.join("report.json");
    let pid_arg = pid.to_string();
    let mut memtrace = Memtrace::spawn([
        "attach",
        &pid_arg,
        "--duration",
        "90s",
        "--interval",
        "1s",
        "--warn-at",
        "70%",
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    gate.open();
    let out = memtrace.wait(Duration::from_mins(2));
    assert!(out.status.success(), "memtrace attach exited with {}\n{}", out.status, out.combined());
    assert!(
        out.stderr.contains("OOM-killed"),
        "memtrace did not say the target was OOM-killed\n{}",
        out.combined()
    );
    assert!(
        out.stderr.contains("WARNING: cgroup"),
        "--warn-at 70% did not warn before the kill\n{}",
        out.combined()
    );

    // SAFETY: signals the memtrace process this test spawned, by its pid.
    unsafe { libc::kill(watcher.pid().cast_signed(), libc::SIGTERM) };
    let oom_out = watcher.wait(Duration::from_secs(30));
    assert!(oom_out.status.success(), "memtrace oom exited with {}\n{}", oom_out.status, oom_out.combined());
    drop(fixture);
    drop(cgroup);

    let report: Value = serde_json::from_str(&fs::read_to_string(&json).expect("read report"))
        .expect("report is complete JSON");
    let ooms: Value = serde_json::from_str(&fs::read_to_string(&oom_json).expect("read oom records"))
        .expect("oom records are JSON");
    Some((report, ooms, pid))
}

fn check_kill(report: &Value, ooms: &Value, pid: u32, limit: u64, leaking_function: &str) {
    let text = serde_json::to_string_pretty(&report["oom_kills"]).unwrap_or_default();
    assert_eq!(report["target"]["pid"], pid, "target pid");
    assert_eq!(report["target"]["oom_killed"], true, "target.oom_killed\n{text}");
    let kills = report["oom_kills"].as_array().expect("oom_kills");
    let kill =
        kills.iter().find(|k| k["pid"] == pid).unwrap_or_else(|| panic!("no OOM record for {pid}\n{text}"));
    let anon = kill["anon_rss_bytes"].as_u64().unwrap_or(0);
    assert!(
        anon > limit / 2 && anon <= limit + 16 * MIB,
        "anon RSS {anon} is not plausible for a {limit}-byte cgroup\n{text}"
    );
    assert_eq!(kill["memcg_limit_bytes"], limit, "cgroup limit\n{text}");
    assert_eq!(kill["scope"], "cgroup", "kill scope\n{text}");
    assert!(kill["cgroup"].as_str().is_some_and(|c| c.contains("memtrace-test")), "cgroup path\n{text}");

    let leaks = report["leaks"].as_array().expect("leaks");
    let named = leaks.iter().filter(|l| functions(l).iter().any(|f| f == leaking_function));
    let bytes: u64 = named.map(|l| l["bytes"].as_u64().unwrap_or(0)).max().unwrap_or(0);
    assert!(
        bytes > limit / 3,
        "the leaking function {leaking_function} holds only {bytes} bytes in the report"
    );
    assert!(report["leaks"][0]["frames"].as_array().is_some_and(|f| !f.is_empty()));
    assert!(
        report["warnings"].as_array().is_some_and(|w| !w.is_empty()),
        "the --warn-at warning is in the report"
    );

    let watched = ooms.as_array().expect("memtrace oom writes an array");
    let same = watched
        .iter()
        .find(|k| k["pid"] == pid)
        .unwrap_or_else(|| panic!("memtrace oom missed the kill of {pid}: {ooms}"));
    assert_eq!(same["anon_rss_bytes"], kill["anon_rss_bytes"], "both saw the same kill");
    assert_eq!(same["scope"], "cgroup");
}

#[test]
fn c_fixture_oom_killed_in_a_cgroup() {
    if !require_root("c_fixture_oom_killed_in_a_cgroup") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("mmap_leak", dir.path());
    let gate = StartGate::new(dir.path());
    let mut cmd = Command::new(&bin);
    cmd.arg("2000").arg(gate.path());
    let limit = 160 * MIB;
    let Some((report, ooms, pid)) = trace_until_oom("c", cmd, &gate, limit, dir.path()) else {
        eprintln!("SKIPPED: no memory cgroup controller (v1 or v2) on this machine");
        return;
    };
    check_kill(&report, &ooms, pid, limit, "leak_mappings");
}

#[test]
fn node_oom_killed_in_a_cgroup() {
    if !require_root("node_oom_killed_in_a_cgroup") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let gate = StartGate::new(dir.path());
    let cmd = keep_buffers_command(2000, &gate);
    let limit = 200 * MIB;
    let Some((report, ooms, pid)) = trace_until_oom("node", cmd, &gate, limit, dir.path()) else {
        eprintln!("SKIPPED: no memory cgroup controller (v1 or v2) on this machine");
        return;
    };
    check_kill(&report, &ooms, pid, limit, "keepBuffers");
    let js = report["leaks"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["frames"].as_array().into_iter().flatten())
        .any(|f| f["function"] == "keepBuffers" && f["kind"] == "js");
    assert!(js, "keepBuffers is named as a JS frame after the process is gone");
}

/// An OOM kill during a storm of stack events that overflows the (small) event ring
/// buffer: the kill travels on a ring buffer of its own and is still recorded; the
/// events lost to the storm are counted.
#[test]
fn oom_kill_survives_an_event_storm() {
    if !require_root("oom_kill_survives_an_event_storm") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("oom_storm", dir.path());
    let gate = StartGate::new(dir.path());
    let Some(cgroup) = MemoryCgroup::new("storm", 64 * MIB) else {
        panic!("no memory cgroup controller (v1 or v2) on this machine: the OOM tests cannot run");
    };
    let mut cmd = Command::new(&bin);
    cmd.arg(gate.path());
    let mut fixture = TestProcess::spawn("oom_storm", cmd);
    fixture.wait_for_stdout("waiting", Duration::from_secs(20));
    cgroup.add(fixture.pid());
    let pid = fixture.pid();
    let json = dir.path().join("report.json");
    let pid_arg = pid.to_string();
    let mut memtrace = Memtrace::spawn([
        "attach",
        &pid_arg,
        "--duration",
        "60s",
        "--ring-buffer-mib",
        "1",
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    gate.open();
    let out = memtrace.wait(Duration::from_mins(2));
    drop(fixture);
    drop(cgroup);
    assert!(out.status.success(), "memtrace attach exited with {}\n{}", out.status, out.combined());
    assert!(out.stderr.contains("OOM-killed"), "the kill was missed in the storm\n{}", out.combined());
    let report: Value = serde_json::from_str(&fs::read_to_string(&json).expect("read report")).expect("JSON");
    let kills = report["oom_kills"].as_array().expect("oom_kills");
    assert!(kills.iter().any(|k| k["pid"] == pid), "no OOM record for {pid}: {kills:?}");
    let lost = report["lost_events"].as_u64().expect("lost_events");
    assert!(
        lost > 0,
        "the storm did not overflow the 1 MiB ring buffer, so the test proves nothing\n{}",
        out.combined()
    );
    // The loss is named, with its count, among the report's warnings.
    let warnings: Vec<&str> = report["warnings"]
        .as_array()
        .map_or_else(Vec::new, |w| w.iter().filter_map(|w| w["message"].as_str()).collect());
    let dropped = warnings
        .iter()
        .find_map(|w| {
            w.strip_prefix("kernel: ")?.strip_suffix(
                " events were dropped because the ring buffer was full (raise --ring-buffer-mib)",
            )
        })
        .and_then(|n| n.parse::<u64>().ok());
    assert!(
        dropped.is_some_and(|n| n > 0 && n <= lost),
        "no warning naming the {lost} events the full ring buffer dropped: {warnings:?}"
    );
    eprintln!("storm: {lost} events lost, the OOM record kept");
}
