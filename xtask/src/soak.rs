//! `cargo xtask bench soak --minutes N`: memtrace attached to the example service under
//! wrk for N minutes, its CPU and RSS sampled every `--interval` seconds.
//!
//! The service leaks until `--leak-cap-mb` and then holds steady, so the run shows both
//! a growing target and a flat one. Every sample goes to `out/soak/samples.csv`; the end
//! prints a table per window (CPU mean and peak, RSS at the window's end and peak), the
//! RSS drift over the second half of the run, and what memtrace's report says it lost.

use std::{
    fmt::Write as _,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    proc::{self, Owned, note, step},
    service::{self, Load, Service},
};

const MIB: f64 = 1024.0 * 1024.0;

#[derive(clap::Args)]
pub struct Args {
    /// Minutes of load with memtrace attached.
    #[arg(long, default_value_t = 60)]
    minutes: u32,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10)]
    interval: u32,
    /// The service stops leaking at this many MiB (`LEAK_CAP_MB`), then holds steady.
    #[arg(long, default_value_t = 512)]
    leak_cap_mb: u32,
    /// One request in this many places an order and leaks 1 MiB (wrk's `ORDER_EVERY`).
    #[arg(long, default_value_t = 2000)]
    order_every: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Passed to memtrace as `--track` (default: memtrace's default sources).
    #[arg(long)]
    track: Option<String>,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    no_setup: bool,
}

/// One sample of the run.
#[derive(Clone, Copy, Debug)]
struct Sample {
    t_s: f64,
    tracer_cpu_pct: f64,
    tracer_rss: u64,
    service_cpu_pct: f64,
    service_rss: u64,
    load1: f64,
    events: u64,
    lost: u64,
}

/// CPU ticks (utime + stime) of a process, from /proc/PID/stat.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

