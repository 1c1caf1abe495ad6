//! `cargo xtask bench overhead`: what memtrace costs the service it traces.
//!
//! Each run starts a fresh example service (so that every run sees the same leak, from
//! zero), warms it up with wrk, then measures wrk's requests/s, with memtrace attached
//! (traced) or not (untraced). Each round runs untraced, then every mode (`--mode`, or the
//! one `--track`) in turn; we report the medians per mode, their ratio to the untraced
//! median, and memtrace's peak RSS (`ru_maxrss`, over its whole life).

use std::{
    ffi::OsStr,
    fs::{self, File},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    proc::{self, note, step},
    service::{self, Load, Service, Tracer},
};

const MIB: f64 = 1024.0 * 1024.0;

#[derive(clap::Args)]
pub struct Args {
    /// Measured runs of each kind (untraced and traced).
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Seconds of load per measured run.
    #[arg(long, default_value_t = 10)]
    duration: u32,
    /// Seconds of load before each measured run (JIT warm-up).
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Passed to memtrace as `--track` (default: memtrace's default sources).
    #[arg(long)]
    track: Option<String>,
    /// A traced mode: memtrace's arguments, split at spaces (e.g. `--track malloc
    /// --malloc-probes node-buffers`). Repeat to compare modes in alternating rounds. A
    /// first word `@PATH` runs another memtrace binary (to compare builds).
    #[arg(long = "mode", allow_hyphen_values = true)]
    modes: Vec<String>,
    /// Passed to memtrace as `--js-heap-interval` (default: memtrace's, 512k).
    #[arg(long)]
    js_heap_interval: Option<String>,
    /// Each mode is also measured with `--js-heap off`: the JS heap view's own cost is
    /// the ratio of the two rows.
    #[arg(long)]
    js_heap_compare: bool,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    no_setup: bool,
}

/// One measured run of the service.
struct Measured {
    requests_per_s: f64,
    /// The service's CPU time (user + system, traps included) per request, in µs.
    cpu_us_per_request: f64,
}

struct Traced {
    requests_per_s: f64,
    cpu_us_per_request: f64,
    max_rss: u64,
    lost_events: u64,
    tracked: String,
}

pub fn run(args: &Args) -> Result<()> {
    if args.runs == 0 || args.duration == 0 {
        bail!("--runs and --duration must be at least 1");
    }
    let (bin, out) = service::prepare("the overhead benchmark", args.no_setup, "bench")?;
    // Reports of an earlier, longer benchmark would read as this one's.
    for entry in fs::read_dir(&out).with_context(|| format!("list {}", out.display()))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("traced-") {
            let _ = fs::remove_file(entry.path());
        }
    }

    let load = Load {
        threads: args.threads,
        connections: args.connections,
        duration_s: args.duration,
        order_every: None,
    };
    let warmup = Load { duration_s: args.warmup, ..load };
    step(&format!(
        "overhead: {} runs each, wrk -t{} -c{} -d{}s after {}s warm-up; kernel {}, {} CPUs, node {}",
        args.runs,
        load.threads,
        load.connections,
        load.duration_s,
        args.warmup,
        command_line("uname", &["-r"]),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        command_line("node", &["--version"]),
    ));
    // The machines are shared: the load says how far to trust the numbers.
    note(&format!("load at start: {}", command_line("uptime", &[])));

