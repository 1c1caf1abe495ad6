use super::*;

const MIB: usize = 1 << 20;

fn js(function: &str) -> Frame {
    Frame {
        function: function.into(),
        file: "/srv/app.js".into(),
        line: 9,
        kind: FrameKind::Js,
        ..Frame::default()
    }
}

#[test]
fn interns_and_bounds() {
    let mut t = StackTable::new(MIB);
    let a = t.intern(&[1, 2, 3]);
    assert_eq!(t.intern(&[1, 2, 3]), a);
    let b = t.intern(&[4]);
    assert_ne!(a, b);
    assert_eq!(t.get(a), &[1, 2, 3]);
    assert_eq!(t.intern(&[]), StackId(0));
    let mut small = StackTable::new(t.heap_bytes() + 8);
    assert_ne!(small.intern(&[1]), StackId(0));
    assert_eq!(small.intern(&[2, 3, 4, 5, 6, 7, 8, 9]), StackId(0), "full table gives the unknown stack");
    assert_eq!(small.overflowed(), 1);
}

#[test]
fn the_same_addresses_in_two_spaces_are_two_stacks() {
    let mut t = StackTable::new(MIB);
    let a = t.intern_in(1, &[0x40_1000, 0x40_2000]);
    let b = t.intern_in(2, &[0x40_1000, 0x40_2000]);
    assert_ne!(a, b, "an exec'd image reuses addresses for other code");
    assert_eq!(t.intern_in(1, &[0x40_1000, 0x40_2000]), a);
    assert_eq!((t.space(a), t.space(b)), (1, 2));
    assert_eq!(t.get(b), &[0x40_1000, 0x40_2000]);
}

#[test]
fn symbolic_stacks_share_ids_and_limit() {
    let mut t = StackTable::new(MIB);
    let f = vec![js("keepJob")];
    let a = t.intern_frames(&f);
    assert_eq!(t.intern_frames(&f), a);
    assert_eq!(t.frames(a), f);
    assert!(t.is_named(a));
    assert!(t.get(a).is_empty(), "no addresses to symbolize");
    assert!(t.take_unsymbolized().is_empty(), "nothing to symbolize");
    let addrs = t.intern(&[1]);
    assert_ne!(addrs, a);
    assert_eq!(t.take_unsymbolized(), vec![addrs]);
}

#[test]
fn symbolized_frames_are_kept_by_id() {
    let mut t = StackTable::new(MIB);
    let a = t.intern(&[1, 2]);
    let b = t.intern(&[3, 2]);
    assert!(t.frames(a).is_empty(), "not symbolized yet");
    let main = Frame {
        function: "main".into(),
        module: "/usr/bin/node".into(),
        kind: FrameKind::Native,
        ..Frame::default()
    };
    t.set_frames(a, &[js("rememberOrder"), main.clone()]);
    t.set_frames(b, &[js("other"), main.clone()]);
    assert_eq!(t.frames(a), vec![js("rememberOrder"), main.clone()]);
    assert_eq!(t.frame_count(), 3, "main is stored once for both stacks");
    let unknown = Frame { function: "0x7f00".into(), ..Frame::default() };
    t.set_frames(b, &[unknown, main]);
    assert_eq!(t.with_unknown_frames(), vec![b]);
}

/// 200 symbolized stacks, 20 per tick.
fn fill(limit: usize) -> (StackTable, Vec<StackId>) {
    let mut t = StackTable::new(limit);
    let mut ids = Vec::new();
    for i in 0..200u64 {
        let id = t.intern(&[0x1000 + i, 0x2000, 0x3000]);
        t.set_frames(id, &[js(&format!("f{i}")), js("main")]);
        ids.push(id);
        if i % 20 == 19 {
            t.tick();
        }
    }
    (t, ids)
}

#[test]
fn eviction_keeps_held_and_recent_stacks() {
    // A limit the 200 stacks fill to 95%.
    let (mut t, ids) = fill(fill(usize::MAX).0.heap_bytes() * 100 / 95);
    assert_eq!(t.overflowed(), 0, "{} of {} bytes", t.heap_bytes(), t.limit_bytes());
    assert!(t.wants_eviction(), "{} of {} bytes", t.heap_bytes(), t.limit_bytes());
    // Every tenth stack holds memory, and the oldest of all does.
    let held: HashSet<StackId> = ids.iter().copied().step_by(10).collect();
    let before: Vec<(StackId, Vec<u64>, Vec<Frame>)> =
        held.iter().map(|&id| (id, t.get(id).to_vec(), t.frames(id))).collect();
    let evicted = t.evict(&held, 2);
    assert!(evicted > 0);
    assert_eq!(t.evicted(), evicted as u64);
    assert!(t.heap_bytes() <= t.limit_bytes() * 7 / 10 + 1024, "down to the low mark: {}", t.heap_bytes());
    for (id, pcs, frames) in before {
        assert_eq!(t.get(id), &pcs[..], "a held stack keeps its addresses");
        assert_eq!(t.frames(id), frames, "and its frames, after the frame table is rebuilt");
    }
    for &id in &ids[180..] {
        assert!(!t.get(id).is_empty(), "stacks seen in the last two ticks stay");
    }
    let gone = ids.iter().copied().find(|id| t.get(*id).is_empty()).expect("something went");
    let again = t.intern(&[0x1000 + u64::from(gone.0) - 1, 0x2000, 0x3000]);
    assert!(again.0 > ids[199].0, "an evicted stack seen again gets a new id, never an old one");
    // A held stack is recognised after the rebuild.
    assert_eq!(t.intern(&[0x1000, 0x2000, 0x3000]), ids[0]);
}

