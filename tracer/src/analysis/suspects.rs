//! Evidence to suspects: every stack's held memory, in every view, grouped by culprit.
//! A verdict comes only from a view that names the holder; growth of a segment (a
//! malloc arena, V8's heap pages) is reported as the segment's, with who extended it.

use std::collections::{BTreeMap, HashMap};

use super::{
    ReportInputs,
    culprit::{caller_index, culprit_index, function_key, segment_of},
    trend::{Trend, assess, series_key},
};
use crate::{
    model::ProcIndex,
    report::{
        Evidence, Frame, FrameKind, Leak, Process, ProcessShare, Report, SegmentGrowth, SegmentKind,
        SegmentVerdict, Source, Totals, Variant, Verdict, ViewTotal,
    },
    units::human_bytes,
};

const NS: f64 = 1e9;

/// One view's memory under a culprit.
#[derive(Default)]
struct ViewAcc {
    bytes: u64,
    count: u64,
    oldest_ts_ns: u64,
    series: Vec<u64>,
    has_series: bool,
    /// Σ mean allocation time × bytes, and the bytes it covers (stacks that know it).
    weighted_ts: u128,
    weighted_bytes: u128,
}

impl ViewAcc {
    /// Mean age of the held bytes at `end_ns`, in seconds, when known.
    fn mean_age_s(&self, end_ns: u64) -> Option<f64> {
        let mean = self.weighted_ts.checked_div(self.weighted_bytes)?;
        Some(end_ns.saturating_sub(mean as u64) as f64 / NS)
    }
}

/// A leak's held bytes were allocated all along the trace (mean age about half of it);
/// when their mean age is below this share of the trace, they are in flight.
const IN_FLIGHT_AGE_SHARE: f64 = 0.2;
/// Traces shorter than this do not judge ages.
const IN_FLIGHT_MIN_TRACE_S: f64 = 4.0;

struct Group {
    culprit: Frame,
    caller: Option<Frame>,
    segment: Option<SegmentKind>,
    views: BTreeMap<Source, ViewAcc>,
    /// Bytes and count per view and process: the per-process split of the suspect.
    procs: BTreeMap<(Source, ProcIndex), (u64, u64)>,
    variants: Vec<Variant>,
    variant_index: HashMap<(Vec<Frame>, Source), usize>,
}

#[must_use]
pub fn build_report(inputs: &ReportInputs<'_>) -> Report {
    let groups = group(inputs);
    let times = inputs.history.times();
    let mut leaks = Vec::new();
    let mut others = Vec::new();
    let mut by_segment: BTreeMap<SegmentKind, Vec<Group>> = BTreeMap::new();
    let mut views: BTreeMap<Source, ViewTotal> = BTreeMap::new();
    for g in groups {
        for (source, acc) in &g.views {
            let total =
                views.entry(*source).or_insert(ViewTotal { source: Some(*source), bytes: 0, count: 0 });
            total.bytes += acc.bytes;
            total.count += acc.count;
        }
        if let Some(kind) = g.segment {
            by_segment.entry(kind).or_default().push(g);
            continue;
        }
        let leak = suspect(g, times, inputs);
        if flagged(&leak) {
            leaks.push(leak);
        } else {
            others.push(leak);
        }
    }
    leaks.sort_by(|a, b| b.score.total_cmp(&a.score).then(b.bytes.cmp(&a.bytes)));
    others.sort_by_key(|l| std::cmp::Reverse(l.bytes));
    let segments =
        by_segment.into_iter().filter_map(|(kind, groups)| segment(kind, groups, inputs)).collect::<Vec<_>>();
    let view_bytes = |pred: fn(Source) -> bool| {
        views.values().filter(|v| v.source.is_some_and(pred)).map(|v| v.bytes).sum()
    };
    Report {
        version: crate::report::REPORT_VERSION,
        target: inputs.target.clone(),
        duration_s: inputs.duration_s,
        tracked: inputs.tracked.clone(),
        totals: Totals {
            outstanding_bytes: view_bytes(|s| matches!(s, Source::Mmap | Source::Brk)),
            resident_bytes: view_bytes(|s| s == Source::Faults),
            views: views.into_values().collect(),
            ..inputs.totals.clone()
        },
        leaks,
        oom_kills: inputs.ooms.to_vec(),
        timeline: inputs.timeline.clone(),
        lost_events: inputs.lost_events,
        warnings: Vec::new(),
        other_suspects: others,
        segments,
        memory: inputs.memory,
        time_to_limit: Some(super::limit::time_to_limit(&inputs.timeline, super::limit::WINDOW_S)),
        processes: inputs.processes.clone(),
    }
}

