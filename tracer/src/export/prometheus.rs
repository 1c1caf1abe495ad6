//! Prometheus text exposition of a running trace (`--metrics ADDR`).
//!
//! Written here rather than with `prometheus-client`: that crate emits only `OpenMetrics`
//! (counters typed under a name without `_total`, `# UNIT`, `# EOF`), and `promtool check
//! metrics` (2.42, the Debian package) rejects its counters ("no help text", exit 3). The
//! text format 0.0.4 is what both Prometheus and promtool read.

use std::fmt::Write as _;

/// One suspect as exposed: who holds memory and how much.
#[derive(Clone, Debug, PartialEq)]
pub struct SuspectSample {
    /// The frame a person looks at first (innermost JS frame, else outside libc).
    pub culprit: String,
    /// `mmap`, `brk` or `faults`.
    pub source: String,
    pub bytes: u64,
}

/// What a scrape shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsSnapshot {
    pub pid: u32,
    pub comm: String,
    pub rss_bytes: u64,
    pub mapped_bytes: u64,
    pub touched_bytes: u64,
    /// Outstanding heap bytes, with `--track malloc`.
    pub heap_bytes: Option<u64>,
    pub events_total: u64,
    pub lost_events_total: u64,
    pub stacks: u64,
    pub oom_kills_total: u64,
    pub memcg_usage_bytes: u64,
    pub memcg_limit_bytes: u64,
    /// Largest holders first, one per (culprit, source).
    pub suspects: Vec<SuspectSample>,
    /// Where the resident memory is, at the latest snapshot.
    pub memory: Option<crate::report::MemoryParts>,
    /// The recent growth against the cgroup limit, at the latest snapshot.
    pub time_to_limit: Option<crate::report::TimeToLimit>,
    /// Per profile destination (`pyroscope`, `otlp`): pushes that succeeded and failed.
    pub pushes: Vec<(&'static str, u64, u64)>,
}

/// Culprits exposed per scrape (one series each per view).
pub const TOP_SUSPECTS: usize = 10;

/// Escapes a label value: backslash, double quote and newline.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, labels: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}");
}

