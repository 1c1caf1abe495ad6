//! Runs a parsed command line.

use std::{
    io::Write as _,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::{CommandExt as _, ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, ExitCode},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};

use crate::{
    bpf::features::{Status, run_checks},
    cli::{Cli, Command, OutputArgs, TraceArgs},
    export,
    launch::RunAs,
    output, procfs, record,
    report::Report,
    session::{self, Release, StopReason, TraceTarget},
};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if !matches!(cli.command, Command::Doctor | Command::Report { .. }) {
        protect_from_oom_killer();
    }
    if let Command::Attach { trace, .. } | Command::Top { trace, .. } | Command::Run { trace, .. } =
        &cli.command
    {
        check_before_tracing(trace)?;
    }
    match &cli.command {
        Command::Report { output, .. } => check_outputs(output, None)?,
        Command::Oom { json: Some(path), .. } => output::check(path)?,
        _ => {}
    }
    match cli.command {
        Command::Doctor => Ok(doctor()),
        Command::Attach { pids, cgroup, trace } => {
            let target = TraceTarget { pids, children: trace.children, cgroup, release: None, program: None };
            trace_and_report(target, &trace, None)
        }
        Command::Top { pid, mut trace } => {
            trace.live = true;
            let target = TraceTarget {
                pids: vec![pid],
                children: trace.children,
                cgroup: None,
                release: None,
                program: None,
            };
            trace_and_report(target, &trace, None)
        }
        Command::Run { trace, command, as_root } => {
            if let Err((status, message)) = find_command(&command) {
                eprintln!("memtrace: error: {message}");
                return Ok(ExitCode::from(status));
            }
            let user = if as_root { None } else { RunAs::invoking_user() };
            if let Some(user) = &user {
                eprintln!(
                    "memtrace: running {} as {}, the user who ran sudo (--as-root runs it as root)",
                    command[0],
                    user.describe()
                );
            }
            let launched = Launched { started: SystemTime::now(), command: &command };
            let (child, release) = spawn_held(&command, user.as_ref())?;
            let target = TraceTarget {
                pids: vec![child.id()],
                children: trace.children,
                cgroup: None,
                release: Some(release),
                program: which::which(&command[0]).ok(),
            };
            trace_and_report(target, &trace, Some((child, launched)))
        }
        Command::Oom { duration, json } => crate::oomwatch::watch(duration, json.as_deref()),
        Command::Report { recording, diff, output } => report_recording(&recording, diff.as_deref(), &output),
    }
}

/// Fails before a long trace on what would only fail when writing its outputs.
fn check_before_tracing(args: &TraceArgs) -> anyhow::Result<()> {
    let tracked: Vec<&str> = args.track.iter().map(|t| t.name()).collect();
    args.output.flamegraph_kind.flame_value(&tracked).map_err(anyhow::Error::msg)?;
    if let Some(url) = &args.pyroscope {
        let auth = crate::push::pyroscope::Auth::from_env()?;
        crate::push::pyroscope::Target::new(url, &args.labels, "", auth)?;
    }
    if let Some(url) = &args.otlp_profiles {
        crate::push::otlp::Target::new(url, &args.labels, "")?;
    }
    check_outputs(&args.output, args.record.as_deref())
}

/// Every output path is checked before anything is attached (see [`crate::output`]).
fn check_outputs(out: &OutputArgs, record: Option<&Path>) -> anyhow::Result<()> {
    let paths = [&out.json, &out.flamegraph, &out.folded, &out.pprof, &out.speedscope];
    let mut seen: Vec<&Path> = Vec::new();
    for path in paths.into_iter().flatten().map(PathBuf::as_path).chain(record) {
        if seen.contains(&path) {
            bail!("{} is given for two outputs; give each its own file", path.display());
        }
        seen.push(path);
        output::check(path)?;
    }
    Ok(())
}

