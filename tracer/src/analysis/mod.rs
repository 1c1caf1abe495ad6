//! From the model to the report: leak suspects ranked, OOM kills, the timeline.

pub mod trend;

pub use trend::{History, Trend, Verdict, assess, series_key};

use crate::{
    events::OomRecord,
    model::{StackAgg, StackId},
    procfs::{self, Memcg},
    report::{Frame, FrameKind, Leak, OomKill, Report, TimelinePoint, Totals},
};

/// Everything the report is made from, gathered by the session.
pub struct ReportInputs<'a> {
    pub target: crate::report::Target,
    pub duration_s: f64,
    pub tracked: Vec<String>,
    pub totals: Totals,
    /// Outstanding memory by stack, as the model groups it.
    pub stacks: Vec<StackAgg>,
    /// Seconds from each allocation's `ts_ns` to the end of the trace: `end_ns - ts`.
    pub end_ns: u64,
    pub min_age_s: f64,
    /// Symbolized frames of a stack, leaf first.
    pub frames: &'a dyn Fn(StackId) -> Vec<Frame>,
    pub ooms: &'a [OomKill],
    pub timeline: Vec<TimelinePoint>,
    pub history: &'a History,
    pub lost_events: u64,
}

const NS: f64 = 1e9;

/// Growth rate of a stack's outstanding memory: the bytes it holds over the time since
/// its oldest live allocation (at least one second, so one fresh allocation does not
/// look like an infinite rate).
fn growth(agg: &StackAgg, end_ns: u64) -> f64 {
    let age_s = (end_ns.saturating_sub(agg.oldest_ts_ns) as f64 / NS).max(1.0);
    agg.bytes as f64 / age_s
}

#[must_use]
pub fn build_report(inputs: &ReportInputs<'_>) -> Report {
    let mut leaks: Vec<Leak> = inputs
        .stacks
        .iter()
        .filter(|agg| agg.bytes > 0)
        .filter(|agg| (inputs.end_ns.saturating_sub(agg.oldest_ts_ns) as f64 / NS) >= inputs.min_age_s)
        .map(|agg| {
            let series = inputs.history.series(series_key(agg)).unwrap_or(&[]);
            let mut trend = assess(inputs.history.times(), series);
            if series.is_empty() {
                trend.reason = "allocated after the last snapshot".to_string();
            }
            let growth_bytes_per_s = if trend.verdict == Verdict::Unknown {
                growth(agg, inputs.end_ns)
            } else {
                trend.slope_bytes_per_s
            };
            let mut frames = (inputs.frames)(agg.stack);
            if frames.is_empty() {
                frames.push(Frame {
                    function: "[no stack captured]".into(),
                    kind: FrameKind::Unknown,
                    ..Frame::default()
                });
            }
            Leak {
                bytes: agg.bytes,
                count: agg.count,
                oldest_age_s: inputs.end_ns.saturating_sub(agg.oldest_ts_ns) as f64 / NS,
                growth_bytes_per_s,
                score: trend.score,
                sources: agg.sources.iter().map(|s| s.name().to_string()).collect(),
                frames,
                verdict: trend.verdict.name().to_string(),
                reason: trend.reason,
            }
        })
        .collect();
    leaks.sort_by(|a, b| b.score.total_cmp(&a.score).then(b.bytes.cmp(&a.bytes)));
    let oom_kills = inputs.ooms.to_vec();
    Report {
        version: crate::report::REPORT_VERSION,
        target: inputs.target.clone(),
        duration_s: inputs.duration_s,
        tracked: inputs.tracked.clone(),
        totals: Totals {
            outstanding_bytes: inputs
                .stacks
                .iter()
                .filter(|a| !a.sources.contains(&crate::model::Source::Faults))
                .map(|a| a.bytes)
                .sum(),
            resident_bytes: inputs
                .stacks
                .iter()
                .filter(|a| a.sources.contains(&crate::model::Source::Faults))
                .map(|a| a.bytes)
                .sum(),
            ..inputs.totals
        },
        leaks,
        oom_kills,
        timeline: inputs.timeline.clone(),
        lost_events: inputs.lost_events,
        warnings: Vec::new(),
    }
}

/// Whether a kill was made because the victim's cgroup hit its limit.
#[must_use]
pub fn oom_scope(memcg: Option<&Memcg>) -> &'static str {
    match memcg {
        Some(m) if m.limit_bytes > 0 && m.oom_kills().unwrap_or(0) > 0 => "cgroup",
        Some(_) => "machine",
        None => "unknown",
    }
}

/// The report's record of a kill: the kernel's figures plus the victim's cgroup, read
/// now (the caller passes the cgroup it read earlier when the victim may be gone).
#[must_use]
pub fn oom_kill(rec: &OomRecord, memcg: Option<Memcg>, cmdline: String, t_s: f64) -> OomKill {
    let memcg = memcg.or_else(|| procfs::memcg(rec.pid));
    OomKill {
        pid: rec.pid,
        comm: rec.comm.clone(),
        anon_rss_bytes: rec.anon_rss_bytes,
        file_rss_bytes: rec.file_rss_bytes,
        shmem_rss_bytes: rec.shmem_rss_bytes,
        total_vm_bytes: rec.total_vm_bytes,
        oom_score_adj: rec.oom_score_adj,
        cgroup: memcg.as_ref().map(|m| m.path.clone()).unwrap_or_default(),
        memcg_limit_bytes: memcg.as_ref().map_or(0, |m| m.limit_bytes),
        t_s,
        cmdline,
        scope: oom_scope(memcg.as_ref()).to_string(),
        trigger_pid: rec.trigger_pid,
        trigger_comm: rec.trigger_comm.clone(),
        pgtables_bytes: rec.pgtables_bytes.unwrap_or(0),
        uid: rec.uid,
        memcg_usage_bytes: memcg.as_ref().and_then(Memcg::usage_bytes).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Source;

    fn agg(stack: u32, bytes: u64, oldest_ts_ns: u64) -> StackAgg {
        StackAgg { stack: StackId(stack), bytes, count: 1, oldest_ts_ns, sources: vec![Source::Mmap] }
    }

    #[test]
    fn ranks_by_score_and_applies_min_age() {
        let frames = |id: StackId| {
            vec![Frame { function: format!("f{}", id.0), kind: FrameKind::Native, ..Frame::default() }]
        };
        let ooms = [];
        let inputs = ReportInputs {
            target: crate::report::Target { pid: 7, ..Default::default() },
            duration_s: 10.0,
            tracked: vec!["mmap".into()],
            totals: Totals::default(),
            stacks: vec![agg(1, 100, 0), agg(2, 5000, 9_500_000_000), agg(3, 300, 2_000_000_000)],
            end_ns: 10_000_000_000,
            min_age_s: 1.0,
            frames: &frames,
            ooms: &ooms,
            timeline: vec![],
            history: &History::new(16, 16),
            lost_events: 0,
        };
        let r = build_report(&inputs);
        let names: Vec<_> = r.leaks.iter().map(|l| l.frames[0].function.as_str()).collect();
        assert_eq!(
            names,
            vec!["f3", "f1"],
            "stack 2 is younger than --min-age; without history, biggest first"
        );
        assert_eq!(r.leaks[0].verdict, "unknown");
        assert_eq!(r.totals.outstanding_bytes, 5400);
        assert!((r.leaks[0].growth_bytes_per_s - 300.0 / 8.0).abs() < 1e-9);
        assert!((r.leaks[0].oldest_age_s - 8.0).abs() < 1e-9);
    }
}
