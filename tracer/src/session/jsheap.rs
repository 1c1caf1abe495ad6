//! The session's side of the JS heap view: when to open it, its snapshots as evidence
//! of the `js-heap` view, and closing it on every way out.

use std::time::{Duration, Instant};

use crate::{
    cli::{JsHeapMode, TraceArgs},
    jsheap::{JsHeapError, JsHeapOptions, JsHeapView, V8HeapStats},
    model::{Source, StackAgg, StackTable},
    units::human_bytes,
};

/// How long `memtrace run` waits for node to install its SIGUSR1 handler.
const READY_WAIT: Duration = Duration::from_secs(10);

/// The view through a trace.
pub(super) enum JsHeap {
    /// Off, not a Node target, or it could not be opened (said so once).
    Off,
    /// `memtrace run`: node is starting; the view opens once it handles SIGUSR1.
    Waiting {
        since: Instant,
        options: JsHeapOptions,
    },
    Open(Box<Open>),
    /// Closed at the end of the trace; its last evidence stays for the report.
    Closed {
        aggs: Vec<StackAgg>,
        stats: V8HeapStats,
    },
}

pub(super) struct Open {
    view: JsHeapView,
    /// When sampling started (monotonic ns): no live sample is older.
    opened_ns: u64,
    /// The latest snapshot, as evidence; kept when the target dies or the view fails.
    pub(super) aggs: Vec<StackAgg>,
    pub(super) stats: V8HeapStats,
    failed: bool,
    /// A reading arrived since the last timeline snapshot took the aggregates.
    fresh: bool,
    /// Snapshots answered too late (read by the next one); shown in the status line so
    /// that a stale JS heap view is never silent.
    late: u32,
}

impl JsHeap {
    /// For `memtrace attach`, opens the view now (before "attached", so that nothing the
    /// target allocates after it goes unsampled); for `memtrace run`, once node is up.
    pub(super) async fn start(pid: u32, args: &TraceArgs, launched: bool) -> Self {
        if args.js_heap == JsHeapMode::Off {
            return Self::Off;
        }
        let options = JsHeapOptions { interval_bytes: args.js_heap_interval.max(1) };
        if launched {
            return Self::Waiting { since: Instant::now(), options };
        }
        Self::open(pid, options).await
    }

    async fn open(pid: u32, options: JsHeapOptions) -> Self {
        match JsHeapView::open(pid, options).await {
            Ok(view) => {
                eprintln!("memtrace: {}", describe(&view));
                Self::Open(Box::new(Open {
                    view,
                    opened_ns: super::monotonic_ns(),
                    aggs: Vec::new(),
                    stats: V8HeapStats::default(),
                    failed: false,
                    // Nothing sampled yet is a reading too: the first one's growth is
                    // drawn from here.
                    fresh: true,
                    late: 0,
                }))
            }
            Err(JsHeapError::NotNode { .. }) => Self::Off,
            Err(e) => {
                eprintln!("memtrace: js-heap: {e}");
                Self::Off
            }
        }
    }

    /// Each tick: opens a waiting view when node is ready, else nothing.
    pub(super) async fn poll_open(&mut self, pid: u32) {
        let Self::Waiting { since, options } = *self else { return };
        let ready = crate::jsheap::detect(pid).is_ok_and(|t| t.catches_sigusr1 || t.options.disable_sigusr1);
        if ready || since.elapsed() >= READY_WAIT {
            *self = Self::open(pid, options).await;
        }
    }

    pub(super) fn is_open(&self) -> bool {
        matches!(self, Self::Open(_))
    }

