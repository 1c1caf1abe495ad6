//! Exporters: render a [`Report`](crate::report::Report) into every output format.
//!
//! One file per format; each takes the report and any [`std::io::Write`]. Report frames
//! are leaf first; the flamegraph-style formats (folded, SVG, speedscope) share
//! [`stacks`], which turns leaks into root-first stacks with one value each.

pub mod flamegraph;
pub mod folded;
pub(crate) mod human;
pub mod json;
pub mod otlp;
pub mod pprof;
pub mod prometheus;
pub mod speedscope;
pub mod stacks;
pub mod text;

#[cfg(test)]
pub(crate) mod fixture;

pub use flamegraph::write_flamegraph;
pub use folded::write_folded;
pub use json::write_json;
pub use pprof::write_pprof;
pub use speedscope::write_speedscope;
pub use stacks::FlameValue;
pub use text::write_text;

/// Why an export failed. The path of the output file is added by the caller.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("write report: {0}")]
    Io(#[from] std::io::Error),
    #[error("serialize report as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("render flamegraph SVG: {0}")]
    Flamegraph(#[source] std::io::Error),
}

/// Renders one export into `path` through [`crate::output::OutputFile`] (a temporary file
/// renamed into place) and says so on stderr: `memtrace: wrote {what} to {path}`.
pub fn write_to_file(
    path: &std::path::Path,
    what: &str,
    render: &dyn Fn(&mut crate::output::OutputFile) -> Result<(), ExportError>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut file = crate::output::OutputFile::create(path)?;
    render(&mut file).with_context(|| format!("write {}", path.display()))?;
    file.commit()?;
    eprintln!("memtrace: wrote {what} to {}", path.display());
    Ok(())
}
