//! One tracing session: load, attach, read events until a stop condition, report.

mod jsheap;
mod metrics;
mod os;
mod state;

use std::{
    collections::HashMap,
    io::{IsTerminal as _, Write as _},
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use log::{debug, warn};
use tokio::{io::unix::AsyncFd, net::TcpListener, signal::unix::SignalKind};
use tracer_common::{COUNTER_STACK_READ_FAILED, TRACK_MALLOC, TRACK_OOM};

pub use os::{monotonic_ns, readable_fd, resolve_target, track_bits};

use self::{
    os::{pidfd_open, wait_for_exec},
    state::Session,
};
use crate::{
    analysis::{History, ReportInputs, build_report},
    bpf::{LoadOptions, Tracer},
    cli::TraceArgs,
    events::OomFormat,
    model::{LiveModel, StackId, StackTable},
    procfs,
    report::{Report, Target, Totals},
    symbolize::ProcessSymbols,
};

/// Unique stacks kept at most; later new stacks are counted as unknown.
const STACK_TABLE_CAPACITY: usize = 200_000;
/// Snapshots of per-stack held bytes kept for the growth verdict (resolution halves
/// beyond it), and stacks followed at most.
const HISTORY_POINTS: usize = 512;
const HISTORY_SERIES: usize = 8192;

/// Why tracing stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Duration,
    Signal,
    TargetExited,
    TargetOomKilled,
}

/// How the target was obtained.
pub struct TraceTarget {
    pub pid: u32,
    /// For `memtrace run`: called once the programs are attached, to let the child run.
    pub release: Option<Release>,
}

/// Lets a held child go on (see [`TraceTarget::release`]).
pub type Release = Box<dyn FnOnce() -> anyhow::Result<()>>;

/// What the event loop waits on besides timers and signals.
struct Sources {
    events: AsyncFd<RingBuf<MapData>>,
    pidfd: OwnedFd,
    metrics: Option<TcpListener>,
}

/// Traces `target` and returns the report.
pub async fn trace(target: TraceTarget, args: &TraceArgs) -> anyhow::Result<(Report, StopReason)> {
    let (mut s, sources) = start(target, args).await?;
    let started = Instant::now();
    let Sources { mut events, pidfd, metrics } = sources;
    // On an error the view is dropped with the session, which stops the agent too.
    let reason = event_loop(&mut s, &mut events, pidfd, metrics.as_ref(), args, started).await?;
    // Whatever is still in the ring buffer belongs to the run.
    s.drain(events.get_mut());
    if !matches!(reason, StopReason::TargetExited | StopReason::TargetOomKilled) && !s.target_oom_killed {
        s.js_heap.refresh(&mut s.stacks).await;
    }
    s.js_heap.close().await;
    Ok(finish(s, reason, args, started))
}

