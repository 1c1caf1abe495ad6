//! The human report printed at the end of `memtrace attach`: plain text, no colours,
//! the same bytes for the same report.

mod procs;

use std::io::Write;

use super::ExportError;
use super::human::{bytes, duration, plural, rate};
use crate::report::{
    Frame, FrameKind, Leak, LimitState, OomKill, Report, SegmentVerdict, Source, TimeToLimit, TimelinePoint,
};

/// Frames printed per suspect: enough to reach the caller's code through allocator, V8
/// and framework frames; the rest is summarized in one line.
const MAX_FRAMES: usize = 32;

/// A memcg limit this large is the kernel's "max" (no limit).
const UNLIMITED: u64 = 1 << 60;

/// Writes the report for a person: the answer first (the top culprit), the header, a
/// table of flagged culprits, growing segments, where the memory is, then the details of
/// the `top` culprits, other memory held, OOM kills and a timeline summary.
pub fn write_text<W: Write>(report: &Report, top: usize, mut out: W) -> Result<(), ExportError> {
    write_header(report, &mut out)?;
    write_leak_table(report, top, &mut out)?;
    write_segments(report, &mut out)?;
    write_memory(report, &mut out)?;
    write_details(report, top, &mut out)?;
    write_others(report, top, &mut out)?;
    procs::write_processes(report, &mut out)?;
    write_oom_kills(&report.oom_kills, &mut out)?;
    write_timeline(&report.timeline, &mut out)?;
    out.flush()?;
    Ok(())
}

/// `rememberOrder (server.js:30)`, and ` ← caller` when the report has that culprit as
/// more than one suspect (under more than one caller). The stacks that extended a segment
/// are not suspects: a culprit seen there too keeps its plain name.
fn culprit_name(report: &Report, leak: &Leak) -> String {
    let name = culprit_only(leak);
    let Some(caller) = &leak.caller else { return name };
    let same = report
        .leaks
        .iter()
        .chain(&report.other_suspects)
        .filter(|l| l.culprit.function == leak.culprit.function && l.culprit.file == leak.culprit.file)
        .count();
    if same > 1 { format!("{name} ← {}", caller.function) } else { name }
}

fn culprit_only(leak: &Leak) -> String {
    let c = &leak.culprit;
    if c.function.is_empty() && c.file.is_empty() {
        // A version-1 suspect: the leaf frame.
        return leak.frames.first().map_or_else(|| "[no stack captured]".to_string(), Frame::label);
    }
    let function = if c.function.is_empty() { "(anonymous)" } else { &c.function };
    if !c.file.is_empty() && c.line > 0 {
        let file = c.file.rsplit('/').next().unwrap_or(&c.file);
        format!("{function} ({file}:{})", c.line)
    } else {
        c.label()
    }
}

/// `12.0 MiB mapped` (or `in 300 sampled pages` for the touched view).
fn held(leak: &Leak) -> String {
    match leak.view {
        Some(view) => format!("{} {}", bytes(leak.bytes), view.view()),
        None => bytes(leak.bytes),
    }
}

/// The first line: what a person must fix, or why nothing is named.
fn write_answer(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    if let Some(leak) = report.leaks.first() {
        return writeln!(
            out,
            "#1 {}: {} — {}{}, {}",
            leak.verdict,
            culprit_name(report, leak),
            procs::spread(leak),
            held(leak),
            rate(leak.growth_bytes_per_s)
        );
    }
    if let Some(seg) = report.segments.iter().find(|s| s.verdict != SegmentVerdict::Flat) {
        return writeln!(
            out,
            "No leak named: the {} grew ({}); the stacks that extended it need not hold it (see below)",
            seg.kind.label(),
            seg.reason
        );
    }
    writeln!(out, "No leak found: no memory traced keeps growing at a stack that holds it.")
}

