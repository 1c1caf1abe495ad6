//! The processes of a multi-process trace in the text report: where each culprit's memory
//! is, and the list of processes traced.

use std::io::Write;

use super::super::human::{bytes, duration, plural};
use crate::report::{Leak, Process, Report};

/// Per-process shares shown on one line at most; the rest are counted.
const SHARES_SHOWN: usize = 4;
/// Processes listed at most.
const PROCESSES_SHOWN: usize = 20;

/// The report's entry for `pid` (the latest, should the pid have been reused).
fn process(report: &Report, pid: u32) -> Option<&Process> {
    report.processes.iter().rev().find(|p| p.pid == pid)
}

fn named(report: &Report, pid: u32) -> String {
    let p = process(report, pid);
    let ns = p.and_then(|p| p.ns_pid).map_or_else(String::new, |ns| format!(", pid {ns} in its namespace"));
    match p.filter(|p| !p.comm.is_empty()) {
        Some(p) => format!("pid {pid} ({}{ns})", p.comm),
        None if ns.is_empty() => format!("pid {pid}"),
        None => format!("pid {pid} ({})", &ns[2..]),
    }
}

/// `, pid 1 in its namespace` for the header when the target runs in a container.
pub(super) fn ns_pid_note(report: &Report) -> String {
    process(report, report.target.pid)
        .and_then(|p| p.ns_pid)
        .map_or_else(String::new, |ns| format!(", pid {ns} in its namespace"))
}

/// `2 processes, ` for the answer line when a culprit holds memory in several.
pub(super) fn spread(leak: &Leak) -> String {
    if leak.processes.len() > 1 { format!("{} processes, ", leak.processes.len()) } else { String::new() }
}

/// Where a culprit's memory is, when that is not simply the target: `in 2 processes:
/// pid 101 (worker) 18.0 MiB, pid 102 (worker) 5.0 MiB at its exit`, or `in pid 101 (worker)`.
pub(super) fn where_held(report: &Report, leak: &Leak) -> Option<String> {
    match leak.processes.as_slice() {
        [] => None,
        [one] if one.pid == report.target.pid && report.processes.len() <= 1 => None,
        [one] => {
            Some(format!("in {}{}", named(report, one.pid), if one.exited { ", at its exit" } else { "" }))
        }
        many => {
            let mut shown: Vec<String> = many
                .iter()
                .take(SHARES_SHOWN)
                .map(|s| {
                    let exited = if s.exited { " at its exit" } else { "" };
                    format!("{} {}{exited}", named(report, s.pid), bytes(s.bytes))
                })
                .collect();
            if many.len() > SHARES_SHOWN {
                let rest = &many[SHARES_SHOWN..];
                let rest_bytes = rest.iter().fold(0_u64, |sum, s| sum.saturating_add(s.bytes));
                shown.push(format!("{} more ({})", rest.len(), bytes(rest_bytes)));
            }
            let exited = many.iter().filter(|s| s.exited).count();
            let ended = if exited > 0 { format!(", {exited} exited") } else { String::new() };
            Some(format!("in {} processes{ended}: {}", many.len(), shown.join(", ")))
        }
    }
}