/// `memtrace report`: renders a recording, or the diff of two.
fn report_recording(path: &Path, later: Option<&Path>, out: &OutputArgs) -> anyhow::Result<ExitCode> {
    let a = record::read(path)?;
    match later {
        None => write_outputs(&a.report, out)?,
        Some(later) => {
            let b = record::read(later)?;
            let (a_name, b_name) = (path.display().to_string(), later.display().to_string());
            let diff = record::diff::diff(&a_name, &a.report, &b_name, &b.report);
            record::diff::write_outputs(&diff, out)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("start the async runtime")
}

/// A command `memtrace run` started.
struct Launched<'a> {
    started: SystemTime,
    command: &'a [String],
}

fn trace_and_report(
    target: TraceTarget,
    args: &TraceArgs,
    launched: Option<(Child, Launched<'_>)>,
) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let result = rt.block_on(session::trace(target, args));
    let (child, launched) = launched.unzip();
    let child_end = child.and_then(finish_child);
    let (mut report, reason) = result?;
    if let Some(launched) = launched {
        remove_v8_logs(&report, &launched);
    }
    let ended = matches!(reason, StopReason::TargetExited | StopReason::TargetOomKilled);
    // `memtrace run` returns the command's own status when it ended by itself, as a
    // shell would: its code, or 128 + the signal that killed it.
    let mut code = ExitCode::SUCCESS;
    if let Some(status) = child_end.filter(|_| ended) {
        let exit = procfs::exit::exit_from(status.code(), status.signal(), status.core_dumped());
        code = ExitCode::from(procfs::exit::shell_status(&exit));
        report.target.exit = Some(exit);
    }
    // The recording goes first, and the other outputs are written even if it fails.
    let recorded = args.record.as_deref().map(|path| {
        record::write_report(path, &report)?;
        eprintln!("memtrace: wrote recording to {}", path.display());
        anyhow::Ok(())
    });
    write_outputs(&report, &args.output)?;
    recorded.transpose()?;
    match reason {
        StopReason::TargetOomKilled => {
            eprintln!("memtrace: the traced process was OOM-killed; report written");
        }
        StopReason::TargetExited => match &report.target.exit {
            Some(exit) => eprintln!("memtrace: the traced process ended: {exit}"),
            None => eprintln!("memtrace: the traced process exited"),
        },
        StopReason::Duration | StopReason::Signal => {}
    }
    Ok(code)
}

/// `memtrace run`: the `isolate-*-v8.log` files node wrote into the working directory are
/// not left there (see [`crate::launch::remove_v8_logs`]).
fn remove_v8_logs(report: &Report, launched: &Launched<'_>) {
    let Ok(dir) = std::env::current_dir() else { return };
    let pids: Vec<u32> = report.processes.iter().map(|p| p.pid).chain([report.target.pid]).collect();
    let removed = crate::launch::remove_v8_logs(&dir, &pids, launched.started, launched.command);
    if !removed.is_empty() {
        eprintln!(
            "memtrace: removed {} that node wrote with --perf-basic-prof in {}",
            export::human::plural(
                removed.len() as u64,
                "V8 log (isolate-*-v8.log)",
                "V8 logs (isolate-*-v8.log)"
            ),
            dir.display()
        );
    }
}

/// `memtrace run`: the command must exist before a shell is started for it, so that a
/// typo is one clear line (and the shell's statuses: 127 not found, 126 not runnable).
fn find_command(command: &[String]) -> Result<(), (u8, String)> {
    let Some(program) = command.first() else {
        return Err((2, "memtrace run needs a command after --".to_string()));
    };
    if program.contains('/') {
        return match std::fs::metadata(program) {
            Err(e) => Err((127, format!("cannot run {program}: {e}"))),
            Ok(meta) if meta.is_dir() => Err((126, format!("cannot run {program}: it is a directory"))),
            Ok(_) if which::which(program).is_err() => {
                Err((126, format!("cannot run {program}: it is not executable")))
            }
            Ok(_) => Ok(()),
        };
    }
    which::which(program)
        .map(drop)
        .map_err(|_| (127, format!("cannot run {program}: command not found (searched PATH)")))
}

/// Writes every requested output; the text report goes to stdout.
pub fn write_outputs(report: &Report, out: &OutputArgs) -> anyhow::Result<()> {
    let flame = if out.flamegraph.is_some() || out.folded.is_some() {
        out.flamegraph_kind.flame_value(&report.tracked).map_err(anyhow::Error::msg)?
    } else {
        export::FlameValue::Outstanding
    };
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    export::text::write_text(report, out.top, &mut lock).context("write the report to stdout")?;
    lock.flush().context("flush stdout")?;
    let write_file = crate::export::write_to_file;
    if let Some(path) = &out.json {
        write_file(path, "JSON report", &|w| export::json::write_json(report, w))?;
    }
    if let Some(path) = &out.folded {
        write_file(path, "folded stacks", &|w| export::folded::write_folded(report, flame, w))?;
    }
    if let Some(path) = &out.flamegraph {
        write_file(path, "flamegraph", &|w| export::flamegraph::write_flamegraph(report, flame, w))?;
    }
    if let Some(path) = &out.pprof {
        write_file(path, "pprof profile", &|w| export::pprof::write_pprof(report, w))?;
    }
    if let Some(path) = &out.speedscope {
        write_file(path, "speedscope profile", &|w| export::speedscope::write_speedscope(report, w))?;
    }
    Ok(())
}

/// The tracer must outlive the target it watches being OOM-killed: lower our own
/// `oom_score_adj` (not to -1000: a tracer gone wrong must stay killable).
fn protect_from_oom_killer() {
    const ADJ: &str = "-900";
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", ADJ) {
        log::info!("could not lower memtrace's oom_score_adj to {ADJ} (needs CAP_SYS_RESOURCE): {e}");
    }
}