fn write_header(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    let target = &report.target;
    if let Some(cgroup) = &target.cgroup {
        writeln!(
            out,
            "memtrace report for cgroup {cgroup} ({}, the first pid {})",
            plural(report.processes.len() as u64, "process", "processes"),
            target.pid
        )?;
    } else if target.comm.is_empty() {
        writeln!(out, "memtrace report for pid {}{}", target.pid, procs::ns_pid_note(report))?;
    } else {
        writeln!(
            out,
            "memtrace report for pid {} ({}{})",
            target.pid,
            target.comm,
            procs::ns_pid_note(report)
        )?;
    }
    write_answer(report, out)?;
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
    let status = match (target.exited, target.oom_killed, &target.exit) {
        (_, true, _) => "killed by the OOM killer".to_string(),
        (true, false, Some(exit)) => exit.to_string(),
        (true, false, None) => "exited".to_string(),
        (false, false, _) => "running".to_string(),
    };
    writeln!(out, "  status:       {status}")?;
    writeln!(out, "  traced for:   {}", duration(report.duration_s))?;
    let tracked = if report.tracked.is_empty() { "nothing".to_string() } else { report.tracked.join(", ") };
    writeln!(out, "  tracking:     {tracked}")?;
    let totals = &report.totals;
    writeln!(
        out,
        "  mapped:       {} held (allocated {}, freed {})",
        bytes(totals.outstanding_bytes),
        bytes(totals.allocated_bytes),
        bytes(totals.freed_bytes)
    )?;
    for v in totals.views.iter().filter(|v| matches!(v.source, Some(Source::Malloc | Source::JsHeap))) {
        let name = v.source.map_or("", Source::view);
        writeln!(
            out,
            "  {:<13} {} held in {}",
            format!("{name}:"),
            bytes(v.bytes),
            plural(v.count, "block", "blocks")
        )?;
    }
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
    if let Some(ttl) = &report.time_to_limit {
        writeln!(out, "  time to limit: {}", time_to_limit(ttl))?;
    }
    writeln!(out, "  lost events:  {}", report.lost_events)?;
    // What was lost or degraded, by name (kernel counters, full tables, failed pushes).
    for warning in &report.warnings {
        writeln!(out, "  warning:      {}", warning.message)?;
    }
    Ok(())
}

/// "at this rate the cgroup limit (512.0 MiB) is reached in 3h 10m 0s (...)", or why not.
pub(crate) fn time_to_limit(ttl: &TimeToLimit) -> String {
    let usage =
        format!("{} {}", if ttl.basis == "rss" { "rss" } else { "cgroup usage" }, bytes(ttl.usage_bytes));
    let trend =
        format!("{}, {} over the last {}", usage, rate(ttl.growth_bytes_per_s), duration(ttl.window_s));
    let limit = bytes(ttl.limit_bytes);
    match (ttl.state, ttl.seconds) {
        (LimitState::Growing, Some(s)) => {
            let when = if s > 2.0 * 86_400.0 { format!("{:.0} days", s / 86_400.0) } else { duration(s) };
            format!("at this rate the cgroup limit ({limit}) is reached in {when} ({trend})")
        }
        (LimitState::Reached, _) => format!("the cgroup limit ({limit}) is reached ({usage})"),
        (LimitState::NotGrowing | LimitState::Growing, _) => format!("not growing ({trend}; limit {limit})"),
        (LimitState::NoLimit, _) if ttl.window_s > 0.0 => format!("no limit ({trend})"),
        (LimitState::NoLimit, _) => "no limit".to_string(),
        (LimitState::Unknown, _) => "unknown (too few timeline samples yet)".to_string(),
    }
}

