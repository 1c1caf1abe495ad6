//! A small report shared by the exporter tests.

use crate::report::{
    Evidence, Frame, FrameKind, Leak, OomKill, REPORT_VERSION, Report, SegmentGrowth, SegmentKind,
    SegmentVerdict, Source, Target, TimelinePoint, Totals, Variant, Verdict, ViewTotal,
};

pub(crate) fn frame(function: &str, module: &str, file: &str, line: u32, kind: FrameKind) -> Frame {
    Frame { function: function.to_string(), module: module.to_string(), file: file.to_string(), line, kind }
}

/// A suspect seen in one view, with one stack.
fn leak(
    bytes: u64,
    count: u64,
    age: f64,
    growth: f64,
    score: f64,
    source: Source,
    frames: Vec<Frame>,
) -> Leak {
    let culprit = frames.first().cloned().unwrap_or_default();
    Leak {
        bytes,
        count,
        oldest_age_s: age,
        growth_bytes_per_s: growth,
        score,
        sources: vec![source],
        frames: frames.clone(),
        culprit,
        view: Some(source),
        evidence: vec![Evidence {
            source: Some(source),
            bytes,
            count,
            growth_bytes_per_s: growth,
            verdict: Verdict::Unknown,
        }],
        variants: vec![Variant { source: Some(source), bytes, count, frames }],
        ..Leak::default()
    }
}

/// A Node service leaking from a JS function (mapped and touched), a kernel stack that
/// holds a page without a verdict, and a malloc arena extended by a native and a JS
/// stack; OOM-killed at the end. Mapped and arena bytes add up to
/// `totals.outstanding_bytes`.
pub(crate) fn sample_report() -> Report {
    let (leaks, others, segments) = sample_leaks();
    let outstanding = 12_582_912 + 4096 + 1_048_576 + 8192;
    Report {
        version: REPORT_VERSION,
        target: Target {
            pid: 4242,
            comm: "node".to_string(),
            cmdline: "node /srv/app.js".to_string(),
            exited: true,
            oom_killed: true,
            exit: None,
            cgroup: None,
        },
        duration_s: 30.0,
        tracked: ["mmap", "brk", "faults", "oom"].map(String::from).to_vec(),
        totals: Totals {
            outstanding_bytes: outstanding,
            allocated_bytes: 41_943_040,
            freed_bytes: 41_943_040 - outstanding,
            resident_bytes: 12_582_912,
            views: vec![
                ViewTotal { source: Some(Source::Mmap), bytes: 12_582_912 + 4096, count: 301 },
                ViewTotal { source: Some(Source::Brk), bytes: 1_048_576 + 8192, count: 4 },
                ViewTotal { source: Some(Source::Faults), bytes: 12_582_912, count: 48 },
            ],
        },
        leaks,
        other_suspects: others,
        segments,
        memory: None,
        processes: Vec::new(),
        oom_kills: vec![OomKill {
            pid: 4242,
            comm: "node".to_string(),
            anon_rss_bytes: 503_316_480,
            file_rss_bytes: 12_582_912,
            shmem_rss_bytes: 0,
            total_vm_bytes: 1_288_490_188,
            oom_score_adj: 0,
            cgroup: "/memtrace-demo".to_string(),
            memcg_limit_bytes: 536_870_912,
            ..OomKill::default()
        }],
        timeline: [(0.0, 104_857_600, 0), (15.0, 314_572_800, 6_291_456), (30.0, 304_087_040, outstanding)]
            .map(|(t_s, rss_bytes, outstanding_bytes)| TimelinePoint {
                t_s,
                rss_bytes,
                outstanding_bytes,
                ..TimelinePoint::default()
            })
            .to_vec(),
        lost_events: 7,
        warnings: Vec::new(),
        time_to_limit: None,
    }
}

/// 12 MiB mapped (and touched) by JS, a page from the kernel, and an arena extended by
/// native code (1 MiB) and the JS stack (8 KiB).
fn sample_leaks() -> (Vec<Leak>, Vec<Leak>, Vec<SegmentGrowth>) {
    let js_stack = vec![
        frame("rememberOrder", "", "/srv/app.js", 9, FrameKind::Js),
        frame("handleRequest", "", "/srv/app.js", 22, FrameKind::Js),
        frame("uv_run", "/usr/bin/node", "", 0, FrameKind::Native),
        frame("main", "/usr/bin/node", "", 0, FrameKind::Native),
    ];
    let libc = "/lib/x86_64-linux-gnu/libc.so.6";
    let native_stack = vec![
        frame("malloc", libc, "", 0, FrameKind::Native),
        frame("v8::internal::Heap::AllocateRaw", "/usr/bin/node", "/src/heap.cc", 120, FrameKind::Native),
        frame("main", "/usr/bin/node", "", 0, FrameKind::Native),
    ];
    let kernel_stack = vec![
        frame("do_anonymous_page", "", "", 0, FrameKind::Kernel),
        frame("", "", "", 0, FrameKind::Unknown),
        frame("main", "/usr/bin/node", "", 0, FrameKind::Native),
    ];
    let mut top = leak(12_582_912, 300, 29.5, 409_600.0, 0.9, Source::Mmap, js_stack.clone());
    top.verdict = Verdict::Leak;
    top.reason = "grew 24.0 MiB/min in 19 of 20 intervals over 30s and was still growing at the end".into();
    top.sources.push(Source::Faults);
    top.evidence[0].verdict = Verdict::Leak;
    top.evidence.push(Evidence {
        source: Some(Source::Faults),
        bytes: 12_582_912,
        count: 48,
        growth_bytes_per_s: 409_600.0,
        verdict: Verdict::Unattributed,
    });
    top.variants.push(Variant {
        source: Some(Source::Faults),
        bytes: 12_582_912,
        count: 48,
        frames: js_stack.clone(),
    });
    let mut kernel = leak(4096, 1, 3.0, -10.5, 0.1, Source::Mmap, kernel_stack);
    kernel.verdict = Verdict::Churn;
    kernel.reason =
        "took 8.0 KiB in all but holds 4.0 KiB now (peak 8.0 KiB): memory is given back (churn)".into();
    let mut native = leak(1_048_576, 2, 12.3, 0.0, 0.0, Source::Brk, native_stack);
    native.verdict = Verdict::Unattributed;
    let mut js = leak(8192, 2, 1.0, 0.0, 0.0, Source::Brk, js_stack);
    js.verdict = Verdict::Unattributed;
    let arena = SegmentGrowth {
        kind: SegmentKind::MallocArena,
        bytes: 1_056_768,
        growth_bytes_per_s: 35_225.6,
        verdict: SegmentVerdict::Growing,
        reason: "+1.0 MiB in 30s (2.0 MiB/min)".into(),
        advice: "to name who holds the blocks: --track malloc".into(),
        extended_by: vec![native, js],
    };
    (vec![top], vec![kernel], vec![arena])
}
