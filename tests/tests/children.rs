//! Process trees (`tree_leak.c`): with `--children`, memtrace follows the processes a
//! target forks from their first instruction, names each one's leak under its own pid,
//! keeps what a short-lived child held (symbolized) after it exits, and after an exec
//! reports the new image's leak and not the old image's memory.

use std::{path::Path, process::Command, time::Duration};

use integration_tests::{
    MIB, Memtrace, Report, RunOutput, StartGate, TestProcess, build_c_fixture, require_root,
};

/// The pid after `key=` in a fixture's line (`workers a=12 b=13`).
fn pid_after(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no {key}PID in {line:?}"))
}

fn within_5_percent(bytes: u64, expected: u64) -> bool {
    bytes.abs_diff(expected) <= expected / 20
}

/// `memtrace attach ARGS.. PID --duration 8s --json JSON`, started before the fixture
/// is let go; returns memtrace's output once the fixture printed `done` (the line).
fn trace(fixture: &mut TestProcess, gate: &StartGate, args: &[&str], json: &Path) -> (RunOutput, String) {
    let pid = fixture.pid().to_string();
    let mut all: Vec<&str> = vec!["attach"];
    all.extend(args);
    all.extend([pid.as_str(), "--duration", "8s", "--json"]);
    let mut memtrace = Memtrace::spawn(all.iter().map(Path::new).chain([json]));
    memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    gate.open();
    let done = fixture.wait_for_stdout("done", Duration::from_secs(30));
    let out = memtrace.wait(Duration::from_mins(1));
    assert!(out.status.success(), "memtrace attach exited with {}\n{}", out.status, out.combined());
    (out, done)
}

/// Starts `tree_leak MODE ARGS… START_FILE`, waiting at its start gate.
fn spawn_tree_leak(dir: &std::path::Path, args: &[String]) -> (TestProcess, StartGate) {
    let bin = build_c_fixture("tree_leak", dir);
    let gate = StartGate::new(dir);
    let mut cmd = Command::new(&bin);
    cmd.args(args).arg(gate.path());
    let mut fixture = TestProcess::spawn("tree_leak", cmd);
    fixture.wait_for_stdout("waiting", Duration::from_secs(10));
    (fixture, gate)
}

#[test]
fn workers_leak_under_their_own_pids_and_the_parent_is_clean() {
    if !require_root("workers_leak_under_their_own_pids_and_the_parent_is_clean") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let (mut fixture, gate) = spawn_tree_leak(dir.path(), &["workers".to_string()]);
    let parent = u64::from(fixture.pid());

    let json = dir.path().join("report.json");
    let pid = fixture.pid().to_string();
    let mut memtrace = Memtrace::spawn([
        "attach",
        "--children",
        &pid,
        "--duration",
        "8s",
        "--json",
        json.to_str().expect("UTF-8 path"),
    ]);
    memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    gate.open();
    let workers = fixture.wait_for_stdout("workers", Duration::from_secs(10));
    let (a, b) = (pid_after(&workers, "a="), pid_after(&workers, "b="));
    fixture.wait_for_stdout("done", Duration::from_secs(30));
    let out = memtrace.wait(Duration::from_mins(1));
    assert!(out.status.success(), "memtrace attach exited with {}\n{}", out.status, out.combined());
    let report = Report::read(&json);
    let summary = report.summary();
    eprintln!("{summary}");

    for (pid, function, mib) in [(a, "leak_in_worker_a", 20), (b, "leak_in_worker_b", 12)] {
        let found: Vec<_> = report.suspects().into_iter().filter(|l| l.culprit() == function).collect();
        assert_eq!(found.len(), 1, "one suspect for {function}\n{summary}\n{}", out.combined());
        let leak = &found[0];
        assert_eq!(leak.pid(), pid, "{function} is worker {pid}'s\n{summary}");
        let split = leak.processes();
        assert_eq!(split.len(), 1, "{function} held in worker {pid} only: {split:?}");
        assert!(
            within_5_percent(split[0].1, mib * MIB),
            "worker {pid} holds {} bytes through {function}, expected {mib} MiB ±5%\n{summary}",
            split[0].1
        );
    }
    assert!(
        report.leaks_with_frame(|f| f.names("transient_mappings")).is_empty(),
        "the parent's mapped-and-unmapped memory is reported\n{summary}"
    );
    let parents: Vec<_> = report
        .suspects()
        .iter()
        .flat_map(integration_tests::Leak::processes)
        .filter(|&(pid, bytes, _)| pid == parent && bytes >= MIB)
        .collect();
    assert!(parents.is_empty(), "the parent holds nothing, yet: {parents:?}\n{summary}");
    let processes = report.json.get("processes").and_then(|p| p.as_array()).expect("processes list");
    let child_of = |pid: u64| {
        processes
            .iter()
            .find(|p| p.get("pid").and_then(serde_json::Value::as_u64) == Some(pid))
            .and_then(|p| p.get("parent_pid").and_then(serde_json::Value::as_u64))
    };
    assert_eq!((child_of(a), child_of(b)), (Some(parent), Some(parent)), "{processes:?}");
    assert!(out.stdout.contains(&format!("in pid {a} (tree_leak)")), "text report:\n{}", out.stdout);
}

