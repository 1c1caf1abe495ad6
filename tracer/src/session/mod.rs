//! One tracing session: load, attach, read events until a stop condition, report.

pub(crate) mod cgroup;
mod jsheap;
mod live;
mod metrics;
mod opener;
mod os;
mod procs;
mod state;

use std::{
    io::{IsTerminal as _, Write as _},
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use log::{debug, warn};
use tokio::{io::unix::AsyncFd, net::TcpListener};
use tracer_common::{TRACK_MALLOC, TRACK_OOM};

pub use os::{StopSignals, monotonic_ns, readable_fd, resolve_target, track_bits};

use self::{
    os::{pidfd_open, wait_for_exec},
    state::Session,
};
use crate::{
    analysis::History,
    bpf::{LoadOptions, Tracer},
    cli::TraceArgs,
    events::OomFormat,
    live::{Action, LiveView},
    model::StackTable,
    procfs,
    push::{Destination, Pusher, otlp, pyroscope},
    report::Report,
    symbolize::ProcessSymbols,
};

/// How long the ring buffers are read once tracing stopped.
const FINAL_DRAIN: Duration = Duration::from_millis(200);
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
    /// The processes to trace; the first is the one the report is for.
    pub pids: Vec<u32>,
    /// Follow the processes they fork (and theirs), from their first instruction.
    pub children: bool,
    /// `--cgroup`: trace the processes of this cgroup, and those that join it.
    pub cgroup: Option<std::path::PathBuf>,
    /// For `memtrace run`: called once the programs are attached, to let the child run.
    pub release: Option<Release>,
    /// For `memtrace run`: the command's program (its path), whose files are probed before
    /// it runs.
    pub program: Option<std::path::PathBuf>,
}

/// Lets a held child go on (see [`TraceTarget::release`]).
pub type Release = Box<dyn FnOnce() -> anyhow::Result<()>>;

/// What the event loop waits on besides timers and signals.
struct Sources {
    events: AsyncFd<RingBuf<MapData>>,
    /// OOM records, on a ring buffer of their own.
    oom_events: AsyncFd<RingBuf<MapData>>,
    pidfd: OwnedFd,
    metrics: Option<TcpListener>,
}

/// Who is shown or sent the trace while it runs, besides the status line.
#[derive(Default)]
struct Watchers {
    live: Option<LiveView>,
    /// `--pyroscope`, `--otlp-profiles`.
    pushers: Vec<Pusher>,
    /// `--metrics`: the listener scrapes come to.
    metrics: Option<TcpListener>,
}

/// Traces `target` and returns the report.
pub async fn trace(target: TraceTarget, args: &TraceArgs) -> anyhow::Result<(Report, StopReason)> {
    // Before anything is attached: a signal from then on stops tracing with a report,
    // instead of killing memtrace between "attached" and the event loop.
    let signals = StopSignals::install()?;
    let (mut s, sources) = start(target, args).await?;
    let started = Instant::now();
    let Sources { mut events, mut oom_events, pidfd, metrics } = sources;
    let live = if args.live { start_live_view() } else { None };
    let pushers = pushers(args, &s.comm, snapshot_interval(args, live.is_some()))?;
    let mut watchers = Watchers { live, pushers, metrics };
    // On an error the view is dropped with the session, which stops the agent too.
    let reason =
        event_loop(&mut s, [&mut events, &mut oom_events], pidfd, signals, args, started, &mut watchers)
            .await?;
    let stopping = Instant::now();
    if let Some(view) = watchers.live.take() {
        view.finish();
    }
    // Whatever is still in the ring buffers belongs to the run; in a storm records keep
    // coming, and those not read within FINAL_DRAIN came after the stop.
    let deadline = Instant::now() + FINAL_DRAIN;
    s.drain_until(oom_events.get_mut(), deadline);
    if s.drain_until(events.get_mut(), deadline) {
        warn!("events still arriving {FINAL_DRAIN:?} after the stop; the report ends there");
    }
    // Stopped by a person: the report comes within a second, with what is named by then.
    s.settle_symbols(if reason == StopReason::Signal {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(5)
    });
    if !matches!(reason, StopReason::TargetExited | StopReason::TargetOomKilled) && !s.target_oom_killed {
        s.js_heap.refresh(&mut s.stacks).await;
    }
    s.js_heap.close().await;
    debug!("stopping: ring buffers read and symbols settled in {:.1?}", stopping.elapsed());
    let (mut report, reason) = finish(s, reason, args, started);
    debug!("stopping: report made in {:.1?}", stopping.elapsed());
    for pusher in &mut watchers.pushers {
        pusher.push_final(&report).await;
        let status = pusher.status();
        eprintln!("memtrace: {status}");
        if pusher.failures() > 0 {
            report.warnings.push(crate::report::Warning { t_s: report.duration_s, message: status });
        }
    }
    Ok((report, reason))
}