    let modes = modes(args);
    let mut untraced = Vec::new();
    let mut untraced_cpu = Vec::new();
    let mut traced: Vec<Vec<Traced>> = modes.iter().map(|_| Vec::new()).collect();
    for run in 1..=args.runs {
        let m = measure_untraced(&load, &warmup, &out)?;
        eprintln!(
            "run {run} untraced: {:.0} req/s, {:.0} µs CPU per request",
            m.requests_per_s, m.cpu_us_per_request
        );
        untraced.push(m.requests_per_s);
        untraced_cpu.push(m.cpu_us_per_request);

        for (i, mode) in modes.iter().enumerate() {
            let (mode_bin, mode_args) = match mode.split_first() {
                Some((first, rest)) if first.starts_with('@') => (Path::new(&first[1..]), rest),
                _ => (bin.as_path(), mode.as_slice()),
            };
            let t = measure_traced(mode_bin, mode_args, &load, &warmup, &out, &format!("{run}-{i}"))?;
            eprintln!(
                "run {run} traced [{}]: {:.0} req/s, {:.0} µs CPU per request (memtrace max RSS {:.1} MiB, lost events {})",
                mode.join(" "),
                t.requests_per_s,
                t.cpu_us_per_request,
                t.max_rss as f64 / MIB,
                t.lost_events
            );
            traced[i].push(t);
        }
    }

    let base = median(&untraced);
    let base_cpu = median(&untraced_cpu);
    step(&format!(
        "untraced median {base:.0} req/s (runs {}), {base_cpu:.0} µs CPU per request",
        spread(&untraced)
    ));
    println!(
        "| workload | memtrace arguments | tracked | untraced req/s | traced req/s | traced/untraced | paired ratio | CPU µs/request untraced → traced | CPU ratio | memtrace max RSS | lost events |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (mode, runs) in modes.iter().zip(&traced) {
        let traced_rps: Vec<f64> = runs.iter().map(|t| t.requests_per_s).collect();
        let with = median(&traced_rps);
        let ratio = with / base;
        // Each traced run against the untraced run of its round: less sensitive to drift.
        let paired: Vec<f64> = untraced.iter().zip(&traced_rps).map(|(u, t)| t / u).collect();
        let cpu = median(&runs.iter().map(|t| t.cpu_us_per_request).collect::<Vec<_>>());
        let max_rss = runs.iter().map(|t| t.max_rss).max().unwrap_or(0);
        let lost: u64 = runs.iter().map(|t| t.lost_events).sum();
        let sources = runs.first().map_or_else(String::new, |t| t.tracked.clone());
        let shown = if mode.is_empty() { "(defaults)".to_string() } else { format!("`{}`", mode.join(" ")) };
        note(&format!("{shown}: traced runs {}", spread(&traced_rps)));
        println!(
            "| leaky-service, wrk -t{} -c{}, {} s × {} runs | {shown} | {sources} | {base:.0} | {with:.0} | {ratio:.3} | {:.3} | {base_cpu:.0} → {cpu:.0} | {:.3} | {:.0} MiB | {lost} |",
            load.threads,
            load.connections,
            load.duration_s,
            args.runs,
            median(&paired),
            if cpu > 0.0 { base_cpu / cpu } else { 0.0 },
            max_rss as f64 / MIB,
        );
    }
    note(&format!("load at end: {}", command_line("uptime", &[])));
    note(&format!("memtrace reports and JSON: {}", out.display()));
    Ok(())
}

/// The traced modes, as memtrace arguments: `--mode`s (or the one `--track`), each with
/// `--js-heap-interval` and, with `--js-heap-compare`, a twin with the JS heap view off.
fn modes(args: &Args) -> Vec<Vec<String>> {
    let mut modes: Vec<Vec<String>> = if args.modes.is_empty() {
        vec![args.track.iter().flat_map(|t| ["--track".to_string(), t.clone()]).collect()]
    } else {
        args.modes.iter().map(|m| m.split_whitespace().map(str::to_string).collect()).collect()
    };
    if let Some(interval) = &args.js_heap_interval {
        for mode in &mut modes {
            mode.extend(["--js-heap-interval".to_string(), interval.clone()]);
        }
    }
    if args.js_heap_compare {
        modes = modes
            .into_iter()
            .flat_map(|mode| {
                let mut off = mode.clone();
                off.extend(["--js-heap".to_string(), "off".to_string()]);
                [off, mode]
            })
            .collect();
    }
    modes
}

