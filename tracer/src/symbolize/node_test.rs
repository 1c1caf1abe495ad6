//! End to end on a real Node.js process: stop it at `mmap` syscalls with ptrace (as the
//! eBPF tracepoint would see them), copy its registers and stack, and check that the stack
//! unwinds from glibc (no frame pointers) through node's C++ and V8's builtins into the
//! JavaScript function that allocated, named by the perf map, or, without one, from V8's
//! heap.
//!
//! Needs `node` on PATH; the test says so and passes when it is missing. Tracing one's own
//! child needs no privileges.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

const SCRIPT: &str = r"
const kept = [];
function rememberOrder(i) {
  // Large enough for glibc's malloc to mmap it.
  kept.push(Buffer.allocUnsafeSlow(256 * 1024));
  if (kept.length > 64) kept.shift();
}
setInterval(() => { for (let i = 0; i < 64; i++) rememberOrder(i); }, 1);
";

/// ptrace's unused pointer arguments (variadic: they must be pointer-sized).
const NULL: *mut libc::c_void = std::ptr::null_mut();

/// Kills the fixture on drop.
struct Fixture(Child);

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", self.0.id()));
    }
}

/// What a `mmap` syscall-entry stop of the main thread looked like.
struct Sample {
    regs: Regs,
    stack: Vec<u8>,
}

/// Waits for the next ptrace stop of `pid`; `None` when it exited.
fn wait_stop(pid: i32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waitpid writes only to `status`.
    let rc = unsafe { libc::waitpid(pid, &raw mut status, libc::__WALL) };
    (rc == pid && libc::WIFSTOPPED(status)).then(|| libc::WSTOPSIG(status))
}

/// Collects register and stack samples at `mmap` entries of the node main thread; `None`
/// when ptrace is not allowed here.
fn sample_mmaps(pid: i32, wanted: usize, deadline: Instant) -> Option<Vec<Sample>> {
    // SAFETY: plain ptrace requests on our own child; no memory is passed.
    let seized = unsafe {
        libc::ptrace(libc::PTRACE_SEIZE, pid, NULL, libc::c_long::from(libc::PTRACE_O_TRACESYSGOOD))
    };
    if seized != 0 {
        eprintln!("PTRACE_SEIZE: {}", std::io::Error::last_os_error());
        return None;
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, pid, NULL, NULL) }, 0, "PTRACE_INTERRUPT");
    assert!(wait_stop(pid).is_some(), "node stops for the tracer");
    let mem = File::open(format!("/proc/{pid}/mem")).expect("open the child's memory");
    let mut samples = Vec::new();
    let mut in_syscall = false;
    let mut signal = 0;
    while samples.len() < wanted && Instant::now() < deadline {
        // SAFETY: resumes our stopped tracee until its next syscall entry or exit.
        if unsafe { libc::ptrace(libc::PTRACE_SYSCALL, pid, NULL, libc::c_long::from(signal)) } != 0 {
            break;
        }
        let Some(stop) = wait_stop(pid) else { break };
        signal = 0;
        if stop != (libc::SIGTRAP | 0x80) {
            // Signal delivery stops pass the signal on; group stops (the interrupt) do not.
            if stop != libc::SIGTRAP && stop != libc::SIGSTOP {
                signal = stop;
            }
            continue;
        }
        in_syscall = !in_syscall;
        // SAFETY: user_regs_struct is plain data; PTRACE_GETREGS fills it.
        let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        // SAFETY: the tracee is stopped and `regs` is a valid destination.
        if unsafe { libc::ptrace(libc::PTRACE_GETREGS, pid, NULL, &raw mut regs) } != 0 {
            break;
        }
        if !in_syscall || regs.orig_rax != libc::SYS_mmap as u64 {
            continue;
        }
        let mut stack = vec![0u8; 16 * 1024];
        let n = mem.read_at(&mut stack, regs.rsp).unwrap_or(0);
        stack.truncate(n);
        samples.push(Sample { regs: Regs { ip: regs.rip, sp: regs.rsp, bp: regs.rbp }, stack });
    }
    // SAFETY: detaching our own tracee.
    unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, NULL, NULL) };
    Some(samples)
}

/// Starts node on [`SCRIPT`] with `flags`, samples its mmap stacks and returns the
/// symbols and the symbolized stacks; `None` (after saying why) when it cannot run here.
fn sampled_stacks(test: &str, flags: &[&str]) -> Option<(ProcessSymbols, Vec<Vec<Frame>>, Fixture)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("app.js");
    File::create(&script).and_then(|mut f| f.write_all(SCRIPT.as_bytes())).expect("write script");
    let (mut symbols, samples, fixture) =
        sample_node(test, flags, &[script.as_os_str()], Duration::from_millis(700))?;
    symbols.refresh_perf_map();
    let stacks = samples
        .iter()
        .map(|sample| {
            let addrs = symbols.unwind(sample.regs, &sample.stack, &[]);
            symbols.symbolize(&addrs).into_iter().flatten().collect()
        })
        .collect();
    Some((symbols, stacks, fixture))
}

/// Starts `node FLAGS ARGS`, waits `warmup`, and samples 40 mmap stacks.
fn sample_node(
    test: &str,
    flags: &[&str],
    args: &[&std::ffi::OsStr],
    warmup: Duration,
) -> Option<(ProcessSymbols, Vec<Sample>, Fixture)> {
    let Ok(node) = which_node() else {
        eprintln!("SKIPPED {test}: `node` is not installed");
        return None;
    };
    let child = Command::new(node).args(flags).args(args).stdin(Stdio::null()).spawn().expect("start node");
    let fixture = Fixture(child);
    let pid = fixture.0.id();
    // Let the functions get hot (and JIT-compiled) first.
    std::thread::sleep(warmup);
    let symbols = ProcessSymbols::new(pid).expect("symbols of node");
    let Some(samples) = sample_mmaps(pid.cast_signed(), 40, Instant::now() + Duration::from_secs(10)) else {
        eprintln!("SKIPPED {test}: ptrace is not allowed here");
        return None;
    };
    assert!(!samples.is_empty(), "node made no mmap calls");
    Some((symbols, samples, fixture))
}

