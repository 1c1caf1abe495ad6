//! `memtrace report A.mtr --diff B.mtr`: what grew between two recordings.
//!
//! Stacks are matched by their frames' function, module, file and line (not their kind,
//! which a later symbolizer may refine); identical stacks within one report are summed
//! first. Each stack's delta is B − A: positive deltas grew, negative ones shrank.

use std::{collections::HashMap, io::Write};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::{
    cli::{FlameKind, OutputArgs},
    export::{self, ExportError, FlameValue},
    report::{Frame, FrameKind, Leak, Report, Source, Target, Totals, Variant},
    units::human_bytes,
};

/// Version of the JSON diff document (`--json` with `--diff`).
pub const DIFF_VERSION: u32 = 1;

/// The comparison of two reports: the JSON document written by `--json` with `--diff`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diff {
    pub diff_version: u32,
    pub a: Side,
    pub b: Side,
    /// B − A.
    pub delta: TotalsDelta,
    /// Stacks whose bytes or count changed, biggest growth first, biggest shrink last.
    pub stacks: Vec<StackDelta>,
}

/// One of the two recordings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Side {
    pub recording: String,
    pub target: Target,
    pub duration_s: f64,
    pub totals: Totals,
    pub lost_events: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TotalsDelta {
    pub outstanding_bytes: i64,
    pub allocated_bytes: i64,
    pub freed_bytes: i64,
    pub resident_bytes: i64,
}

/// One stack's outstanding memory in both recordings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StackDelta {
    pub delta_bytes: i64,
    pub delta_count: i64,
    pub a_bytes: u64,
    pub b_bytes: u64,
    pub a_count: u64,
    pub b_count: u64,
    /// Views the stack was seen in, in either recording.
    pub sources: Vec<Source>,
    /// Leaf first, as in the report.
    pub frames: Vec<Frame>,
}

/// `b − a`, saturated to `i64`.
fn delta(a: u64, b: u64) -> i64 {
    let d = i128::from(b) - i128::from(a);
    i64::try_from(d).unwrap_or(if d < 0 { i64::MIN } else { i64::MAX })
}

type FrameKey = (String, String, String, u32);

fn frame_keys(frames: &[Frame]) -> Vec<FrameKey> {
    frames.iter().map(|f| (f.function.clone(), f.module.clone(), f.file.clone(), f.line)).collect()
}

fn side(name: &str, report: &Report) -> Side {
    Side {
        recording: name.to_string(),
        target: report.target.clone(),
        duration_s: report.duration_s,
        totals: report.totals.clone(),
        lost_events: report.lost_events,
    }
}

/// Compares `a` (earlier) with `b` (later); the names label them in every output.
#[must_use]
pub fn diff(a_name: &str, a: &Report, b_name: &str, b: &Report) -> Diff {
    // Each view's stacks are compared with the same view's: views are never added.
    let mut index: HashMap<(Option<Source>, Vec<FrameKey>), usize> = HashMap::new();
    let mut stacks: Vec<StackDelta> = Vec::new();
    let variants = |r: &Report, later: bool| -> Vec<(Variant, bool)> {
        r.all_suspects().flat_map(Leak::variants_or_self).map(|v| (v, later)).collect()
    };
    for (leak, later) in variants(a, false).into_iter().chain(variants(b, true)) {
        let key = (leak.source, frame_keys(&leak.frames));
        let i = *index.entry(key).or_insert_with(|| {
            stacks.push(StackDelta {
                delta_bytes: 0,
                delta_count: 0,
                a_bytes: 0,
                b_bytes: 0,
                a_count: 0,
                b_count: 0,
                sources: Vec::new(),
                frames: leak.frames.clone(),
            });
            stacks.len() - 1
        });
        let s = &mut stacks[i];
        if later {
            s.b_bytes = s.b_bytes.saturating_add(leak.bytes);
            s.b_count = s.b_count.saturating_add(leak.count);
            // The later recording's frame kinds win.
            s.frames.clone_from(&leak.frames);
        } else {
            s.a_bytes = s.a_bytes.saturating_add(leak.bytes);
            s.a_count = s.a_count.saturating_add(leak.count);
        }
        if let Some(source) = leak.source
            && !s.sources.contains(&source)
        {
            s.sources.push(source);
        }
    }
    for s in &mut stacks {
        s.delta_bytes = delta(s.a_bytes, s.b_bytes);
        s.delta_count = delta(s.a_count, s.b_count);
        s.sources.sort();
    }
    stacks.retain(|s| s.delta_bytes != 0 || s.delta_count != 0);
    stacks.sort_by(|x, y| {
        y.delta_bytes
            .cmp(&x.delta_bytes)
            .then(y.b_bytes.cmp(&x.b_bytes))
            .then_with(|| frame_keys(&x.frames).cmp(&frame_keys(&y.frames)))
            .then_with(|| x.sources.cmp(&y.sources))
    });
    Diff {
        diff_version: DIFF_VERSION,
        a: side(a_name, a),
        b: side(b_name, b),
        delta: TotalsDelta {
            outstanding_bytes: delta(a.totals.outstanding_bytes, b.totals.outstanding_bytes),
            allocated_bytes: delta(a.totals.allocated_bytes, b.totals.allocated_bytes),
            freed_bytes: delta(a.totals.freed_bytes, b.totals.freed_bytes),
            resident_bytes: delta(a.totals.resident_bytes, b.totals.resident_bytes),
        },
        stacks,
    }
}

