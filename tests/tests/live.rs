//! `memtrace top`: the live view drawn in a real terminal (tmux), as a person watching a
//! load test sees it: the leaking function appears within seconds with its verdict and
//! the time to the cgroup limit, `q` ends the trace and writes the outputs. Without a
//! terminal it falls back to the status line.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    MIB, MemoryCgroup, Memtrace, Report, StartGate, TestProcess, build_c_fixture, require_root,
};

/// A tmux server of its own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Runs `command` in a detached 160x48 session named `live`.
    fn start(command: &str) -> Self {
        let socket = format!("memtrace-live-test-{}", std::process::id());
        let status = Command::new("tmux")
            .args(["-L", &socket, "new-session", "-d", "-s", "live", "-x", "160", "-y", "48", command])
            .status()
            .unwrap_or_else(|e| panic!("run tmux: {e} (is tmux installed? `cargo xtask setup` installs it)"));
        assert!(status.success(), "tmux new-session failed: {status}");
        Self { socket }
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().expect("run tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "live"])
    }

    /// The screen and the scrollback above it.
    fn history(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-S", "-", "-t", "live"])
    }

    fn send(&self, keys: &str) {
        self.tmux(&["send-keys", "-t", "live", keys]);
    }

    /// Polls the screen until `pred` holds; panics with the last screen after `timeout`.
    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> (String, Duration) {
        let started = Instant::now();
        loop {
            let screen = self.screen();
            if pred(&screen) {
                return (screen, started.elapsed());
            }
            assert!(
                started.elapsed() < timeout,
                "the live view did not show {what} within {timeout:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.tmux(&["kill-server"]);
    }
}

/// Waits for `path` to hold the exit status the tmux command wrote.
fn wait_for_status(path: &Path, timeout: Duration, screen: impl Fn() -> String) -> i32 {
    let started = Instant::now();
    loop {
        if let Ok(text) = fs::read_to_string(path)
            && let Ok(code) = text.trim().parse()
        {
            return code;
        }
        assert!(
            started.elapsed() < timeout,
            "memtrace top did not exit within {timeout:?} after q:\n{}",
            screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Run {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    fixture: TestProcess,
    gate: StartGate,
}

/// The mmap fixture: `leak_mappings` keeps 1 MiB every 50 ms (20 MiB/s) for
/// `mebibytes` MiB while `transient_mappings` maps and unmaps as much.
fn leak_fixture(mebibytes: u32) -> Run {
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("mmap_leak", dir.path());
    let gate = StartGate::new(dir.path());
    let mut cmd = Command::new(&bin);
    cmd.arg(mebibytes.to_string()).arg(gate.path());
    let mut fixture = TestProcess::spawn("mmap_leak", cmd);
    fixture.wait_for_stdout("waiting", Duration::from_secs(10));
    Run { dir: dir.path().to_path_buf(), _dir: dir, fixture, gate }
}

/// The terminal is back in cooked mode (the tmux command ran `stty -a` after memtrace).
fn assert_terminal_restored(dir: &Path) {
    let started = Instant::now();
    let stty = loop {
        match fs::read_to_string(dir.join("stty")) {
            Ok(text) if text.contains("icanon") => break text,
            _ if started.elapsed() > Duration::from_secs(5) => panic!("stty -a did not run after memtrace"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let flags: Vec<&str> = stty.split_whitespace().collect();
    for flag in ["icanon", "echo", "isig"] {
        assert!(flags.contains(&flag), "{flag} is back on after memtrace top:\n{stty}");
    }
}

/// The suspects table's row naming `function`.
fn row<'a>(screen: &'a str, function: &str) -> Option<&'a str> {
    screen.lines().find(|l| l.contains(function) && l.contains("MiB"))
}

#[test]
fn top_draws_the_leak_and_quits_on_q_writing_the_outputs() {
    if !require_root("top_draws_the_leak_and_quits_on_q_writing_the_outputs") {
        return;
    }
    // Made first, removed last: after the fixture in it is gone.
    let cgroup = MemoryCgroup::new("live", 512 * MIB)
        .unwrap_or_else(|| panic!("this test needs a memory cgroup controller (v1 or v2)"));
    let run = leak_fixture(300);
    cgroup.add(run.fixture.pid());
    let (json, pprof, status) = (run.dir.join("top.json"), run.dir.join("top.pb.gz"), run.dir.join("status"));
    let command = format!(
        "{} top {} --json {} --pprof {}; echo $? > {}; stty -a > {}; sleep 120",
        integration_tests::memtrace_bin().display(),
        run.fixture.pid(),
        json.display(),
        pprof.display(),
        status.display(),
        run.dir.join("stty").display()
    );
    let tmux = Tmux::start(&command);
    tmux.wait_for("its header", Duration::from_secs(30), |s| {
        s.contains("memtrace top") && s.contains("Suspects")
    });
    run.gate.open();

    let (screen, after) = tmux.wait_for("leak_mappings as a leak", Duration::from_secs(20), |s| {
        row(s, "leak_mappings").is_some_and(|r| r.contains(" leak "))
    });
    eprintln!(
        "live view: leak_mappings shown as a leak {:.1}s after the fixture started",
        after.as_secs_f64()
    );
    assert!(after < Duration::from_secs(10), "the leak took {after:?} to show\n{screen}");
    let leak_row = row(&screen, "leak_mappings").unwrap_or_default();
    assert!(
        leak_row.contains("MiB/s") && leak_row.contains("mapped"),
        "with its growth and view: {leak_row}"
    );
    // The leak (20 MiB/s) fills the 512 MiB cgroup: the time to the limit is said.
    let (screen, _) = tmux.wait_for("the time to the limit", Duration::from_secs(20), |s| {
        s.contains("at this rate the cgroup limit (512.0 MiB) is reached in")
    });
    assert!(screen.contains("of its 512.0 MiB limit"), "{screen}");
    assert!(screen.contains("lost 0"), "{screen}");

    // Enter shows the stack of the selected suspect; s re-sorts.
    tmux.send("s");
    tmux.wait_for("the held-bytes order", Duration::from_secs(5), |s| s.contains("sorted by held bytes"));
    tmux.send("q");
    let code = wait_for_status(&status, Duration::from_secs(30), || tmux.screen());
    assert_eq!(code, 0, "memtrace top exits cleanly on q\n{}", tmux.screen());
    assert_terminal_restored(&run.dir);
    let report = Report::read(&json);
    let leaks = report.leaks_with_frame(|f| f.names("leak_mappings"));
    assert!(
        leaks.iter().any(|l| l.bytes() >= 20 * MIB),
        "the JSON report names the leak\n{}",
        report.summary()
    );
    assert!(
        report.json["time_to_limit"]["limit_bytes"] == 512 * MIB,
        "and the time to the limit: {}",
        report.json["time_to_limit"]
    );
    let pprof_len = fs::metadata(&pprof).map_or(0, |m| m.len());
    assert!(pprof_len > 100, "the pprof profile is written ({pprof_len} bytes)");
    // The text report comes after the view, on the restored terminal.
    let after_exit = tmux.history();
    assert!(after_exit.contains("time to limit:"), "{after_exit}");
    drop(tmux);
    drop(run);
    drop(cgroup);
}

#[test]
fn ctrl_c_in_top_writes_the_outputs_and_enter_shows_the_stack() {
    if !require_root("ctrl_c_in_top_writes_the_outputs_and_enter_shows_the_stack") {
        return;
    }
    let run = leak_fixture(300);
    let (json, status) = (run.dir.join("top.json"), run.dir.join("status"));
    let command = format!(
        "{} attach {} --live --json {}; echo $? > {}; stty -a > {}; sleep 120",
        integration_tests::memtrace_bin().display(),
        run.fixture.pid(),
        json.display(),
        status.display(),
        run.dir.join("stty").display()
    );
    let tmux = Tmux::start(&command);
    tmux.wait_for("its header", Duration::from_secs(30), |s| s.contains("memtrace top"));
    run.gate.open();
    tmux.wait_for("leak_mappings", Duration::from_secs(20), |s| row(s, "leak_mappings").is_some());
    // Paused, the view stops re-ranking; Enter expands the selected (first) suspect.
    tmux.send("p");
    tmux.wait_for("PAUSED", Duration::from_secs(5), |s| s.contains("PAUSED"));
    tmux.send("Enter");
    let (screen, _) = tmux.wait_for("the expanded stack", Duration::from_secs(5), |s| {
        s.lines().any(|l| l.trim_start_matches(['│', ' ']).starts_with("main mmap_leak.c"))
    });
    assert!(
        screen.lines().any(|l| l.contains("→ ") && l.contains("mmap_leak.c")),
        "the culprit is marked in the stack\n{screen}"
    );
    tmux.send("C-c");
    let code = wait_for_status(&status, Duration::from_secs(30), || tmux.screen());
    assert_eq!(code, 0, "Ctrl-C in the view ends the trace cleanly\n{}", tmux.screen());
    assert_terminal_restored(&run.dir);
    let report = Report::read(&json);
    assert!(!report.leaks_with_frame(|f| f.names("leak_mappings")).is_empty(), "{}", report.summary());
}

#[test]
fn top_without_a_terminal_prints_the_status_line() {
    if !require_root("top_without_a_terminal_prints_the_status_line") {
        return;
    }
    let run = leak_fixture(300);
    let pid = run.fixture.pid().to_string();
    let mut memtrace = Memtrace::spawn(["top", &pid, "--duration", "4s"]);
    memtrace.wait_for_stderr("no live view (stdin is not a terminal)", Duration::from_secs(30));
    run.gate.open();
    let out = memtrace.wait(Duration::from_secs(30));
    assert!(out.status.success(), "{}", out.combined());
    assert!(out.stderr.contains("events"), "the status line instead\n{}", out.combined());
    assert!(out.stdout.contains("leak_mappings"), "and the report\n{}", out.combined());
}
