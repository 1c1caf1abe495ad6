//! `cargo xtask bench malloc`: what `--track malloc` costs the traced process, in ns per
//! malloc+free pair (`benches/malloc_pair.c`), untraced and under each memtrace mode.
//!
//! Every run starts a fresh `malloc_pair` held at a start file, attaches memtrace (when
//! traced), releases it, and reads the ns per pair it measured itself. Medians of the
//! runs are reported with their ratio to the untraced median.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    proc::{self, Lines, Owned, note, step},
    service::{self, Load, Service, Tracer},
};

#[derive(clap::Args)]
pub struct Args {
    /// Measured runs per mode (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// malloc+free pairs per untraced run.
    #[arg(long, default_value_t = 20_000_000)]
    untraced_pairs: u64,
    /// malloc+free pairs per traced run.
    #[arg(long, default_value_t = 300_000)]
    traced_pairs: u64,
    /// Bytes per allocation (the benchmark varies it by up to 15 bytes).
    #[arg(long, default_value_t = 64)]
    size: u64,
    /// Also measure the example Node service's throughput under wrk, untraced and with
    /// each malloc mode attached.
    #[arg(long)]
    node: bool,
    /// Seconds of wrk load per Node run (after 5 s of warm-up).
    #[arg(long, default_value_t = 10)]
    node_duration: u32,
}

