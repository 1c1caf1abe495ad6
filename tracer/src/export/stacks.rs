//! Leaks as root-first stacks with one value each: the common input of the folded,
//! flamegraph and speedscope exporters.

use std::collections::BTreeMap;

use crate::report::{Frame, FrameKind, Report, Source};

/// Which number of a suspect a flamegraph-style export weighs its stacks by. Each
/// selector shows one view: views are never added together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlameValue {
    /// Held bytes in the report's primary view ([`Report::primary_view`]).
    #[default]
    Outstanding,
    /// Held allocations in the primary view.
    Count,
    /// Growth in bytes per second of each suspect (on its largest stack), rounded;
    /// shrinking suspects count as zero.
    Growth,
    /// Resident bytes by the stack that first touched them (the touched view).
    Faults,
    /// Live JS heap bytes (the JS heap view).
    JsHeap,
}

impl FlameValue {
    /// What the value counts, for axis and tooltip labels.
    #[must_use]
    pub fn unit(self) -> &'static str {
        match self {
            Self::Outstanding | Self::Faults | Self::JsHeap => "bytes",
            Self::Count => "allocations",
            Self::Growth => "bytes/s",
        }
    }

    /// The view this selector shows in `report`.
    #[must_use]
    pub fn view(self, report: &Report) -> Source {
        match self {
            Self::Faults => Source::Faults,
            Self::JsHeap => Source::JsHeap,
            Self::Outstanding | Self::Count | Self::Growth => report.primary_view(),
        }
    }
}

/// Stands in for the stack of a leak that has no frames.
static NO_FRAMES: Frame = Frame {
    function: String::new(),
    module: String::new(),
    file: String::new(),
    line: 0,
    kind: FrameKind::Unknown,
};

/// One leak's stack, root first, with its selected value.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedStack<'a> {
    pub frames: Vec<&'a Frame>,
    pub value: u64,
}

/// Every stack variant of every suspect with a non-zero value under the selector, in
/// report order, frames root first. A stack without frames gets a single `[unknown]`
/// frame.
#[must_use]
pub fn weighted_stacks(report: &Report, value: FlameValue) -> Vec<WeightedStack<'_>> {
    let view = value.view(report);
    let mut out = Vec::new();
    for leak in report.all_suspects() {
        if value == FlameValue::Growth {
            // `as` saturates: NaN and negative rates become 0, huge ones u64::MAX.
            let growth = leak.growth_bytes_per_s.round() as u64;
            if growth > 0 && leak.view.is_none_or(|s| s.shown_in(view)) {
                out.push(WeightedStack { frames: root_first(&leak.frames), value: growth });
            }
            continue;
        }
        if leak.variants.is_empty() {
            // A version-1 suspect: one stack, one view.
            let v = leak.variants_or_self();
            if v[0].source.is_some_and(|s| s.shown_in(view)) {
                let n = if value == FlameValue::Count { leak.count } else { leak.bytes };
                if n > 0 {
                    out.push(WeightedStack { frames: root_first(&leak.frames), value: n });
                }
            }
            continue;
        }
        for variant in leak.variants.iter().filter(|v| v.source.is_some_and(|s| s.shown_in(view))) {
            let n = if value == FlameValue::Count { variant.count } else { variant.bytes };
            if n > 0 {
                out.push(WeightedStack { frames: root_first(&variant.frames), value: n });
            }
        }
    }
    out
}

fn root_first(frames: &[Frame]) -> Vec<&Frame> {
    if frames.is_empty() { vec![&NO_FRAMES] } else { frames.iter().rev().collect() }
}

/// Collapsed stacks: `root;...;leaf` to the summed value, identical stacks merged and
/// sorted lexicographically.
#[must_use]
pub fn folded_stacks(report: &Report, value: FlameValue) -> BTreeMap<String, u64> {
    let mut folded = BTreeMap::new();
    for stack in weighted_stacks(report, value) {
        let key = stack.frames.iter().map(|frame| folded_label(frame)).collect::<Vec<_>>().join(";");
        let sum: &mut u64 = folded.entry(key).or_default();
        *sum = sum.saturating_add(stack.value);
    }
    folded
}

/// [`Frame::label`] made safe for one field of a folded line: no `;` (the frame
/// separator), no line breaks, and no trailing ` <number>`, which flamegraph tools would
/// read as the sample count.
#[must_use]
pub fn folded_label(frame: &Frame) -> String {
    let label: String = frame
        .label()
        .chars()
        .map(|c| match c {
            ';' => ':',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect();
    let mut label = label.trim().to_string();
    if let Some(space) = label.rfind(' ') {
        let tail = &label[space + 1..];
        if !tail.is_empty() && tail.chars().all(|c| c.is_ascii_digit() || c == '.') {
            label.replace_range(space..=space, "_");
        }
    }
    if label.is_empty() { "[unknown]".to_string() } else { label }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::fixture::{frame, sample_report};

    #[test]
    fn stacks_are_root_first_and_skip_zero_values() {
        let report = sample_report();
        let stacks = weighted_stacks(&report, FlameValue::Outstanding);
        // Every mapped and arena stack of every suspect and segment; the touched variant
        // of the same memory is not among them.
        assert_eq!(stacks.len(), 4);
        assert_eq!(stacks.iter().map(|s| s.value).sum::<u64>(), report.totals.outstanding_bytes);
        assert_eq!(stacks[0].frames.first().map(|f| f.function.as_str()), Some("main"));
        assert_eq!(stacks[0].frames.last().map(|f| f.function.as_str()), Some("rememberOrder"));
        // Only the first leak grows; the others are flat or shrinking.
        let growing = weighted_stacks(&report, FlameValue::Growth);
        assert_eq!(growing.len(), 1);
        assert_eq!(growing[0].value, 409_600);
        let faulted = weighted_stacks(&report, FlameValue::Faults);
        assert_eq!(
            faulted.iter().map(|s| s.value).collect::<Vec<_>>(),
            vec![12_582_912],
            "only leaks with the faults source"
        );
    }

    #[test]
    fn labels_are_sanitized() {
        let mut f = frame("drop<[u8; 8]>\nnext", "", "", 0, FrameKind::Native);
        assert_eq!(folded_label(&f), "drop<[u8: 8]> next");
        f.function = "anonymous 42".to_string();
        assert_eq!(folded_label(&f), "anonymous_42");
        f.function = " \t ".to_string();
        assert_eq!(folded_label(&f), "[unknown]");
    }
}