/// One pusher per profile destination asked for.
fn pushers(args: &TraceArgs, comm: &str, interval: Duration) -> anyhow::Result<Vec<Pusher>> {
    let mut destinations = Vec::new();
    if let Some(url) = &args.pyroscope {
        let auth = pyroscope::Auth::from_env()?;
        destinations.push(Destination::Pyroscope(pyroscope::Target::new(url, &args.labels, comm, auth)?));
    }
    if let Some(url) = &args.otlp_profiles {
        destinations.push(Destination::Otlp(otlp::Target::new(url, &args.labels, comm)?));
    }
    Ok(destinations.into_iter().map(|d| Pusher::new(d, interval)).collect::<Result<_, _>>()?)
}

/// The full-screen view, or `None` (the status line) when it cannot be shown.
fn start_live_view() -> Option<LiveView> {
    LiveView::start().unwrap_or_else(|e| {
        warn!("no live view: {e}; printing the status line instead");
        None
    })
}

/// Checks, loads and attaches; returns once tracing has started.
async fn start(target: TraceTarget, args: &TraceArgs) -> anyhow::Result<(Session, Sources)> {
    let attach_started = Instant::now();
    let mut pids = target.pids.iter().map(|&p| resolve_target(p)).collect::<anyhow::Result<Vec<u32>>>()?;
    let named = pids.len();
    let mut cgroup = target.cgroup.as_deref().map(cgroup::CgroupWatch::open).transpose()?;
    let cgroup_filter = cgroup.as_mut().map(|watch| watch.add_members(&mut pids)).transpose()?;
    let &pid = pids.first().context("no process to trace")?;
    let launched = target.release.is_some();
    let pidfd = pidfd_open(pid).with_context(|| format!("no such process: {pid} (pidfd_open failed)"))?;
    crate::bpf::require_root()?;
    procfs::access::check_traceable(pid)?;
    let track = track_bits(&args.track);
    check_scope(track, target.children || cgroup.is_some(), pids.len())?;
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
        targets: pids.clone(),
        follow_children: target.children,
        cgroup: cgroup_filter,
        track,
        stack_copy_bytes: args.stack_bytes,
        ring_buffer_bytes,
        fault_sample_period: args.fault_sample,
        malloc,
        oom_record_len: oom_format.as_ref().map_or(0, OomFormat::record_len),
    })
    .with_context(|| format!("attach to process {pid}"))?;
    let events = readable_fd(tracer.take_events().context("ring buffer already taken")?)
        .context("poll the ring buffer")?;
    let oom_events = readable_fd(tracer.take_oom_events().context("OOM ring buffer already taken")?)
        .context("poll the OOM ring buffer")?;
    let files = target.program.as_deref().and_then(|program| hold_at_exit(&mut tracer, pid, program));
    if track & TRACK_MALLOC != 0 && files.is_none() {
        os::wait_for_allocator(pid, malloc.node_buffers).await;
    }
    let mut heap = (track & TRACK_MALLOC != 0)
        .then(|| crate::heap::HeapTracker::attach(tracer.ebpf_mut(), pid, malloc, files.as_ref()))
        .transpose()
        .with_context(|| format!("attach the malloc probes to process {pid}"))?;
    if let Some(release) = target.release {
        let before = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        release()?;
        wait_for_exec(pid, before).await;
        if let Some(heap) = heap.as_mut() {
            if files.is_none() {
                os::wait_for_allocator(pid, malloc.node_buffers).await;
            }
            heap.after_exec(tracer.ebpf_mut(), pid)
                .with_context(|| format!("attach the malloc probes to process {pid}"))?;
        }
    }
    if let Some(heap) = &heap {
        eprintln!("memtrace: malloc: {}", heap.describe());
    }
    let mut procs = open_targets(&pids[..named], &pids[named..])?;
    if let Some(heap) = heap.as_mut() {
        heap.set_v8_code(&mut procs::FirstTarget(&mut procs));
    }
    if target.children {
        adopt_descendants(&mut tracer, &mut procs, &pids);
    }
    if launched {
        procs.await_exec(pid);
    }
    let memcg = procfs::memcg(pid);
    let comm = procfs::comm(pid);
    let cmdline = procfs::cmdline(pid);
    let mut tracked: Vec<String> = args.track.iter().map(|t| t.name().to_string()).collect();
    let js_heap = jsheap::JsHeap::start(pid, args, launched).await;
    if js_heap.is_open() {
        tracked.push(crate::report::Source::JsHeap.name().to_string());
    }
    let whom = match &cgroup {
        Some(watch) => format!(
            "{} ({})",
            watch.describe(),
            crate::export::human::plural(pids.len() as u64, "process", "processes")
        ),
        None => whom(&pids, target.children, &comm),
    };
    eprintln!(
        "memtrace: attached to {whom} in {:.2}s, tracking {}; Ctrl-C to stop",
        attach_started.elapsed().as_secs_f64(),
        tracked.join(",")
    );
    let mut s = Session {
        pid,
        tracer,
        procs,
        all_exited: false,
        stacks: StackTable::new(usize::try_from(args.stack_table_mib << 20).unwrap_or(usize::MAX)),
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
        exit: None,
        ended_ns: None,
        last_mem: procfs::MemStatus::default(),
        heap,
        comm,
        tracked,
        rules: crate::analysis::CulpritRules::new(&args.culprit_skip).context("--culprit-skip")?,
        node: procfs::smaps::is_node(pid),
        js_heap,
        parts: None,
        cgroup,
    };
    s.snapshot();

    Ok((s, Sources { events, oom_events, pidfd, metrics }))
}