/// A mode: a name and memtrace's arguments (`None`: untraced).
type Mode = (&'static str, Option<&'static [&'static str]>);

/// The modes measured on `malloc_pair`.
const MODES: &[Mode] = &[
    ("untraced", None),
    ("syscall tracepoints only", Some(&["--track", "mmap,brk"])),
    ("malloc, every allocation", Some(&["--track", "malloc"])),
    ("malloc, sampled 512 KiB", Some(&["--track", "malloc", "--malloc-sample-bytes", "512k"])),
    ("malloc, min size 4 KiB", Some(&["--track", "malloc", "--malloc-min-size", "4k"])),
];

/// The modes measured on the Node service.
const NODE_MODES: &[Mode] = &[
    ("untraced", None),
    ("malloc, every allocation", Some(&["--track", "malloc"])),
    ("malloc, sampled 512 KiB", Some(&["--track", "malloc", "--malloc-sample-bytes", "512k"])),
    ("Node ArrayBuffer allocator", Some(&["--track", "malloc", "--malloc-probes", "node-buffers"])),
    (
        "mmap,brk + Node ArrayBuffer allocator",
        Some(&["--track", "mmap,brk,malloc", "--malloc-probes", "node-buffers"]),
    ),
];

pub fn run(args: &Args) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    // No setup step here, as before this helper existed.
    let (memtrace, out) = service::prepare("the malloc benchmark", true, "bench-malloc")?;
    let bench = build_bench(&out)?;
    step(&format!(
        "malloc_pair: {} runs per mode, {} B allocations; kernel {}, {} CPUs",
        args.runs,
        args.size,
        proc::output(Command::new("uname").arg("-r")).map_or_else(|| "?".into(), |s| s.trim().to_owned()),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
    ));

    let mut rows = Vec::new();
    for &(name, memtrace_args) in MODES {
        let pairs = if memtrace_args.is_some() { args.traced_pairs } else { args.untraced_pairs };
        let mut samples = Vec::new();
        for run in 1..=args.runs {
            let ns = measure(&bench, &memtrace, memtrace_args, pairs, args.size, &out)
                .with_context(|| format!("{name}, run {run}"))?;
            eprintln!("{name}, run {run}: {ns:.1} ns per pair");
            samples.push(ns);
        }
        rows.push((name, memtrace_args, median(&samples)));
    }

    let base = rows.first().map_or(1.0, |r| r.2);
    println!("| mode | memtrace arguments | ns per malloc+free pair | vs untraced |");
    println!("|---|---|---:|---:|");
    for (name, memtrace_args, ns) in &rows {
        let args = memtrace_args.map_or_else(|| "—".to_owned(), |a| format!("`{}`", a.join(" ")));
        println!("| {name} | {args} | {ns:.0} | ×{:.0} |", ns / base);
    }
    note(&format!("median of {} runs each; traces in {}", args.runs, out.display()));
    if args.node {
        node_throughput(args, &memtrace, &out)?;
    }
    Ok(())
}

/// Requests/s of the example service under wrk, untraced and with each malloc mode, each
/// on a fresh service after a warm-up (as `cargo xtask bench overhead` does).
fn node_throughput(args: &Args, memtrace: &Path, out: &Path) -> Result<()> {
    let load = Load { threads: 2, connections: 32, duration_s: args.node_duration, order_every: None };
    let warmup = Load { duration_s: 5, ..load };
    step(&format!(
        "leaky-service: wrk -t{} -c{} -d{}s after 5 s warm-up, {} runs per mode",
        load.threads, load.connections, load.duration_s, args.runs
    ));
    let mut rows = Vec::new();
    for &(name, memtrace_args) in NODE_MODES {
        let mut samples = Vec::new();
        for run in 1..=args.runs {
            let service = Service::start(out)?;
            service::wrk(&service.url(), &warmup).context("warm-up")?;
            let tracer = match memtrace_args {
                Some(a) => {
                    let mut full: Vec<&str> = a.to_vec();
                    full.extend(["--duration", "10m"]);
                    Some(Tracer::attach(memtrace, service.pid(), &full, Stdio::null())?)
                }
                None => None,
            };
            let result = service::wrk(&service.url(), &load)?;
            if let Some(mut tracer) = tracer {
                tracer.proc.signal(libc::SIGINT)?;
                let status = tracer.proc.wait(Duration::from_mins(3))?;
                if !status.success() {
                    bail!("memtrace exited with {status}");
                }
            }
            service.stop();
            eprintln!("node {name}, run {run}: {:.0} req/s", result.requests_per_s);
            samples.push(result.requests_per_s);
        }
        rows.push((name, memtrace_args, median(&samples)));
    }
    let base = rows.first().map_or(1.0, |r| r.2);
    println!();
    println!("| mode | memtrace arguments | leaky-service req/s | vs untraced |");
    println!("|---|---|---:|---:|");
    for (name, memtrace_args, rps) in &rows {
        let args = memtrace_args.map_or_else(|| "—".to_owned(), |a| format!("`{}`", a.join(" ")));
        println!("| {name} | {args} | {rps:.0} | {:.3} |", rps / base);
    }
    Ok(())
}

fn build_bench(out: &Path) -> Result<PathBuf> {
    let src = proc::workspace_root().join("benches").join("malloc_pair.c");
    let bin = out.join("malloc_pair");
    proc::run(
        Command::new("gcc")
            .args(["-O2", "-fno-omit-frame-pointer", "-fno-builtin", "-o"])
            .arg(&bin)
            .arg(&src),
    )
    .with_context(|| format!("compile {}", src.display()))?;
    Ok(bin)
}

/// One run: ns per pair as `malloc_pair` measured it.
fn measure(
    bench: &Path,
    memtrace: &Path,
    memtrace_args: Option<&[&str]>,
    pairs: u64,
    size: u64,
    out: &Path,
) -> Result<f64> {
    let start = out.join("start");
    let _ = fs::remove_file(&start);
    let mut cmd = Command::new(bench);
    cmd.arg(pairs.to_string()).arg(size.to_string()).arg(&start).stdin(Stdio::null()).stdout(Stdio::piped());
    let mut target = Owned::spawn("malloc_pair", &mut cmd)?;
    let stdout = target.child_mut()?.stdout.take().context("malloc_pair: no stdout pipe")?;
    let lines = Lines::spawn(stdout, None);
    lines.wait_for("waiting", Duration::from_secs(10), "malloc_pair")?;
    let tracer = match memtrace_args {
        Some(args) => Some(Tracer::attach(memtrace, target.pid(), args, Stdio::null())?),
        None => None,
    };
    fs::write(&start, b"go\n").with_context(|| format!("create {}", start.display()))?;
    let result = lines.wait_for("result", Duration::from_mins(10), "malloc_pair")?;
    target.wait(Duration::from_secs(30))?;
    if let Some(mut tracer) = tracer {
        // memtrace stops when its target exits.
        let status = tracer.proc.wait(Duration::from_mins(2))?;
        if !status.success() {
            bail!("memtrace exited with {status}");
        }
    }
    result
        .split_whitespace()
        .find_map(|word| word.strip_prefix("ns_per_pair="))
        .and_then(|ns| ns.parse().ok())
        .with_context(|| format!("malloc_pair printed no ns_per_pair: {result:?}"))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}