/// The processes traced, when there were several.
pub(super) fn write_processes(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    if report.processes.len() <= 1 {
        return Ok(());
    }
    let exited = report.processes.iter().filter(|p| p.exited_s.is_some()).count();
    writeln!(out)?;
    writeln!(out, "Processes ({} traced, {exited} exited while traced):", report.processes.len())?;
    for p in report.processes.iter().take(PROCESSES_SHOWN) {
        let parent = p.parent_pid.map_or_else(String::new, |pp| format!(", child of {pp}"));
        let started = if p.started_s <= 0.0 {
            "running when tracing started".to_string()
        } else {
            format!("started at {}", duration(p.started_s))
        };
        let ended = match (p.exited_s, p.oom_killed) {
            (_, true) => ", OOM-killed".to_string(),
            (Some(t), false) => format!(", exited at {}", duration(t)),
            (None, false) => String::new(),
        };
        let execs = if p.execs > 0 {
            format!(", {}", plural(u64::from(p.execs), "exec", "execs"))
        } else {
            String::new()
        };
        let comm = if p.comm.is_empty() { "?" } else { &p.comm };
        let ns = p.ns_pid.map_or_else(String::new, |ns| format!(", pid {ns} in its namespace"));
        writeln!(out, "  pid {} ({comm}{ns}{parent}): {started}{ended}{execs}", p.pid)?;
        if !p.cmdline.is_empty() {
            writeln!(out, "      {}", p.cmdline)?;
        }
    }
    let rest = report.processes.len().saturating_sub(PROCESSES_SHOWN);
    if rest > 0 {
        writeln!(
            out,
            "  ... and {} more (all of them are in --json)",
            plural(rest as u64, "process", "processes")
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        export::{fixture::sample_report, text::write_text},
        report::ProcessShare,
    };

    #[test]
    fn a_culprit_in_two_workers_is_shown_once_with_its_split() {
        let mut report = sample_report();
        let worker = |pid, exited_s| Process {
            pid,
            parent_pid: Some(4242),
            comm: "worker".into(),
            cmdline: "node worker.js".into(),
            started_s: 2.0,
            exited_s,
            ..Process::default()
        };
        report.processes = vec![
            Process { pid: 4242, comm: "node".into(), started_s: -60.0, ..Process::default() },
            worker(4300, None),
            worker(4301, Some(20.0)),
        ];
        report.leaks[0].processes = vec![
            ProcessShare { pid: 4300, bytes: 8 << 20, count: 200, exited: false },
            ProcessShare { pid: 4301, bytes: 4 << 20, count: 100, exited: true },
        ];
        let mut text = Vec::new();
        write_text(&report, 10, &mut text).expect("render");
        let text = String::from_utf8(text).expect("UTF-8");
        let answer = text.lines().nth(1).expect("answer line");
        assert_eq!(answer, "#1 leak: rememberOrder (app.js:9) — 2 processes, 12.0 MiB mapped, +400.0 KiB/s");
        assert!(
            text.contains(
                "      in 2 processes, 1 exited: pid 4300 (worker) 8.0 MiB, pid 4301 (worker) 4.0 MiB at its exit\n"
            ),
            "{text}"
        );
        assert!(text.contains("Processes (3 traced, 1 exited while traced):\n  pid 4242 (node): running when tracing started\n"), "{text}");
        assert!(
            text.contains(
                "  pid 4301 (worker, child of 4242): started at 2.0s, exited at 20.0s\n      node worker.js\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_single_process_trace_says_nothing_more() {
        let mut report = sample_report();
        report.leaks[0].processes = vec![ProcessShare { pid: 4242, bytes: 1, count: 1, exited: false }];
        assert_eq!(where_held(&report, &report.leaks[0]), None);
        assert_eq!(spread(&report.leaks[0]), "");
    }

    #[test]
    fn a_process_in_a_container_is_shown_with_both_pids() {
        let mut report = sample_report();
        let node = |pid, ns_pid, parent_pid| Process {
            pid,
            ns_pid: Some(ns_pid),
            parent_pid,
            comm: "node".into(),
            ..Process::default()
        };
        report.processes = vec![node(4242, 1, None), node(4300, 7, Some(4242))];
        report.leaks[0].processes = vec![ProcessShare { pid: 4300, bytes: 8 << 20, count: 8, exited: false }];
        let mut text = Vec::new();
        write_text(&report, 10, &mut text).expect("render");
        let text = String::from_utf8(text).expect("UTF-8");
        assert!(text.starts_with("memtrace report for pid 4242 (node, pid 1 in its namespace)\n"), "{text}");
        assert!(text.contains("in pid 4300 (node, pid 7 in its namespace)"), "{text}");
        assert!(text.contains("  pid 4300 (node, pid 7 in its namespace, child of 4242): "), "{text}");
    }
}