/// `memtrace run`: reads the files the command will load and holds it at its `_exit` (see
/// `uprobe_exit`), so that a program gone within a millisecond is still symbolized.
fn hold_at_exit(
    tracer: &mut Tracer,
    pid: u32,
    program: &std::path::Path,
) -> Option<crate::bpf::uprobe::CommandFiles> {
    let files = crate::bpf::uprobe::CommandFiles::of(program)
        .map_err(|e| warn!("{e}; the command's modules are read once it runs"))
        .ok()?;
    match crate::bpf::uprobe::attach_exit_hold(tracer.ebpf_mut(), pid, &files) {
        Ok(links) => tracer.keep_links(links),
        Err(e) => warn!("{e}: a command that exits within milliseconds may have unnamed stacks"),
    }
    Some(files)
}

/// The targets' models and symbols, read from `/proc`: an error if one of `named` cannot be
/// read; one of a cgroup's `members` that cannot is traced without symbols.
fn open_targets(named: &[u32], members: &[u32]) -> anyhow::Result<procs::Processes> {
    let mut procs = procs::Processes::new();
    for &p in named {
        let symbols =
            ProcessSymbols::new(p).with_context(|| format!("read the memory map of process {p}"))?;
        procs.add_running(p, Some(symbols), None);
    }
    for &p in members {
        procs.add_running(p, None, None);
    }
    Ok(procs)
}

/// `--children`: the processes the targets forked before tracing started (a running pool's
/// workers) are traced too; read after the programs are attached, so that a fork in
/// between is seen one way or the other.
fn adopt_descendants(tracer: &mut Tracer, procs: &mut procs::Processes, targets: &[u32]) {
    for &target in targets {
        for (child, parent) in procs::descendants(target) {
            if procs.is_running(child) {
                continue;
            }
            if let Err(e) = tracer.trace_process(child) {
                warn!("{e}");
                continue;
            }
            debug!("following process {child}, a child of {parent} running when tracing started");
            procs.add_running(child, None, Some(parent));
        }
    }
}

