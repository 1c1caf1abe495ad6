use super::*;
use crate::{
    analysis::{CulpritRules, History},
    model::{ProcIndex, StackAgg, StackId},
    report::{Process, Target, TimelinePoint},
};

const MIB: u64 = 1 << 20;

fn agg(stack: u32, source: Source, bytes: u64) -> StackAgg {
    StackAgg {
        stack: StackId(stack),
        bytes,
        count: bytes / 4096 + 1,
        oldest_ts_ns: 0,
        source,
        ..StackAgg::default()
    }
}

fn in_proc(proc: u32, mut agg: StackAgg) -> StackAgg {
    agg.proc = ProcIndex(proc);
    agg
}

fn native(function: &str, module: &str) -> Frame {
    Frame { function: function.into(), module: module.into(), kind: FrameKind::Native, ..Frame::default() }
}

fn js(function: &str, file: &str, line: u32) -> Frame {
    Frame { function: function.into(), file: file.into(), line, kind: FrameKind::Js, ..Frame::default() }
}

/// Stacks of a Node service: 1 and 2 reach `rememberOrder` through two Express routing
/// paths; 3 is a transient handler; 4 is V8's scavenger; 5 a native keeper.
fn frames(id: StackId) -> Vec<Frame> {
    let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    let mut f = vec![native("__memset_avx2_unaligned_erms", libc), js("alloc", "node:buffer", 391)];
    match id.0 {
        1 => f.extend([
            js("rememberOrder", "/srv/server.js", 30),
            js("process_params", "/srv/node_modules/express/lib/router/index.js", 1),
        ]),
        2 => f.extend([
            js("rememberOrder", "/srv/server.js", 30),
            js("trim_prefix", "/srv/node_modules/express/lib/router/index.js", 2),
        ]),
        3 => f.extend([js("transient", "/srv/server.js", 50)]),
        4 => {
            return vec![
                native("__mmap", libc),
                native("v8::internal::MemoryAllocator::AllocatePage(int)", "/usr/bin/node"),
                native("v8::internal::Scavenger::Process()", "/usr/bin/node"),
            ];
        }
        5 => {
            return vec![
                native("__mmap", libc),
                native("keep_block", "/tmp/fixture"),
                native("main", "/tmp/fixture"),
            ];
        }
        6 | 7 => {
            let caller = if id.0 == 6 { "leak_steadily" } else { "churn" };
            return vec![
                native("__mmap", libc),
                native("map_touched", "/tmp/fixture"),
                native(caller, "/tmp/fixture"),
            ];
        }
        _ => return Vec::new(),
    }
    f
}

struct Run {
    history: History,
    timeline: Vec<TimelinePoint>,
}

/// Records `n` snapshots one second apart, `at(t)` giving the aggregates at `t`.
fn run(n: u32, at: impl Fn(u64) -> Vec<StackAgg>) -> (Run, Vec<StackAgg>) {
    let mut history = History::new(64, 64);
    let mut timeline = Vec::new();
    for t in 0..n {
        let aggs = at(u64::from(t));
        history.record(f64::from(t), &aggs);
        let heap_bytes = aggs.iter().filter(|a| a.source == Source::Malloc).map(|a| a.bytes).sum();
        timeline.push(TimelinePoint { t_s: f64::from(t), heap_bytes, ..TimelinePoint::default() });
    }
    (Run { history, timeline }, at(u64::from(n - 1)))
}

fn report(r: &Run, stacks: Vec<StackAgg>, tracked: &[&str]) -> Report {
    report_of(r, stacks, tracked, Vec::new())
}

fn report_of(r: &Run, stacks: Vec<StackAgg>, tracked: &[&str], processes: Vec<Process>) -> Report {
    let rules = CulpritRules::default();
    build_report(&ReportInputs {
        target: Target::default(),
        duration_s: 20.0,
        tracked: tracked.iter().map(ToString::to_string).collect(),
        totals: Totals::default(),
        stacks,
        end_ns: 20_000_000_000,
        frames: &frames,
        ooms: &[],
        timeline: r.timeline.clone(),
        history: &r.history,
        lost_events: 0,
        rules: &rules,
        memory: None,
        node: true,
        processes,
    })
}

