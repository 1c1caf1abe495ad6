//! The command line as a user meets it: a wrong pid, bad input (issue 15's table), and
//! the environment check.

use std::{
    ffi::OsStr,
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{Memtrace, TestProcess, require_root, unused_pid};

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

/// A sleeping process to point memtrace at; killed on drop.
fn sleeper() -> TestProcess {
    let mut cmd = Command::new("sleep");
    cmd.arg("300");
    TestProcess::spawn("sleep", cmd)
}

/// Runs memtrace (`--duration 20s` among `args`) and checks that it refused at once: a
/// non-zero exit within 15 s, nothing attached. Returns its stderr.
fn refused_up_front<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_os_string()).collect();
    let started = Instant::now();
    let out = Memtrace::run(&args, Duration::from_mins(1));
    let took = started.elapsed();
    assert!(!out.status.success(), "memtrace {args:?} succeeded\n{}", out.combined());
    assert!(
        !out.stderr.contains("attached to"),
        "memtrace {args:?} attached before refusing\n{}",
        out.combined()
    );
    assert!(took < Duration::from_secs(15), "memtrace {args:?} took {took:?} to refuse\n{}", out.combined());
    out.stderr
}

/// `attach 2`: a kernel thread has no user memory; an empty report would be a lie.
#[test]
fn kernel_thread_is_refused() {
    if !require_root("kernel_thread_is_refused") {
        return;
    }
    let stat = fs::read_to_string("/proc/2/stat").expect("read /proc/2/stat");
    assert!(stat.contains("(kthreadd)"), "pid 2 is not kthreadd here (a pid namespace?): {stat}");
    let stderr = refused_up_front(["attach", "2", "--duration", "20s"]);
    assert!(stderr.contains("process 2 (kthreadd) is a kernel thread"), "{stderr}");
}