/// What can be traced together: the allocator view follows one process.
fn check_scope(track: u32, children: bool, targets: usize) -> anyhow::Result<()> {
    if track & TRACK_MALLOC != 0 && (children || targets > 1) {
        anyhow::bail!(
            "--track malloc follows one process: its uprobes are attached to that process's allocator, and \
             memtrace does not attach them to other processes yet; trace several processes or --children \
             with the other sources (mmap,brk,faults,oom), or one process with --track malloc"
        );
    }
    Ok(())
}

/// `4242 (node) and its children`, for the attach message.
fn whom(pids: &[u32], children: bool, comm: &str) -> String {
    match (pids, children) {
        ([pid], false) => format!("{pid} ({comm})"),
        ([pid], true) => format!("{pid} ({comm}) and its children"),
        (pids, children) => format!(
            "{} processes ({}){}",
            pids.len(),
            pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
            if children { " and their children" } else { "" }
        ),
    }
}

/// Reads events, snapshots and reports status until a stop condition.
#[allow(clippy::too_many_lines, reason = "one select! over every source, each arm short")]
async fn event_loop(
    s: &mut Session,
    [events, oom_events]: [&mut AsyncFd<RingBuf<MapData>>; 2],
    pidfd: OwnedFd,
    mut signals: StopSignals,
    args: &TraceArgs,
    started: Instant,
    watchers: &mut Watchers,
) -> anyhow::Result<StopReason> {
    let pidfd = readable_fd(pidfd).context("poll the pidfd")?;
    let new_heap_stacks = match s.heap.as_ref().and_then(crate::heap::HeapTracker::new_stacks_fd) {
        Some(fd) => Some(
            readable_fd(fd.context("duplicate the malloc stack ring buffer")?)
                .context("poll the malloc stack ring buffer")?,
        ),
        None => None,
    };
    let mut target_exited = false;
    let deadline = args.duration.and_then(|d| crate::duration::deadline(tokio::time::Instant::now(), d));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The kernel wakes us only when data piles up (see `wakeup_flags` in the eBPF
    // object); between wakeups the ring buffer is drained on this timer.
    let mut drain = tokio::time::interval(Duration::from_millis(100));
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let interval = snapshot_interval(args, watchers.live.is_some());
    let mut next_snapshot = Instant::now().checked_add(interval);
    // The JS heap view's reads are a full GC in the target each (see --js-heap-every).
    let js_heap_every = js_heap_every(args, interval);
    let mut next_js_heap = Instant::now().checked_add(js_heap_every);
    let mut status = StatusLine { tty: std::io::stderr().is_terminal(), last: Instant::now() };
    let reason = loop {
        tokio::select! {
            guard = events.readable_mut() => {
                read_ready(s, guard, "events").await?;
                if let Some(reason) = ended(s) {
                    break reason;
                }
            }
            guard = oom_events.readable_mut() => {
                read_ready(s, guard, "OOM records").await?;
                if let Some(reason) = ended(s) {
                    break reason;
                }
            }
            _ = drain.tick() => {
                if s.drain(oom_events.get_mut()) | s.drain(events.get_mut()) {
                    tokio::task::yield_now().await;
                }
                if let Some(heap) = s.heap.as_mut() {
                    // Until it is known, Buffers are recorded without a stack.
                    heap.set_v8_code(&mut procs::FirstTarget(&mut s.procs));
                }
                if let Some(reason) = ended(s) {
                    break reason;
                }
            }
            guard = async { match new_heap_stacks.as_ref() { Some(fd) => fd.readable().await, None => std::future::pending().await } } => {
                let mut guard = guard.context("wait for new malloc stacks")?;
                if let Some(heap) = s.heap.as_mut() {
                    heap.poll_new_stacks(&mut s.stacks, &mut procs::FirstTarget(&mut s.procs));
                }
                guard.clear_ready();
            }
            _ = pidfd.readable(), if !target_exited => {
                target_exited = true;
                if s.target_exited(events.get_mut()) {
                    break StopReason::TargetExited;
                }
            }
            () = signals.recv() => break StopReason::Signal,
            event = async { match watchers.live.as_mut() { Some(view) => view.next_event().await, None => std::future::pending().await } } => {
                if let Some(view) = watchers.live.as_mut() {
                    if view.handle(&event) == Action::Quit {
                        break StopReason::Signal;
                    }
                    draw(view);
                }
            }
            () = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } else { std::future::pending().await } } => {
                break StopReason::Duration;
            }
            accepted = async {
                match watchers.metrics.as_ref() {
                    Some(listener) => listener.accept().await,
                    None => std::future::pending().await,
                }
            } => match accepted {
                Ok((stream, _)) => serve_scrape(s, watchers, stream),
                Err(e) => debug!("accept a metrics connection: {e}"),
            },
            _ = tick.tick() => {
                s.rescan_cgroup();
                s.procs.reap();
                if s.procs.live() == 0 && s.cgroup.is_none() {
                    s.drain(events.get_mut());
                    break StopReason::TargetExited;
                }
                if let Some(heap) = s.heap.as_mut() {
                    heap.poll(s.tracer.ebpf_mut(), &mut s.stacks, &mut procs::FirstTarget(&mut s.procs));
                }
                if !s.js_heap.is_open() {
                    s.js_heap.poll_open(s.pid).await;
                    if s.js_heap.is_open() {
                        s.tracked.push(crate::report::Source::JsHeap.name().to_string());
                    }
                }
                s.js_heap.keep_closed().await;
                if next_js_heap.is_some_and(|at| Instant::now() >= at) {
                    s.js_heap.refresh(&mut s.stacks).await;
                    next_js_heap = next_js_heap.and_then(|at| at.checked_add(js_heap_every));
                }
                s.symbolize_and_bound_stacks();
                if let Some(share) = args.warn_at {
                    s.check_warn_at(share);
                }
                let snapshot = next_snapshot.is_some_and(|at| Instant::now() >= at);
                if snapshot {
                    s.snapshot();
                    next_snapshot = next_snapshot.and_then(|at| at.checked_add(interval));
                }
                on_tick(s, watchers, snapshot, &mut status, args, started);
            }
        }
    };
    if reason == StopReason::TargetExited && !target_exited {
        // The kernel's exit event came first: the target becomes a zombie a moment later,
        // and how it ended is read then.
        let _ = tokio::time::timeout(Duration::from_secs(1), pidfd.readable()).await;
        s.exit = procfs::exit::exit_status(s.pid);
    }
    Ok(reason)
}