#[test]
fn routing_variants_are_one_culprit_whose_verdict_follows_the_sum() {
    // The leak's growth moves from one routing path to the other half-way.
    let (r, last) = run(20, |t| {
        let (a, b) = if t < 10 { (t * MIB, 0) } else { (10 * MIB, (t - 10) * MIB) };
        vec![agg(1, Source::Mmap, a), agg(2, Source::Mmap, b), agg(1, Source::Faults, a)]
    });
    let rep = report(&r, last, &["mmap", "faults"]);
    assert_eq!(rep.leaks.len(), 1, "one culprit: {:#?}", rep.leaks);
    let top = &rep.leaks[0];
    assert_eq!(top.culprit.function, "rememberOrder");
    assert_eq!(top.verdict, Verdict::Leak, "{}", top.reason);
    assert_eq!(top.view, Some(Source::Mmap));
    assert_eq!(top.bytes, 19 * MIB, "mapped bytes only, never mapped + touched");
    assert!((top.growth_bytes_per_s - MIB as f64).abs() < 0.05 * MIB as f64, "{}", top.growth_bytes_per_s);
    assert_eq!(top.variants.iter().filter(|v| v.source == Some(Source::Mmap)).count(), 2);
    let touched = top.evidence.iter().find(|e| e.source == Some(Source::Faults)).expect("touched evidence");
    assert_eq!((touched.bytes, touched.verdict), (10 * MIB, Verdict::Unattributed));
    assert!(rep.other_suspects.is_empty());
    let mapped = rep.totals.views.iter().find(|v| v.source == Some(Source::Mmap)).expect("mapped total");
    assert_eq!(mapped.bytes, 19 * MIB);
}

#[test]
fn arena_growth_is_a_segment_never_a_leak() {
    // A transient handler's malloc crosses the top of the arena every second.
    let (r, last) = run(20, |t| vec![agg(3, Source::Brk, t * 4 * MIB), agg(3, Source::Faults, t * 2 * MIB)]);
    let rep = report(&r, last, &["mmap", "brk", "faults"]);
    assert!(rep.leaks.is_empty(), "nothing named a leak: {:#?}", rep.leaks);
    let seg = &rep.segments[0];
    assert_eq!((seg.kind, seg.verdict), (SegmentKind::MallocArena, SegmentVerdict::Growing));
    assert_eq!(seg.bytes, 76 * MIB, "brk bytes, the touched pages not added");
    assert_eq!(seg.extended_by[0].culprit.function, "transient");
    assert_eq!(seg.extended_by[0].verdict, Verdict::Unattributed);
    assert!(seg.advice.contains("node-buffers"), "{}", seg.advice);
}

#[test]
fn v8_page_allocation_is_the_v8_heap_segment() {
    let (r, last) = run(10, |t| vec![agg(4, Source::Mmap, t * MIB), agg(4, Source::Faults, t * MIB)]);
    let rep = report(&r, last, &["mmap", "faults"]);
    assert!(rep.leaks.is_empty() && rep.other_suspects.is_empty());
    assert_eq!(rep.segments.len(), 1);
    assert_eq!(rep.segments[0].kind, SegmentKind::V8Heap);
    assert!(rep.segments[0].advice.contains("JS heap view"));
}

#[test]
fn touched_only_and_churn_are_not_flagged() {
    let (r, last) = run(10, |t| vec![agg(5, Source::Faults, t * MIB), agg(1, Source::Mmap, (t % 2) * MIB)]);
    let rep = report(&r, last, &["mmap", "faults"]);
    assert!(rep.leaks.is_empty(), "{:#?}", rep.leaks);
    let verdicts: Vec<_> =
        rep.other_suspects.iter().map(|l| (l.culprit.function.as_str(), l.verdict)).collect();
    assert!(verdicts.contains(&("keep_block", Verdict::Unattributed)), "{verdicts:?}");
    assert!(verdicts.contains(&("rememberOrder", Verdict::Churn)), "{verdicts:?}");
}

#[test]
fn fragmentation_when_the_arena_grows_and_live_blocks_do_not() {
    let (r, last) =
        run(20, |t| vec![agg(5, Source::Brk, t * 2 * MIB), agg(5, Source::Malloc, 8 * MIB + (t % 2) * 4096)]);
    let rep = report(&r, last, &["mmap", "brk", "malloc"]);
    let seg = rep.segments.iter().find(|s| s.kind == SegmentKind::MallocArena).expect("arena segment");
    assert_eq!(seg.verdict, SegmentVerdict::Fragmentation, "{}", seg.reason);
    assert!(seg.advice.contains("MALLOC_ARENA_MAX"));
    assert!(rep.leaks.iter().all(|l| l.verdict != Verdict::Leak), "{:#?}", rep.leaks);
}