#[test]
fn short_lived_children_keep_their_symbolized_evidence() {
    const JOBS: u64 = 6;
    if !require_root("short_lived_children_keep_their_symbolized_evidence") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let (mut fixture, gate) = spawn_tree_leak(dir.path(), &["pool".to_string(), JOBS.to_string()]);

    let json = dir.path().join("report.json");
    let (out, done) = trace(&mut fixture, &gate, &["--children"], &json);
    let jobs: Vec<u64> = done
        .rsplit("jobs=")
        .next()
        .map(|list| list.split(',').filter_map(|p| p.trim().parse().ok()).collect())
        .unwrap_or_default();
    assert_eq!(jobs.len() as u64, JOBS, "job pids in {done:?}");
    let report = Report::read(&json);
    let summary = report.summary();
    eprintln!("{summary}");

    let found: Vec<_> = report
        .suspects()
        .into_iter()
        .filter(|l| l.culprit() == "pool_job" && l.frames().iter().any(|f| f.file().ends_with("tree_leak.c")))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one suspect, symbolized to pool_job in tree_leak.c\n{summary}\n{}",
        out.combined()
    );
    let job = &found[0];
    assert!(
        within_5_percent(job.bytes(), JOBS * 4 * MIB),
        "the jobs held {} bytes at their exits, expected {} MiB ±5%\n{summary}",
        job.bytes(),
        JOBS * 4
    );
    let split = job.processes();
    let mut pids: Vec<u64> = split.iter().map(|s| s.0).collect();
    pids.sort_unstable();
    let mut expected = jobs.clone();
    expected.sort_unstable();
    assert_eq!(pids, expected, "every job under its own pid: {split:?}");
    assert!(
        split.iter().all(|s| s.2 && within_5_percent(s.1, 4 * MIB)),
        "each job held 4 MiB at its exit: {split:?}"
    );
    assert!(
        out.stdout.contains(&format!("in {JOBS} processes, {JOBS} exited")),
        "text report:\n{}",
        out.stdout
    );
}

#[test]
fn after_exec_the_new_image_is_traced_and_the_old_one_is_not_a_leak() {
    const REGIONS: u64 = 30;
    if !require_root("after_exec_the_new_image_is_traced_and_the_old_one_is_not_a_leak") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("tree_leak", dir.path());
    let leaker = build_c_fixture("mmap_leak", dir.path());
    let gate = StartGate::new(dir.path());
    let mut cmd = Command::new(&bin);
    // mmap_leak waits for the same start file, which exists by then.
    cmd.arg("exec").arg(gate.path()).arg(&leaker).arg(REGIONS.to_string()).arg(gate.path());
    let mut fixture = TestProcess::spawn("tree_leak", cmd);
    fixture.wait_for_stdout("waiting", Duration::from_secs(10));

    let json = dir.path().join("report.json");
    let (out, _) = trace(&mut fixture, &gate, &[], &json);
    let report = Report::read(&json);
    let summary = report.summary();
    eprintln!("{summary}");

    let leaking = report.leaks_with_frame(|f| f.names("leak_mappings") && f.file().ends_with("mmap_leak.c"));
    assert!(
        leaking.iter().any(|l| within_5_percent(l.bytes(), REGIONS * MIB)),
        "the exec'd image's leak_mappings holds {REGIONS} MiB ±5%\n{summary}\n{}",
        out.combined()
    );
    assert!(
        report.leaks_with_frame(|f| f.names("before_exec")).is_empty(),
        "memory of the image replaced by exec is reported\n{summary}"
    );
    let process = report.json.pointer("/processes/0").expect("the target in processes");
    assert_eq!(process.get("execs").and_then(serde_json::Value::as_u64), Some(1), "{process}");
    assert_eq!(process.get("comm").and_then(serde_json::Value::as_str), Some("mmap_leak"), "{process}");
}

#[test]
fn children_with_malloc_probes_is_a_clear_error() {
    if !require_root("children_with_malloc_probes_is_a_clear_error") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let (fixture, _gate) = spawn_tree_leak(dir.path(), &["workers".to_string()]);
    let pid = fixture.pid().to_string();
    let out = Memtrace::run(
        ["attach", "--children", "--track", "mmap,malloc", &pid, "--duration", "2s"],
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "--children --track malloc must fail\n{}", out.combined());
    assert!(
        out.stderr.contains("--track malloc follows one process"),
        "the error says why:\n{}",
        out.combined()
    );
}

#[test]
fn run_children_follows_the_commands_pool() {
    if !require_root("run_children_follows_the_commands_pool") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("tree_leak", dir.path());
    let gate = StartGate::new(dir.path());
    // Open already: the command runs from its start under `memtrace run`.
    gate.open();
    let json = dir.path().join("report.json");
    let out = Memtrace::run(
        [
            Path::new("run"),
            Path::new("--children"),
            Path::new("--duration"),
            Path::new("6s"),
            Path::new("--json"),
            &json,
            Path::new("--"),
            &bin,
            Path::new("pool"),
            Path::new("3"),
            gate.path(),
        ],
        Duration::from_mins(1),
    );
    assert!(out.status.success(), "memtrace run exited with {}\n{}", out.status, out.combined());
    let report = Report::read(&json);
    let summary = report.summary();
    let jobs: Vec<_> = report.suspects().into_iter().filter(|l| l.culprit() == "pool_job").collect();
    assert_eq!(jobs.len(), 1, "the jobs' pool_job is one suspect\n{summary}\n{}", out.combined());
    let split = jobs[0].processes();
    assert_eq!(split.len(), 3, "three jobs, each its own process: {split:?}\n{summary}");
    assert!(
        split
            .iter()
            .all(|s| s.2 && within_5_percent(s.1, 4 * MIB) && s.0 != report.target_pid().unwrap_or(0)),
        "each job held 4 MiB at its exit, none of it the command's: {split:?}"
    );
}