/// Stacks grouped by (culprit, segment); within a group, identical symbolized stacks of
/// one view are one variant (JIT code moves between tiers and addresses).
fn group(inputs: &ReportInputs<'_>) -> Vec<Group> {
    type FnKey = (String, String, String, FrameKind);
    let points = inputs.history.times().len();
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<(FnKey, Option<FnKey>, Option<SegmentKind>), usize> = HashMap::new();
    for agg in inputs.stacks.iter().filter(|agg| agg.bytes > 0 || agg.count > 0) {
        let mut frames = (inputs.frames)(agg.stack);
        if frames.is_empty() {
            frames.push(Frame {
                function: "[no stack captured]".into(),
                kind: FrameKind::Unknown,
                ..Frame::default()
            });
        }
        let at = culprit_index(&frames, inputs.rules);
        let segment = segment_of(agg.source, &frames, at);
        let culprit = at.and_then(|i| frames.get(i)).cloned().unwrap_or_default();
        let caller = caller_index(&frames, at, inputs.rules).and_then(|i| frames.get(i)).cloned();
        let key = (function_key(&culprit), caller.as_ref().map(function_key), segment);
        let i = *index.entry(key).or_insert_with(|| {
            groups.push(Group {
                culprit,
                caller,
                segment,
                views: BTreeMap::new(),
                procs: BTreeMap::new(),
                variants: Vec::new(),
                variant_index: HashMap::new(),
            });
            groups.len() - 1
        });
        let g = &mut groups[i];
        let acc = g.views.entry(agg.source).or_insert_with(|| ViewAcc {
            oldest_ts_ns: u64::MAX,
            series: vec![0; points],
            ..ViewAcc::default()
        });
        acc.bytes += agg.bytes;
        acc.count += agg.count;
        acc.oldest_ts_ns = acc.oldest_ts_ns.min(agg.oldest_ts_ns);
        let in_proc = g.procs.entry((agg.source, agg.proc)).or_default();
        in_proc.0 += agg.bytes;
        in_proc.1 += agg.count;
        if agg.mean_ts_ns > 0 {
            acc.weighted_ts += u128::from(agg.mean_ts_ns) * u128::from(agg.bytes);
            acc.weighted_bytes += u128::from(agg.bytes);
        }
        if let Some(series) = inputs.history.series(series_key(agg)) {
            acc.has_series = true;
            for (sum, v) in acc.series.iter_mut().zip(series) {
                *sum += v;
            }
        }
        let v = *g.variant_index.entry((frames.clone(), agg.source)).or_insert_with(|| {
            g.variants.push(Variant { source: Some(agg.source), frames, ..Variant::default() });
            g.variants.len() - 1
        });
        g.variants[v].bytes += agg.bytes;
        g.variants[v].count += agg.count;
    }
    groups
}

/// The trend of one view's series, or of its final value when it has no history.
fn trend_of(acc: &ViewAcc, times: &[f64], end_ns: u64) -> (Trend, f64, f64) {
    let series = if acc.has_series { acc.series.as_slice() } else { &[] };
    let mut trend = assess(times, series);
    if !acc.has_series {
        trend.reason = format!("holds {}, allocated after the last snapshot", human_bytes(acc.bytes));
    }
    let age_s = end_ns.saturating_sub(acc.oldest_ts_ns) as f64 / NS;
    let growth = if trend.verdict == Verdict::Unknown {
        // Without a history: what it holds over its age (at least a second).
        acc.bytes as f64 / age_s.max(1.0)
    } else {
        trend.slope_bytes_per_s
    };
    (trend, growth, age_s)
}

/// The processes holding a view's memory under a culprit, most first.
fn shares(g: &Group, view: Source, processes: &[Process]) -> Vec<ProcessShare> {
    let mut out: Vec<ProcessShare> = g
        .procs
        .range((view, ProcIndex(0))..=(view, ProcIndex(u32::MAX)))
        .filter(|(_, (bytes, count))| *bytes > 0 || *count > 0)
        .map(|((_, proc), (bytes, count))| {
            let p = processes.get(proc.0 as usize);
            ProcessShare {
                pid: p.map_or(0, |p| p.pid),
                bytes: *bytes,
                count: *count,
                exited: p.is_some_and(|p| p.exited_s.is_some()),
            }
        })
        .collect();
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.pid.cmp(&b.pid)));
    out
}

