//! `memtrace run` under sudo: the command runs as the user who ran sudo (`SUDO_UID`,
//! `SUDO_GID`) and is still traced; `--as-root` keeps it root; the `isolate-*-v8.log` files
//! node writes with `--perf-basic-prof` are not left in the working directory.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use integration_tests::{MIB, Report, StartGate, build_c_fixture, node_bin, require_root};

/// `nobody` on Debian.
const NOBODY: u32 = 65534;
const LEAKED_MIB: u64 = 10;

/// A directory that `nobody` can read and search, with `mmap_leak` built in it and its
/// start gate already open (the command runs at once).
fn world_readable_fixture() -> (tempfile::TempDir, PathBuf, StartGate) {
    let dir = tempfile::tempdir().expect("create temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    let bin = build_c_fixture("mmap_leak", dir.path());
    let gate = StartGate::new(dir.path());
    gate.open();
    (dir, bin, gate)
}

/// `[env SUDO_UID=.. SUDO_GID=..] memtrace run [--as-root] -- sh -c 'echo ids; exec mmap_leak'`.
fn run_leak(as_root: bool, dir: &Path, bin: &Path, gate: &StartGate) -> (String, Report) {
    let json = dir.join("report.json");
    let mut args: Vec<&std::ffi::OsStr> = vec!["run".as_ref(), "--duration".as_ref(), "5s".as_ref()];
    if as_root {
        args.push("--as-root".as_ref());
    }
    let leaked = LEAKED_MIB.to_string();
    args.extend([
        "--json".as_ref(),
        json.as_os_str(),
        "--".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        "echo \"ids uid=$(id -u) gid=$(id -g) home=$HOME\"; exec \"$0\" \"$@\"".as_ref(),
        bin.as_os_str(),
        leaked.as_ref(),
        gate.path().as_os_str(),
    ]);
    let mut cmd = std::process::Command::new(integration_tests::memtrace_bin());
    cmd.args(&args).env("SUDO_UID", NOBODY.to_string()).env("SUDO_GID", NOBODY.to_string());
    let out = cmd.output().expect("run memtrace");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "memtrace run exited with {}\n{stdout}\n{stderr}", out.status);
    let ids =
        stdout.lines().find(|l| l.starts_with("ids ")).unwrap_or_else(|| panic!("no ids line:\n{stdout}"));
    (format!("{ids}\n{stderr}"), Report::read(&json))
}

fn assert_leak_named(report: &Report, context: &str) {
    let found = report.leaks_with_frame(|f| f.names("leak_mappings"));
    assert!(!found.is_empty(), "leak_mappings is not named\n{}\n{context}", report.summary());
    // The mapped view's suspect (the faults view's names leak_mappings as a caller too).
    let bytes = found.iter().map(|l| l.bytes_in("mmap")).max().unwrap_or(0);
    assert!(
        bytes.abs_diff(LEAKED_MIB * MIB) <= LEAKED_MIB * MIB / 20,
        "leak_mappings holds {bytes} bytes, expected {LEAKED_MIB} MiB ±5%\n{}",
        report.summary()
    );
}

#[test]
fn under_sudo_the_command_runs_as_the_invoking_user_and_is_traced() {
    if !require_root("under_sudo_the_command_runs_as_the_invoking_user_and_is_traced") {
        return;
    }
    let (dir, bin, gate) = world_readable_fixture();
    let (seen, report) = run_leak(false, dir.path(), &bin, &gate);
    assert!(seen.starts_with(&format!("ids uid={NOBODY} gid={NOBODY} home=/nonexistent")), "{seen}");
    assert!(
        seen.contains("as uid 65534 (nobody), the user who ran sudo"),
        "memtrace says whom it runs as\n{seen}"
    );
    assert_leak_named(&report, &seen);
}

#[test]
fn as_root_keeps_the_command_root() {
    if !require_root("as_root_keeps_the_command_root") {
        return;
    }
    let (dir, bin, gate) = world_readable_fixture();
    let (seen, report) = run_leak(true, dir.path(), &bin, &gate);
    assert!(seen.starts_with("ids uid=0 gid=0"), "{seen}");
    assert_leak_named(&report, &seen);
}

#[test]
fn node_leaves_no_v8_logs_in_the_working_directory() {
    if !require_root("node_leaves_no_v8_logs_in_the_working_directory") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let out = std::process::Command::new(integration_tests::memtrace_bin())
        .args(["run", "--duration", "4s", "--js-heap", "off", "--"])
        .arg(node_bin())
        .args(["--perf-basic-prof", "-e", "setInterval(() => {}, 1000)"])
        .current_dir(dir.path())
        .output()
        .expect("run memtrace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "memtrace run exited with {}\n{stderr}", out.status);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list the working directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("isolate-") && n.ends_with("-v8.log"))
        .collect();
    assert!(
        stderr.contains("memtrace: removed 1 V8 log (isolate-*-v8.log)"),
        "node wrote its log and memtrace removed it\n{stderr}"
    );
    assert!(left.is_empty(), "V8 logs left in the working directory: {left:?}");
}
