//! Reports made from the session's state: the final one, and those made while tracing
//! goes on (each second for the live view, each interval for a profile push), which stop
//! or detach nothing.

use std::time::{Duration, Instant};

use super::{os::monotonic_ns, state::Session};
use crate::{
    analysis::{ReportInputs, build_report},
    model::{StackAgg, StackId},
    report::{MemoryBreakdown, Report, Target, Totals},
};

impl Session {
    /// The report of `stacks` (held memory by stack at `end_ns`) with everything else the
    /// session has seen.
    pub(super) fn report(
        &self,
        stacks: Vec<StackAgg>,
        end_ns: u64,
        exited: bool,
        started: Instant,
    ) -> Report {
        self.report_with(stacks, end_ns, exited, started, self.timeline.clone())
    }

    /// The report as it would read if tracing stopped now. The timeline gets a point for
    /// now (not kept), so the view's RSS and the time to the limit are current between
    /// snapshots. The allocator view is read from the kernel's running totals, with no
    /// `--min-age` cutoff (that needs the per-allocation table, read only at the end).
    pub(super) fn live_report(&mut self, started: Instant, min_age: Duration) -> Report {
        let end_ns = monotonic_ns();
        let mapped = self.procs.by_stack_before(end_ns.saturating_sub(crate::duration::nanos(min_age)));
        let mut heap_bytes = 0;
        let stacks = match self.heap.as_mut() {
            Some(heap) => {
                let heap_aggs =
                    heap.snapshot(&mut self.stacks, &mut super::procs::FirstTarget(&mut self.procs));
                heap_bytes = heap_aggs.iter().map(|a| a.bytes).sum();
                heap.merge(mapped, heap_aggs, &self.stacks)
            }
            None => mapped,
        };
        self.symbolize_new();
        let t_s = end_ns.saturating_sub(self.start_ns) as f64 / 1e9;
        let mut timeline = self.timeline.clone();
        let now = self.point_now(t_s, heap_bytes);
        timeline.push(now);
        self.report_with(stacks, end_ns, false, started, timeline)
    }

    fn report_with(
        &self,
        stacks: Vec<StackAgg>,
        end_ns: u64,
        exited: bool,
        started: Instant,
        timeline: Vec<crate::report::TimelinePoint>,
    ) -> Report {
        let frames = |id: StackId| self.stacks.frames(id);
        let model_totals = self.procs.totals();
        let mut report = build_report(&ReportInputs {
            target: Target {
                pid: self.pid,
                comm: self.comm.clone(),
                cmdline: self.cmdline.clone(),
                exited,
                oom_killed: self.target_oom_killed,
                exit: self.exit.clone(),
                cgroup: self.cgroup.as_ref().map(|c| c.path.display().to_string()),
            },
            duration_s: started.elapsed().as_secs_f64(),
            tracked: self.tracked.clone(),
            totals: Totals {
                allocated_bytes: model_totals.allocated_bytes,
                freed_bytes: model_totals.freed_bytes,
                ..Totals::default()
            },
            stacks,
            end_ns,
            frames: &frames,
            ooms: &self.ooms,
            timeline,
            history: &self.history,
            lost_events: self.lost_events(),
            rules: &self.rules,
            memory: self.parts.map(|((t0, first), (t1, last))| MemoryBreakdown {
                first,
                last,
                span_s: (t1 - t0).max(0.0).round() as u64,
            }),
            node: self.node,
            processes: self.procs.report(self.start_ns),
        });
        report.warnings.clone_from(&self.warnings);
        report
    }
}