/// Other views' bytes of a suspect, e.g. `touched 10.0 MiB`.
fn also(leak: &Leak) -> String {
    leak.evidence
        .iter()
        .filter(|e| e.source != leak.view && e.source.is_some())
        .map(|e| format!("{} {}", e.source.map_or("", Source::view), bytes(e.bytes)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn write_leak_table(report: &Report, top: usize, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out)?;
    if report.leaks.is_empty() {
        return writeln!(out, "No leak suspects: no memory keeps growing at a stack that holds it.");
    }
    writeln!(out, "Leaks (one line per culprit, most suspect first):")?;
    writeln!(out, "  {:<3} {:<44} {:>20}  {:>14}  verdict", "#", "culprit", "held", "growth")?;
    for (rank, leak) in report.leaks.iter().take(top).enumerate() {
        writeln!(
            out,
            "  {:<3} {:<44} {:>20}  {:>14}  {}",
            rank + 1,
            culprit_name(report, leak),
            held(leak),
            rate(leak.growth_bytes_per_s),
            leak.verdict
        )?;
        let also = also(leak);
        if !also.is_empty() {
            writeln!(out, "      also seen: {also}")?;
        }
        if let Some(line) = procs::where_held(report, leak) {
            writeln!(out, "      {line}")?;
        }
    }
    let rest = &report.leaks[top.min(report.leaks.len())..];
    if !rest.is_empty() {
        let rest_bytes = rest.iter().fold(0_u64, |sum, leak| sum.saturating_add(leak.bytes));
        writeln!(
            out,
            "  ... and {} more ({})",
            plural(rest.len() as u64, "culprit", "culprits"),
            bytes(rest_bytes)
        )?;
    }
    Ok(())
}

fn write_segments(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    if report.segments.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    writeln!(out, "Segments (memory that grows as a whole; the stacks that extended it need not hold it):")?;
    for seg in &report.segments {
        let verdict = match seg.verdict {
            SegmentVerdict::Growing => "growing",
            SegmentVerdict::Flat => "not growing",
            SegmentVerdict::Fragmentation => "fragmentation",
        };
        writeln!(out, "  {}: {verdict} — {}", seg.kind.label(), seg.reason)?;
        let total: u64 = seg.extended_by.iter().map(|l| l.bytes).sum();
        let who: Vec<String> = seg
            .extended_by
            .iter()
            .take(3)
            .map(|l| {
                format!(
                    "{} ({}, {:.0}%)",
                    culprit_name(report, l),
                    bytes(l.bytes),
                    l.bytes as f64 * 100.0 / total.max(1) as f64
                )
            })
            .collect();
        writeln!(out, "    extended by: {}", who.join("; "))?;
        writeln!(out, "    {}", seg.advice)?;
    }
    Ok(())
}

fn write_memory(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    let Some(m) = &report.memory else { return Ok(()) };
    writeln!(out)?;
    writeln!(
        out,
        "Where the memory is (resident, from /proc/PID/smaps, over {}):",
        duration(m.span_s as f64)
    )?;
    let (first, last) = (m.first.parts(), m.last.parts());
    let mut grew: Option<(&str, i128)> = None;
    for ((name, a), (_, b)) in first.iter().zip(last.iter()) {
        if *a == 0 && *b == 0 {
            continue;
        }
        let change = i128::from(*b) - i128::from(*a);
        let sign = if change < 0 { "-" } else { "+" };
        writeln!(
            out,
            "  {name:<20} {:>12} -> {:>12}  ({sign}{})",
            bytes(*a),
            bytes(*b),
            bytes(change.unsigned_abs() as u64)
        )?;
        if change > 0 && grew.is_none_or(|(_, c)| change > c) {
            grew = Some((name, change));
        }
    }
    if let Some((name, change)) = grew {
        writeln!(out, "  grew most: {name} (+{})", bytes(change as u64))?;
    }
    Ok(())
}

fn write_details(report: &Report, top: usize, out: &mut impl Write) -> std::io::Result<()> {
    for (rank, leak) in report.leaks.iter().take(top).enumerate() {
        writeln!(out)?;
        write_leak(report, rank + 1, leak, out)?;
    }
    Ok(())
}

fn write_others(report: &Report, top: usize, out: &mut impl Write) -> std::io::Result<()> {
    if report.other_suspects.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    writeln!(out, "Other memory held, not flagged (warm-up, in flight, or seen only by first touch):")?;
    let top = top.min(5);
    for leak in report.other_suspects.iter().take(top) {
        writeln!(
            out,
            "  {:<44} {:>20}  {} — {}",
            culprit_name(report, leak),
            held(leak),
            leak.verdict,
            leak.reason
        )?;
        if let Some(line) = procs::where_held(report, leak) {
            writeln!(out, "      {line}")?;
        }
    }
    let rest = report.other_suspects.len().saturating_sub(top);
    if rest > 0 {
        writeln!(out, "  ... and {} more", plural(rest as u64, "culprit", "culprits"))?;
    }
    Ok(())
}

fn write_leak(report: &Report, rank: usize, leak: &Leak, out: &mut impl Write) -> std::io::Result<()> {
    let unit = if leak.view == Some(Source::Faults) {
        // Each page-fault sample stands for --fault-sample pages.
        plural(leak.count, "sampled page", "sampled pages")
    } else {
        plural(leak.count, "allocation", "allocations")
    };
    writeln!(out, "#{rank}  {}", culprit_name(report, leak))?;
    writeln!(
        out,
        "    {} in {unit}, oldest {}, growth {}",
        held(leak),
        duration(leak.oldest_age_s),
        rate(leak.growth_bytes_per_s)
    )?;
    let also = also(leak);
    if !also.is_empty() {
        writeln!(out, "    also seen: {also} (other views of memory; never added)")?;
    }
    if let Some(line) = procs::where_held(report, leak) {
        writeln!(out, "    {line}")?;
    }
    writeln!(out, "    verdict: {} — {}", leak.verdict, leak.reason)?;
    let stacks = leak.variants.iter().filter(|v| v.source == leak.view).count().max(1);
    if stacks > 1 {
        let largest = leak.variants.iter().find(|v| v.source == leak.view);
        let share = largest.map_or(0.0, |v| v.bytes as f64 * 100.0 / leak.bytes.max(1) as f64);
        writeln!(out, "    {stacks} stacks lead here; the largest ({share:.0}% of {}):", held(leak))?;
    }
    write_frames(leak, out)
}

/// The stack, with the frames on the leaf side of the culprit (allocator, V8, node)
/// summarized and the culprit marked.
fn write_frames(leak: &Leak, out: &mut impl Write) -> std::io::Result<()> {
    let frames = &leak.frames;
    if frames.is_empty() {
        return writeln!(out, "      (no stack)");
    }
    let at = frames.iter().position(|f| *f == leak.culprit).unwrap_or(0);
    if at > 0 {
        let leaf_line = frame_line(&frames[0]);
        writeln!(
            out,
            "      ({} below it, from {leaf_line})",
            plural(at as u64, "runtime frame", "runtime frames")
        )?;
    }
    for (i, frame) in frames.iter().enumerate().skip(at).take(MAX_FRAMES) {
        let mark = if i == at { "->" } else { "  " };
        writeln!(out, "    {mark}{}", frame_line(frame))?;
    }
    let shown = at + MAX_FRAMES;
    if frames.len() > shown {
        writeln!(
            out,
            "      ... {} more frames down to {} (all of them are in --json and --flamegraph)",
            frames.len() - shown,
            frames.last().map_or_else(String::new, frame_line)
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
    fn the_caller_is_named_only_for_a_culprit_that_is_several_suspects() {
        let mut report = sample_report();
        let mut leak = report.leaks[0].clone();
        leak.caller = Some(crate::export::fixture::frame(
            "placeOrder",
            "",
            "/srv/server.js",
            46,
            crate::report::FrameKind::Js,
        ));
        report.leaks[0] = leak.clone();
        // The same culprit among the stacks that extended a segment: still one suspect.
        report.segments.first_mut().expect("the sample report has a segment").extended_by.push(leak.clone());
        report.other_suspects.retain(|l| l.culprit.function != leak.culprit.function);
        assert_eq!(culprit_name(&report, &leak), culprit_only(&leak));
        // Under a second caller it is two suspects: each says which caller.
        let mut other = leak.clone();
        other.caller = Some(crate::export::fixture::frame(
            "refund",
            "",
            "/srv/server.js",
            80,
            crate::report::FrameKind::Js,
        ));
        report.other_suspects.push(other);
        assert_eq!(culprit_name(&report, &leak), format!("{} ← placeOrder", culprit_only(&leak)));
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
#1 leak: rememberOrder (app.js:9) — 12.0 MiB mapped, +400.0 KiB/s
WARNING: 7 events were lost: the figures below are lower bounds.
  command:      node /srv/app.js
  status:       killed by the OOM killer
  traced for:   30.0s
  tracking:     mmap, brk, faults, oom
  mapped:       13.0 MiB held (allocated 40.0 MiB, freed 27.0 MiB)
  touched:      12.0 MiB of pages first touched while tracing and still held (sampled), 6% of the RSS growth of 190.0 MiB
  lost events:  7

Leaks (one line per culprit, most suspect first):
  #   culprit                                                      held          growth  verdict
  1   rememberOrder (app.js:9)                          12.0 MiB mapped    +400.0 KiB/s  leak
      also seen: touched 12.0 MiB

Segments (memory that grows as a whole; the stacks that extended it need not hold it):
  malloc arena: growing — +1.0 MiB in 30s (2.0 MiB/min)
    extended by: malloc [libc.so.6] (1.0 MiB, 99%); rememberOrder (app.js:9) (8.0 KiB, 1%)
    to name who holds the blocks: --track malloc

#1  rememberOrder (app.js:9)
    12.0 MiB mapped in 300 allocations, oldest 29.5s, growth +400.0 KiB/s
    also seen: touched 12.0 MiB (other views of memory; never added)
    verdict: leak — grew 24.0 MiB/min in 19 of 20 intervals over 30s and was still growing at the end
    ->rememberOrder app.js:9 [js]
      handleRequest app.js:22 [js]
      uv_run [node]
      main [node]

Other memory held, not flagged (warm-up, in flight, or seen only by first touch):
  do_anonymous_page                                  4.0 KiB mapped  churn — took 8.0 KiB in all but holds 4.0 KiB now (peak 8.0 KiB): memory is given back (churn)

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
    fn runtime_frames_below_the_culprit_are_summarized() {
        let mut report = sample_report();
        let leak = &mut report.leaks[0];
        let libc = "/lib/x86_64-linux-gnu/libc.so.6";
        let mut frames = vec![
            Frame {
                function: "__memset_avx2".into(),
                module: libc.into(),
                kind: FrameKind::Native,
                ..Frame::default()
            },
            Frame { function: "do_page_fault".into(), kind: FrameKind::Kernel, ..Frame::default() },
        ];
        frames.extend(leak.frames.iter().cloned());
        leak.frames = frames;
        let text = render(&report, 10);
        assert!(text.contains("      (2 runtime frames below it, from __memset_avx2 [libc.so.6])\n    ->rememberOrder app.js:9 [js]\n"), "{text}");
        assert!(!text.contains("do_page_fault"), "{text}");
    }

    #[test]
    fn without_a_leak_the_first_line_says_why() {
        let mut report = sample_report();
        report.leaks.clear();
        let text = render(&report, 10);
        let second = text.lines().nth(1).expect("two lines");
        assert!(second.starts_with("No leak named: the malloc arena grew"), "{second}");
        report.segments.clear();
        let text = render(&report, 10);
        assert!(text.lines().nth(1).expect("two lines").starts_with("No leak found"), "{text}");
        assert!(text.contains("do_anonymous_page [kernel]") || text.contains("do_anonymous_page"), "{text}");
    }

    #[test]
    fn header_says_when_the_limit_is_reached() {
        let mut report = sample_report();
        report.time_to_limit = Some(TimeToLimit {
            state: LimitState::Growing,
            basis: "memcg".to_string(),
            limit_bytes: 512 << 20,
            usage_bytes: 230 << 20,
            growth_bytes_per_s: 28_300.0,
            seconds: Some(11_400.0),
            window_s: 300.0,
        });
        let text = render(&report, 1);
        assert!(
            text.contains(
                "\n  time to limit: at this rate the cgroup limit (512.0 MiB) is reached in 3h 10m 0s (cgroup usage 230.0 MiB, +27.6 KiB/s over the last 5m 0s)\n"
            ),
            "{text}"
        );
        let ttl = report.time_to_limit.as_mut().expect("set above");
        (ttl.state, ttl.seconds, ttl.growth_bytes_per_s) = (LimitState::NotGrowing, None, 0.0);
        assert!(render(&report, 1).contains("  time to limit: not growing (cgroup usage 230.0 MiB, 0 B/s over the last 5m 0s; limit 512.0 MiB)\n"));
        let ttl = report.time_to_limit.as_mut().expect("set above");
        (ttl.state, ttl.limit_bytes, ttl.basis) = (LimitState::NoLimit, 0, "rss".to_string());
        assert!(
            render(&report, 1)
                .contains("  time to limit: no limit (rss 230.0 MiB, 0 B/s over the last 5m 0s)\n")
        );
    }

    #[test]
    fn warnings_follow_the_lost_events() {
        let message = "kernel: 6 allocator calls never returned: their thread exited inside them".to_string();
        let report = Report {
            lost_events: 2,
            warnings: vec![crate::report::Warning { t_s: 1.0, message }],
            ..Report::default()
        };
        assert!(render(&report, 10).contains(
            "  lost events:  2\n  warning:      kernel: 6 allocator calls never returned: their thread exited inside them\n"
        ));
    }

    #[test]
    fn quiet_report_has_no_warning_and_says_there_is_nothing() {
        let report = Report { lost_events: 0, ..Report::default() };
        let text = render(&report, 10);
        assert!(!text.contains("WARNING"));
        assert!(text.contains("No leak suspects"));
        assert!(text.contains("No leak found"));
        assert!(!text.contains("OOM kills"));
        assert!(!text.contains("Timeline"));
    }
}