    /// Takes a snapshot and keeps it as the view's evidence. On failure the last one is
    /// kept (e.g. the target was OOM-killed) and the view stops asking.
    pub(super) async fn refresh(&mut self, stacks: &mut StackTable) {
        let Self::Open(open) = self else { return };
        if open.failed {
            return;
        }
        match open.view.snapshot().await {
            Ok(snapshot) => {
                open.aggs = snapshot
                    .stacks
                    .iter()
                    .map(|s| StackAgg {
                        stack: stacks.intern_frames(&s.frames),
                        bytes: s.bytes,
                        count: s.count,
                        oldest_ts_ns: open.opened_ns,
                        source: Source::JsHeap,
                        // The view is of the first target (`ProcIndex(0)`); V8's profile has
                        // no allocation times.
                        ..StackAgg::default()
                    })
                    .collect();
                open.stats = snapshot.stats;
                open.fresh = true;
            }
            // A busy event loop answers late: the next snapshot reads the answer.
            Err(JsHeapError::Timeout(what)) => {
                open.late += 1;
                log::debug!("js-heap: timed out waiting for {what}");
            }
            Err(e) => {
                open.failed = true;
                if crate::procfs::status(open.view.pid()).is_ok() {
                    eprintln!("memtrace: js-heap: {e}; the report keeps the last snapshot");
                }
            }
        }
    }

    /// Whether a reading arrived since the last call.
    pub(super) fn take_fresh(&mut self) -> bool {
        match self {
            Self::Open(open) => std::mem::take(&mut open.fresh),
            _ => false,
        }
    }

    pub(super) fn aggs(&self) -> &[StackAgg] {
        match self {
            Self::Open(open) => &open.aggs,
            Self::Closed { aggs, .. } => aggs,
            _ => &[],
        }
    }

    pub(super) fn stats(&self) -> V8HeapStats {
        match self {
            Self::Open(open) => open.stats,
            Self::Closed { stats, .. } => *stats,
            _ => V8HeapStats::default(),
        }
    }

    /// For the status line.
    pub(super) fn status(&self) -> String {
        match self {
            Self::Open(open) if open.stats.total == 0 && open.aggs.is_empty() => "  js-heap on".to_string(),
            Self::Open(open) if open.late > 0 => {
                format!("  js-heap {} ({} late snapshots)", human_bytes(open.stats.used), open.late)
            }
            Self::Open(open) => format!("  js-heap {}", human_bytes(open.stats.used)),
            _ => String::new(),
        }
    }

    /// Each tick and at the end: an inspector memtrace opened stays closed (see
    /// `JsHeapView::keep_closed`), loudly.
    pub(super) async fn keep_closed(&mut self) {
        let Self::Open(open) = self else { return };
        let pid = open.view.pid();
        match open.view.keep_closed().await {
            Ok(Some(addr)) => eprintln!(
                "memtrace: js-heap: the inspector of pid {pid} listened again on {addr} after memtrace closed its window (node starts it by several paths on one SIGUSR1, and any later SIGUSR1 starts it too); memtrace closed it again: it keeps closed the inspector it opened while its agent is in the target (to debug the target while tracing it, trace with --js-heap off)"
            ),
            Ok(None) => {}
            Err(e @ JsHeapError::LeftOpen { .. }) => eprintln!("memtrace: js-heap: {e}"),
            // The target exited meanwhile.
            Err(e) => log::debug!("js-heap: inspector check of pid {pid}: {e}"),
        }
    }

    /// Stops the agent (dropping the view would too: its socket closes).
    pub(super) async fn close(&mut self) {
        self.keep_closed().await;
        if let Self::Open(open) = std::mem::replace(self, Self::Off) {
            let Open { view, aggs, stats, .. } = *open;
            view.close().await;
            // The evidence stays for the report.
            *self = Self::Closed { aggs, stats };
        }
    }
}

fn describe(view: &JsHeapView) -> String {
    let info = view.info();
    let how = if info.opened_by_memtrace {
        format!(
            "sent SIGUSR1 (an application SIGUSR1 listener sees it too); the inspector listened {} ms on {} and is closed",
            info.window.map_or(0, |w| w.as_millis()),
            info.inspector
        )
    } else {
        format!("through the inspector the target had open on {} (left open)", info.inspector)
    };
    format!(
        "js-heap: V8 sampling heap profiler on (node {}, one sample per {}{}); {how}{}",
        info.node_version,
        human_bytes(info.interval_bytes),
        if info.shared { ", shared with another memtrace" } else { "" },
        if info.in_other_netns { "; connected inside the target's network namespace" } else { "" },
    )
}