/// Reads a ring buffer that polled readable. Records left (a storm): it stays ready and
/// the loop comes back at once, after a yield that lets the runtime poll its drivers
/// (signals, timers, the pidfd), which a task that never waits would starve.
async fn read_ready(
    s: &mut Session,
    guard: std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, RingBuf<MapData>>>,
    what: &str,
) -> anyhow::Result<()> {
    let mut guard = guard.with_context(|| format!("wait for {what}"))?;
    if s.drain(guard.get_inner_mut()) {
        drop(guard);
        tokio::task::yield_now().await;
    } else {
        guard.clear_ready();
    }
    Ok(())
}

/// Whether what was drained ended the trace: the target OOM-killed, or every traced
/// process gone.
fn ended(s: &Session) -> Option<StopReason> {
    if s.target_oom_killed {
        Some(StopReason::TargetOomKilled)
    } else if s.all_exited {
        Some(StopReason::TargetExited)
    } else {
        None
    }
}

/// Answers one scrape with the metrics as they are now.
fn serve_scrape(s: &Session, watchers: &Watchers, stream: tokio::net::TcpStream) {
    let mut snapshot = s.metrics_snapshot();
    snapshot.pushes = watchers.pushers.iter().map(|p| (p.name(), p.pushed(), p.failures())).collect();
    let mut body = crate::export::prometheus::render(&snapshot);
    if s.procs.len() > 1 {
        let samples = s.procs.samples(metrics::PROCESS_SERIES_MAX);
        body.push_str(&metrics::per_process(&samples, s.procs.live(), s.procs.len()));
    }
    tokio::spawn(metrics::serve(stream, body));
}

