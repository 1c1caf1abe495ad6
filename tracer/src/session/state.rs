//! The state of one trace: the model, the stacks and what was seen, updated per event.

use std::{collections::HashSet, fmt::Write as _, time::Instant};

use aya::maps::{MapData, RingBuf};
use log::warn;

use super::os::monotonic_ns;
use super::procs::Processes;
use crate::{
    analysis::History,
    bpf::Tracer,
    events::{Event, OomFormat, decode},
    model::{MemOp, Source, StackId, StackTable},
    procfs,
    report::TimelinePoint,
    symbolize::Regs,
    units::human_bytes,
};

/// The longest the event loop spends handling records before it looks at its other
/// sources (signals, the target's exit, timers).
const DRAIN_SLICE: std::time::Duration = std::time::Duration::from_millis(50);

/// The longest the once-a-second symbolization of new stacks runs; the rest waits for the
/// next second.
const SYMBOLIZE_SLICE: std::time::Duration = std::time::Duration::from_millis(200);

/// Ticks (seconds) a stack is kept after it was last seen, even when it holds nothing.
const STACK_RECENT_S: u64 = 60;

/// Timeline points kept at most; older points are thinned out beyond it.
const TIMELINE_CAPACITY: usize = 4096;

pub(super) struct Session {
    /// The (first) target.
    pub(super) pid: u32,
    pub(super) tracer: Tracer,
    /// The traced processes, each with its model and symbols.
    pub(super) procs: Processes,
    /// No traced process runs any more.
    pub(super) all_exited: bool,
    pub(super) stacks: StackTable,
    pub(super) oom_format: Option<OomFormat>,
    pub(super) ooms: Vec<crate::report::OomKill>,
    pub(super) warnings: Vec<crate::report::Warning>,
    pub(super) memcg: Option<procfs::Memcg>,
    pub(super) cmdline: String,
    pub(super) timeline: Vec<TimelinePoint>,
    pub(super) history: History,
    pub(super) start_ns: u64,
    pub(super) events: u64,
    pub(super) decode_errors: u64,
    pub(super) target_oom_killed: bool,
    /// How the target ended, if it did while traced.
    pub(super) exit: Option<crate::report::Exit>,
    /// When the (first) target ended (or called `_exit`): the report's ages end there.
    pub(super) ended_ns: Option<u64>,
    pub(super) last_mem: procfs::MemStatus,
    pub(super) heap: Option<crate::heap::HeapTracker>,
    pub(super) comm: String,
    /// Sources traced, as named in the report.
    pub(super) tracked: Vec<String>,
    pub(super) rules: crate::analysis::CulpritRules,
    /// The target runs V8.
    pub(super) node: bool,
    /// The JS heap view of a Node target.
    pub(super) js_heap: super::jsheap::JsHeap,
    /// `--cgroup`: the cgroup whose processes are traced; tracing outlives them.
    pub(super) cgroup: Option<super::cgroup::CgroupWatch>,
    /// Where the memory was at the first and the latest snapshot (seconds since start).
    pub(super) parts: Option<((f64, crate::report::MemoryParts), (f64, crate::report::MemoryParts))>,
}

impl Session {
    /// Handles the records waiting in the ring buffer, for at most [`DRAIN_SLICE`]: in a
    /// storm the buffer never empties, and between slices the event loop sees signals,
    /// the target's exit and its timers. Returns whether records may still wait.
    pub(super) fn drain(&mut self, rb: &mut RingBuf<MapData>) -> bool {
        self.drain_until(rb, Instant::now() + DRAIN_SLICE)
    }

    /// Handles the records waiting in the ring buffer until it is empty or `deadline`
    /// passes; returns whether it stopped at the deadline.
    pub(super) fn drain_until(&mut self, rb: &mut RingBuf<MapData>, deadline: Instant) -> bool {
        let mut handled = 0u32;
        let mut more = false;
        while let Some(item) = rb.next() {
            self.handle(&item);
            handled += 1;
            // The clock is read once per 64 records (a record takes about a microsecond).
            if handled.is_multiple_of(64) && Instant::now() >= deadline {
                more = true;
                break;
            }
        }
        self.replay(None);
        more
    }