#[test]
fn without_history_biggest_first_and_flagged() {
    let r = Run { history: History::new(16, 16), timeline: Vec::new() };
    let stacks = vec![agg(5, Source::Mmap, 100), agg(1, Source::Mmap, 300)];
    let rep = report(&r, stacks, &["mmap"]);
    let names: Vec<_> = rep.leaks.iter().map(|l| l.culprit.function.as_str()).collect();
    assert_eq!(names, vec!["rememberOrder", "keep_block"]);
    assert_eq!(rep.leaks[0].verdict, Verdict::Unknown);
    assert_eq!(rep.totals.outstanding_bytes, 400);
}

#[test]
fn zero_byte_blocks_are_kept() {
    let r = Run { history: History::new(16, 16), timeline: Vec::new() };
    let stacks = vec![StackAgg {
        stack: StackId(5),
        bytes: 0,
        count: 7,
        oldest_ts_ns: 0,
        source: Source::Malloc,
        ..StackAgg::default()
    }];
    let rep = report(&r, stacks, &["malloc"]);
    let all: Vec<_> = rep.leaks.iter().chain(&rep.other_suspects).collect();
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].bytes, all[0].count), (0, 7));
}

#[test]
fn a_helper_shared_by_a_leak_and_churn_is_two_suspects() {
    let (r, last) = run(20, |t| vec![agg(6, Source::Mmap, t * MIB), agg(7, Source::Mmap, (t % 3) * 4 * MIB)]);
    let rep = report(&r, last, &["mmap"]);
    assert_eq!(rep.leaks.len(), 1, "{:#?} {:#?}", rep.leaks, rep.other_suspects);
    let leak = &rep.leaks[0];
    assert_eq!(leak.culprit.function, "map_touched");
    assert_eq!(leak.caller.as_ref().map(|c| c.function.as_str()), Some("leak_steadily"));
    assert!(
        (leak.growth_bytes_per_s - MIB as f64).abs() < 0.05 * MIB as f64,
        "the churn's bytes are not added"
    );
    assert_eq!(rep.other_suspects[0].caller.as_ref().map(|c| c.function.as_str()), Some("churn"));
    assert_eq!(rep.other_suspects[0].verdict, Verdict::Churn);
}

#[test]
fn a_culprit_in_several_workers_is_one_suspect_split_by_process() {
    let process = |pid, exited_s| Process { pid, exited_s, ..Process::default() };
    let processes = vec![process(100, None), process(101, None), process(102, Some(5.0))];
    // Workers 101 and 102 run the same code (one stack id, their parent's image): 101
    // keeps growing, 102 grew and exited; the parent holds nothing there.
    let (r, last) = run(10, |t| {
        vec![
            in_proc(1, agg(1, Source::Mmap, t * 2 * MIB)),
            in_proc(2, agg(1, Source::Mmap, t.min(5) * MIB)),
            in_proc(0, agg(5, Source::Mmap, 4096)),
        ]
    });
    let rep = report_of(&r, last, &["mmap"], processes.clone());
    let keeper = rep.all_suspects().find(|l| l.culprit.function == "rememberOrder").expect("suspect");
    assert_eq!(keeper.bytes, 23 * MIB, "the sum over the processes");
    assert_eq!(keeper.pid, 101, "the process holding the most");
    let split: Vec<_> = keeper.processes.iter().map(|p| (p.pid, p.bytes, p.exited)).collect();
    assert_eq!(split, vec![(101, 18 * MIB, false), (102, 5 * MIB, true)]);
    assert_eq!(keeper.verdict, Verdict::Leak, "{}", keeper.reason);
    let parent = rep.all_suspects().find(|l| l.culprit.function == "keep_block").expect("parent's");
    assert_eq!((parent.pid, parent.processes.len()), (100, 1));
    assert_eq!(rep.processes, processes);
}

#[test]
fn young_memory_of_a_growing_stack_is_in_flight() {
    // Garbage awaiting collection: it grows between collections, and all of it is young.
    let end_ns = 20_000_000_000;
    let (r, _) = run(20, |t| vec![agg(3, Source::Malloc, t * MIB), agg(5, Source::Malloc, t * MIB)]);
    let young = StackAgg { mean_ts_ns: end_ns - 1_000_000_000, ..agg(3, Source::Malloc, 19 * MIB) };
    let spread = StackAgg { mean_ts_ns: end_ns - 10_000_000_000, ..agg(5, Source::Malloc, 19 * MIB) };
    let rep = report(&r, vec![young, spread], &["malloc"]);
    let names: Vec<_> = rep.leaks.iter().map(|l| l.culprit.function.as_str()).collect();
    assert_eq!(names, vec!["keep_block"], "only the stack whose blocks span the trace");
    let other = &rep.other_suspects[0];
    assert_eq!((other.culprit.function.as_str(), other.verdict), ("transient", Verdict::InFlight));
    assert!(other.reason.contains("1.0s old"), "{}", other.reason);
}
