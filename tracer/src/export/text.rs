//! The human report printed at the end of `memtrace attach`: plain text, no colours,
//! the same bytes for the same report.

use std::io::Write;

use super::ExportError;
use super::human::{bytes, duration, plural, rate};
use crate::report::{Frame, FrameKind, Leak, OomKill, Report, TimelinePoint};

/// Frames printed per suspect: enough to reach the caller's code through allocator, V8
/// and framework frames; the rest is summarized in one line.
const MAX_FRAMES: usize = 32;

/// A memcg limit this large is the kernel's "max" (no limit).
const UNLIMITED: u64 = 1 << 60;

/// Writes the report for a person: header, the `top` biggest leak suspects with their
/// stacks, OOM kills, and a timeline summary.
pub fn write_text<W: Write>(report: &Report, top: usize, mut out: W) -> Result<(), ExportError> {
    write_header(report, &mut out)?;
    write_leaks(report, top, &mut out)?;
    write_oom_kills(&report.oom_kills, &mut out)?;
    write_timeline(&report.timeline, &mut out)?;
    out.flush()?;
    Ok(())
}

fn write_header(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    let target = &report.target;
    if target.comm.is_empty() {
        writeln!(out, "memtrace report for pid {}", target.pid)?;
    } else {
        writeln!(out, "memtrace report for pid {} ({})", target.pid, target.comm)?;
    }
    if report.lost_events > 0 {
        writeln!(
            out,
            "WARNING: {} lost: the figures below are lower bounds.",
            plural(report.lost_events, "event was", "events were")
        )?;
    }
    if !target.cmdline.is_empty() {
        writeln!(out, "  command:      {}", target.cmdline)?;
    }
    let status = match (target.exited, target.oom_killed) {
        (_, true) => "killed by the OOM killer",
        (true, false) => "exited",
        (false, false) => "running",
    };
    writeln!(out, "  status:       {status}")?;
    writeln!(out, "  traced for:   {}", duration(report.duration_s))?;
    let tracked = if report.tracked.is_empty() { "nothing".to_string() } else { report.tracked.join(", ") };
    writeln!(out, "  tracking:     {tracked}")?;
    let totals = &report.totals;
    writeln!(
        out,
        "  outstanding:  {} (allocated {}, freed {})",
        bytes(totals.outstanding_bytes),
        bytes(totals.allocated_bytes),
        bytes(totals.freed_bytes)
    )?;
    if totals.resident_bytes > 0 {
        let rss_growth = match (report.timeline.first(), report.timeline.last()) {
            (Some(a), Some(b)) => b.rss_bytes.saturating_sub(a.rss_bytes),
            _ => 0,
        };
        let explained = if rss_growth > 0 {
            format!(
                ", {:.0}% of the RSS growth of {}",
                totals.resident_bytes as f64 * 100.0 / rss_growth as f64,
                bytes(rss_growth)
            )
        } else {
            String::new()
        };
        writeln!(
            out,
            "  touched:      {} of pages first touched while tracing and still held (sampled){explained}",
            bytes(totals.resident_bytes)
        )?;
    }
    writeln!(out, "  lost events:  {}", report.lost_events)
}

fn write_leaks(report: &Report, top: usize, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out)?;
    if report.leaks.is_empty() {
        return writeln!(out, "No leak suspects: no outstanding memory was attributed to a stack.");
    }
    writeln!(out, "Leak suspects (unfreed memory by allocating stack, most suspect first):")?;
    let mut leaks: Vec<&Leak> = report.leaks.iter().collect();
    // Stable, so equal scores keep the report's order.
    leaks.sort_by(|a, b| b.score.total_cmp(&a.score));
    for (rank, leak) in leaks.iter().take(top).enumerate() {
        writeln!(out)?;
        write_leak(rank + 1, leak, out)?;
    }
    let rest = &leaks[top.min(leaks.len())..];
    if !rest.is_empty() {
        let rest_bytes = rest.iter().fold(0_u64, |sum, leak| sum.saturating_add(leak.bytes));
        writeln!(out)?;
        writeln!(
            out,
            "... and {} more {} ({})",
            rest.len(),
            if rest.len() == 1 { "stack" } else { "stacks" },
            bytes(rest_bytes)
        )?;
    }
    Ok(())
}

fn write_leak(rank: usize, leak: &Leak, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "#{rank}  {} in {}, oldest {}, growth {}",
        bytes(leak.bytes),
        if leak.sources.iter().all(|s| s == "faults") && !leak.sources.is_empty() {
            // Each page-fault sample stands for --fault-sample pages.
            plural(leak.count, "sampled page", "sampled pages")
        } else {
            plural(leak.count, "allocation", "allocations")
        },
        duration(leak.oldest_age_s),
        rate(leak.growth_bytes_per_s)
    )?;
    if leak.sources.iter().all(|s| s == "faults") && !leak.sources.is_empty() {
        writeln!(
            out,
            "    from faults: resident pages first touched here (a second view of memory mapped elsewhere)"
        )?;
    } else if !leak.sources.is_empty() {
        writeln!(out, "    from {}", leak.sources.join(", "))?;
    }
    if !leak.verdict.is_empty() {
        writeln!(out, "    verdict: {} — {}", leak.verdict, leak.reason)?;
    }
    if leak.frames.is_empty() {
        return writeln!(out, "      (no stack)");
    }
    for frame in leak.frames.iter().take(MAX_FRAMES) {
        writeln!(out, "      {}", frame_line(frame))?;
    }
    if leak.frames.len() > MAX_FRAMES {
        writeln!(
            out,
            "      ... {} more frames down to {} (all of them are in --json and --flamegraph)",
            leak.frames.len() - MAX_FRAMES,
            leak.frames.last().map_or_else(String::new, frame_line)
        )?;
    }
    Ok(())
}