    /// Handles again the records held while their process's symbols were opened, once
    /// they are (waiting up to `wait` for them).
    fn replay(&mut self, wait: Option<std::time::Duration>) -> bool {
        let held = self.procs.ready_events(wait);
        let any = !held.is_empty();
        for record in held {
            self.handle(&record);
        }
        any
    }

    /// At the end: waits (up to `wait`) for symbols still being opened and handles what
    /// was held for them; after that, without them.
    pub(super) fn settle_symbols(&mut self, wait: std::time::Duration) {
        let deadline = std::time::Instant::now() + wait;
        while self.procs.opening() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                warn!("symbols still being opened after {wait:.1?}; those processes keep addresses");
                for record in self.procs.abandon_opening() {
                    self.handle(&record);
                }
                return;
            }
            self.replay(Some(left.min(std::time::Duration::from_millis(100))));
        }
    }

    pub(super) fn handle(&mut self, bytes: &[u8]) {
        if self.procs.hold(bytes) {
            return;
        }
        self.events += 1;
        match decode(bytes) {
            Ok(Event::Mem { event, stack }) => {
                let proc = self.procs.index_of(event.header.tgid);
                let id = match stack {
                    Some(s) => {
                        let regs = Regs { ip: s.ip, sp: s.sp, bp: s.bp };
                        let (space, addrs) = self.procs.unwind(proc, regs, s.data, &s.fp_frames());
                        self.stacks.intern_in(space, &addrs)
                    }
                    None => StackId(0),
                };
                if let Some(op) = MemOp::from_event(&event) {
                    self.procs.apply(proc, op, id, event.header.ts_ns);
                }
            }
            Ok(Event::Proc { event }) => self.lifecycle(&event),
            Ok(Event::Oom { event }) => {
                let Some(format) = &self.oom_format else {
                    return;
                };
                match format.decode(event) {
                    Ok(rec) => {
                        let traced = self.procs.mark_oom_killed(rec.pid);
                        eprintln!(
                            "memtrace: OOM kill: pid {} ({}) anon-rss {} file-rss {} shmem-rss {}{}",
                            rec.pid,
                            rec.comm,
                            human_bytes(rec.anon_rss_bytes),
                            human_bytes(rec.file_rss_bytes),
                            human_bytes(rec.shmem_rss_bytes),
                            if rec.pid == self.pid {
                                " — the traced process"
                            } else if traced {
                                " — a traced process"
                            } else {
                                ""
                            }
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

    /// The (first) target ended, as its pidfd says; returns whether no traced process runs.
    pub(super) fn target_exited(&mut self, rb: &mut RingBuf<MapData>) -> bool {
        // Its exit event may still be in the ring buffer, with its last changes.
        self.drain(rb);
        self.exit = procfs::exit::exit_status(self.pid);
        self.procs.on_exit(self.pid, monotonic_ns());
        self.procs.live() == 0 && self.cgroup.is_none()
    }

    /// A traced process forked (the kernel traces the child already), exec'd or ended.
    fn lifecycle(&mut self, event: &tracer_common::ProcEvent) {
        let (tgid, ts_ns) = (event.header.tgid, event.header.ts_ns);
        let comm = crate::events::comm_of(&event.comm);
        match event.header.kind {
            tracer_common::kind::FORK => {
                self.procs.on_fork(tgid, event.parent_tgid, comm, ts_ns);
                log::info!("following process {tgid}, forked by {}", event.parent_tgid);
            }
            tracer_common::kind::EXITING => self.held_at_exit(tgid, ts_ns, event.parent_tgid),
            tracer_common::kind::EXEC => {
                // Stacks of the old image are named with its symbols before they go.
                self.symbolize_new();
                self.procs.on_exec(tgid, comm, ts_ns);
                log::info!("process {tgid} exec'd {}", procfs::cmdline(tgid));
            }
            tracer_common::kind::JOIN => {
                if !self.procs.is_running(tgid) {
                    self.procs.add_joined(tgid);
                    log::info!("following process {tgid} ({}), which joined the cgroup", procfs::comm(tgid));
                }
            }
            tracer_common::kind::LEAVE => {
                self.symbolize_new();
                self.procs.on_exit(tgid, ts_ns);
                log::info!("process {tgid} left the cgroup; no longer traced");
            }
            _ => {
                self.symbolize_new();
                if tgid == self.pid {
                    self.ended_ns.get_or_insert(ts_ns);
                }
                self.procs.on_exit(tgid, ts_ns);
                self.all_exited = self.procs.live() == 0 && self.cgroup.is_none();
            }
        }
    }

    /// `memtrace run`'s command called `_exit` and is stopped there (see `uprobe_exit`):
    /// everything it allocated is in the tables and its memory map is still readable, so
    /// its stacks are named now; then it may go on and end.
    fn held_at_exit(&mut self, tgid: u32, ts_ns: u64, status: u32) {
        log::debug!("process {tgid} called _exit({status}); reading its modules before it ends");
        if tgid == self.pid {
            self.ended_ns.get_or_insert(ts_ns);
        }
        self.procs.refresh_symbols(tgid);
        if let Some(heap) = self.heap.as_mut() {
            heap.refresh_addresses(tgid);
            heap.poll_new_stacks(&mut self.stacks, &mut super::procs::FirstTarget(&mut self.procs));
        }
        self.symbolize_new();
        self.resymbolize_unknown();
        super::os::resume(tgid);
    }

    /// Names again the stacks that have unknown frames: they were symbolized while the
    /// modules were still being mapped (right after the exec), and the memory map is
    /// complete now.
    fn resymbolize_unknown(&mut self) {
        for id in self.stacks.with_unknown_frames() {
            let addrs = self.stacks.get(id).to_vec();
            let frames = self.procs.symbolize(self.stacks.space(id), &addrs);
            self.stacks.set_frames(id, &frames);
        }
    }

    /// Symbolizes stacks seen since the last call, while the target still lives (JIT code
    /// moves and the process may exit).
    pub(super) fn symbolize_new(&mut self) {
        self.symbolize_for(None);
    }

    /// [`Self::symbolize_new`] for at most `budget`, leaving the rest for the next call.
    fn symbolize_for(&mut self, budget: Option<std::time::Duration>) {
        let fresh = self.stacks.take_unsymbolized();
        if fresh.is_empty() {
            return;
        }
        let started = Instant::now();
        self.procs.refresh_perf_maps();
        for (i, &id) in fresh.iter().enumerate() {
            if budget.is_some_and(|b| started.elapsed() >= b) {
                log::debug!(
                    "symbolized {i} of {} new stacks in {:.1?}; the rest next",
                    fresh.len(),
                    started.elapsed()
                );
                self.stacks.requeue_unsymbolized(&fresh[i..]);
                return;
            }
            let addrs = self.stacks.get(id).to_vec();
            let frames = self.procs.symbolize(self.stacks.space(id), &addrs);
            self.stacks.set_frames(id, &frames);
        }
    }

    /// Once a second: symbolizes the new stacks and, when the stack table nears its limit,
    /// forgets the stacks that hold nothing in any view and were not seen in the last
    /// [`STACK_RECENT_S`] seconds (a stack is forgotten only once its frames are known).
    pub(super) fn symbolize_and_bound_stacks(&mut self) {
        // A share of each second: the event loop goes on reading events meanwhile.
        self.symbolize_for(Some(SYMBOLIZE_SLICE));
        self.stacks.tick();
        if self.stacks.ticks().is_multiple_of(60) {
            log::debug!(
                "memory: stack table {} ({} stacks, {} frames), symbol caches {}",
                human_bytes(self.stacks.heap_bytes() as u64),
                self.stacks.len(),
                self.stacks.frame_count(),
                human_bytes(self.procs.symbol_cache_bytes() as u64)
            );
        }
        if !self.stacks.wants_eviction() {
            return;
        }
        let mut held = HashSet::new();
        self.procs.held_stacks(&mut held);
        held.extend(self.js_heap.aggs().iter().map(|a| a.stack));
        if let Some(heap) = &self.heap {
            held.extend(heap.stack_ids());
        }
        let before = self.stacks.heap_bytes();
        let started = Instant::now();
        let evicted = self.stacks.evict(&held, STACK_RECENT_S);
        log::debug!(
            "stack table: evicted {evicted} of {} stacks ({} held), {} -> {} in {:.1?}",
            self.stacks.len() + evicted,
            held.len(),
            human_bytes(before as u64),
            human_bytes(self.stacks.heap_bytes() as u64),
            started.elapsed()
        );
    }

    pub(super) fn snapshot(&mut self) {
        if let Some(mem) = self.procs.mem_status() {
            self.last_mem = mem;
        }
        let t_s = (monotonic_ns().saturating_sub(self.start_ns)) as f64 / 1e9;
        let mut aggs = self.procs.by_stack();
        let mut heap_bytes = 0;
        if let Some(heap) = self.heap.as_mut() {
            let heap_aggs = heap.snapshot(&mut self.stacks, &mut super::procs::FirstTarget(&mut self.procs));
            heap_bytes = heap_aggs.iter().map(|a| a.bytes).sum();
            aggs.extend(heap_aggs);
        }
        aggs.extend_from_slice(self.js_heap.aggs());
        self.history.record(t_s, &aggs);
        if self.js_heap.take_fresh() {
            self.history.observed(Source::JsHeap);
        }
        if let Some(parts) = procfs::smaps::memory_parts(self.pid, self.node) {
            let first = self.parts.map_or((t_s, parts), |(first, _)| first);
            self.parts = Some((first, (t_s, parts)));
        }
        let point = self.point_now(t_s, heap_bytes);
        self.timeline.push(point);
        if self.timeline.len() > TIMELINE_CAPACITY {
            // Keep every other point: resolution halves, coverage stays whole.
            let mut i = 0;
            self.timeline.retain(|_| {
                i += 1;
                i % 2 == 1
            });
        }
    }

    /// The memory now, as a timeline point (`heap_bytes`: the allocator view's total).
    pub(super) fn point_now(&mut self, t_s: f64, heap_bytes: u64) -> TimelinePoint {
        if let Ok(s) = procfs::status(self.pid) {
            self.last_mem = s.mem;
        }
        let v8 = self.js_heap.stats();
        TimelinePoint {
            t_s,
            rss_bytes: self.last_mem.rss,
            outstanding_bytes: self.procs.outstanding_bytes(),
            rss_anon_bytes: self.last_mem.rss_anon,
            rss_file_bytes: self.last_mem.rss_file,
            rss_shmem_bytes: self.last_mem.rss_shmem,
            resident_bytes: self.procs.resident_bytes(),
            memcg_usage_bytes: self.memcg.as_ref().and_then(procfs::Memcg::usage_bytes).unwrap_or(0),
            memcg_limit_bytes: self.memcg.as_ref().map_or(0, |m| m.limit_bytes),
            heap_bytes,
            v8_heap_used_bytes: v8.used,
            v8_heap_total_bytes: v8.total,
            v8_external_bytes: v8.external,
            v8_array_buffers_bytes: v8.array_buffers,
        }
    }

    /// `--warn-at`: the first time cgroup usage reaches the share of its limit, say so
    /// with the stacks that hold the most.
    pub(super) fn check_warn_at(&mut self, share: f64) {
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
            .procs
            .by_stack()
            .iter()
            .take(3)
            .map(|agg| {
                let frames = self.stacks.frames(agg.stack);
                format!(
                    "{} by {}",
                    human_bytes(agg.bytes),
                    crate::analysis::culprit(&frames, &self.rules).label()
                )
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

    pub(super) fn metrics_snapshot(&self) -> crate::export::prometheus::MetricsSnapshot {
        // One series per (culprit, view): stacks of one culprit are summed within a view.
        let mut by_culprit: Vec<crate::export::prometheus::SuspectSample> = Vec::new();
        for agg in self.procs.by_stack() {
            let frames = self.stacks.frames(agg.stack);
            let culprit = crate::analysis::culprit(&frames, &self.rules).label();
            let source = agg.source.name().to_string();
            match by_culprit.iter_mut().find(|s| s.culprit == culprit && s.source == source) {
                Some(s) => s.bytes += agg.bytes,
                None => by_culprit.push(crate::export::prometheus::SuspectSample {
                    culprit,
                    source,
                    bytes: agg.bytes,
                }),
            }
        }
        by_culprit.sort_by_key(|c| std::cmp::Reverse(c.bytes));
        by_culprit.truncate(crate::export::prometheus::TOP_SUSPECTS);
        let suspects = by_culprit;
        crate::export::prometheus::MetricsSnapshot {
            pid: self.pid,
            comm: self.comm.clone(),
            rss_bytes: self.last_mem.rss,
            mapped_bytes: self.procs.outstanding_bytes(),
            touched_bytes: self.procs.resident_bytes(),
            heap_bytes: self.heap.as_ref().map(|h| h.counters().outstanding_bytes()),
            events_total: self.events,
            lost_events_total: self.lost_events(),
            stacks: self.stacks.len() as u64,
            oom_kills_total: self.ooms.len() as u64,
            memcg_usage_bytes: self.memcg.as_ref().and_then(procfs::Memcg::usage_bytes).unwrap_or(0),
            memcg_limit_bytes: self.memcg.as_ref().map_or(0, |m| m.limit_bytes),
            suspects,
            memory: self.parts.map(|(_, (_, last))| last),
            time_to_limit: Some(crate::analysis::limit::time_to_limit(
                &self.timeline,
                crate::analysis::limit::WINDOW_S,
            )),
            pushes: Vec::new(),
        }
    }

    pub(super) fn lost_events(&self) -> u64 {
        let heap_lost = self.heap.as_ref().map_or(0, |h| h.counters().lost());
        crate::bpf::counters::lost(&self.tracer.counters()) + self.decode_errors + heap_lost
    }

    /// The stack count, and what the table's limit did once it bit.
    fn stacks_status(&self) -> String {
        let (evicted, full) = (self.stacks.evicted(), self.stacks.overflowed());
        if evicted == 0 && full == 0 {
            return self.stacks.len().to_string();
        }
        let mut s = format!(
            "{} ({} of {} limit",
            self.stacks.len(),
            human_bytes(self.stacks.heap_bytes() as u64),
            human_bytes(self.stacks.limit_bytes() as u64)
        );
        if evicted > 0 {
            let _ = write!(s, ", {evicted} idle evicted");
        }
        if full > 0 {
            let _ = write!(s, ", {full} unknown: table full");
        }
        s + ")"
    }

    pub(super) fn status_line(&self, started: Instant) -> String {
        let elapsed = started.elapsed().as_secs_f64();
        format!(
            "memtrace: {:>6.1}s  events {} ({:.0}/s){}  stacks {}  mapped {}  touched {}{}  rss {}  lost {}",
            elapsed,
            self.events,
            self.events as f64 / elapsed.max(0.001),
            if self.procs.len() > 1 {
                format!("  processes {} running, {} traced", self.procs.live(), self.procs.len())
            } else {
                String::new()
            },
            self.stacks_status(),
            human_bytes(self.procs.outstanding_bytes()),
            human_bytes(self.procs.resident_bytes()),
            self.heap.as_ref().map_or_else(String::new, |h| format!("  {}", h.status()))
                + &self.js_heap.status(),
            human_bytes(self.last_mem.rss),
            self.lost_events()
        )
    }
}