/// A series with only the target's labels: name, type, help and value (`None` when its
/// view or feature is off).
type Series = (&'static str, &'static str, &'static str, Option<u64>);

fn plain_series(s: &MetricsSnapshot) -> [Series; 10] {
    let memcg = |v| (s.memcg_limit_bytes > 0).then_some(v);
    [
        ("memtrace_target_rss_bytes", "gauge", "Resident set size of the traced process.", Some(s.rss_bytes)),
        (
            "memtrace_mapped_outstanding_bytes",
            "gauge",
            "Anonymous memory mapped while tracing and not unmapped.",
            Some(s.mapped_bytes),
        ),
        (
            "memtrace_touched_resident_bytes",
            "gauge",
            "Pages first touched while tracing and still held (estimated from sampled page faults).",
            Some(s.touched_bytes),
        ),
        (
            "memtrace_heap_outstanding_bytes",
            "gauge",
            "Bytes allocated by the malloc family while tracing and not freed (--track malloc).",
            s.heap_bytes,
        ),
        ("memtrace_events_total", "counter", "Events read from the kernel.", Some(s.events_total)),
        (
            "memtrace_lost_events_total",
            "counter",
            "Events the kernel could not deliver (ring buffer or table full).",
            Some(s.lost_events_total),
        ),
        ("memtrace_stacks", "gauge", "Distinct allocation stacks seen.", Some(s.stacks)),
        ("memtrace_oom_kills_total", "counter", "OOM kills recorded while tracing.", Some(s.oom_kills_total)),
        (
            "memtrace_memcg_usage_bytes",
            "gauge",
            "Memory charged to the target's cgroup.",
            memcg(s.memcg_usage_bytes),
        ),
        (
            "memtrace_memcg_limit_bytes",
            "gauge",
            "Memory limit of the target's cgroup.",
            memcg(s.memcg_limit_bytes),
        ),
    ]
}

/// Renders the snapshot in the Prometheus text format (version 0.0.4).
#[must_use]
pub fn render(s: &MetricsSnapshot) -> String {
    let target = format!("pid=\"{}\",comm=\"{}\"", s.pid, label(&s.comm));
    let mut out = String::new();
    for (name, kind, help, value) in plain_series(s) {
        if let Some(value) = value {
            metric(&mut out, name, kind, help, &target, value);
        }
    }
    if let Some(parts) = &s.memory {
        let name = "memtrace_memory_part_bytes";
        let _ = writeln!(
            out,
            "# HELP {name} Resident memory of the traced process by part (from /proc/PID/smaps).\n# TYPE {name} gauge"
        );
        for (part, bytes) in parts.parts() {
            let part = part.replace([' ', '-'], "_").to_lowercase();
            let _ = writeln!(out, "{name}{{{target},part=\"{part}\"}} {bytes}");
        }
    }
    if let Some(ttl) = &s.time_to_limit {
        write_time_to_limit(&mut out, &target, ttl);
    }
    if !s.pushes.is_empty() {
        let counters = [
            (
                "memtrace_profile_pushes_total",
                "Profiles the destination accepted (--pyroscope, --otlp-profiles).",
            ),
            (
                "memtrace_profile_push_failures_total",
                "Profile pushes that failed (--pyroscope, --otlp-profiles).",
            ),
        ];
        for (i, (name, help)) in counters.into_iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for &(destination, pushed, failed) in &s.pushes {
                let value = if i == 0 { pushed } else { failed };
                let _ = writeln!(out, "{name}{{{target},destination=\"{destination}\"}} {value}");
            }
        }
    }
    // The top culprits only, and no rank label: a culprit keeps its series when another
    // overtakes it, and the number of series stays bounded.
    let name = "memtrace_suspect_bytes";
    let _ = writeln!(
        out,
        "# HELP {name} Memory held by the largest suspects (top {TOP_SUSPECTS}), by culprit frame and view.\n# TYPE {name} gauge"
    );
    for suspect in s.suspects.iter().take(TOP_SUSPECTS) {
        let _ = writeln!(
            out,
            "{name}{{{target},culprit=\"{}\",source=\"{}\"}} {}",
            label(&suspect.culprit),
            label(&suspect.source),
            suspect.bytes
        );
    }
    out
}