/// Checks, loads and attaches; returns once tracing has started.
async fn start(target: TraceTarget, args: &TraceArgs) -> anyhow::Result<(Session, Sources)> {
    let attach_started = Instant::now();
    let pid = resolve_target(target.pid)?;
    let launched = target.release.is_some();
    let pidfd = pidfd_open(pid).with_context(|| format!("no such process: {pid} (pidfd_open failed)"))?;
    crate::bpf::require_root()?;
    let track = track_bits(&args.track);
    let metrics = match args.metrics {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let ring_buffer_bytes = args
        .ring_buffer_mib
        .checked_mul(1 << 20)
        .filter(|b| b.is_power_of_two())
        .context("--ring-buffer-mib must be a power of two between 1 and 2048")?;
    let oom_format = if track & TRACK_OOM != 0 {
        Some(OomFormat::load().context("read the oom:mark_victim tracepoint format")?)
    } else {
        None
    };
    let mut malloc = args.malloc.settings(track & TRACK_MALLOC != 0).map_err(anyhow::Error::msg)?;
    // `memtrace run`: probes go on the waiting shell, armed by its exec of the command.
    malloc.wait_exec = target.release.is_some();
    let mut tracer = Tracer::load(&LoadOptions {
        target_tgid: pid,
        track,
        stack_copy_bytes: args.stack_bytes,
        ring_buffer_bytes,
        fault_sample_period: args.fault_sample,
        malloc,
    })
    .with_context(|| format!("attach to process {pid}"))?;
    let events = tracer.take_events().context("ring buffer already taken")?;
    let events = readable_fd(events).context("poll the ring buffer")?;
    let mut heap = if track & TRACK_MALLOC == 0 {
        None
    } else {
        let heap = crate::heap::HeapTracker::attach(tracer.ebpf_mut(), pid, malloc)
            .with_context(|| format!("attach the malloc probes to process {pid}"))?;
        Some(heap)
    };
    if let Some(release) = target.release {
        let before = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        release()?;
        wait_for_exec(pid, before).await;
        if let Some(heap) = heap.as_mut() {
            heap.after_exec(tracer.ebpf_mut(), pid)
                .with_context(|| format!("attach the malloc probes to process {pid}"))?;
        }
    }
    if let Some(heap) = &heap {
        eprintln!("memtrace: malloc: {}", heap.describe());
    }
    let symbols =
        ProcessSymbols::new(pid).with_context(|| format!("read the memory map of process {pid}"))?;
    let mut model = LiveModel::new();
    if let Some(brk) = procfs::program_break(pid) {
        model.set_initial_brk(brk);
    }
    let memcg = procfs::memcg(pid);
    let comm = procfs::comm(pid);
    let cmdline = procfs::cmdline(pid);
    let mut tracked: Vec<String> = args.track.iter().map(|t| t.name().to_string()).collect();
    let js_heap = jsheap::JsHeap::start(pid, args, launched).await;
    if js_heap.is_open() {
        tracked.push(crate::report::Source::JsHeap.name().to_string());
    }
    eprintln!(
        "memtrace: attached to {pid} ({comm}) in {:.2}s, tracking {}; Ctrl-C to stop",
        attach_started.elapsed().as_secs_f64(),
        tracked.join(",")
    );
    let mut s = Session {
        pid,
        tracer,
        symbols,
        model,
        stacks: StackTable::new(STACK_TABLE_CAPACITY),
        frames: HashMap::new(),
        symbolized_upto: 0,
        oom_format,
        ooms: Vec::new(),
        warnings: Vec::new(),
        memcg: memcg.clone(),
        cmdline: cmdline.clone(),
        timeline: Vec::new(),
        history: History::new(HISTORY_POINTS, HISTORY_SERIES),
        start_ns: monotonic_ns(),
        events: 0,
        decode_errors: 0,
        target_oom_killed: false,
        last_mem: procfs::MemStatus::default(),
        heap,
        comm,
        tracked,
        rules: crate::analysis::CulpritRules::new(&args.culprit_skip).context("--culprit-skip")?,
        node: procfs::smaps::is_node(pid),
        js_heap,
        parts: None,
    };
    s.snapshot();

    Ok((s, Sources { events, pidfd, metrics }))
}

/// Reads events, snapshots and reports status until a stop condition.
async fn event_loop(
    s: &mut Session,
    events: &mut AsyncFd<RingBuf<MapData>>,
    pidfd: OwnedFd,
    metrics: Option<&TcpListener>,
    args: &TraceArgs,
    started: Instant,
) -> anyhow::Result<StopReason> {
    let pidfd = readable_fd(pidfd).context("poll the pidfd")?;
    let mut sigterm =
        tokio::signal::unix::signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut sigint =
        tokio::signal::unix::signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The kernel wakes us only when data piles up (see `wakeup_flags` in the eBPF
    // object); between wakeups the ring buffer is drained on this timer.
    let mut drain = tokio::time::interval(Duration::from_millis(100));
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let interval = args.interval.unwrap_or_else(|| {
        args.duration.map_or(Duration::from_secs(5), |d| {
            (d / 20).clamp(Duration::from_secs(1), Duration::from_secs(10))
        })
    });
    let mut next_snapshot = Instant::now() + interval;
    let tty = std::io::stderr().is_terminal();
    let mut last_status_line = Instant::now();
    let reason = loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard.context("wait for events")?;
                s.drain(guard.get_inner_mut());
                guard.clear_ready();
                if s.target_oom_killed {
                    break StopReason::TargetOomKilled;
                }
            }
            _ = drain.tick() => {
                s.drain(events.get_mut());
                if s.target_oom_killed {
                    break StopReason::TargetOomKilled;
                }
            }
            _ = pidfd.readable() => break StopReason::TargetExited,
            _ = sigint.recv() => break StopReason::Signal,
            _ = sigterm.recv() => break StopReason::Signal,
            () = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } else { std::future::pending().await } } => {
                break StopReason::Duration;
            }
            accepted = async {
                match metrics {
                    Some(listener) => listener.accept().await,
                    None => std::future::pending().await,
                }
            } => {
                match accepted {
                    Ok((stream, _)) => {
                        let body = crate::export::prometheus::render(&s.metrics_snapshot());
                        tokio::spawn(metrics::serve(stream, body));
                    }
                    Err(e) => debug!("accept a metrics connection: {e}"),
                }
            }
            _ = tick.tick() => {
                if let Some(heap) = s.heap.as_mut() {
                    heap.poll_new_stacks(&mut s.stacks);
                }
                if !s.js_heap.is_open() {
                    s.js_heap.poll_open(s.pid).await;
                    if s.js_heap.is_open() {
                        s.tracked.push(crate::report::Source::JsHeap.name().to_string());
                    }
                }
                if Instant::now() >= next_snapshot {
                    s.js_heap.refresh(&mut s.stacks).await;
                }
                s.symbolize_new();
                if let Some(share) = args.warn_at {
                    s.check_warn_at(share);
                }
                if Instant::now() >= next_snapshot {
                    s.snapshot();
                    next_snapshot += interval;
                }
                if tty {
                    eprint!("\r{}\x1b[K", s.status_line(started));
                } else if last_status_line.elapsed() >= Duration::from_secs(5) {
                    eprintln!("{}", s.status_line(started));
                    last_status_line = Instant::now();
                }
            }
        }
    };
    Ok(reason)
}