#[test]
fn named_stacks_are_found_after_the_frame_table_is_rebuilt() {
    let mut t = StackTable::new(32 * 1024);
    let kept = t.intern_frames(&[js("keepJob"), js("main")]);
    for i in 0..300u64 {
        let id = t.intern(&[i + 1]);
        t.set_frames(id, &[js(&format!("transient{i}"))]);
    }
    t.tick();
    t.tick();
    let held = HashSet::from([kept]);
    assert!(t.evict(&held, 1) > 0);
    assert!(t.frame_count() < 100, "the frames of evicted stacks went: {}", t.frame_count());
    assert_eq!(t.intern_frames(&[js("keepJob"), js("main")]), kept);
}

#[test]
fn nothing_evictable_leaves_the_table_as_it_is() {
    let mut t = StackTable::new(4096);
    let ids: Vec<StackId> = (0..30u64).map(|i| t.intern(&[i + 1, 7, 8])).collect();
    t.tick();
    let held: HashSet<StackId> = ids.iter().copied().collect();
    assert_eq!(t.evict(&held, 0), 0, "every stack holds memory");
    assert_eq!(t.evict(&HashSet::new(), 5), 0, "every stack was seen recently");
    assert!(ids.iter().all(|&id| !t.get(id).is_empty() || id == StackId(0)));
}

/// A Node service's model: one stack keeps 1 MiB a second, transient stacks (a new one
/// each second, as JIT code moves) map and unmap; the report is the same whether the
/// stacks that hold nothing were evicted or not.
#[test]
fn the_report_is_the_same_after_eviction() {
    use crate::{
        analysis::{CulpritRules, History, ReportInputs, build_report},
        model::{LiveModel, MemOp},
        report::{Target, Totals},
    };
    const MIB: u64 = 1 << 20;
    let mut t = StackTable::new(usize::MAX);
    let mut model = LiveModel::new();
    let mut history = History::new(64, 64);
    let native = |f: &str| Frame {
        function: f.into(),
        module: "/usr/bin/node".into(),
        kind: FrameKind::Native,
        ..Frame::default()
    };
    let keeper = t.intern(&[0x10, 0x20, 0x30]);
    t.set_frames(keeper, &[native("mmap"), js("rememberOrder"), native("main")]);
    for s in 0..20u64 {
        let ts = s * 1_000_000_000;
        // It stops allocating before the end: only what it holds protects it.
        if s < 15 {
            assert_eq!(t.intern(&[0x10, 0x20, 0x30]), keeper);
            model.apply(MemOp::Map { addr: 0x1000_0000 + s * MIB, len: MIB, reserved: false }, keeper, ts);
            model.apply(MemOp::Fault { addr: 0x1000_0000 + s * MIB, bytes: 4096 }, keeper, ts);
        }
        let transient = t.intern(&[0x10, 0x100 + s, 0x30]);
        t.set_frames(transient, &[native("mmap"), js(&format!("handler{s}")), native("main")]);
        model.apply(MemOp::Map { addr: 0x9000_0000, len: 4 * MIB, reserved: false }, transient, ts + 1);
        model.apply(MemOp::Unmap { addr: 0x9000_0000, len: 4 * MIB }, transient, ts + 2);
        history.record(s as f64, &model.by_stack());
        t.tick();
    }
    let rules = CulpritRules::default();
    let report = |t: &StackTable| {
        let frames = |id: StackId| t.frames(id);
        let totals = model.totals();
        let report = build_report(&ReportInputs {
            target: Target::default(),
            duration_s: 20.0,
            tracked: vec!["mmap".into(), "faults".into()],
            totals: Totals {
                allocated_bytes: totals.allocated_bytes,
                freed_bytes: totals.freed_bytes,
                ..Totals::default()
            },
            stacks: model.by_stack(),
            end_ns: 20_000_000_000,
            frames: &frames,
            ooms: &[],
            timeline: Vec::new(),
            history: &history,
            lost_events: 0,
            rules: &rules,
            memory: None,
            node: true,
            processes: Vec::new(),
        });
        serde_json::to_value(&report).expect("a report serializes")
    };
    let before = report(&t);
    let mut held = HashSet::new();
    model.held_stacks(&mut held);
    assert_eq!(held, HashSet::from([keeper]));
    // The recent ones stay: the last second's transient stack.
    let mut bounded = StackTable { limit_bytes: 0, ..t };
    let evicted = bounded.evict(&held, 1);
    assert_eq!((evicted, bounded.len()), (19, 2), "every idle transient stack went, the keeper stayed");
    assert_eq!(report(&bounded), before, "the same report, totals included");
    assert_eq!(
        before["totals"]["freed_bytes"],
        20 * 4 * MIB,
        "freed memory is counted in the model, not by stack"
    );
    assert!(before["leaks"][0]["culprit"]["function"] == "rememberOrder", "{:#}", before["leaks"]);
}