/// The fitted growth (when there is a fit) and, when growing toward a limit, the seconds
/// left: alert rules compare these, not a rate of their own.
fn write_time_to_limit(out: &mut String, target: &str, ttl: &crate::report::TimeToLimit) {
    use crate::report::LimitState;
    if ttl.window_s > 0.0 {
        let name = "memtrace_memory_growth_bytes_per_second";
        let _ = writeln!(
            out,
            "# HELP {name} Growth of the memory held against the cgroup limit (the cgroup's usage, else RSS), least squares over the recent window.\n# TYPE {name} gauge\n{name}{{{target},basis=\"{}\"}} {:.0}",
            label(&ttl.basis),
            ttl.growth_bytes_per_s
        );
    }
    if let (LimitState::Growing | LimitState::Reached, Some(seconds)) = (ttl.state, ttl.seconds) {
        let name = "memtrace_time_to_limit_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Seconds until the cgroup limit is reached at the recent rate (absent when there is no limit or memory is not growing).\n# TYPE {name} gauge\n{name}{{{target}}} {seconds:.0}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let text = render(&MetricsSnapshot {
            pid: 7,
            comm: "no\"de".into(),
            rss_bytes: 100,
            mapped_bytes: 40,
            suspects: vec![SuspectSample {
                culprit: "rememberOrder server.js:30".into(),
                source: "mmap".into(),
                bytes: 40,
            }],
            memory: Some(crate::report::MemoryParts { v8_heap_bytes: 12, ..Default::default() }),
            ..MetricsSnapshot::default()
        });
        assert!(
            text.contains("memtrace_memory_part_bytes{pid=\"7\",comm=\"no\\\"de\",part=\"v8_heap\"} 12\n"),
            "{text}"
        );
        assert!(text.contains("part=\"malloc_arenas\"} 0\n"), "{text}");
        assert!(text.contains("# TYPE memtrace_target_rss_bytes gauge\nmemtrace_target_rss_bytes{pid=\"7\",comm=\"no\\\"de\"} 100\n"), "{text}");
        assert!(text.contains(
            "memtrace_suspect_bytes{pid=\"7\",comm=\"no\\\"de\",culprit=\"rememberOrder server.js:30\",source=\"mmap\"} 40\n"
        ));
        assert!(!text.contains("memtrace_memcg_limit_bytes"), "no cgroup limit, no cgroup gauges");
        assert!(!text.contains("memtrace_time_to_limit_seconds"), "no fit, no time to the limit");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<u64>().is_ok(), "sample line without a number: {line}");
        }
    }

    #[test]
    fn time_to_limit_is_a_gauge_only_when_growing() {
        use crate::report::{LimitState, TimeToLimit};
        let growing = TimeToLimit {
            state: LimitState::Growing,
            basis: "memcg".into(),
            limit_bytes: 512 << 20,
            usage_bytes: 230 << 20,
            growth_bytes_per_s: 28_300.4,
            seconds: Some(11_400.2),
            window_s: 300.0,
        };
        let text = render(&MetricsSnapshot {
            pid: 7,
            comm: "node".into(),
            time_to_limit: Some(growing.clone()),
            ..MetricsSnapshot::default()
        });
        assert!(text.contains("\nmemtrace_time_to_limit_seconds{pid=\"7\",comm=\"node\"} 11400\n"), "{text}");
        assert!(
            text.contains(
                "\nmemtrace_memory_growth_bytes_per_second{pid=\"7\",comm=\"node\",basis=\"memcg\"} 28300\n"
            ),
            "{text}"
        );
        let flat =
            TimeToLimit { state: LimitState::NotGrowing, seconds: None, growth_bytes_per_s: 3.0, ..growing };
        let text = render(&MetricsSnapshot { time_to_limit: Some(flat), ..MetricsSnapshot::default() });
        assert!(
            !text.contains("memtrace_time_to_limit_seconds")
                && text.contains("memtrace_memory_growth_bytes_per_second{"),
            "{text}"
        );
    }

    #[test]
    fn culprits_are_bounded_and_optional_views_appear_when_traced() {
        let suspects = (0..25)
            .map(|i| SuspectSample { culprit: format!("f{i}"), source: "mmap".into(), bytes: 100 - i })
            .collect();
        let text = render(&MetricsSnapshot { suspects, ..MetricsSnapshot::default() });
        let series = text.lines().filter(|l| l.starts_with("memtrace_suspect_bytes{")).count();
        assert_eq!(series, TOP_SUSPECTS, "{text}");
        assert!(
            !text.contains("memtrace_heap_outstanding_bytes") && !text.contains("memtrace_profile_push"),
            "{text}"
        );
        let text = render(&MetricsSnapshot {
            heap_bytes: Some(4096),
            pushes: vec![("pyroscope", 12, 1)],
            ..MetricsSnapshot::default()
        });
        assert!(text.contains("\nmemtrace_heap_outstanding_bytes{pid=\"0\",comm=\"\"} 4096\n"), "{text}");
        assert!(
            text.contains("# TYPE memtrace_profile_pushes_total counter\nmemtrace_profile_pushes_total{pid=\"0\",comm=\"\",destination=\"pyroscope\"} 12\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "\nmemtrace_profile_push_failures_total{pid=\"0\",comm=\"\",destination=\"pyroscope\"} 1\n"
            ),
            "{text}"
        );
    }
}
