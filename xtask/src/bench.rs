//! `cargo xtask bench overhead`: what memtrace costs the service it traces.
//!
//! Each run starts a fresh example service (so that every run sees the same leak, from
//! zero), warms it up with wrk, then measures wrk's requests/s, with memtrace attached
//! (traced) or not (untraced). Runs alternate untraced/traced; we report the medians,
//! their ratio, and memtrace's peak RSS (`ru_maxrss`, over its whole life).
//!
//! `--js-heap-compare` adds a third kind of run to each round, traced with the JS heap
//! view off (`--js-heap off`), so that the view's own cost reads off the same rounds.

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
    setup,
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
    /// Passed to memtrace as `--js-heap-interval` (default: memtrace's, 512k).
    #[arg(long)]
    js_heap_interval: Option<String>,
    /// Each round also measures memtrace with `--js-heap off`: the JS heap view's own
    /// cost is the ratio of the traced runs with it on and off.
    #[arg(long)]
    js_heap_compare: bool,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    no_setup: bool,
}

struct Traced {
    requests_per_s: f64,
    max_rss: u64,
    lost_events: u64,
    tracked: String,
}

pub fn run(args: &Args) -> Result<()> {
    if args.runs == 0 || args.duration == 0 {
        bail!("--runs and --duration must be at least 1");
    }
    service::require_root("the overhead benchmark")?;
    if !args.no_setup {
        setup::run()?;
    }
    let bin = service::build_memtrace()?;
    let out = service::out_dir()?.join("bench");
    fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    // Reports of an earlier, longer benchmark would read as this one's.
    for entry in fs::read_dir(&out).with_context(|| format!("list {}", out.display()))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("traced-") {
            let _ = fs::remove_file(entry.path());
        }
    }

    let load = Load { threads: args.threads, connections: args.connections, duration_s: args.duration };
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

    let mut untraced = Vec::new();
    let mut traced = Vec::new();
    let mut view_off = Vec::new();
    for run in 1..=args.runs {
        let rps = measure_untraced(&load, &warmup, &out)?;
        eprintln!("run {run} untraced: {rps:.0} req/s");
        untraced.push(rps);

        if args.js_heap_compare {
            let t = measure_traced(&bin, args, false, &load, &warmup, &out, run)?;
            eprintln!("run {run} traced, --js-heap off: {:.0} req/s", t.requests_per_s);
            view_off.push(t.requests_per_s);
        }
        let t = measure_traced(&bin, args, true, &load, &warmup, &out, run)?;
        eprintln!(
            "run {run} traced:   {:.0} req/s (memtrace max RSS {:.1} MiB, lost events {})",
            t.requests_per_s,
            t.max_rss as f64 / MIB,
            t.lost_events
        );
        traced.push(t);
    }

    let traced_rps: Vec<f64> = traced.iter().map(|t| t.requests_per_s).collect();
    let base = median(&untraced);
    let with = median(&traced_rps);
    let ratio = with / base;
    let max_rss = traced.iter().map(|t| t.max_rss).max().unwrap_or(0);
    let lost: u64 = traced.iter().map(|t| t.lost_events).sum();
    let sources = traced.first().map_or_else(String::new, |t| t.tracked.clone());
    step(&format!(
        "medians: untraced {base:.0} req/s (runs {}), traced {with:.0} req/s (runs {}), ratio {ratio:.3} ({:+.1}%)",
        spread(&untraced),
        spread(&traced_rps),
        (ratio - 1.0) * 100.0
    ));
    // Each traced run against the untraced run just before it: less sensitive to drift.
    let paired: Vec<f64> = untraced.iter().zip(&traced_rps).map(|(u, t)| t / u).collect();
    note(&format!("median of paired ratios (traced / untraced run before it): {:.3}", median(&paired)));
    note(&format!("memtrace reports and JSON: {}", out.display()));

    println!(
        "| workload | tracked | untraced req/s | traced req/s | traced/untraced | memtrace max RSS | lost events |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    println!(
        "| leaky-service, wrk -t{} -c{}, {} s × {} runs | {sources} | {base:.0} | {with:.0} | {ratio:.3} ({:+.1}%) | {:.0} MiB | {lost} |",
        load.threads,
        load.connections,
        load.duration_s,
        args.runs,
        (ratio - 1.0) * 100.0,
        max_rss as f64 / MIB,
    );
    if args.js_heap_compare {
        let off = median(&view_off);
        let paired: Vec<f64> = traced_rps.iter().zip(&view_off).map(|(on, off)| on / off).collect();
        step(&format!(
            "JS heap view: traced with it {with:.0} req/s, without it {off:.0} req/s (runs {}): on/off {:.3} (median of paired ratios {:.3}); without it / untraced {:.3}",
            spread(&view_off),
            with / off,
            median(&paired),
            off / base
        ));
        println!(
            "| leaky-service, wrk -t{} -c{}, {} s × {} runs | same, --js-heap off | {base:.0} | {off:.0} | {:.3} | | |",
            load.threads,
            load.connections,
            load.duration_s,
            args.runs,
            off / base,
        );
    }
    Ok(())
}

fn measure_untraced(load: &Load, warmup: &Load, out: &Path) -> Result<f64> {
    let service = Service::start(out)?;
    service::wrk(&service.url(), warmup).context("warm-up")?;
    let result = service::wrk(&service.url(), load)?;
    service.stop();
    Ok(result.requests_per_s)
}

fn measure_traced(
    bin: &Path,
    args: &Args,
    js_heap: bool,
    load: &Load,
    warmup: &Load,
    out: &Path,
    run: u32,
) -> Result<Traced> {
    let service = Service::start(out)?;
    service::wrk(&service.url(), warmup).context("warm-up")?;

    let kind = if js_heap { "" } else { "-no-js-heap" };
    let json = out.join(format!("traced-{run}{kind}.json"));
    let report = out.join(format!("traced-{run}{kind}.txt"));
    let _ = fs::remove_file(&json);
    // A safety net: the run stops memtrace with SIGINT as soon as wrk is done.
    let duration = format!("{}s", load.duration_s + 120);
    let mut trace_args: Vec<&OsStr> =
        vec!["--duration".as_ref(), duration.as_ref(), "--json".as_ref(), json.as_os_str()];
    if let Some(track) = &args.track {
        trace_args.extend([OsStr::new("--track"), OsStr::new(track)]);
    }
    if !js_heap {
        trace_args.extend([OsStr::new("--js-heap"), OsStr::new("off")]);
    }
    if let Some(interval) = &args.js_heap_interval {
        trace_args.extend([OsStr::new("--js-heap-interval"), OsStr::new(interval)]);
    }
    let stdout = File::create(&report).with_context(|| format!("create {}", report.display()))?;
    let mut tracer = Tracer::attach(bin, service.pid(), &trace_args, Stdio::from(stdout))?;

    let result = service::wrk(&service.url(), load)?;

    tracer.proc.signal(libc::SIGINT)?;
    let (status, max_rss) = tracer.proc.wait_with_rusage(Duration::from_mins(3))?;
    service.stop();
    if !status.success() {
        bail!("memtrace exited with {status} on SIGINT (its report: {})", report.display());
    }
    let (lost_events, tracked) = read_report(&json)?;
    Ok(Traced { requests_per_s: result.requests_per_s, max_rss, lost_events, tracked })
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