/// The final snapshot and the report.
fn finish(mut s: Session, reason: StopReason, args: &TraceArgs, started: Instant) -> (Report, StopReason) {
    let reason = if s.target_oom_killed { StopReason::TargetOomKilled } else { reason };
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    eprintln!("{}", s.status_line(started));
    let exited = matches!(reason, StopReason::TargetExited | StopReason::TargetOomKilled);
    // The last point holds the final state (RSS keeps its last reading once the target
    // is gone).
    s.snapshot();
    let heap_aggs = s.heap.as_mut().map(|heap| {
        let cutoff = monotonic_ns().saturating_sub(args.min_age.as_nanos() as u64);
        heap.finish(cutoff, &mut s.stacks)
    });
    s.symbolize_new();
    let end_ns = monotonic_ns();
    let stack_failures = s.tracer.counters()[COUNTER_STACK_READ_FAILED as usize];
    if stack_failures > 0 {
        warn!("{stack_failures} stack copies failed; those allocations have partial stacks");
    }
    if s.stacks.overflowed() > 0 {
        warn!("{} new stacks found the stack table full and are reported as unknown", s.stacks.overflowed());
    }
    let frames = |id: StackId| s.frames.get(&id).cloned().unwrap_or_default();
    let model_totals = s.model.totals();
    let report = build_report(&ReportInputs {
        target: Target {
            pid: s.pid,
            comm: s.comm.clone(),
            cmdline: s.cmdline.clone(),
            exited,
            oom_killed: s.target_oom_killed,
        },
        duration_s: started.elapsed().as_secs_f64(),
        tracked: s.tracked.clone(),
        totals: Totals {
            outstanding_bytes: 0,
            allocated_bytes: model_totals.allocated_bytes,
            freed_bytes: model_totals.freed_bytes,
            resident_bytes: 0,
            views: Vec::new(),
        },
        stacks: {
            let mapped = s.model.by_stack_before(end_ns.saturating_sub(args.min_age.as_nanos() as u64));
            let mut stacks = match (&s.heap, heap_aggs) {
                (Some(heap), Some(heap_aggs)) => heap.merge(mapped, heap_aggs, &s.stacks),
                _ => mapped,
            };
            stacks.extend_from_slice(s.js_heap.aggs());
            stacks
        },
        end_ns,
        frames: &frames,
        ooms: &s.ooms,
        timeline: s.timeline.clone(),
        history: &s.history,
        lost_events: s.lost_events(),
        rules: &s.rules,
        memory: s.parts.map(|((t0, first), (t1, last))| crate::report::MemoryBreakdown {
            first,
            last,
            span_s: (t1 - t0).max(0.0).round() as u64,
        }),
        node: s.node,
    });
    let mut report = report;
    report.warnings.clone_from(&s.warnings);
    if let Some(heap) = &s.heap {
        let t_s = started.elapsed().as_secs_f64();
        eprintln!("memtrace: {}", heap.summary());
        for message in heap.warnings() {
            eprintln!("memtrace: WARNING: {message}");
            report.warnings.push(crate::report::Warning { t_s, message });
        }
    }
    debug!("stopped: {reason:?}");
    let _ = std::io::stderr().flush();
    (report, reason)
}
