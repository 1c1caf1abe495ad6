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
    /// End of the trace (`bpf_ktime_get_ns` clock), for ages.
    pub end_ns: u64,
    /// Symbolized frames of a stack, leaf first.
    pub frames: &'a dyn Fn(StackId) -> Vec<Frame>,
    pub ooms: &'a [OomKill],
    pub timeline: Vec<TimelinePoint>,
    pub history: &'a History,
    pub lost_events: u64,
}

const NS: f64 = 1e9;

/// Stacks that symbolize to the same frames are one suspect: JIT code moves between
/// tiers and addresses, the function stays the same.
struct Group {
    frames: Vec<Frame>,
    bytes: u64,
    count: u64,
    oldest_ts_ns: u64,
    sources: Vec<crate::model::Source>,
    series: Vec<u64>,
    has_series: bool,
}

#[must_use]
pub fn build_report(inputs: &ReportInputs<'_>) -> Report {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: std::collections::HashMap<(Vec<Frame>, bool), usize> = std::collections::HashMap::new();
    let points = inputs.history.times().len();
    for agg in inputs.stacks.iter().filter(|agg| agg.bytes > 0) {
        let mut frames = (inputs.frames)(agg.stack);
        if frames.is_empty() {
            frames.push(Frame {
                function: "[no stack captured]".into(),
                kind: FrameKind::Unknown,
                ..Frame::default()
            });
        }
        let key = (frames, series_key(agg).1);
        let i = *index.entry(key.clone()).or_insert_with(|| {
            groups.push(Group {
                frames: key.0,
                bytes: 0,
                count: 0,
                oldest_ts_ns: u64::MAX,
                sources: Vec::new(),
                series: vec![0; points],
                has_series: false,
            });
            groups.len() - 1
        });
        let g = &mut groups[i];
        g.bytes += agg.bytes;
        g.count += agg.count;
        g.oldest_ts_ns = g.oldest_ts_ns.min(agg.oldest_ts_ns);
        for s in &agg.sources {
            if !g.sources.contains(s) {
                g.sources.push(*s);
            }
        }
        if let Some(series) = inputs.history.series(series_key(agg)) {
            g.has_series = true;
            for (sum, v) in g.series.iter_mut().zip(series) {
                *sum += v;
            }
        }
    }
    let mut leaks: Vec<Leak> = groups
        .into_iter()
        .map(|g| {
            let series = if g.has_series { g.series.as_slice() } else { &[] };
            let mut trend = assess(inputs.history.times(), series);
            if !g.has_series {
                trend.reason = "allocated after the last snapshot".to_string();
            }
            let age_s = inputs.end_ns.saturating_sub(g.oldest_ts_ns) as f64 / NS;
            let growth_bytes_per_s = if trend.verdict == Verdict::Unknown {
                // Without a history: what it holds over its age (at least a second).
                g.bytes as f64 / age_s.max(1.0)
            } else {
                trend.slope_bytes_per_s
            };
            Leak {
                bytes: g.bytes,
                count: g.count,
                oldest_age_s: age_s,
                growth_bytes_per_s,
                score: trend.score,
                sources: g.sources.iter().map(|s| s.name().to_string()).collect(),
                frames: g.frames,
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
///
/// The cgroup's `oom_kill` counter moves only after `oom:mark_victim` fires, and the OOM
/// reaper may already have lowered its usage when memtrace looks, so a kill counts as the
/// cgroup's when its limit is set and was reached: a kill already counted, usage at 90% of
/// the limit or more, or the kernel's count of limit hits.
pub fn oom_scope(memcg: Option<&Memcg>) -> &'static str {
    let Some(m) = memcg else { return "unknown" };
    if m.limit_bytes == 0 {
        return "machine";
    }
    let killed = m.oom_kills().unwrap_or(0) > 0;
    let full = m.usage_bytes().is_some_and(|u| u.saturating_mul(10) >= m.limit_bytes.saturating_mul(9));
    let hit = m.limit_hits().unwrap_or(0) > 0;
    if killed || full || hit { "cgroup" } else { "machine" }
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
    fn stacks_with_the_same_frames_are_one_suspect() {
        let frames = |id: StackId| {
            let name = if id.0 == 3 { "other" } else { "rememberOrder" };
            vec![Frame { function: name.into(), kind: FrameKind::Js, ..Frame::default() }]
        };
        let mut history = History::new(16, 16);
        for t in 0..5u32 {
            let b = u64::from(t) * 100;
            history.record(f64::from(t), &[agg(1, b, 0), agg(2, 2 * b, 0), agg(3, 50, 0)]);
        }
        let inputs = ReportInputs {
            target: crate::report::Target::default(),
            duration_s: 4.0,
            tracked: vec![],
            totals: Totals::default(),
            stacks: vec![agg(1, 400, 0), agg(2, 800, 1_000_000_000), agg(3, 50, 0)],
            end_ns: 4_000_000_000,
            frames: &frames,
            ooms: &[],
            timeline: vec![],
            history: &history,
            lost_events: 0,
        };
        let r = build_report(&inputs);
        assert_eq!(r.leaks.len(), 2);
        let top = &r.leaks[0];
        assert_eq!((top.frames[0].function.as_str(), top.bytes, top.count), ("rememberOrder", 1200, 2));
        assert_eq!(top.verdict, "leak");
        assert!(
            (top.growth_bytes_per_s - 300.0).abs() < 1e-6,
            "summed series grow 300 B/s: {}",
            top.growth_bytes_per_s
        );
        assert!((top.oldest_age_s - 4.0).abs() < 1e-9);
    }

    #[test]
    fn ranks_by_bytes_without_history() {
        let frames = |id: StackId| {
            vec![Frame { function: format!("f{}", id.0), kind: FrameKind::Native, ..Frame::default() }]
        };
        let ooms = [];
        let inputs = ReportInputs {
            target: crate::report::Target { pid: 7, ..Default::default() },
            duration_s: 10.0,
            tracked: vec!["mmap".into()],
            totals: Totals::default(),
            stacks: vec![agg(1, 100, 0), agg(3, 300, 2_000_000_000)],
            end_ns: 10_000_000_000,
            frames: &frames,
            ooms: &ooms,
            timeline: vec![],
            history: &History::new(16, 16),
            lost_events: 0,
        };
        let r = build_report(&inputs);
        let names: Vec<_> = r.leaks.iter().map(|l| l.frames[0].function.as_str()).collect();
        assert_eq!(names, vec!["f3", "f1"], "without history, biggest first");
        assert_eq!(r.leaks[0].verdict, "unknown");
        assert_eq!(r.totals.outstanding_bytes, 400);
        assert!((r.leaks[0].growth_bytes_per_s - 300.0 / 8.0).abs() < 1e-9);
        assert!((r.leaks[0].oldest_age_s - 8.0).abs() < 1e-9);
    }
}