fn load1() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no memory preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// `events N` and `lost N` from memtrace's last status line in its log.
fn last_status(log: &Path) -> (u64, u64) {
    let text = fs::read_to_string(log).unwrap_or_default();
    let Some(line) = text.lines().rev().find(|l| l.starts_with("memtrace:") && l.contains(" events ")) else {
        return (0, 0);
    };
    let after = |key: &str| -> u64 {
        line.split(key)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (after(" events "), after(" lost "))
}

/// Waits until memtrace's log says it is attached, or it exits.
fn wait_attached(tracer: &mut Owned, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_mins(1);
    while Instant::now() < deadline {
        if fs::read_to_string(log).is_ok_and(|t| t.to_lowercase().contains("attached")) {
            return Ok(());
        }
        if tracer.child_mut()?.try_wait()?.is_some() {
            bail!("memtrace exited before attaching; its log: {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("memtrace did not say it attached within 60 s; its log: {}", log.display())
}

pub fn run(args: &Args) -> Result<()> {
    if args.minutes == 0 || args.interval == 0 {
        bail!("--minutes and --interval must be at least 1");
    }
    let (bin, out) = service::prepare("the soak", args.no_setup, "soak")?;
    let json = out.join("report.json");
    let log = out.join("memtrace.log");
    let csv = out.join("samples.csv");
    for stale in [&json, &log, &csv] {
        let _ = fs::remove_file(stale);
    }

    step(&format!(
        "soak: {} min, samples every {} s, wrk -t{} -c{}, an order (1 MiB kept) every {} requests up to {} MiB; uptime: {}",
        args.minutes,
        args.interval,
        args.threads,
        args.connections,
        args.order_every,
        args.leak_cap_mb,
        proc::output(&mut Command::new("uptime")).unwrap_or_default().trim()
    ));
    let cap = args.leak_cap_mb.to_string();
    let service = Service::start_with_env(&out, &[("LEAK_CAP_MB", cap.as_str())])?;
    note(&format!("service pid {} at {}", service.pid(), service.url()));

    let load_s = args.minutes * 60;
    // A safety net: memtrace is stopped with SIGINT when the load ends.
    let duration = format!("{}s", load_s + 600);
    let mut cmd = Command::new(&bin);
    cmd.arg("attach").arg(service.pid().to_string()).args(["--duration", &duration, "--json"]).arg(&json);
    if let Some(track) = &args.track {
        cmd.args(["--track", track]);
    }
    let stderr = File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let report = File::create(out.join("report.txt")).context("create the report file")?;
    cmd.stdin(Stdio::null()).stdout(Stdio::from(report)).stderr(Stdio::from(stderr));
    let mut tracer = Owned::spawn("memtrace", &mut cmd)?;
    wait_attached(&mut tracer, &log)?;
    let tracer_pid = tracer.pid();
    note(&format!("memtrace pid {tracer_pid} attached; its log: {}", log.display()));

    let load = Load {
        threads: args.threads,
        connections: args.connections,
        duration_s: load_s,
        order_every: Some(args.order_every),
    };
    let wrk_out = out.join("wrk.txt");
    let mut wrk_cmd = service::wrk_command(&service.url(), &load);
    wrk_cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(File::create(&wrk_out).context("create wrk's output file")?))
        .stderr(Stdio::null());
    let mut wrk = Owned::spawn("wrk", &mut wrk_cmd)?;

    let samples = sample(args, &mut wrk, &mut tracer, tracer_pid, service.pid(), &log, &csv)?;
    // `sample` saw wrk exit; the status is kept by the child.
    let wrk_status = wrk.child_mut()?.wait().context("wrk's status")?;
    let wrk_text = fs::read_to_string(&wrk_out).unwrap_or_default();
    let service_alive = rss_bytes(service.pid()).is_some();
    let stats = service.stats();

    let stop = Instant::now();
    tracer.signal(libc::SIGINT)?;
    let (exit, max_rss) = tracer.wait_with_rusage(Duration::from_mins(3))?;
    let stop_s = stop.elapsed().as_secs_f64();
    service.stop();
    if !exit.success() {
        bail!("memtrace exited with {exit} on SIGINT; its log: {}", log.display());
    }
    let report: Value = fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .with_context(|| format!("memtrace wrote no readable JSON report at {}", json.display()))?;

    step("soak: summary");
    if !wrk_status.success() {
        note(&format!("wrk exited with {wrk_status}"));
    }
    let rps = service::parse_rps(&wrk_text).unwrap_or(0.0);
    note(&format!("wrk: {rps:.0} requests/s over {} min", args.minutes));
    note(&format!(
        "service alive at the end: {service_alive}; its stats: {}",
        stats.as_deref().unwrap_or("(no answer)")
    ));
    note(&format!(
        "memtrace: {exit} {stop_s:.1} s after SIGINT, peak RSS (ru_maxrss) {:.1} MiB, report lost_events {}",
        max_rss as f64 / MIB,
        report.get("lost_events").and_then(Value::as_u64).unwrap_or(0)
    ));
    print!("{}", summary(&samples, args));
    note(&format!("samples: {}", csv.display()));
    Ok(())
}

/// Samples every `--interval` seconds until wrk ends (or memtrace does).
fn sample(
    args: &Args,
    wrk: &mut Owned,
    tracer: &mut Owned,
    tracer_pid: u32,
    service_pid: u32,
    log: &Path,
    csv: &PathBuf,
) -> Result<Vec<Sample>> {
    let ticks = clock_ticks_per_s();
    let interval = Duration::from_secs(u64::from(args.interval));
    let start = Instant::now();
    let mut last = (start, cpu_ticks(tracer_pid).unwrap_or(0), cpu_ticks(service_pid).unwrap_or(0));
    let mut samples = Vec::new();
    let mut text = String::from(
        "t_s,tracer_cpu_pct,tracer_rss_bytes,service_cpu_pct,service_rss_bytes,load1,events,lost\n",
    );
    let mut next = start + interval;
    loop {
        while Instant::now() < next {
            if wrk.child_mut()?.try_wait()?.is_some() {
                return Ok(samples);
            }
            if tracer.child_mut()?.try_wait()?.is_some() {
                bail!("memtrace exited during the soak; its log: {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        next += interval;
        let now = Instant::now();
        let (tracer_ticks, service_ticks) =
            (cpu_ticks(tracer_pid).unwrap_or(last.1), cpu_ticks(service_pid).unwrap_or(last.2));
        let wall = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let pct = |now: u64, then: u64| now.saturating_sub(then) as f64 / ticks / wall * 100.0;
        let (events, lost_total) = last_status(log);
        let s = Sample {
            t_s: now.duration_since(start).as_secs_f64(),
            tracer_cpu_pct: pct(tracer_ticks, last.1),
            tracer_rss: rss_bytes(tracer_pid).unwrap_or(0),
            service_cpu_pct: pct(service_ticks, last.2),
            service_rss: rss_bytes(service_pid).unwrap_or(0),
            load1: load1(),
            events,
            lost: lost_total,
        };
        last = (now, tracer_ticks, service_ticks);
        let _ = writeln!(
            text,
            "{:.0},{:.2},{},{:.2},{},{:.2},{},{}",
            s.t_s,
            s.tracer_cpu_pct,
            s.tracer_rss,
            s.service_cpu_pct,
            s.service_rss,
            s.load1,
            s.events,
            s.lost
        );
        fs::write(csv, &text).with_context(|| format!("write {}", csv.display()))?;
        eprintln!(
            "    t {:>5.0} s  memtrace cpu {:>5.1}% rss {:>6.1} MiB  service cpu {:>5.1}% rss {:>6.1} MiB  load {:.2}  events {} lost {}",
            s.t_s,
            s.tracer_cpu_pct,
            s.tracer_rss as f64 / MIB,
            s.service_cpu_pct,
            s.service_rss as f64 / MIB,
            s.load1,
            s.events,
            s.lost
        );
        samples.push(s);
    }
}

/// The summary table: one row per window (a sixth of the run, at least a minute).
fn summary(samples: &[Sample], args: &Args) -> String {
    let mut out = String::new();
    if samples.is_empty() {
        return "no samples (the run was shorter than one interval)\n".to_string();
    }
    let window_s = (f64::from(args.minutes) * 60.0 / 6.0).max(60.0);
    out.push_str(
        "| window | memtrace CPU mean | CPU peak | memtrace RSS at end | RSS peak | service RSS at end | load (1 min) mean | events/s | lost |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut from = 0.0;
    let mut prev_events = 0;
    while from < samples.last().map_or(0.0, |s| s.t_s) {
        let to = from + window_s;
        let w: Vec<&Sample> = samples.iter().filter(|s| s.t_s > from && s.t_s <= to).collect();
        if let (Some(first), Some(end)) = (w.first(), w.last()) {
            let n = w.len() as f64;
            let span = (end.t_s - first.t_s + f64::from(args.interval)).max(1.0);
            let _ = writeln!(
                out,
                "| {:.0}–{:.0} min | {:.1}% | {:.1}% | {:.1} MiB | {:.1} MiB | {:.0} MiB | {:.2} | {:.0} | {} |",
                from / 60.0,
                end.t_s / 60.0,
                w.iter().map(|s| s.tracer_cpu_pct).sum::<f64>() / n,
                w.iter().map(|s| s.tracer_cpu_pct).fold(0.0, f64::max),
                end.tracer_rss as f64 / MIB,
                w.iter().map(|s| s.tracer_rss).max().unwrap_or(0) as f64 / MIB,
                end.service_rss as f64 / MIB,
                w.iter().map(|s| s.load1).sum::<f64>() / n,
                end.events.saturating_sub(prev_events) as f64 / span,
                end.lost,
            );
            prev_events = end.events;
        }
        from = to;
    }
    // Drift of memtrace's RSS over the second half: what a bounded tracer keeps near 0.
    let half: Vec<&Sample> =
        samples.iter().filter(|s| s.t_s * 2.0 >= samples[samples.len() - 1].t_s).collect();
    if let (Some(a), Some(b)) = (half.first(), half.last())
        && b.t_s > a.t_s
    {
        let mib_per_h = (b.tracer_rss as f64 - a.tracer_rss as f64) / MIB / (b.t_s - a.t_s) * 3600.0;
        let _ = writeln!(
            out,
            "memtrace RSS over the second half: {:.1} → {:.1} MiB ({mib_per_h:+.1} MiB/h)",
            a.tracer_rss as f64 / MIB,
            b.tracer_rss as f64 / MIB
        );
    }
    let all_cpu = samples.iter().map(|s| s.tracer_cpu_pct).sum::<f64>() / samples.len() as f64;
    let _ = writeln!(out, "memtrace CPU over the whole run: {all_cpu:.1}% of one core (mean of the samples)");
    out
}
