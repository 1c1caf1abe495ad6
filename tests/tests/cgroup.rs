//! `memtrace attach --cgroup PATH` (`tree_leak.c leak`): the processes in a cgroup when
//! tracing starts and those moved in afterwards are traced, each leak named under its own
//! pid and counted in full; a process outside the cgroup is not traced. On the v1 memory
//! hierarchy and on cgroup v2.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use integration_tests::{
    MIB, MemoryCgroup, Memtrace, Report, StartGate, TestProcess, build_c_fixture, require_root,
};

/// The v1 memory hierarchy, or where cgroup v2 is mounted (`unified` on hybrid systems).
fn cgroup_root(v2: bool) -> Option<PathBuf> {
    let candidates: &[&str] =
        if v2 { &["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] } else { &["/sys/fs/cgroup/memory"] };
    let marker = if v2 { "cgroup.controllers" } else { "memory.limit_in_bytes" };
    candidates.iter().map(PathBuf::from).find(|p| p.join(marker).is_file())
}

/// The body of `GET /metrics` on `port`.
fn scrape(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    response
}

/// `memtrace_process_mapped_outstanding_bytes` of `pid`.
fn mapped_series(scraped: &str, pid: u32) -> Option<u64> {
    let series = format!("memtrace_process_mapped_outstanding_bytes{{pid=\"{pid}\",comm=\"tree_leak\"}} ");
    scraped.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.trim().parse().ok())
}

/// Scrapes until each process's mapped-bytes series shows its MiB (±5%), and checks it.
/// Events are drained every 100 ms; on a loaded machine the last ones may take longer.
fn scrape_per_process(port: u16, want: &[(u32, u64)]) -> String {
    let complete = |s: &str| {
        want.iter().all(|&(pid, mib)| mapped_series(s, pid).is_some_and(|v| within_5_percent(v, mib * MIB)))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut scraped = scrape(port);
    while !complete(&scraped) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        scraped = scrape(port);
    }
    for &(pid, mib) in want {
        let value =
            mapped_series(&scraped, pid).unwrap_or_else(|| panic!("no series of {pid} in:\n{scraped}"));
        assert!(
            within_5_percent(value, mib * MIB),
            "pid {pid}: {value} mapped bytes, expected {mib} MiB ±5%"
        );
    }
    scraped
}

fn within_5_percent(bytes: u64, expected: u64) -> bool {
    bytes.abs_diff(expected) <= expected / 20
}

fn leaker(bin: &Path, site: &str, mib: u64, gate: &StartGate) -> TestProcess {
    let mut cmd = Command::new(bin);
    cmd.args(["leak", site, &mib.to_string()]).arg(gate.path());
    let mut p = TestProcess::spawn(&format!("tree_leak leak {site}"), cmd);
    p.wait_for_stdout("waiting", Duration::from_secs(10));
    p
}

fn members_and_a_joiner_are_traced(v2: bool, test: &str) {
    if !require_root(test) {
        return;
    }
    let Some(root) = cgroup_root(v2) else {
        let _ = write!(
            std::io::stderr(),
            "\n==================================================================\n\
             SKIPPED: {test}: this machine has no {} hierarchy mounted under /sys/fs/cgroup\n\
             ==================================================================\n",
            if v2 { "cgroup v2" } else { "v1 memory" }
        );
        return;
    };
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("tree_leak", dir.path());
    let gate = StartGate::new(dir.path());
    let cgroup = MemoryCgroup::under(&root, if v2 { "cgroup-v2" } else { "cgroup-v1" });
    let mut member = leaker(&bin, "a", 20, &gate);
    cgroup.add(member.pid());
    let mut joiner = leaker(&bin, "b", 12, &gate);
    // Leaks at the member's call site, but is never in the cgroup.
    let mut outsider = leaker(&bin, "a", 8, &gate);

    let json = dir.path().join("report.json");
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let metrics = format!("127.0.0.1:{port}");
    let mut memtrace = Memtrace::spawn([
        "attach".as_ref(),
        "-v".as_ref(),
        "--metrics".as_ref(),
        metrics.as_ref(),
        "--cgroup".as_ref(),
        cgroup.path().as_os_str(),
        // Stopped by the test once the metrics are read (a fixed duration raced the
        // scrape on a slow machine: "connection refused").
        "--duration".as_ref(),
        "2m".as_ref(),
        "--json".as_ref(),
        json.as_os_str(),
    ]);
    let attached = memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    assert!(
        attached.contains(if v2 { "v2 cgroup" } else { "v1 cgroup" }) && attached.contains("1 process"),
        "the attach line names the cgroup and its one process: {attached}"
    );
    // Moved in and let go at once: its first leak comes well before a rescan would see it,
    // so counting all of it takes the kernel's attach event.
    cgroup.add(joiner.pid());
    gate.open();
    for p in [&mut member, &mut joiner, &mut outsider] {
        p.wait_for_stdout("done", Duration::from_secs(30));
    }
    let scraped = scrape_per_process(port, &[(member.pid(), 20), (joiner.pid(), 12)]);
    let out = memtrace.stop(Duration::from_mins(1));
    assert!(out.status.success(), "memtrace attach --cgroup exited with {}\n{}", out.status, out.combined());
    assert!(
        out.stderr
            .contains(&format!("following process {} (tree_leak), which joined the cgroup", joiner.pid())),
        "the kernel announced the joiner (not only the once-a-second rescan)\n{}",
        out.stderr
    );
    assert!(
        !scraped.contains(&format!("pid=\"{}\"", outsider.pid())),
        "the outsider has no series:\n{scraped}"
    );
    assert!(scraped.contains("memtrace_processes{state=\"running\"} 2\n"), "{scraped}");
    check_report(
        &Report::read(&json),
        [member.pid(), joiner.pid(), outsider.pid()],
        cgroup.path(),
        &out.combined(),
    );
    drop((member, joiner, outsider));
}

/// The JSON report of the trace: each leak under its process, in full; the joiner listed,
/// the outsider not; the cgroup named.
fn check_report(report: &Report, [member, joiner, outsider]: [u32; 3], cgroup_dir: &Path, output: &str) {
    let summary = report.summary();
    eprintln!("{summary}");

    let held = |function: &str| -> Vec<(u64, u64)> {
        report
            .suspects()
            .into_iter()
            .filter(|l| l.culprit() == function)
            .flat_map(|l| l.processes())
            .map(|(pid, bytes, _)| (pid, bytes))
            .collect()
    };
    for (p, function, mib) in [(member, "leak_in_worker_a", 20), (joiner, "leak_in_worker_b", 12)] {
        let pid = u64::from(p);
        let shares = held(function);
        assert_eq!(
            shares.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![pid],
            "{function} is held by {pid} only (the outsider {outsider} is not traced)\n{summary}\n{output}"
        );
        assert!(
            within_5_percent(shares[0].1, mib * MIB),
            "{pid} holds {} bytes through {function}, expected {mib} MiB ±5%\n{summary}",
            shares[0].1
        );
    }
    let listed: Vec<u64> = report
        .json
        .get("processes")
        .and_then(|p| p.as_array())
        .expect("processes list")
        .iter()
        .filter_map(|p| p.get("pid").and_then(serde_json::Value::as_u64))
        .collect();
    assert!(
        listed.contains(&u64::from(joiner)) && !listed.contains(&u64::from(outsider)),
        "the joiner is listed, the outsider is not: {listed:?}"
    );
    let cgroup_path = cgroup_dir.canonicalize().expect("cgroup path");
    assert_eq!(
        report.json.pointer("/target/cgroup").and_then(serde_json::Value::as_str),
        Some(cgroup_path.to_str().expect("UTF-8 path")),
        "the report names the cgroup"
    );
}

#[test]
fn v1_memory_cgroup_members_and_a_joiner_are_traced() {
    members_and_a_joiner_are_traced(false, "v1_memory_cgroup_members_and_a_joiner_are_traced");
}

#[test]
fn v2_cgroup_members_and_a_joiner_are_traced() {
    members_and_a_joiner_are_traced(true, "v2_cgroup_members_and_a_joiner_are_traced");
}

#[test]
fn a_path_that_is_no_cgroup_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let out = Memtrace::run(
        [
            "attach".as_ref(),
            "--cgroup".as_ref(),
            dir.path().as_os_str(),
            "--duration".as_ref(),
            "1s".as_ref(),
        ],
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "memtrace accepted {} as a cgroup", dir.path().display());
    assert!(out.stderr.contains("is not a cgroup"), "{}", out.combined());
}