fn frame_line(frame: &Frame) -> String {
    let label = frame.label().replace(['\n', '\r'], " ");
    match frame.kind {
        FrameKind::Js => format!("{label} [js]"),
        FrameKind::Kernel => format!("{label} [kernel]"),
        FrameKind::Native | FrameKind::Unknown => label,
    }
}

fn write_oom_kills(kills: &[OomKill], out: &mut impl Write) -> std::io::Result<()> {
    if kills.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    writeln!(out, "OOM kills ({}):", kills.len())?;
    for kill in kills {
        let comm = if kill.comm.is_empty() { "?" } else { &kill.comm };
        writeln!(
            out,
            "  pid {} ({comm}): anon-rss {}, file-rss {}, shmem-rss {}, total-vm {}, oom_score_adj {}",
            kill.pid,
            bytes(kill.anon_rss_bytes),
            bytes(kill.file_rss_bytes),
            bytes(kill.shmem_rss_bytes),
            bytes(kill.total_vm_bytes),
            kill.oom_score_adj
        )?;
        let cgroup = if kill.cgroup.is_empty() { "unknown" } else { &kill.cgroup };
        let limit = match kill.memcg_limit_bytes {
            0 => "unknown".to_string(),
            n if n >= UNLIMITED => "none".to_string(),
            n => bytes(n),
        };
        writeln!(out, "    cgroup {cgroup}, limit {limit}")?;
    }
    Ok(())
}

/// A named value of the timeline.
type Series = (&'static str, fn(&TimelinePoint) -> u64);

fn write_timeline(points: &[TimelinePoint], out: &mut impl Write) -> std::io::Result<()> {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return Ok(());
    };
    writeln!(out)?;
    writeln!(
        out,
        "Timeline ({} from {} to {}):",
        plural(points.len() as u64, "sample", "samples"),
        duration(first.t_s),
        duration(last.t_s)
    )?;
    let series: [Series; 2] = [("rss", |p| p.rss_bytes), ("outstanding", |p| p.outstanding_bytes)];
    for (name, value) in series {
        // The first of equal maxima, so the output does not depend on the sort.
        let peak = points.iter().fold(first, |best, p| if value(p) > value(best) { p } else { best });
        writeln!(
            out,
            "  {name:<12} {} -> {}, peak {} at {}",
            bytes(value(first)),
            bytes(value(last)),
            bytes(value(peak)),
            duration(peak.t_s)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::fixture::sample_report;
    use crate::report::Report;

    fn render(report: &Report, top: usize) -> String {
        let mut out = Vec::new();
        write_text(report, top, &mut out).expect("render text report");
        String::from_utf8(out).expect("text report is UTF-8")
    }

    #[test]
    fn deep_stacks_are_cut_with_the_outermost_frame_named() {
        let mut report = sample_report();
        let frames: Vec<Frame> = (0..40)
            .map(|i| Frame { function: format!("f{i}"), kind: FrameKind::Native, ..Frame::default() })
            .collect();
        report.leaks[0].frames = frames;
        let text = render(&report, 1);
        assert!(text.contains("      f31\n"), "{text}");
        assert!(!text.contains("      f32\n"), "{text}");
        assert!(text.contains("... 8 more frames down to f39"), "{text}");
    }

    #[test]
    fn renders_the_expected_report() {
        let expected = "\
memtrace report for pid 4242 (node)
WARNING: 7 events were lost: the figures below are lower bounds.
  command:      node /srv/app.js
  status:       killed by the OOM killer
  traced for:   30.0s
  tracking:     mmap, brk, faults, oom
  outstanding:  13.0 MiB (allocated 40.0 MiB, freed 27.0 MiB)
  lost events:  7

Leak suspects (unfreed memory by allocating stack, most suspect first):

#1  12.0 MiB in 300 allocations, oldest 29.5s, growth +400.0 KiB/s
    from mmap, faults
      rememberOrder app.js:9 [js]
      handleRequest app.js:22 [js]
      uv_run [node]
      main [node]

#2  1.0 MiB in 2 allocations, oldest 12.3s, growth 0 B/s
    from brk
      malloc [libc.so.6]
      v8::internal::Heap::AllocateRaw heap.cc:120
      main [node]

... and 2 more stacks (12.0 KiB)

OOM kills (1):
  pid 4242 (node): anon-rss 480.0 MiB, file-rss 12.0 MiB, shmem-rss 0 B, total-vm 1.2 GiB, oom_score_adj 0
    cgroup /memtrace-demo, limit 512.0 MiB

Timeline (3 samples from 0.0s to 30.0s):
  rss          100.0 MiB -> 290.0 MiB, peak 300.0 MiB at 15.0s
  outstanding  0 B -> 13.0 MiB, peak 13.0 MiB at 30.0s
";
        assert_eq!(render(&sample_report(), 2), expected);
    }

    #[test]
    fn orders_by_score_and_marks_kernel_frames() {
        let mut report = sample_report();
        report.leaks.reverse();
        let text = render(&report, 10);
        let first = text.find("#1  12.0 MiB").expect("biggest score ranked first");
        let third = text.find("#3  4.0 KiB").expect("kernel stack ranked third");
        assert!(first < third);
        assert!(text.contains("      do_anonymous_page [kernel]\n      [unknown]\n"));
        assert!(!text.contains("more stack"));
    }

    #[test]
    fn quiet_report_has_no_warning_and_says_there_is_nothing() {
        let report = Report { lost_events: 0, ..Report::default() };
        let text = render(&report, 10);
        assert!(!text.contains("WARNING"));
        assert!(text.contains("No leak suspects"));
        assert!(!text.contains("OOM kills"));
        assert!(!text.contains("Timeline"));
    }
}