fn measure_untraced(load: &Load, warmup: &Load, out: &Path) -> Result<Measured> {
    let service = Service::start(out)?;
    service::wrk(&service.url(), warmup).context("warm-up")?;
    let result = measure(&service, load)?;
    service.stop();
    Ok(result)
}

/// wrk's requests/s and the service's CPU time per request over the measured run. On a
/// machine shared with other work, throughput follows the scheduler's share as much as
/// memtrace's cost; CPU time per request (a uprobe's trap is charged to the traced task)
/// does not.
fn measure(service: &Service, load: &Load) -> Result<Measured> {
    let before = cpu_ticks(service.pid())?;
    let result = service::wrk(&service.url(), load)?;
    let after = cpu_ticks(service.pid())?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let requests = result.requests_per_s * f64::from(load.duration_s);
    let cpu_s = after.saturating_sub(before) as f64 / hz;
    Ok(Measured {
        requests_per_s: result.requests_per_s,
        cpu_us_per_request: if requests > 0.0 { cpu_s * 1e6 / requests } else { 0.0 },
    })
}

/// utime + stime of a process, in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat =
        fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it are plain.
    let rest = stat.rsplit_once(')').map_or(stat.as_str(), |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    Ok(field(11) + field(12))
}

fn measure_traced(
    bin: &Path,
    mode: &[String],
    load: &Load,
    warmup: &Load,
    out: &Path,
    run: &str,
) -> Result<Traced> {
    let service = Service::start(out)?;
    service::wrk(&service.url(), warmup).context("warm-up")?;

    let json = out.join(format!("traced-{run}.json"));
    let report = out.join(format!("traced-{run}.txt"));
    let _ = fs::remove_file(&json);
    // A safety net: the run stops memtrace with SIGINT as soon as wrk is done.
    let duration = format!("{}s", load.duration_s + 120);
    let mut trace_args: Vec<&OsStr> =
        vec!["--duration".as_ref(), duration.as_ref(), "--json".as_ref(), json.as_os_str()];
    trace_args.extend(mode.iter().map(OsStr::new));
    let stdout = File::create(&report).with_context(|| format!("create {}", report.display()))?;
    let mut tracer = Tracer::attach(bin, service.pid(), &trace_args, Stdio::from(stdout))?;

    let result = measure(&service, load)?;

    tracer.proc.signal(libc::SIGINT)?;
    let (status, max_rss) = tracer.proc.wait_with_rusage(Duration::from_mins(3))?;
    service.stop();
    if !status.success() {
        bail!("memtrace exited with {status} on SIGINT (its report: {})", report.display());
    }
    let (lost_events, tracked) = read_report(&json)?;
    Ok(Traced {
        requests_per_s: result.requests_per_s,
        cpu_us_per_request: result.cpu_us_per_request,
        max_rss,
        lost_events,
        tracked,
    })
}

/// `lost_events` and `tracked` from memtrace's JSON report.
fn read_report(json: &Path) -> Result<(u64, String)> {
    let text = fs::read_to_string(json)
        .with_context(|| format!("read memtrace's JSON report {}", json.display()))?;
    let report: Value = serde_json::from_str(&text).with_context(|| format!("parse {}", json.display()))?;
    let lost = report.get("lost_events").and_then(Value::as_u64).unwrap_or(0);
    let tracked = report
        .get("tracked")
        .and_then(Value::as_array)
        .map(|t| t.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
        .unwrap_or_default();
    Ok((lost, tracked))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.is_empty() {
        0.0
    } else if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        f64::midpoint(sorted[mid - 1], sorted[mid])
    }
}

/// `min–max` of the runs, to judge the medians' noise.
fn spread(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.0}–{max:.0}")
}

fn command_line(program: &str, args: &[&str]) -> String {
    proc::output(Command::new(program).args(args)).map_or_else(|| "?".to_owned(), |out| out.trim().to_owned())
}