fn suspect(mut g: Group, times: &[f64], inputs: &ReportInputs<'_>) -> Leak {
    let (end_ns, duration_s) = (inputs.end_ns, inputs.duration_s);
    let attributable = g.segment.is_none();
    let mut evidence = Vec::new();
    let mut primary: Option<(Source, Trend, f64, f64)> = None;
    for (source, acc) in &g.views {
        let (trend, growth, age_s) = trend_of(acc, times, end_ns);
        let holder = attributable && source.names_holder();
        evidence.push(Evidence {
            source: Some(*source),
            bytes: acc.bytes,
            count: acc.count,
            growth_bytes_per_s: growth,
            verdict: if holder { trend.verdict } else { Verdict::Unattributed },
        });
        let better = match &primary {
            None => true,
            Some((p, ..)) => {
                let (p_holder, p_bytes) = (attributable && p.names_holder(), g.views[p].bytes);
                (holder, acc.bytes) > (p_holder, p_bytes)
            }
        };
        if better {
            primary = Some((*source, trend, growth, age_s));
        }
    }
    g.variants.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(b.count.cmp(&a.count)));
    let Some((view, trend, growth, age_s)) = primary else {
        return Leak { culprit: g.culprit, caller: g.caller, ..Leak::default() };
    };
    let processes = shares(&g, view, &inputs.processes);
    let acc = &g.views[&view];
    let holder = attributable && view.names_holder();
    let young = acc
        .mean_age_s(end_ns)
        .filter(|age| duration_s >= IN_FLIGHT_MIN_TRACE_S && *age < IN_FLIGHT_AGE_SHARE * duration_s);
    let (verdict, reason, score) = if holder && trend.verdict == Verdict::Leak && young.is_some() {
        let age = young.unwrap_or(0.0);
        (
            Verdict::InFlight,
            format!(
                "grew, but what it holds ({}) is on average {age:.1}s old in a {duration_s:.0}s trace: memory in \
                 flight (garbage not yet collected, a burst), or a leak that began late; trace longer to tell",
                human_bytes(acc.bytes)
            ),
            0.0,
        )
    } else if holder {
        (trend.verdict, trend.reason, trend.score)
    } else {
        (
            Verdict::Unattributed,
            "seen only by first touch, which is not ownership: no verdict".to_string(),
            0.0,
        )
    };
    let frames = g
        .variants
        .iter()
        .find(|v| v.source == Some(view))
        .or(g.variants.first())
        .map(|v| v.frames.clone())
        .unwrap_or_default();
    Leak {
        bytes: acc.bytes,
        count: acc.count,
        oldest_age_s: age_s,
        growth_bytes_per_s: growth,
        score,
        sources: g.views.keys().copied().collect(),
        frames,
        verdict,
        reason,
        culprit: g.culprit,
        caller: g.caller,
        view: Some(view),
        evidence,
        variants: g.variants,
        pid: processes.first().map_or(inputs.target.pid, |p| p.pid),
        processes,
    }
}

/// A suspect the report leads with: a leak, or memory that grew with too few snapshots to
/// judge, seen in a view that names the holder.
fn flagged(leak: &Leak) -> bool {
    match leak.verdict {
        Verdict::Leak => true,
        Verdict::Unknown => leak.bytes > 0 && leak.view.is_some_and(Source::names_holder),
        Verdict::WarmUp | Verdict::Churn | Verdict::InFlight | Verdict::Unattributed => false,
    }
}

