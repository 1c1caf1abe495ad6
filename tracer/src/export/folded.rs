//! Collapsed stacks (`--folded`): `root;...;leaf value` per line, the input format of
//! flamegraph.pl, inferno and most flamegraph viewers.

use std::io::Write;

use super::ExportError;
pub use super::stacks::FlameValue;
use super::stacks::folded_stacks;
use crate::report::Report;

/// Writes one line per distinct stack, sorted, weighed by `value`. Stacks whose value is
/// zero are left out, so an empty report writes nothing.
pub fn write_folded<W: Write>(report: &Report, value: FlameValue, mut out: W) -> Result<(), ExportError> {
    for (stack, weight) in folded_stacks(report, value) {
        writeln!(out, "{stack} {weight}")?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::fixture::sample_report;

    fn render(report: &Report, value: FlameValue) -> String {
        let mut out = Vec::new();
        write_folded(report, value, &mut out).expect("write folded stacks");
        String::from_utf8(out).expect("folded stacks are UTF-8")
    }

    #[test]
    fn outstanding_bytes_merged_and_sorted() {
        let expected = "\
main [node];[unknown];do_anonymous_page 4096
main [node];uv_run [node];handleRequest app.js:22;rememberOrder app.js:9 12591104
main [node];v8::internal::Heap::AllocateRaw heap.cc:120;malloc [libc.so.6] 1048576
";
        assert_eq!(render(&sample_report(), FlameValue::Outstanding), expected);
    }

    #[test]
    fn counts_and_growth() {
        let expected = "\
main [node];[unknown];do_anonymous_page 1
main [node];uv_run [node];handleRequest app.js:22;rememberOrder app.js:9 302
main [node];v8::internal::Heap::AllocateRaw heap.cc:120;malloc [libc.so.6] 2
";
        assert_eq!(render(&sample_report(), FlameValue::Count), expected);
        assert_eq!(
            render(&sample_report(), FlameValue::Growth),
            "main [node];uv_run [node];handleRequest app.js:22;rememberOrder app.js:9 409600\n"
        );
    }

    #[test]
    fn empty_report_writes_nothing() {
        assert_eq!(render(&Report::default(), FlameValue::Outstanding), "");
    }
}
