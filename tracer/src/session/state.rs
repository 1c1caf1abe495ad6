//! The state of one trace: the model, the stacks and what was seen, updated per event.

use std::{collections::HashMap, time::Instant};

use aya::maps::{MapData, RingBuf};
use log::warn;
use tracer_common::{COUNTER_PENDING_FULL, COUNTER_RINGBUF_FULL};

use super::os::monotonic_ns;
use crate::{
    analysis::History,
    bpf::Tracer,
    events::{Event, OomFormat, decode},
    model::{LiveModel, MemOp, StackId, StackTable},
    procfs,
    report::{Frame, TimelinePoint},
    symbolize::{ProcessSymbols, Regs},
    units::human_bytes,
};

/// Timeline points kept at most; older points are thinned out beyond it.
const TIMELINE_CAPACITY: usize = 4096;

pub(super) struct Session {
    pub(super) pid: u32,
    pub(super) tracer: Tracer,
    pub(super) symbols: ProcessSymbols,
    pub(super) model: LiveModel,
    pub(super) stacks: StackTable,
    pub(super) frames: HashMap<StackId, Vec<Frame>>,
    pub(super) symbolized_upto: usize,
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
    /// Where the memory was at the first and the latest snapshot (seconds since start).
    pub(super) parts: Option<((f64, crate::report::MemoryParts), (f64, crate::report::MemoryParts))>,
}

impl Session {
    /// Handles every record waiting in the ring buffer.
    pub(super) fn drain(&mut self, rb: &mut RingBuf<MapData>) {
        while let Some(item) = rb.next() {
            self.handle(&item);
        }
    }

    pub(super) fn handle(&mut self, bytes: &[u8]) {
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
    pub(super) fn symbolize_new(&mut self) {
        let total = self.stacks.len();
        if self.symbolized_upto >= total {
            return;
        }
        self.symbols.refresh_perf_map();
        for id in (self.symbolized_upto + 1)..=total {
            let id = StackId(id as u32);
            let frames = match self.stacks.frames(id) {
                Some(named) => named.to_vec(),
                None => {
                    let addrs = self.stacks.get(id).to_vec();
                    self.symbols.symbolize(&addrs).into_iter().flatten().collect()
                }
            };
            self.frames.insert(id, frames);
        }
        self.symbolized_upto = total;
    }

    pub(super) fn snapshot(&mut self) {
        if let Ok(s) = procfs::status(self.pid) {
            self.last_mem = s.mem;
        }
        let t_s = (monotonic_ns().saturating_sub(self.start_ns)) as f64 / 1e9;
        let mut aggs = self.model.by_stack();
        let mut heap_bytes = 0;
        if let Some(heap) = self.heap.as_mut() {
            let heap_aggs = heap.snapshot(&mut self.stacks);
            heap_bytes = heap_aggs.iter().map(|a| a.bytes).sum();
            aggs.extend(heap_aggs);
        }
        aggs.extend_from_slice(self.js_heap.aggs());
        self.history.record(t_s, &aggs);
        let v8 = self.js_heap.stats();
        if let Some(parts) = procfs::smaps::memory_parts(self.pid, self.node) {
            let first = self.parts.map_or((t_s, parts), |(first, _)| first);
            self.parts = Some((first, (t_s, parts)));
        }
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
            heap_bytes,
            v8_heap_used_bytes: v8.used,
            v8_heap_total_bytes: v8.total,
            v8_external_bytes: v8.external,
            v8_array_buffers_bytes: v8.array_buffers,
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
            .model
            .by_stack()
            .iter()
            .take(3)
            .map(|agg| {
                let frames = self.frames.get(&agg.stack).map_or(&[][..], Vec::as_slice);
                format!(
                    "{} by {}",
                    human_bytes(agg.bytes),
                    crate::analysis::culprit(frames, &self.rules).label()
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
        let suspects = self
            .model
            .by_stack()
            .iter()
            .take(10)
            .map(|agg| crate::export::prometheus::SuspectSample {
                culprit: crate::analysis::culprit(
                    self.frames.get(&agg.stack).map_or(&[][..], Vec::as_slice),
                    &self.rules,
                )
                .label(),
                source: agg.source.name().to_string(),
                bytes: agg.bytes,
            })
            .collect();
        crate::export::prometheus::MetricsSnapshot {
            pid: self.pid,
            comm: self.comm.clone(),
            rss_bytes: self.last_mem.rss,
            mapped_bytes: self.model.outstanding_bytes(),
            touched_bytes: self.model.resident_bytes(),
            heap_bytes: self.heap.as_ref().map(|h| h.counters().outstanding_bytes()),
            events_total: self.events,
            lost_events_total: self.lost_events(),
            stacks: self.stacks.len() as u64,
            oom_kills_total: self.ooms.len() as u64,
            memcg_usage_bytes: self.memcg.as_ref().and_then(procfs::Memcg::usage_bytes).unwrap_or(0),
            memcg_limit_bytes: self.memcg.as_ref().map_or(0, |m| m.limit_bytes),
            suspects,
        }
    }

    pub(super) fn lost_events(&self) -> u64 {
        let c = self.tracer.counters();
        let heap_lost = self.heap.as_ref().map_or(0, |h| h.counters().lost());
        c[COUNTER_RINGBUF_FULL as usize] + c[COUNTER_PENDING_FULL as usize] + self.decode_errors + heap_lost
    }

    pub(super) fn status_line(&self, started: Instant) -> String {
        let elapsed = started.elapsed().as_secs_f64();
        format!(
            "memtrace: {:>6.1}s  events {} ({:.0}/s)  stacks {}  mapped {}  touched {}{}  rss {}  lost {}",
            elapsed,
            self.events,
            self.events as f64 / elapsed.max(0.001),
            self.stacks.len(),
            human_bytes(self.model.outstanding_bytes()),
            human_bytes(self.model.resident_bytes()),
            self.heap.as_ref().map_or_else(String::new, |h| format!("  {}", h.status()))
                + &self.js_heap.status(),
            human_bytes(self.last_mem.rss),
            self.lost_events()
        )
    }
}