/// How often the JS heap view reads V8's profile: `--js-heap-every`, else 30 s, or six
/// readings in a `--duration` shorter than three minutes (so that a short run still
/// shows the view's growth and not one line from its start to its end); never more often
/// than the snapshots.
fn js_heap_every(args: &TraceArgs, interval: Duration) -> Duration {
    const DEFAULT: Duration = Duration::from_secs(30);
    let every = args.js_heap_every.unwrap_or_else(|| args.duration.map_or(DEFAULT, |d| (d / 6).min(DEFAULT)));
    every.max(interval)
}

/// How often a snapshot is taken (and a profile pushed).
fn snapshot_interval(args: &TraceArgs, live: bool) -> Duration {
    args.interval.unwrap_or_else(|| {
        if live {
            // A person is watching: verdicts and the time to the limit within seconds.
            return Duration::from_secs(1);
        }
        args.duration.map_or(Duration::from_secs(5), |d| {
            (d / 20).clamp(Duration::from_secs(1), Duration::from_secs(10))
        })
    })
}

/// The status line on stderr: rewritten in place on a terminal, else every 5 s.
struct StatusLine {
    tty: bool,
    last: Instant,
}

/// Each second: the live view is redrawn from a fresh report, and at each snapshot the
/// profile is pushed; without a view, the status line.
fn on_tick(
    s: &mut Session,
    w: &mut Watchers,
    snapshot: bool,
    status: &mut StatusLine,
    args: &TraceArgs,
    started: Instant,
) {
    let show = w.live.as_ref().is_some_and(|v| !v.paused());
    let push = snapshot && !w.pushers.is_empty();
    if show || push {
        let made = Instant::now();
        let report = s.live_report(started, args.min_age);
        debug!(
            "live report: {} suspects in {:.1?}",
            report.leaks.len() + report.other_suspects.len(),
            made.elapsed()
        );
        for pusher in w.pushers.iter_mut().filter(|_| push) {
            pusher.push(&report);
        }
        if let Some(view) = w.live.as_mut().filter(|_| show) {
            view.update(report);
        }
    }
    let pushed: Vec<String> = w.pushers.iter().map(Pusher::status).collect();
    if let Some(view) = w.live.as_mut() {
        view.set_notes(pushed);
        draw(view);
        return;
    }
    let mut line = s.status_line(started);
    for p in pushed {
        line = format!("{line}  {p}");
    }
    if status.tty {
        eprint!("\r{line}\x1b[K");
    } else if status.last.elapsed() >= Duration::from_secs(5) {
        eprintln!("{line}");
        status.last = Instant::now();
    }
}

fn draw(view: &mut LiveView) {
    if let Err(e) = view.draw() {
        debug!("draw the live view: {e}");
    }
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
    // Ages end when the target did, not when memtrace got round to the report.
    let end_ns = s.ended_ns.filter(|_| exited).unwrap_or_else(monotonic_ns);
    let heap_aggs = s.heap.as_mut().map(|heap| {
        let cutoff = end_ns.saturating_sub(crate::duration::nanos(args.min_age));
        heap.finish(cutoff, &mut s.stacks, &mut procs::FirstTarget(&mut s.procs))
    });
    s.symbolize_new();
    if s.stacks.overflowed() > 0 {
        warn!(
            "{} new stacks found the stack table full (--stack-table-mib {}) and are reported as unknown",
            s.stacks.overflowed(),
            args.stack_table_mib
        );
    }
    let stacks = {
        let mapped = s.procs.by_stack_before(end_ns.saturating_sub(crate::duration::nanos(args.min_age)));
        match (&s.heap, heap_aggs) {
            (Some(heap), Some(heap_aggs)) => heap.merge(mapped, heap_aggs, &s.stacks),
            _ => mapped,
        }
    };
    let mut stacks = stacks;
    stacks.extend_from_slice(s.js_heap.aggs());
    let mut report = s.report(stacks, end_ns, exited, started);
    for message in crate::bpf::counters::warnings(&s.tracer.counters()) {
        eprintln!("memtrace: WARNING: {message}");
        report.warnings.push(crate::report::Warning { t_s: started.elapsed().as_secs_f64(), message });
    }
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
    // Everything is read: the probes go (see `bpf::teardown`), without a wait.
    let hand_off = crate::bpf::teardown::hand_off_probes();
    drop(s);
    drop(hand_off);
    (report, reason)
}
