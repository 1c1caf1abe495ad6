//! Leaks as root-first stacks with one value each: the common input of the folded,
//! flamegraph and speedscope exporters.

use std::collections::BTreeMap;

use crate::report::{Frame, FrameKind, Leak, Report};

/// Which number of a leak a flamegraph-style export weighs its stacks by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlameValue {
    /// Outstanding bytes.
    #[default]
    Outstanding,
    /// Outstanding allocations.
    Count,
    /// Growth in bytes per second, rounded; shrinking stacks count as zero.
    Growth,
    /// Resident bytes by the stack that first touched them: the bytes of leaks from
    /// page-fault samples (source `faults`); other leaks count as zero.
    Faults,
}

impl FlameValue {
    /// The value of `leak` under this selector.
    #[must_use]
    pub fn of(self, leak: &Leak) -> u64 {
        // Page-fault samples are a second view of memory already counted by the mapping
        // that holds it: only the `Faults` selector shows them, so no total counts twice.
        let faulted = !leak.sources.is_empty() && leak.sources.iter().all(|s| s == "faults");
        match self {
            Self::Faults if leak.sources.iter().any(|s| s == "faults") => leak.bytes,
            Self::Faults => 0,
            _ if faulted => 0,
            Self::Outstanding => leak.bytes,
            Self::Count => leak.count,
            // `as` saturates: NaN and negative rates become 0, huge ones u64::MAX.
            Self::Growth => leak.growth_bytes_per_s.round() as u64,
        }
    }

    /// What the value counts, for axis and tooltip labels.
    #[must_use]
    pub fn unit(self) -> &'static str {
        match self {
            Self::Outstanding | Self::Faults => "bytes",
            Self::Count => "allocations",
            Self::Growth => "bytes/s",
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

/// Every leak whose selected value is non-zero, in report order, with its frames root
/// first. A leak without frames gets a single `[unknown]` frame.
#[must_use]
pub fn weighted_stacks(report: &Report, value: FlameValue) -> Vec<WeightedStack<'_>> {
    report
        .leaks
        .iter()
        .filter_map(|leak| {
            let value = value.of(leak);
            if value == 0 {
                return None;
            }
            let frames =
                if leak.frames.is_empty() { vec![&NO_FRAMES] } else { leak.frames.iter().rev().collect() };
            Some(WeightedStack { frames, value })
        })
        .collect()
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
        assert_eq!(stacks.len(), report.leaks.len());
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