fn doctor() -> ExitCode {
    let checks = run_checks();
    let mut failed = false;
    for c in &checks {
        let mark = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => {
                failed = true;
                "FAIL"
            }
        };
        println!("[{mark}] {:<20} {}", c.name, c.detail);
    }
    if failed {
        println!("memtrace cannot run here until the FAIL lines are fixed.");
        ExitCode::FAILURE
    } else {
        println!("memtrace can run here.");
        ExitCode::SUCCESS
    }
}

/// Spawns `command` held before exec until the returned closure is called, so that
/// tracing sees it from its first instruction.
///
/// `std::process::Command::spawn` returns only once the child has exec'd, so the child
/// cannot wait in `pre_exec`. Instead it execs a shell that waits for the gate pipe
/// (fd 3) to close and then execs the command in the same process: the pid memtrace
/// traces is the command's.
fn spawn_held(command: &[String], user: Option<&RunAs>) -> anyhow::Result<(Child, Release)> {
    const GATE_FD: i32 = 3;
    if command.is_empty() {
        bail!("memtrace run needs a command after --");
    }
    let mut fds = [0; 2];
    // SAFETY: valid pointer to two ints; O_CLOEXEC keeps both ends out of other programs.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("create a pipe");
    }
    // SAFETY: the kernel just gave us these fds; each is owned once.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c").arg(format!("read _ <&{GATE_FD}; exec {GATE_FD}<&-; exec \"$0\" \"$@\"")).args(command);
    let raw_read = read_end.as_raw_fd();
    // SAFETY: between fork and exec the hook only calls async-signal-safe dup2(2) and
    // fcntl(2); dup2
    // onto fd 3 clears close-on-exec there, so the shell inherits the gate.
    unsafe {
        cmd.pre_exec(move || {
            if raw_read == GATE_FD {
                // dup2 onto itself keeps close-on-exec: clear it by hand.
                if libc::fcntl(GATE_FD, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw_read, GATE_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if let Some(user) = user {
        user.apply(&mut cmd);
    }
    let child = cmd.spawn().with_context(|| format!("start {}", command[0]))?;
    drop(read_end);
    let release: Release = Box::new(move || {
        // EOF on the gate: the shell execs the command.
        drop(write_end);
        Ok(())
    });
    Ok((child, release))
}

/// A command memtrace launched is stopped with it (SIGTERM, then SIGKILL after 5 s).
/// Returns its status if it had ended by itself.
fn finish_child(mut child: Child) -> Option<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // SAFETY: signals the child we spawned, by its pid.
    unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
    for _ in 0..50 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}
