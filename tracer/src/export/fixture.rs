//! A small report shared by the exporter tests.

use crate::report::{Frame, FrameKind, Leak, OomKill, REPORT_VERSION, Report, Target, TimelinePoint, Totals};

pub(crate) fn frame(function: &str, module: &str, file: &str, line: u32, kind: FrameKind) -> Frame {
    Frame { function: function.to_string(), module: module.to_string(), file: file.to_string(), line, kind }
}

fn leak(
    bytes: u64,
    count: u64,
    age: f64,
    growth: f64,
    score: f64,
    sources: &[&str],
    frames: Vec<Frame>,
) -> Leak {
    Leak {
        bytes,
        count,
        oldest_age_s: age,
        growth_bytes_per_s: growth,
        score,
        sources: sources.iter().map(ToString::to_string).collect(),
        frames,
        ..Leak::default()
    }
}

/// A Node service leaking from a JS function, plus a native, a kernel and a duplicate
/// stack; OOM-killed at the end. Leak bytes add up to `totals.outstanding_bytes`.
pub(crate) fn sample_report() -> Report {
    let leaks = sample_leaks();
    let outstanding = leaks.iter().map(|leak| leak.bytes).sum();
    Report {
        version: REPORT_VERSION,
        target: Target {
            pid: 4242,
            comm: "node".to_string(),
            cmdline: "node /srv/app.js".to_string(),
            exited: true,
            oom_killed: true,
        },
        duration_s: 30.0,
        tracked: ["mmap", "brk", "faults", "oom"].map(String::from).to_vec(),
        totals: Totals {
            outstanding_bytes: outstanding,
            allocated_bytes: 41_943_040,
            freed_bytes: 41_943_040 - outstanding,
            ..Totals::default()
        },
        leaks,
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
    }
}

/// 12 MiB from JS, 1 MiB from native code, a page from the kernel, and 8 KiB more from
/// the JS stack. Scores descend.
fn sample_leaks() -> Vec<Leak> {
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
    vec![
        leak(12_582_912, 300, 29.5, 409_600.0, 0.9, &["mmap", "faults"], js_stack.clone()),
        leak(1_048_576, 2, 12.3, 0.0, 0.4, &["brk"], native_stack),
        leak(4096, 1, 3.0, -10.5, 0.1, &["mmap"], kernel_stack),
        // Symbolizes to the same stack as the first leak.
        leak(8192, 2, 1.0, 0.0, 0.05, &["brk"], js_stack),
    ]
}
