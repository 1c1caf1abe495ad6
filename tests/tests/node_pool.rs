//! A Node job pool (`job_pool.js`), started with no flag, whose sandboxed worker processes
//! were forked before memtrace attached: `attach --children PARENT` traces the running
//! workers too and names the keeping JS function (from V8's heap, no perf map) under each
//! worker's pid, with the total across the pool and none of it in the parent.

use std::{process::Command, time::Duration};

use integration_tests::{
    MIB, Memtrace, Report, StartGate, TestProcess, fixtures_dir, node_bin, require_root,
};

const JOBS: u64 = 24;

#[test]
fn running_pool_workers_hold_the_keeping_function_under_their_pids() {
    if !require_root("running_pool_workers_hold_the_keeping_function_under_their_pids") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let gate = StartGate::new(dir.path());
    let mut cmd = Command::new(node_bin());
    cmd.arg(fixtures_dir().join("job_pool.js")).arg("2").arg(JOBS.to_string()).arg(gate.path());
    let mut pool = TestProcess::spawn("job_pool", cmd);
    let line = pool.wait_for_stdout("workers pids=", Duration::from_secs(20));
    let workers: Vec<u64> = line
        .rsplit('=')
        .next()
        .map(|list| list.split(',').filter_map(|p| p.trim().parse().ok()).collect())
        .unwrap_or_default();
    assert_eq!(workers.len(), 2, "two worker pids in {line:?}");
    // The workers are up (node started) before memtrace attaches.
    std::thread::sleep(Duration::from_secs(1));

    let json = dir.path().join("report.json");
    let parent = pool.pid().to_string();
    let mut memtrace = Memtrace::spawn([
        "attach".as_ref(),
        "--children".as_ref(),
        parent.as_ref(),
        "--js-heap".as_ref(),
        "off".as_ref(),
        "--duration".as_ref(),
        "8s".as_ref(),
        "--json".as_ref(),
        json.as_os_str(),
    ]);
    memtrace.wait_for_stderr("attached", Duration::from_mins(1));
    gate.open();
    pool.wait_for_stdout("done", Duration::from_secs(30));
    let out = memtrace.wait(Duration::from_mins(1));
    assert!(out.status.success(), "memtrace attach exited with {}\n{}", out.status, out.combined());
    let report = Report::read(&json);
    let summary = report.summary();
    eprintln!("{summary}");

    let keeping: Vec<_> = report
        .suspects()
        .into_iter()
        .filter(|l| l.culprit() == "keepJob" && l.bytes_in("mmap") > 0)
        .collect();
    assert_eq!(keeping.len(), 1, "keepJob is one mapped-view suspect\n{summary}\n{}", out.stdout);
    let split = keeping[0].processes();
    let mut pids: Vec<u64> = split.iter().map(|s| s.0).collect();
    pids.sort_unstable();
    let mut expected = workers.clone();
    expected.sort_unstable();
    assert_eq!(
        pids, expected,
        "keepJob's memory is the two workers', not the parent's: {split:?}\n{summary}"
    );
    // Without a perf map, a frame of code V8 optimized mid-run is not always named from the
    // heap; such a stack ends its JS part at node's createUnsafeBuffer, another suspect
    // (seen on 15% of a longer pool's stacks). Most of each worker's memory is keepJob's.
    for &(pid, bytes, _) in &split {
        assert!(
            (JOBS * MIB * 7 / 10..=JOBS * MIB * 11 / 10).contains(&bytes),
            "worker {pid} holds {bytes} bytes through keepJob, expected 70%..110% of {JOBS} MiB"
        );
    }
    assert!(
        out.stdout.contains("2 processes"),
        "the text report gives keepJob's spread over the pool:\n{}",
        out.stdout.lines().take(12).collect::<Vec<_>>().join("\n")
    );
}
