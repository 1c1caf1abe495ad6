//! `--metrics`: the Prometheus endpoint served while tracing.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use anyhow::Context as _;
use log::warn;

/// Binds the metrics listener; anything but loopback is said out loud.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("serve metrics on {addr} (--metrics)"))?;
    if !addr.ip().is_loopback() {
        warn!("metrics are served on {addr}, reachable from other machines");
    }
    eprintln!("memtrace: Prometheus metrics at http://{addr}/metrics");
    Ok(listener)
}

/// Answers one HTTP request on the metrics listener: `GET /metrics` gets `body`.
pub async fn serve(mut stream: tokio::net::TcpStream, body: String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut head = [0u8; 2048];
    let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut head)).await else {
        return;
    };
    let request = String::from_utf8_lossy(&head[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let response = if request.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 404 Not Found\r\nContent-Length: 24\r\nConnection: close\r\n\r\nmetrics are at /metrics\n"
            .to_string()
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(response.as_bytes())).await;
}

/// Processes given series of their own at most: labels stay bounded however large a worker
/// pool grows (the rest are in the totals).
pub(super) const PROCESS_SERIES_MAX: usize = 20;

/// One traced process's memory, for its series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ProcessSample {
    pub pid: u32,
    pub comm: String,
    pub rss_bytes: u64,
    pub mapped_bytes: u64,
}

/// A metric family of per-process series: name, help, and the value of a sample.
type Family = (&'static str, &'static str, fn(&ProcessSample) -> u64);

/// Per-process series for a trace of several processes (`--children`, `--cgroup`, several
/// pids), at most [`PROCESS_SERIES_MAX`] of them (the caller passes the largest first), and
/// how many processes run and were traced. Appended to the main exposition.
pub(super) fn per_process(samples: &[ProcessSample], running: usize, traced: usize) -> String {
    let escape = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP memtrace_processes Traced processes, running and in all (exited ones included).\n\
         # TYPE memtrace_processes gauge\n\
         memtrace_processes{{state=\"running\"}} {running}\n\
         memtrace_processes{{state=\"traced\"}} {traced}"
    );
    let families: [Family; 2] = [
        ("memtrace_process_rss_bytes", "Resident set size of a traced process (the largest holders).", |p| {
            p.rss_bytes
        }),
        (
            "memtrace_process_mapped_outstanding_bytes",
            "Anonymous memory a traced process mapped while traced and still holds (the largest holders).",
            |p| p.mapped_bytes,
        ),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for p in samples.iter().take(PROCESS_SERIES_MAX) {
            let _ = writeln!(out, "{name}{{pid=\"{}\",comm=\"{}\"}} {}", p.pid, escape(&p.comm), value(p));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_process_series_are_bounded_and_labelled_by_pid_and_comm() {
        let samples: Vec<ProcessSample> = (0..30)
            .map(|i| ProcessSample {
                pid: 100 + i,
                comm: if i == 0 { "we\"ird".into() } else { "worker".into() },
                rss_bytes: 1000 - u64::from(i),
                mapped_bytes: 10 * u64::from(i),
            })
            .collect();
        let text = per_process(&samples, 30, 31);
        assert!(text.contains("memtrace_processes{state=\"running\"} 30\n"), "{text}");
        assert!(text.contains("memtrace_processes{state=\"traced\"} 31\n"), "{text}");
        assert!(text.contains("memtrace_process_rss_bytes{pid=\"100\",comm=\"we\\\"ird\"} 1000\n"), "{text}");
        assert!(
            text.contains("memtrace_process_mapped_outstanding_bytes{pid=\"101\",comm=\"worker\"} 10\n"),
            "{text}"
        );
        for family in ["memtrace_process_rss_bytes{", "memtrace_process_mapped_outstanding_bytes{"] {
            assert_eq!(text.lines().filter(|l| l.starts_with(family)).count(), PROCESS_SERIES_MAX, "{text}");
        }
        assert!(!text.contains("pid=\"120\""), "the 21st process has no series");
    }
}
