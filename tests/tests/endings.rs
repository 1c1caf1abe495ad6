//! Short C names and the ways a traced command ends (issue 16, items 4 and 7), with the
//! `endings` fixture: `f` maps 1 MiB and `d` 2 MiB, then the program exits, segfaults or
//! aborts as asked.

use std::{fs, path::Path, process::Command, time::Duration};

use integration_tests::{MIB, Memtrace, Report, RunOutput, TestProcess, build_c_fixture, require_root};
use serde_json::json;

/// `memtrace run --json JSON -- endings MODE`.
fn run_endings(bin: &Path, mode: &str, json: &Path) -> RunOutput {
    Memtrace::run(
        [
            "run".as_ref(),
            "--duration".as_ref(),
            "30s".as_ref(),
            "--json".as_ref(),
            json.as_os_str(),
            "--".as_ref(),
            bin.as_os_str(),
            mode.as_ref(),
        ],
        Duration::from_mins(1),
    )
}

/// A C function named `f` is `f`, not the C++ type `float` (nor `d` `double`).
#[test]
fn short_c_names_are_not_demangled() {
    if !require_root("short_c_names_are_not_demangled") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("endings", dir.path());
    let json = dir.path().join("report.json");
    let out = run_endings(&bin, "exit:0", &json);
    assert!(out.status.success(), "memtrace run exited with {}\n{}", out.status, out.combined());
    let report = Report::read(&json);
    let summary = report.summary();
    for (name, bytes) in [("f", MIB), ("d", 2 * MIB)] {
        let mapped: Vec<_> = report
            .leaks_with_frame(|fr| fr.function() == name)
            .into_iter()
            .filter(|l| l.sources().contains(&"mmap"))
            .collect();
        assert!(mapped.iter().any(|l| l.bytes() == bytes), "{name} maps {bytes} bytes\n{summary}");
    }
    let types = report.leaks_with_frame(|fr| fr.function() == "float" || fr.function() == "double");
    assert!(types.is_empty(), "C names demangled as C++ types\n{summary}");
    assert!(!out.stdout.contains("float") && !out.stdout.contains("double"), "{}", out.stdout);
}

/// `run` returns the command's exit code, and the report says it.
#[test]
fn run_returns_the_exit_code() {
    if !require_root("run_returns_the_exit_code") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("endings", dir.path());
    let json = dir.path().join("report.json");
    let out = run_endings(&bin, "exit:3", &json);
    assert_eq!(out.status.code(), Some(3), "memtrace run returns the command's code\n{}", out.combined());
    assert!(out.stdout.contains("status:       exited with code 3"), "{}", out.combined());
    let report = Report::read(&json);
    assert_eq!(
        report.json["target"]["exit"],
        json!({ "code": 3, "core_dumped": false }),
        "{}",
        report.json["target"]
    );
}

/// A segfault and an abort: the report names the signal (and the core dump), and `run`
/// returns 128 + the signal, as a shell does.
#[test]
fn crashes_are_reported_with_their_signal() {
    if !require_root("crashes_are_reported_with_their_signal") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("endings", dir.path());
    for (mode, signal, number) in [("segv", "SIGSEGV", 11), ("abort", "SIGABRT", 6)] {
        let json = dir.path().join(format!("{mode}.json"));
        let out = run_endings(&bin, mode, &json);
        assert_eq!(
            out.status.code(),
            Some(128 + number),
            "memtrace run -- endings {mode}\n{}",
            out.combined()
        );
        assert!(out.stdout.contains(&format!("status:       killed by {signal}")), "{}", out.combined());
        assert!(
            out.stderr.contains(&format!("the traced process ended: killed by {signal}")),
            "{}",
            out.combined()
        );
        let report = Report::read(&json);
        let exit = &report.json["target"]["exit"];
        assert_eq!(exit["signal"], signal, "{exit}");
        assert_eq!(exit["signal_number"], number, "{exit}");
        assert!(exit.get("code").is_none(), "a killed process has no exit code: {exit}");
        // The leak is still there: a crash does not lose the trace.
        assert!(!report.leaks_with_frame(|f| f.function() == "d").is_empty(), "{}", report.summary());
    }

    // With a core size limit and the kernel's plain `core` pattern, the dump is said.
    let pattern = fs::read_to_string("/proc/sys/kernel/core_pattern").expect("read core_pattern");
    if pattern.trim() != "core" {
        eprintln!("NOTE: core_pattern is {pattern:?}, not \"core\": core_dumped not checked");
        return;
    }
    let json = dir.path().join("core.json");
    let out = Command::new("sh")
        .current_dir(dir.path())
        .arg("-c")
        .arg("ulimit -c unlimited; exec \"$0\" run --json \"$1\" -- \"$2\" abort")
        .arg(integration_tests::memtrace_bin())
        .arg(&json)
        .arg(&bin)
        .output()
        .expect("run memtrace with ulimit -c unlimited");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(134), "{stderr}");
    assert!(stderr.contains("killed by SIGABRT (core dumped)"), "{stderr}");
    assert_eq!(Report::read(&json).json["target"]["exit"]["core_dumped"], true);
    assert!(dir.path().join("core").exists(), "the kernel wrote no core file");
}

/// `attach` to a process that crashes: memtrace is not its parent, but reads how it
/// ended before the parent collects it; memtrace itself succeeds.
#[test]
fn attach_reports_a_crash() {
    if !require_root("attach_reports_a_crash") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("endings", dir.path());
    let mut cmd = Command::new(&bin);
    cmd.args(["segv", "5"]);
    let mut target = TestProcess::spawn("endings", cmd);
    target.wait_for_stdout("leaked", Duration::from_secs(10));
    let json = dir.path().join("report.json");
    let mut memtrace = Memtrace::attach(target.pid(), "60s", &json);
    memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    let out = memtrace.wait(Duration::from_mins(1));
    assert!(out.status.success(), "memtrace attach exited with {}\n{}", out.status, out.combined());
    assert!(out.stdout.contains("status:       killed by SIGSEGV"), "{}", out.combined());
    let report = Report::read(&json);
    assert_eq!(report.json["target"]["exit"]["signal"], "SIGSEGV", "{}", report.json["target"]);
}

/// `run` with a command that does not exist or cannot run: one line, the shell's status.
#[test]
fn missing_command_is_a_clear_error() {
    if !require_root("missing_command_is_a_clear_error") {
        return;
    }
    for (command, status, message) in [
        ("no-such-command-xyz", 127, "cannot run no-such-command-xyz: command not found"),
        ("/no/such/file", 127, "cannot run /no/such/file: No such file or directory"),
        ("/etc/passwd", 126, "cannot run /etc/passwd: it is not executable"),
    ] {
        let out = Memtrace::run(["run", "--", command], Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(status), "memtrace run -- {command}\n{}", out.combined());
        assert!(out.stderr.contains(message), "{}", out.combined());
        assert!(!out.stderr.contains("attached"), "{}", out.combined());
    }
}