impl Diff {
    /// Stacks that grew, biggest first.
    pub fn grown(&self) -> impl Iterator<Item = &StackDelta> {
        self.stacks.iter().filter(|s| s.delta_bytes > 0)
    }

    /// Stacks that shrank, biggest shrink first.
    pub fn shrunk(&self) -> impl Iterator<Item = &StackDelta> {
        self.stacks.iter().rev().filter(|s| s.delta_bytes < 0)
    }

    /// The stacks whose outstanding (mapped) bytes grew, as a report whose leaks hold
    /// the bytes grown, for the stack exporters (folded, flamegraph), which take
    /// non-negative values. Resident-page stacks are left out: they count the same
    /// memory a second time.
    #[must_use]
    pub fn growth_report(&self) -> Report {
        let leaks: Vec<Leak> = self
            .grown()
            .filter(|s| !s.sources.contains(&Source::Faults))
            .map(|s| Leak {
                bytes: s.delta_bytes.unsigned_abs(),
                count: s.delta_count.max(0).unsigned_abs(),
                oldest_age_s: 0.0,
                growth_bytes_per_s: 0.0,
                score: s.delta_bytes as f64 / f64::from(1 << 20),
                sources: s.sources.clone(),
                frames: s.frames.clone(),
                view: s.sources.first().copied(),
                variants: vec![Variant {
                    source: s.sources.first().copied(),
                    bytes: s.delta_bytes.unsigned_abs(),
                    count: s.delta_count.max(0).unsigned_abs(),
                    frames: s.frames.clone(),
                }],
                ..Leak::default()
            })
            .collect();
        let grown = leaks.iter().fold(0_u64, |sum, l| sum.saturating_add(l.bytes));
        let mut target = self.b.target.clone();
        // The flamegraph's title names the target; say that this is growth.
        target.comm = format!(
            "{}growth from {} to {}",
            if target.comm.is_empty() { String::new() } else { format!("{}, ", target.comm) },
            file_name(&self.a.recording),
            file_name(&self.b.recording)
        );
        Report {
            version: crate::report::REPORT_VERSION,
            target,
            duration_s: self.b.duration_s,
            tracked: Vec::new(),
            totals: Totals { outstanding_bytes: grown, ..Totals::default() },
            leaks,
            oom_kills: Vec::new(),
            timeline: Vec::new(),
            lost_events: self.a.lost_events.saturating_add(self.b.lost_events),
            ..Report::default()
        }
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `+1.5 MiB`, `-4.0 KiB`, `0 B`.
fn signed_bytes(d: i64) -> String {
    match d {
        0 => "0 B".to_string(),
        d if d > 0 => format!("+{}", human_bytes(d.unsigned_abs())),
        d => format!("-{}", human_bytes(d.unsigned_abs())),
    }
}

fn signed(d: i64) -> String {
    if d > 0 { format!("+{d}") } else { d.to_string() }
}

/// Writes the diff for a person: both recordings, then the `top` stacks that grew most
/// and the `top` that shrank most.
pub fn write_text<W: Write>(diff: &Diff, top: usize, mut out: W) -> Result<(), ExportError> {
    writeln!(out, "memtrace diff: {} -> {}", diff.a.recording, diff.b.recording)?;
    for (label, side) in [("A", &diff.a), ("B", &diff.b)] {
        let who = if side.target.comm.is_empty() {
            format!("pid {}", side.target.pid)
        } else {
            format!("pid {} ({})", side.target.pid, side.target.comm)
        };
        writeln!(
            out,
            "  {label}: {who}, traced for {:.1}s, outstanding {}",
            side.duration_s,
            human_bytes(side.totals.outstanding_bytes)
        )?;
    }
    let d = &diff.delta;
    writeln!(
        out,
        "  outstanding {} (allocated {}, freed {}), resident by fault samples {}",
        signed_bytes(d.outstanding_bytes),
        signed_bytes(d.allocated_bytes),
        signed_bytes(d.freed_bytes),
        signed_bytes(d.resident_bytes)
    )?;
    if diff.a.lost_events > 0 || diff.b.lost_events > 0 {
        writeln!(
            out,
            "WARNING: events were lost (A {}, B {}): the figures are lower bounds.",
            diff.a.lost_events, diff.b.lost_events
        )?;
    }
    let grown: Vec<&StackDelta> = diff.grown().collect();
    let shrunk: Vec<&StackDelta> = diff.shrunk().collect();
    writeln!(out)?;
    if grown.is_empty() {
        writeln!(out, "Nothing grew: no stack holds more memory in B than in A.")?;
    } else {
        write_list(&mut out, "Grew", &grown, top)?;
    }
    if !shrunk.is_empty() {
        writeln!(out)?;
        write_list(&mut out, "Shrank", &shrunk, top)?;
    }
    out.flush()?;
    Ok(())
}

fn write_list(out: &mut impl Write, title: &str, stacks: &[&StackDelta], top: usize) -> std::io::Result<()> {
    let total = stacks.iter().fold(0_i64, |sum, s| sum.saturating_add(s.delta_bytes));
    writeln!(
        out,
        "{title} ({} {}, {} in all):",
        stacks.len(),
        if stacks.len() == 1 { "stack" } else { "stacks" },
        signed_bytes(total)
    )?;
    for (rank, s) in stacks.iter().take(top).enumerate() {
        let status = match (s.a_bytes, s.b_bytes) {
            (0, _) => ", new in B",
            (_, 0) => ", gone in B",
            _ => "",
        };
        writeln!(out)?;
        writeln!(
            out,
            "#{}  {} ({} -> {}{status}), {} allocations",
            rank + 1,
            signed_bytes(s.delta_bytes),
            human_bytes(s.a_bytes),
            human_bytes(s.b_bytes),
            signed(s.delta_count)
        )?;
        if !s.sources.is_empty() {
            let sources: Vec<&str> = s.sources.iter().map(|s| s.name()).collect();
            writeln!(out, "    from {}", sources.join(", "))?;
        }
        if s.frames.is_empty() {
            writeln!(out, "      (no stack)")?;
        }
        for frame in &s.frames {
            let label = frame.label().replace(['\n', '\r'], " ");
            match frame.kind {
                FrameKind::Js => writeln!(out, "      {label} [js]")?,
                FrameKind::Kernel => writeln!(out, "      {label} [kernel]")?,
                FrameKind::Native | FrameKind::Unknown => writeln!(out, "      {label}")?,
            }
        }
    }
    if stacks.len() > top {
        writeln!(out)?;
        writeln!(out, "... and {} more", stacks.len() - top)?;
    }
    Ok(())
}

/// Writes the diff as pretty-printed JSON followed by a newline.
pub fn write_json<W: Write>(diff: &Diff, mut out: W) -> Result<(), ExportError> {
    serde_json::to_writer_pretty(&mut out, diff)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// Writes the outputs `out` asks for: text to stdout, JSON, folded and flamegraph files.
pub fn write_outputs(diff: &Diff, out: &OutputArgs) -> anyhow::Result<()> {
    if out.flamegraph_kind != FlameKind::Outstanding {
        bail!("--flamegraph-kind does not apply to --diff: the diff weighs each stack by the bytes it grew");
    }
    for (path, what) in [(&out.pprof, "--pprof"), (&out.speedscope, "--speedscope")] {
        if path.is_some() {
            bail!(
                "{what} is not available with --diff; use --folded, --flamegraph or --json for the bytes each stack grew"
            );
        }
    }
    let stdout = std::io::stdout();
    write_text(diff, out.top, stdout.lock()).context("write the diff to stdout")?;
    let write_file = crate::export::write_to_file;
    if let Some(path) = &out.json {
        write_file(path, "JSON diff", &|w| write_json(diff, w))?;
    }
    let growth = diff.growth_report();
    if let Some(path) = &out.folded {
        write_file(path, "folded stacks of growth", &|w| {
            export::write_folded(&growth, FlameValue::Outstanding, w)
        })?;
    }
    if let Some(path) = &out.flamegraph {
        write_file(path, "flamegraph of growth", &|w| {
            export::write_flamegraph(&growth, FlameValue::Outstanding, w)
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::{frame, js_stack, leak, report};

    fn a_and_b() -> (Report, Report) {
        let native = vec![frame("malloc", "", 0, FrameKind::Native), frame("main", "", 0, FrameKind::Native)];
        let a = report(vec![
            leak(1 << 20, 10, js_stack("rememberOrder", 9)),
            leak(4 << 20, 4, native.clone()),
            leak(8192, 2, js_stack("cacheSession", 31)),
        ]);
        let mut grown = js_stack("rememberOrder", 9);
        // A refined kind does not make it another stack.
        grown[2].kind = FrameKind::Unknown;
        let b = report(vec![
            leak(3 << 20, 25, grown.clone()),
            // The same stack twice in one report is summed.
            leak(1 << 20, 5, grown),
            leak(1 << 20, 1, native),
            leak(4096, 1, js_stack("newThing", 3)),
            leak(8192, 2, js_stack("cacheSession", 31)),
            // Resident pages of a known stack stay apart from its mapped bytes.
            Leak { sources: vec![Source::Faults], ..leak(2 << 20, 512, js_stack("rememberOrder", 9)) },
        ]);
        (a, b)
    }

    #[test]
    fn matches_stacks_and_orders_growth_first() {
        let (a, b) = a_and_b();
        let d = diff("a.mtr", &a, "b.mtr", &b);
        let summary: Vec<(&str, i64, i64, u64, u64)> = d
            .stacks
            .iter()
            .map(|s| (s.frames[0].function.as_str(), s.delta_bytes, s.delta_count, s.a_bytes, s.b_bytes))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("rememberOrder", 3 << 20, 20, 1 << 20, 4 << 20),
                ("rememberOrder", 2 << 20, 512, 0, 2 << 20),
                ("newThing", 4096, 1, 0, 4096),
                ("malloc", -(3 << 20), -3, 4 << 20, 1 << 20),
            ],
            "unchanged cacheSession is left out"
        );
        assert_eq!(d.stacks[0].frames[2].kind, FrameKind::Unknown, "B's kinds win");
        assert_eq!(d.delta.outstanding_bytes, delta(a.totals.outstanding_bytes, b.totals.outstanding_bytes));
        assert_eq!(d.stacks[1].sources, vec![Source::Faults]);
        assert_eq!(d.grown().count(), 3);
        assert_eq!(d.shrunk().count(), 1);
    }

    #[test]
    fn saturating_delta() {
        assert_eq!(delta(0, u64::MAX), i64::MAX);
        assert_eq!(delta(u64::MAX, 0), i64::MIN);
        assert_eq!(delta(5, 3), -2);
    }

    #[test]
    fn text_names_what_grew() {
        let (a, b) = a_and_b();
        let d = diff("a.mtr", &a, "b.mtr", &b);
        let mut out = Vec::new();
        write_text(&d, 10, &mut out).expect("render text");
        let text = String::from_utf8(out).expect("UTF-8");
        assert!(text.starts_with("memtrace diff: a.mtr -> b.mtr\n"), "{text}");
        let grew = text.find("Grew (3 stacks, +5.0 MiB in all):").expect(&text);
        let first = text.find("#1  +3.0 MiB (1.0 MiB -> 4.0 MiB), +20 allocations").expect(&text);
        let remember = text.find("rememberOrder app.js:9 [js]").expect(&text);
        let new = text.find("+4.0 KiB (0 B -> 4.0 KiB, new in B)").expect(&text);
        let shrank = text.find("Shrank (1 stack, -3.0 MiB in all):").expect(&text);
        assert!(grew < first && first < remember && remember < new && new < shrank);
        assert!(!text.contains("cacheSession"), "{text}");
        assert!(text.contains("WARNING: events were lost (A 7, B 7)"), "{text}");
    }

    #[test]
    fn json_and_folded_carry_the_delta() {
        let (a, b) = a_and_b();
        let d = diff("a.mtr", &a, "b.mtr", &b);
        let mut out = Vec::new();
        write_json(&d, &mut out).expect("render JSON");
        let json: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(json["diff_version"], 1);
        assert_eq!(json["a"]["recording"], "a.mtr");
        assert_eq!(json["stacks"][0]["delta_bytes"], 3 << 20);
        assert_eq!(json["stacks"][3]["delta_bytes"], -(3 << 20));
        assert_eq!(json["stacks"][0]["frames"][0]["function"], "rememberOrder");

        let mut folded = Vec::new();
        export::write_folded(&d.growth_report(), FlameValue::Outstanding, &mut folded)
            .expect("render folded");
        assert_eq!(
            String::from_utf8(folded).expect("UTF-8"),
            "main [node];uv_run [node];handleRequest app.js:22;newThing app.js:3 4096\n\
             main [node];uv_run [node];handleRequest app.js:22;rememberOrder app.js:9 3145728\n"
        );
    }

    #[test]
    fn identical_reports_show_nothing_grew() {
        let (a, _) = a_and_b();
        let d = diff("a.mtr", &a, "a.mtr", &a);
        assert!(d.stacks.is_empty());
        let mut out = Vec::new();
        write_text(&d, 10, &mut out).expect("render text");
        let text = String::from_utf8(out).expect("UTF-8");
        assert!(text.contains("Nothing grew"), "{text}");
        assert!(d.growth_report().leaks.is_empty());
    }
}