/// One segment's growth from the views that extend it (`brk` and `mmap`; first-touch
/// pages are shown under the extenders but not counted twice).
fn segment(kind: SegmentKind, groups: Vec<Group>, inputs: &ReportInputs<'_>) -> Option<SegmentGrowth> {
    let times = inputs.history.times();
    let mut sum = ViewAcc { oldest_ts_ns: u64::MAX, series: vec![0; times.len()], ..ViewAcc::default() };
    for g in &groups {
        for (source, acc) in g.views.iter().filter(|(s, _)| **s != Source::Faults) {
            let _ = source;
            sum.bytes += acc.bytes;
            sum.count += acc.count;
            sum.oldest_ts_ns = sum.oldest_ts_ns.min(acc.oldest_ts_ns);
            if acc.has_series {
                sum.has_series = true;
                for (s, v) in sum.series.iter_mut().zip(&acc.series) {
                    *s += v;
                }
            }
        }
    }
    let mut extended_by: Vec<Leak> = groups.into_iter().map(|g| suspect(g, times, inputs)).collect();
    extended_by.sort_by_key(|l| std::cmp::Reverse(l.bytes));
    if extended_by.is_empty() {
        return None;
    }
    let (trend, growth, age_s) = trend_of(&sum, times, inputs.end_ns);
    let growing = sum.bytes > 0 && growth > 0.0 && matches!(trend.verdict, Verdict::Leak | Verdict::Unknown);
    let span = if sum.has_series {
        times.last().copied().unwrap_or(0.0) - times.first().copied().unwrap_or(0.0)
    } else {
        age_s
    };
    let mut verdict = if growing { SegmentVerdict::Growing } else { SegmentVerdict::Flat };
    let mut reason = if sum.bytes == 0 {
        format!("pages first touched inside it: {}", human_bytes(extended_by.iter().map(|l| l.bytes).sum()))
    } else if growing {
        format!("+{} in {span:.0}s ({}/min)", human_bytes(sum.bytes), human_bytes((growth * 60.0) as u64))
    } else {
        format!("holds {} grown while traced; {}", human_bytes(sum.bytes), trend.reason)
    };
    let mut advice = advice(kind, inputs.node, inputs.tracked.iter().any(|t| t == "malloc"));
    if kind == SegmentKind::MallocArena
        && growing
        && let Some(live) = heap_growth(inputs)
        && live < 0.1 * growth
    {
        verdict = SegmentVerdict::Fragmentation;
        reason = format!(
            "{reason}, while the live malloc blocks grew only {}/min: fragmentation",
            human_bytes((live.max(0.0) * 60.0) as u64)
        );
        advice = "the allocator keeps freed memory it cannot reuse: try MALLOC_ARENA_MAX=2 (fewer arenas), \
                          MALLOC_TRIM_THRESHOLD_=131072, or another allocator (jemalloc, mimalloc via LD_PRELOAD)"
                    .to_string();
    }
    Some(SegmentGrowth {
        kind,
        bytes: sum.bytes,
        growth_bytes_per_s: growth,
        verdict,
        reason,
        advice,
        extended_by,
    })
}

/// Growth of the live malloc blocks over the run (bytes/s), when the allocator view ran:
/// the floor (least held) of the second half of the snapshots against the floor of the
/// first, so that snapshots taken in the middle of bursts of short-lived blocks (which
/// grow with the bursts) do not count as growth. A leak raises the floor.
fn heap_growth(inputs: &ReportInputs<'_>) -> Option<f64> {
    let points = &inputs.timeline;
    if !inputs.tracked.iter().any(|t| t == "malloc") || points.len() < 4 {
        return None;
    }
    let floor = |p: &[crate::report::TimelinePoint]| {
        let least = p.iter().map(|p| p.heap_bytes).min().unwrap_or(0) as f64;
        let mid_t = f64::midpoint(p.first().map_or(0.0, |p| p.t_s), p.last().map_or(0.0, |p| p.t_s));
        (least, mid_t)
    };
    let (first, second) = points.split_at(points.len() / 2);
    let ((a, ta), (b, tb)) = (floor(first), floor(second));
    Some(if tb > ta { (b - a) / (tb - ta) } else { 0.0 })
}

fn advice(kind: SegmentKind, node: bool, malloc: bool) -> String {
    match kind {
        SegmentKind::MallocArena if malloc => {
            "glibc's arena grows for whichever malloc crosses its top; the malloc view above names who holds the \
             blocks inside it"
                .to_string()
        }
        SegmentKind::MallocArena if node => {
            "glibc's arena grows for whichever malloc crosses its top: the stacks below extended it, they need not \
             hold it. To name who holds the blocks: --track malloc --malloc-probes node-buffers (Node Buffers; a \
             load test keeps about 0.6 of its throughput) or --track malloc (every malloc; about 0.1)"
                .to_string()
        }
        SegmentKind::MallocArena => {
            "glibc's arena grows for whichever malloc crosses its top: the stacks below extended it, they need not \
             hold it. To name who holds the blocks: --track malloc (probes every malloc and free; each call traps, \
             about 5 µs)"
                .to_string()
        }
        SegmentKind::V8Heap => {
            "V8 allocates JS objects inside its own pages: the stacks below are V8's page allocator and garbage \
             collector, not the code that keeps the objects. The JS heap view (V8's sampling heap profiler, on by \
             default for Node targets) names the JS functions that hold them"
                .to_string()
        }
    }
}

#[cfg(test)]
mod tests;
