//! Prometheus text exposition of a running trace (`--metrics ADDR`).

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
}

/// Escapes a label value: backslash, double quote and newline.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, labels: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}");
}

/// Renders the snapshot in the Prometheus text format (version 0.0.4).
#[must_use]
pub fn render(s: &MetricsSnapshot) -> String {
    let target = format!("pid=\"{}\",comm=\"{}\"", s.pid, label(&s.comm));
    let mut out = String::new();
    metric(
        &mut out,
        "memtrace_target_rss_bytes",
        "gauge",
        "Resident set size of the traced process.",
        &target,
        s.rss_bytes,
    );
    metric(
        &mut out,
        "memtrace_mapped_outstanding_bytes",
        "gauge",
        "Anonymous memory mapped while tracing and not unmapped.",
        &target,
        s.mapped_bytes,
    );
    metric(
        &mut out,
        "memtrace_touched_resident_bytes",
        "gauge",
        "Pages first touched while tracing and still held (estimated from sampled page faults).",
        &target,
        s.touched_bytes,
    );
    metric(
        &mut out,
        "memtrace_events_total",
        "counter",
        "Events read from the kernel.",
        &target,
        s.events_total,
    );
    metric(
        &mut out,
        "memtrace_lost_events_total",
        "counter",
        "Events the kernel could not deliver (ring buffer or table full).",
        &target,
        s.lost_events_total,
    );
    metric(&mut out, "memtrace_stacks", "gauge", "Distinct allocation stacks seen.", &target, s.stacks);
    metric(
        &mut out,
        "memtrace_oom_kills_total",
        "counter",
        "OOM kills seen on the machine.",
        &target,
        s.oom_kills_total,
    );
    if s.memcg_limit_bytes > 0 {
        metric(
            &mut out,
            "memtrace_memcg_usage_bytes",
            "gauge",
            "Memory charged to the target's cgroup.",
            &target,
            s.memcg_usage_bytes,
        );
        metric(
            &mut out,
            "memtrace_memcg_limit_bytes",
            "gauge",
            "Memory limit of the target's cgroup.",
            &target,
            s.memcg_limit_bytes,
        );
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
    let name = "memtrace_suspect_bytes";
    let _ = writeln!(
        out,
        "# HELP {name} Memory held by the largest suspects, by culprit frame and source.\n# TYPE {name} gauge"
    );
    for (rank, suspect) in s.suspects.iter().enumerate() {
        let _ = writeln!(
            out,
            "{name}{{{target},rank=\"{}\",culprit=\"{}\",source=\"{}\"}} {}",
            rank + 1,
            label(&suspect.culprit),
            label(&suspect.source),
            suspect.bytes
        );
    }
    out
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
            "memtrace_suspect_bytes{pid=\"7\",comm=\"no\\\"de\",rank=\"1\",culprit=\"rememberOrder server.js:30\",source=\"mmap\"} 40\n"
        ));
        assert!(!text.contains("memtrace_memcg_limit_bytes"), "no cgroup limit, no cgroup gauges");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<u64>().is_ok(), "sample line without a number: {line}");
        }
    }
}
