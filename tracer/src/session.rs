//! One tracing session: load, attach, read events until a stop condition, report.

use std::{
    collections::HashMap,
    io::{IsTerminal as _, Write as _},
    os::fd::{FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, RingBuf};
use log::{debug, warn};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tracer_common::{
    COUNTER_PENDING_FULL, COUNTER_RINGBUF_FULL, COUNTER_STACK_READ_FAILED, TRACK_BRK, TRACK_FAULTS,
    TRACK_MALLOC, TRACK_MMAP, TRACK_OOM,
};

use crate::{
    analysis::History,
    analysis::{ReportInputs, build_report},
    bpf::{LoadOptions, Tracer},
    cli::{TraceArgs, Track},
    events::{Event, OomFormat, decode},
    model::{LiveModel, MemOp, StackId, StackTable},
    procfs,
    report::{Frame, Report, Target, TimelinePoint, Totals},
    symbolize::{ProcessSymbols, Regs},
    units::human_bytes,
};

/// Unique stacks kept at most; later new stacks are counted as unknown.
const STACK_TABLE_CAPACITY: usize = 200_000;
/// Timeline points kept at most; older points are thinned out beyond it.
const TIMELINE_CAPACITY: usize = 4096;
/// Snapshots of per-stack held bytes kept for the growth verdict (resolution halves
/// beyond it), and stacks followed at most.
const HISTORY_POINTS: usize = 512;
const HISTORY_SERIES: usize = 8192;

/// `CLOCK_MONOTONIC` in ns, the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Registers `inner` for read readiness with the runtime.
pub fn readable_fd<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: every `T` used here (the ring buffer's map, an `OwnedFd`) owns its fd for
    // its whole lifetime and always returns the same one.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Opens a pidfd, which becomes readable when the process exits.
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.cast_signed(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Resolves the process to trace: its tgid, with a clear error when it does not exist.
pub fn resolve_target(pid: u32) -> anyhow::Result<u32> {
    match procfs::status(pid) {
        Ok(s) if s.tgid != 0 && s.tgid != pid => {
            log::info!("{pid} is a thread of process {}; tracing the whole process", s.tgid);
            Ok(s.tgid)
        }
        Ok(_) => Ok(pid),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no such process: {pid} (is it running? check with `ps -p {pid}`)")
        }
        Err(e) => Err(e).with_context(|| format!("read /proc/{pid}/status")),
    }
}

/// Why tracing stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Duration,
    Signal,
    TargetExited,
    TargetOomKilled,
}

pub fn track_bits(track: &[Track]) -> anyhow::Result<u32> {
    let mut bits = 0;
    for t in track {
        bits |= match t {
            Track::Mmap => TRACK_MMAP,
            Track::Brk => TRACK_BRK,
            Track::Oom => TRACK_OOM,
            Track::Faults => TRACK_FAULTS,
            Track::Malloc => TRACK_MALLOC,
        };
    }
    Ok(bits)
}

struct Session {
    pid: u32,
    tracer: Tracer,
    symbols: ProcessSymbols,
    model: LiveModel,
    stacks: StackTable,
    frames: HashMap<StackId, Vec<Frame>>,
    symbolized_upto: usize,
    oom_format: Option<OomFormat>,
    ooms: Vec<crate::report::OomKill>,
    warnings: Vec<crate::report::Warning>,
    memcg: Option<procfs::Memcg>,
    cmdline: String,
    timeline: Vec<TimelinePoint>,
    history: History,
    start_ns: u64,
    events: u64,
    decode_errors: u64,
    target_oom_killed: bool,
    last_mem: procfs::MemStatus,
    heap: Option<crate::heap::HeapTracker>,
}

impl Session {
    /// Handles every record waiting in the ring buffer.
    fn drain(&mut self, rb: &mut RingBuf<MapData>) {
        while let Some(item) = rb.next() {
            self.handle(&item);
        }
    }

    fn handle(&mut self, bytes: &[u8]) {
        self.events += 1;
        match decode(bytes) {
            Ok(Event::Mem { event, stack }) => {
                let id = match stack {
                    Some(s) => {
                        let regs = Regs { ip: s.ip, sp: s.sp, bp: s.bp };
                        let addrs = self.symbols.unwind(regs, s.data, &s.fp_frames());
                        self.stacks.intern(&addrs)
                    }
                    None => StackId(0),
                };
                if let Some(op) = MemOp::from_event(&event) {
                    self.model.apply(op, id, event.header.ts_ns);
                }
            }
            Ok(Event::Oom { event }) => {
                let Some(format) = &self.oom_format else {
                    return;
                };
                match format.decode(event) {
                    Ok(rec) => {
                        eprintln!(
                            "memtrace: OOM kill: pid {} ({}) anon-rss {} file-rss {} shmem-rss {}{}",
                            rec.pid,
                            rec.comm,
                            human_bytes(rec.anon_rss_bytes),
                            human_bytes(rec.file_rss_bytes),
                            human_bytes(rec.shmem_rss_bytes),
                            if rec.pid == self.pid { " — the traced process" } else { "" }
                        );
                        let t_s = rec.ts_ns.saturating_sub(self.start_ns) as f64 / 1e9;
                        let kill = if rec.pid == self.pid {
                            self.target_oom_killed = true;
                            crate::analysis::oom_kill(&rec, self.memcg.clone(), self.cmdline.clone(), t_s)
                        } else {
                            crate::analysis::oom_kill(&rec, None, procfs::cmdline(rec.pid), t_s)
                        };
                        self.ooms.push(kill);
                    }
                    Err(e) => warn!("undecodable OOM record: {e}"),
                }
            }
            Err(e) => {
                self.decode_errors += 1;
                if self.decode_errors == 1 {
                    warn!("undecodable event ({e}); further ones are counted");
                }
            }
        }
    }

    /// Symbolizes stacks seen since the last call, while the target still lives (JIT code
    /// moves and the process may exit).
    fn symbolize_new(&mut self) {
        let total = self.stacks.len();
        if self.symbolized_upto >= total {
            return;
        }
        self.symbolizer_refresh();
        for id in (self.symbolized_upto + 1)..=total {
            let id = StackId(id as u32);
            let addrs = self.stacks.get(id).to_vec();
            let frames = self.symbols.symbolize(&addrs).into_iter().flatten().collect();
            self.frames.insert(id, frames);
        }
        self.symbolized_upto = total;
    }

    fn symbolizer_refresh(&mut self) {
        self.symbols.refresh_perf_map();
    }

    fn snapshot(&mut self) {
        if let Ok(s) = procfs::status(self.pid) {
            self.last_mem = s.mem;
        }
        let t_s = (monotonic_ns().saturating_sub(self.start_ns)) as f64 / 1e9;
        let mut aggs = self.model.by_stack();
        if let Some(heap) = self.heap.as_mut() {
            aggs.extend(heap.snapshot(&mut self.stacks));
        }
        self.history.record(t_s, &aggs);
        self.timeline.push(TimelinePoint {
            t_s,
            rss_bytes: self.last_mem.rss,
            outstanding_bytes: self.model.outstanding_bytes(),
            rss_anon_bytes: self.last_mem.rss_anon,
            rss_file_bytes: self.last_mem.rss_file,
            rss_shmem_bytes: self.last_mem.rss_shmem,
            resident_bytes: self.model.resident_bytes(),
            memcg_usage_bytes: self.memcg.as_ref().and_then(procfs::Memcg::usage_bytes).unwrap_or(0),
            memcg_limit_bytes: self.memcg.as_ref().map_or(0, |m| m.limit_bytes),
        });
        if self.timeline.len() > TIMELINE_CAPACITY {
            // Keep every other point: resolution halves, coverage stays whole.
            let mut i = 0;
            self.timeline.retain(|_| {
                i += 1;
                i % 2 == 1
            });
        }
    }

    /// `--warn-at`: the first time cgroup usage reaches the share of its limit, say so
    /// with the stacks that hold the most.
    fn check_warn_at(&mut self, share: f64) {
        if !self.warnings.is_empty() {
            return;
        }
        let Some(memcg) = self.memcg.clone() else { return };
        let (Some(usage), limit) = (memcg.usage_bytes(), memcg.limit_bytes) else { return };
        if limit == 0 || (usage as f64) < share * limit as f64 {
            return;
        }
        self.symbolize_new();
        let top: Vec<String> = self
            .model
            .by_stack()
            .iter()
            .take(3)
            .map(|agg| {
                let frames = self.frames.get(&agg.stack).map_or(&[][..], Vec::as_slice);
                format!("{} by {}", human_bytes(agg.bytes), culprit(frames))
            })
            .collect();
        let t_s = monotonic_ns().saturating_sub(self.start_ns) as f64 / 1e9;
        let message = format!(
            "cgroup {} at {} of its {} limit ({:.0}%); top holders: {}",
            memcg.path,
            human_bytes(usage),
            human_bytes(limit),
            usage as f64 * 100.0 / limit as f64,
            if top.is_empty() { "none traced".to_string() } else { top.join("; ") }
        );
        eprintln!("memtrace: WARNING: {message}");
        self.warnings.push(crate::report::Warning { t_s, message });
    }

    fn metrics_snapshot(&self) -> crate::export::prometheus::MetricsSnapshot {
        let suspects = self
            .model
            .by_stack()
            .iter()
            .take(10)
            .map(|agg| crate::export::prometheus::SuspectSample {
                culprit: culprit(self.frames.get(&agg.stack).map_or(&[][..], Vec::as_slice)),
                source: agg.sources.first().map_or("mmap", |s| s.name()).to_string(),
                bytes: agg.bytes,
            })
            .collect();
        crate::export::prometheus::MetricsSnapshot {
            pid: self.pid,
            comm: procfs::comm(self.pid),
            rss_bytes: self.last_mem.rss,
            mapped_bytes: self.model.outstanding_bytes(),
            touched_bytes: self.model.resident_bytes(),
            events_total: self.events,
            lost_events_total: self.lost_events(),
            stacks: self.stacks.len() as u64,
            oom_kills_total: self.ooms.len() as u64,
            memcg_usage_bytes: self.memcg.as_ref().and_then(procfs::Memcg::usage_bytes).unwrap_or(0),
            memcg_limit_bytes: self.memcg.as_ref().map_or(0, |m| m.limit_bytes),
            suspects,
        }
    }

    fn lost_events(&self) -> u64 {
        let c = self.tracer.counters();
        let heap_lost = self.heap.as_ref().map_or(0, |h| h.counters().lost());
        c[COUNTER_RINGBUF_FULL as usize] + c[COUNTER_PENDING_FULL as usize] + self.decode_errors + heap_lost
    }

    fn status_line(&self, started: Instant) -> String {
        let elapsed = started.elapsed().as_secs_f64();
        format!(
            "memtrace: {:>6.1}s  events {} ({:.0}/s)  stacks {}  mapped {}  touched {}{}  rss {}  lost {}",
            elapsed,
            self.events,
            self.events as f64 / elapsed.max(0.001),
            self.stacks.len(),
            human_bytes(self.model.outstanding_bytes()),
            human_bytes(self.model.resident_bytes()),
            self.heap.as_ref().map_or_else(String::new, |h| format!("  {}", h.status())),
            human_bytes(self.last_mem.rss),
            self.lost_events()
        )
    }
}

/// How the target was obtained.
pub struct TraceTarget {
    pub pid: u32,
    /// For `memtrace run`: called once the programs are attached, to let the child run.
    pub release: Option<Release>,
}

/// Lets a held child go on (see [`TraceTarget::release`]).
pub type Release = Box<dyn FnOnce() -> anyhow::Result<()>>;

/// Traces `target` and returns the report.
#[allow(
    clippy::too_many_lines,
    reason = "setup, the event loop and the final report share many locals; splitting it is a refactor of its own"
)]
pub async fn trace(target: TraceTarget, args: &TraceArgs) -> anyhow::Result<(Report, StopReason)> {
    let attach_started = Instant::now();
    let pid = resolve_target(target.pid)?;
    let pidfd = pidfd_open(pid).with_context(|| format!("no such process: {pid} (pidfd_open failed)"))?;
    crate::bpf::require_root()?;
    let track = track_bits(&args.track)?;
    let metrics = match args.metrics {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("serve metrics on {addr} (--metrics)"))?;
            if !addr.ip().is_loopback() {
                warn!("metrics are served on {addr}, reachable from other machines");
            }
            eprintln!("memtrace: Prometheus metrics at http://{addr}/metrics");
            Some(listener)
        }
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
    let mut events = readable_fd(events).context("poll the ring buffer")?;
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
    let tracked: Vec<String> = args.track.iter().map(|t| t.name().to_string()).collect();
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
    };
    s.snapshot();

    let pidfd = readable_fd(pidfd).context("poll the pidfd")?;
    let mut sigterm =
        tokio::signal::unix::signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut sigint =
        tokio::signal::unix::signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let started = Instant::now();
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
                match &metrics {
                    Some(listener) => listener.accept().await,
                    None => std::future::pending().await,
                }
            } => {
                match accepted {
                    Ok((stream, _)) => {
                        let body = crate::export::prometheus::render(&s.metrics_snapshot());
                        tokio::spawn(serve_metrics(stream, body));
                    }
                    Err(e) => debug!("accept a metrics connection: {e}"),
                }
            }
            _ = tick.tick() => {
                if let Some(heap) = s.heap.as_mut() {
                    heap.poll_new_stacks(&mut s.stacks);
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
    // Whatever is still in the ring buffer belongs to the run.
    s.drain(events.get_mut());
    let reason = if s.target_oom_killed { StopReason::TargetOomKilled } else { reason };
    if tty {
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
        target: Target { pid, comm, cmdline, exited, oom_killed: s.target_oom_killed },
        duration_s: started.elapsed().as_secs_f64(),
        tracked,
        totals: Totals {
            outstanding_bytes: 0,
            allocated_bytes: model_totals.allocated_bytes,
            freed_bytes: model_totals.freed_bytes,
            resident_bytes: 0,
        },
        stacks: {
            let mapped = s.model.by_stack_before(end_ns.saturating_sub(args.min_age.as_nanos() as u64));
            match (&s.heap, heap_aggs) {
                (Some(heap), Some(heap_aggs)) => heap.merge(mapped, heap_aggs, &s.stacks),
                _ => mapped,
            }
        },
        end_ns,
        frames: &frames,
        ooms: &s.ooms,
        timeline: s.timeline.clone(),
        history: &s.history,
        lost_events: s.lost_events(),
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
    Ok((report, reason))
}

/// Answers one HTTP request on the metrics listener: `GET /metrics` gets `body`.
async fn serve_metrics(mut stream: tokio::net::TcpStream, body: String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut head = [0u8; 2048];
    let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut head)).await else {
        return;
    };
    let request = String::from_utf8_lossy(&head[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let response = if request.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 404 Not Found\r\nContent-Length: 24\r\nConnection: close\r\n\r\nmetrics are at /metrics\n"
            .to_string()
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(response.as_bytes())).await;
}

/// The frame a person would look at first: the innermost JS frame, else the innermost
/// frame outside libc.
fn culprit(frames: &[Frame]) -> String {
    frames
        .iter()
        .find(|f| f.kind == crate::report::FrameKind::Js)
        .or_else(|| frames.iter().find(|f| !f.module.contains("libc.so") && !f.function.starts_with("0x")))
        .or(frames.first())
        .map_or_else(|| "[unknown stack]".to_string(), Frame::label)
}

/// `memtrace run`: once released, the waiting shell execs the command; its memory map
/// is only worth reading after that.
async fn wait_for_exec(pid: u32, before: Option<std::path::PathBuf>) {
    for _ in 0..500 {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        if exe.is_none() || exe != before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    warn!("process {pid} did not exec within 5s; its symbols may be missing");
}