/// The first stack from libc into `rememberOrder`, with the index of its frame.
fn stack_into_remember_order(stacks: &[Vec<Frame>]) -> Option<(&Vec<Frame>, usize)> {
    stacks.iter().find_map(|frames| {
        let js = frames.iter().position(|f| f.kind == FrameKind::Js && f.function == "rememberOrder")?;
        frames.first().is_some_and(|f| f.module.contains("libc.so")).then_some((frames, js))
    })
}

fn deepest(stacks: &[Vec<Frame>]) -> Vec<String> {
    stacks.iter().max_by_key(|s| s.len()).map(|s| s.iter().map(Frame::label).collect()).unwrap_or_default()
}

#[test]
fn unwinds_node_from_libc_into_javascript() {
    let test = "unwinds_node_from_libc_into_javascript";
    let flags = ["--perf-basic-prof", "--interpreted-frames-native-stack", "--no-turbo-inlining"];
    let Some((_symbols, stacks, _fixture)) = sampled_stacks(test, &flags) else { return };
    let Some((frames, js)) = stack_into_remember_order(&stacks) else {
        panic!("no mmap stack of {} reached rememberOrder; deepest: {:#?}", stacks.len(), deepest(&stacks));
    };
    // The perf map gives the function's own position, not the allocating line.
    let frame = &frames[js];
    assert!(frame.file.ends_with("app.js") && frame.line == 3, "{frame:?}");
    // The caller from the timer is found past the JIT frame, through frame pointers.
    assert!(frames.len() > js + 1, "frames end at the JS function: {frames:#?}");
}

#[test]
fn names_javascript_from_the_v8_heap_without_a_perf_map() {
    let test = "names_javascript_from_the_v8_heap_without_a_perf_map";
    let Some((symbols, stacks, fixture)) = sampled_stacks(test, &["--no-turbo-inlining"]) else { return };
    assert!(!std::path::Path::new(&format!("/tmp/perf-{}.map", fixture.0.id())).exists());
    let stats = symbols.js_stats().expect("node's V8 is readable");
    let Some((frames, js)) = stack_into_remember_order(&stacks) else {
        panic!(
            "no mmap stack of {} reached rememberOrder ({stats:?}); deepest: {:#?}",
            stacks.len(),
            deepest(&stacks)
        );
    };
    let frame = &frames[js];
    // The same name, file and line as the perf map gives (the function's start).
    assert!(frame.file.ends_with("app.js") && frame.line == 3, "{frame:?}");
    assert_eq!(frame.module, "[jit]");
    // Its caller, the anonymous timer callback, is named too.
    let caller = frames[js + 1..].iter().find(|f| f.kind == FrameKind::Js).expect("a JS caller");
    assert_eq!((caller.function.as_str(), caller.line), ("(anonymous)", 8), "{frames:#?}");
    eprintln!("{}", symbols.js_summary().unwrap_or_default());
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to the valid pointer it is given.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) }, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The cost of naming JS frames from the heap: mmap stacks of an unflagged node, sampled
/// once, unwound again and again against the live process, with and without the V8
/// reader (caches warm). Run with
/// `cargo test -p tracer --release js_frames_cost -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark: run it on purpose, in release mode"]
fn js_frames_cost() {
    const ROUNDS: u32 = 200;
    // The integration tests' fixture: a chain of eight JS functions down to a 1 MiB Buffer.
    let dir = tempfile::tempdir().expect("tempdir");
    let start = dir.path().join("start");
    std::fs::write(&start, b"go").expect("start file");
    let fixture_js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/js_names.js");
    let args = [fixture_js.as_os_str(), "400".as_ref(), start.as_os_str()];
    let Some((mut symbols, samples, _fixture)) =
        sample_node("js_frames_cost", &[], &args, Duration::from_millis(300))
    else {
        return;
    };
    let cost = |symbols: &mut ProcessSymbols| {
        for sample in &samples {
            symbols.unwind(sample.regs, &sample.stack, &[]);
        }
        let started = thread_cpu();
        for _ in 0..ROUNDS {
            for sample in &samples {
                std::hint::black_box(symbols.unwind(sample.regs, &sample.stack, &[]));
            }
        }
        thread_cpu().saturating_sub(started).as_secs_f64() * 1e6 / f64::from(ROUNDS) / samples.len() as f64
    };
    let with_v8 = cost(&mut symbols);
    let summary = symbols.js_summary().unwrap_or_default();
    let stats = symbols.js_stats().unwrap_or_default();
    symbols.disable_v8();
    let without = cost(&mut symbols);
    eprintln!(
        "{} stacks x {ROUNDS}: unwinding {without:.1} µs of CPU per stack, {with_v8:.1} µs with JS frames from the heap (+{:.1} µs; {:.1} JS frames named per stack)",
        samples.len(),
        with_v8 - without,
        stats.named() as f64 / f64::from(ROUNDS + 1) / samples.len() as f64
    );
    eprintln!("{summary}");
}

fn which_node() -> Result<std::path::PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path).map(|dir| dir.join("node")).find(|p| p.is_file()).ok_or(())
}
