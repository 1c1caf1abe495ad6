//! The command line as a user meets it: a wrong pid, and the environment check.

use std::time::Duration;

use integration_tests::{Memtrace, require_root, unused_pid};

#[test]
fn dead_pid() {
    if !require_root("dead_pid") {
        return;
    }
    let pid = unused_pid().to_string();
    let out = Memtrace::run(["attach", pid.as_str(), "--duration", "2s"], Duration::from_secs(30));
    assert!(!out.status.success(), "memtrace attach {pid} (no such process) succeeded\n{}", out.combined());
    let stderr = out.stderr.to_lowercase();
    assert!(
        stderr.contains("no such process") || stderr.contains(&pid),
        "stderr names neither the pid nor \"no such process\"\n{}",
        out.combined()
    );
}

#[test]
fn doctor() {
    if !require_root("doctor") {
        return;
    }
    let out = Memtrace::run(["doctor"], Duration::from_mins(1));
    assert!(out.status.success(), "memtrace doctor exited with {}\n{}", out.status, out.combined());
    let text = out.combined().to_lowercase();
    assert!(text.contains("btf"), "memtrace doctor does not mention BTF\n{}", out.combined());
    assert!(text.contains("tracepoint"), "memtrace doctor does not mention tracepoints\n{}", out.combined());
}

/// Without root, attach and oom refuse at once with a message that says what to do.
#[test]
fn not_root_is_a_clear_error() {
    if !require_root("not_root_is_a_clear_error") {
        return;
    }
    let bin = integration_tests::memtrace_bin();
    let me = std::process::id().to_string();
    for args in [vec!["attach", me.as_str(), "--duration", "1s"], vec!["oom", "--duration", "1s"]] {
        // setpriv (util-linux) drops to `nobody` for the one command.
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .args(&args)
            .output()
            .expect("run setpriv");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "memtrace {args:?} as nobody succeeded");
        assert!(
            stderr.contains("must run as root") && stderr.contains("sudo"),
            "memtrace {args:?} as nobody: {stderr}"
        );
    }
}

/// `memtrace run` traces a command from its first instruction: mappings made right at
/// start are attributed, and the command is stopped with memtrace.
#[test]
fn run_traces_a_command_from_its_start() {
    if !require_root("run_traces_a_command_from_its_start") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = integration_tests::build_c_fixture("mmap_leak", dir.path());
    // The start file exists before the command runs: it leaks at once.
    let gate = integration_tests::StartGate::new(dir.path());
    gate.open();
    let json = dir.path().join("report.json");
    let out = Memtrace::run(
        [
            "run".as_ref(),
            "--duration".as_ref(),
            "4s".as_ref(),
            "--json".as_ref(),
            json.as_os_str(),
            "--".as_ref(),
            bin.as_os_str(),
            "10".as_ref(),
            gate.path().as_os_str(),
        ],
        Duration::from_mins(1),
    );
    assert!(out.status.success(), "memtrace run exited with {}\n{}", out.status, out.combined());
    let report = integration_tests::Report::read(&json);
    let summary = report.summary();
    let leaking = report.leaks_with_frame(|f| f.names("leak_mappings"));
    assert!(
        leaking.iter().any(|l| l.bytes() == 10 * integration_tests::MIB),
        "leak_mappings holds 10 MiB\n{summary}\n{}",
        out.combined()
    );
    assert!(out.stdout.contains("mmap_leak"), "the report names the command\n{}", out.combined());
}