/// `attach 1` from a sandbox where pid 1 cannot be read (a user namespace here, whose
/// root is not the machine's): the message says what and why, not "run as root".
#[test]
fn unreadable_process_says_why() {
    if !require_root("unreadable_process_says_why") {
        return;
    }
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user"])
        .arg(integration_tests::memtrace_bin())
        .args(["attach", "1", "--duration", "20s"])
        .output()
        .expect("run unshare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "memtrace attach 1 in a user namespace succeeded: {stderr}");
    assert!(stderr.contains("cannot read /proc/1/maps of process 1"), "{stderr}");
    assert!(stderr.contains("user namespace"), "{stderr}");
    assert!(!stderr.contains("run memtrace as root"), "root is told to be root: {stderr}");

    // On machines whose sandbox hides pid 1 from root itself (these VMs), plain root too.
    if fs::File::open("/proc/1/maps").is_err() {
        let stderr = refused_up_front(["attach", "1", "--duration", "20s"]);
        assert!(stderr.contains("cannot read /proc/1/maps of process 1"), "{stderr}");
        assert!(!stderr.contains("run memtrace as root"), "root is told to be root: {stderr}");
    }
}

/// An absurd duration is a parse error, not a panic; a huge one works.
#[test]
fn huge_durations() {
    if !require_root("huge_durations") {
        return;
    }
    let target = sleeper();
    let pid = target.pid().to_string();
    let out = Memtrace::run(["attach", &pid, "--duration", "99999999999999999999h"], Duration::from_mins(1));
    assert_eq!(out.status.code(), Some(2), "a usage error exits 2\n{}", out.combined());
    assert!(out.stderr.contains("is too long"), "{}", out.combined());
    assert!(!out.stderr.contains("panicked"), "{}", out.combined());

    // The longest accepted duration and interval: stops when the command exits.
    let out = Memtrace::run(
        ["run", "--duration", "876000h", "--interval", "876000h", "--", "sleep", "1"],
        Duration::from_mins(1),
    );
    assert!(out.status.success(), "{}", out.combined());
    assert!(!out.stderr.contains("panicked"), "{}", out.combined());
}

/// Output files are checked before anything is attached: a missing or unwritable
/// directory costs nothing but the message.
#[test]
fn unwritable_outputs_are_refused_up_front() {
    if !require_root("unwritable_outputs_are_refused_up_front") {
        return;
    }
    let target = sleeper();
    let pid = target.pid().to_string();
    for (option, path, expect) in [
        ("--json", "/missing-dir/r.json", "/missing-dir/r.json: the directory /missing-dir does not exist"),
        (
            "--flamegraph",
            "/missing-dir/f.svg",
            "/missing-dir/f.svg: the directory /missing-dir does not exist",
        ),
        ("--record", "/missing-dir/r.mtr", "/missing-dir/r.mtr: the directory /missing-dir does not exist"),
        // sysfs takes no new files, even from root.
        ("--pprof", "/sys/kernel/p.pb.gz", "/sys/kernel/p.pb.gz: cannot create files in /sys/kernel"),
    ] {
        let stderr = refused_up_front(["attach", pid.as_str(), "--duration", "20s", option, path]);
        assert!(stderr.contains(expect), "{option} {path}: {stderr}");
    }
    let stderr =
        refused_up_front(["run", "--duration", "20s", "--json", "/missing-dir/r.json", "--", "true"]);
    assert!(stderr.contains("/missing-dir does not exist"), "{stderr}");
}

/// `--json /tmp/x.json` where another user planted `x.json` → a root-owned file: refused,
/// and the file it points to is untouched.
#[test]
fn planted_symlink_is_not_written_through() {
    if !require_root("planted_symlink_is_not_written_through") {
        return;
    }
    // A sticky world-writable directory, as /tmp is.
    let dir = tempfile::tempdir().expect("create temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).expect("chmod 1777");
    let victim = dir.path().join("victim");
    fs::write(&victim, "precious\n").expect("write victim");
    let link = dir.path().join("x.json");
    let planted = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ln", "-s"])
        .arg(&victim)
        .arg(&link)
        .status()
        .expect("run setpriv ln");
    assert!(planted.success(), "nobody could not plant the link");
    assert_eq!(fs::symlink_metadata(&link).expect("stat link").uid(), 65534);

    let target = sleeper();
    let pid = target.pid().to_string();
    let stderr = refused_up_front([
        "attach".as_ref(),
        pid.as_ref(),
        "--duration".as_ref(),
        "20s".as_ref(),
        "--json".as_ref(),
        link.as_os_str(),
    ]);
    assert!(stderr.contains("is a symbolic link owned by uid 65534"), "{stderr}");
    assert_eq!(fs::read_to_string(&victim).expect("read victim"), "precious\n");
    assert!(fs::symlink_metadata(&link).expect("stat link").file_type().is_symlink());

    // A safe name in the same directory is written, by a rename: no temporary file stays.
    let good = dir.path().join("good.json");
    let out = Memtrace::run(
        ["run".as_ref(), "--json".as_ref(), good.as_os_str(), "--".as_ref(), "true".as_ref()],
        Duration::from_mins(1),
    );
    assert!(out.status.success(), "{}", out.combined());
    let mut names: Vec<_> =
        fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").file_name()).collect();
    names.sort();
    assert_eq!(names, ["good.json", "victim", "x.json"], "only the report was added");
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&good).expect("read report")).expect("parse report");
    assert_eq!(json["target"]["comm"], "true", "the report of the run: {json}");
}

/// Ctrl-C, SIGTERM and SIGHUP (a closed terminal) all stop tracing with the report
/// written and a zero exit.
#[test]
fn stop_signals_write_the_report() {
    if !require_root("stop_signals_write_the_report") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let target = sleeper();
    for (name, signal) in [("SIGINT", libc::SIGINT), ("SIGTERM", libc::SIGTERM), ("SIGHUP", libc::SIGHUP)] {
        let json = dir.path().join(format!("{name}.json"));
        let mut memtrace = Memtrace::attach(target.pid(), "60s", &json);
        memtrace.wait_for_stderr("attached", Duration::from_secs(30));
        // SAFETY: signals the memtrace process this test spawned, by its pid.
        unsafe { libc::kill(memtrace.pid().cast_signed(), signal) };
        let started = Instant::now();
        let out = memtrace.wait(Duration::from_secs(30));
        assert!(out.status.success(), "memtrace after {name} exited with {}\n{}", out.status, out.combined());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name} took {:?} to stop memtrace",
            started.elapsed()
        );
        let report: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&json).expect("read report")).expect("parse report");
        assert_eq!(report["target"]["pid"], target.pid(), "{name}: {report}");
    }
}
