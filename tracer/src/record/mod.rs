//! Recordings (`--record FILE`): the final report of a run, kept in a versioned binary
//! file so that `memtrace report FILE` renders every output later, on another machine,
//! without the target.
//!
//! The file is a [`format`] container holding gzip-compressed JSON sections: the
//! [`Report`] (the JSON contract of DESIGN.md, so a recording renders exactly the JSON
//! of the live run) and a small [`Meta`] section saying who made it. Unknown sections
//! are skipped, so later versions can add data (events, raw stacks) that this version
//! ignores while it keeps reading the report.

pub mod diff;
pub mod format;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

pub use self::format::FormatError;
use self::format::Section;
use crate::report::Report;

/// Section kinds of format version 1.
pub const SECTION_META: u32 = 1;
pub const SECTION_REPORT: u32 = 2;

/// Where a recording comes from; every field may be empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Meta {
    /// The memtrace version that wrote the file.
    pub memtrace_version: String,
    /// When it was written, in seconds since the Unix epoch.
    pub created_unix_s: u64,
    pub hostname: String,
    /// The kernel release of the traced machine.
    pub kernel: String,
    /// memtrace's own command line.
    pub command: Vec<String>,
}

impl Meta {
    /// The metadata of a recording made now, by this process, on this machine.
    #[must_use]
    pub fn here() -> Self {
        let proc_text =
            |path: &str| fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default();
        Self {
            memtrace_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix_s: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            hostname: proc_text("/proc/sys/kernel/hostname"),
            kernel: proc_text("/proc/sys/kernel/osrelease"),
            command: std::env::args().collect(),
        }
    }
}

/// What a recording holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Recording {
    pub meta: Meta,
    pub report: Report,
}

/// Why a recording could not be written or read. Messages start with the file's path.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    #[error("cannot write {}: {error}", path.display())]
    Write { path: PathBuf, error: std::io::Error },
    #[error("{}: {error}", path.display())]
    Format { path: PathBuf, error: FormatError },
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
}

/// The bytes of a recording of `report`.
pub fn encode(meta: &Meta, report: &Report) -> std::io::Result<Vec<u8>> {
    let meta = serde_json::to_vec(meta)?;
    let report = serde_json::to_vec(report)?;
    format::encode(0, &[(SECTION_META, meta.as_slice()), (SECTION_REPORT, report.as_slice())])
}

/// Reads a recording from its bytes.
pub fn decode(bytes: &[u8]) -> Result<Recording, FormatError> {
    let container = format::decode(bytes)?;
    if container.trailing > 0 {
        log::warn!("{} bytes after the recording's end marker were ignored", container.trailing);
    }
    let mut meta = None;
    let mut report = None;
    for section in &container.sections {
        match section.kind {
            SECTION_META if meta.is_none() => meta = Some(json_section(section, "metadata")?),
            SECTION_REPORT if report.is_none() => report = Some(json_section(section, "report")?),
            SECTION_META | SECTION_REPORT => {
                log::warn!("ignored a second section of kind {} at byte {}", section.kind, section.offset);
            }
            kind => log::debug!(
                "skipped section of kind {kind} at byte {} (from a later memtrace)",
                section.offset
            ),
        }
    }
    Ok(Recording {
        // Metadata is informative: a recording without it still renders.
        meta: meta.unwrap_or_default(),
        report: report.ok_or(FormatError::MissingSection("report"))?,
    })
}

fn json_section<T: serde::de::DeserializeOwned>(section: &Section<'_>, what: &str) -> Result<T, FormatError> {
    let data = section.data()?;
    serde_json::from_slice(&data).map_err(|e| FormatError::Corrupt {
        offset: section.offset,
        what: format!("the {what} does not parse: {e}"),
    })
}

/// Writes a recording of `report`, made now, to `path` (atomically: readers see the old
/// file or the whole new one, see [`crate::output`]).
pub fn write_report(path: &Path, report: &Report) -> Result<(), RecordError> {
    let bytes = encode(&Meta::here(), report)
        .map_err(|error| RecordError::Write { path: path.to_path_buf(), error })?;
    crate::output::write_bytes(path, &bytes).map_err(RecordError::Output)
}

/// Reads the recording at `path`.
pub fn read(path: &Path) -> Result<Recording, RecordError> {
    let bytes = fs::read(path).map_err(|error| RecordError::Read { path: path.to_path_buf(), error })?;
    let recording =
        decode(&bytes).map_err(|error| RecordError::Format { path: path.to_path_buf(), error })?;
    let meta = &recording.meta;
    log::info!(
        "{}: recorded by memtrace {} on {} (kernel {}) at {} s since the epoch: {}",
        path.display(),
        meta.memtrace_version,
        meta.hostname,
        meta.kernel,
        meta.created_unix_s,
        meta.command.join(" ")
    );
    Ok(recording)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::report::{Frame, FrameKind, Leak, OomKill, REPORT_VERSION, Target, TimelinePoint, Totals};

    pub(crate) fn frame(function: &str, file: &str, line: u32, kind: FrameKind) -> Frame {
        Frame {
            function: function.to_string(),
            module: if kind == FrameKind::Native { "/usr/bin/node".to_string() } else { String::new() },
            file: file.to_string(),
            line,
            kind,
        }
    }

    pub(crate) fn leak(bytes: u64, count: u64, frames: Vec<Frame>) -> Leak {
        Leak {
            bytes,
            count,
            oldest_age_s: 12.25,
            growth_bytes_per_s: bytes as f64 / 12.25,
            score: bytes as f64 / f64::from(1 << 20),
            sources: vec![crate::report::Source::Mmap],
            frames,
            verdict: crate::report::Verdict::Leak,
            ..Leak::default()
        }
    }

    /// A Node service leaking from `rememberOrder`, OOM-killed, with awkward floats.
    pub(crate) fn report(leaks: Vec<Leak>) -> Report {
        let outstanding = leaks.iter().map(|l| l.bytes).sum();
        Report {
            version: REPORT_VERSION,
            target: Target {
                pid: 4242,
                comm: "node".to_string(),
                cmdline: "node /srv/app.js".to_string(),
                exited: true,
                oom_killed: true,
                exit: None,
                cgroup: None,
            },
            duration_s: 0.1 + 0.2,
            tracked: ["mmap", "brk", "oom"].map(String::from).to_vec(),
            totals: Totals {
                outstanding_bytes: outstanding,
                allocated_bytes: outstanding * 3,
                freed_bytes: outstanding * 2,
                resident_bytes: outstanding / 2,
                views: Vec::new(),
            },
            leaks,
            oom_kills: vec![OomKill {
                pid: 4242,
                comm: "node".to_string(),
                anon_rss_bytes: 503_316_480,
                file_rss_bytes: 12_582_912,
                shmem_rss_bytes: 0,
                total_vm_bytes: 1_288_490_188,
                oom_score_adj: -17,
                cgroup: "/memtrace-demo".to_string(),
                memcg_limit_bytes: u64::MAX,
                ..OomKill::default()
            }],
            timeline: vec![
                TimelinePoint { t_s: 0.0, rss_bytes: 104_857_600, ..TimelinePoint::default() },
                TimelinePoint {
                    t_s: 1.0 / 3.0,
                    rss_bytes: 314_572_800,
                    outstanding_bytes: outstanding,
                    rss_anon_bytes: 300_000_000,
                    rss_file_bytes: 14_572_800,
                    rss_shmem_bytes: 0,
                    resident_bytes: outstanding / 2,
                    ..TimelinePoint::default()
                },
            ],
            lost_events: 7,
            ..Report::default()
        }
    }

    pub(crate) fn js_stack(leaf: &str, line: u32) -> Vec<Frame> {
        vec![
            frame(leaf, "/srv/app.js", line, FrameKind::Js),
            frame("handleRequest", "/srv/app.js", 22, FrameKind::Js),
            frame("uv_run", "", 0, FrameKind::Native),
            frame("main", "", 0, FrameKind::Native),
        ]
    }

    fn sample() -> Report {
        report(vec![
            leak(12_582_912, 300, js_stack("rememberOrder", 9)),
            leak(4096, 1, vec![frame("do_anonymous_page", "", 0, FrameKind::Kernel)]),
            leak(1, 1, Vec::new()),
        ])
    }

    fn json(report: &Report) -> Vec<u8> {
        let mut out = Vec::new();
        crate::export::write_json(report, &mut out).expect("render JSON");
        out
    }

    #[test]
    fn file_round_trip_renders_the_same_json() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("run.mtr");
        let report = sample();
        write_report(&path, &report).expect("write recording");
        let back = read(&path).expect("read recording");
        assert_eq!(back.report, report);
        assert_eq!(json(&back.report), json(&report));
        assert_eq!(back.meta.memtrace_version, env!("CARGO_PKG_VERSION"));
        assert!(back.meta.created_unix_s > 0);
        // Only the recording is left: the temporary file was renamed.
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list temp dir")
            .map(|e| e.expect("dir entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("run.mtr")]);
    }

    #[test]
    fn floats_survive_exactly() {
        // Values from a real run that serde_json's default float parser got wrong.
        let rates = [13_787_164.047_650_801, 941_517.597_040_593_9, 0.1 + 0.2, 1.0 / 3.0, 5e-324, 1e300];
        let mut report = sample();
        report.leaks = rates
            .iter()
            .map(|&rate| Leak { growth_bytes_per_s: rate, score: rate / 7.0, ..leak(1, 1, Vec::new()) })
            .collect();
        let back = decode(&encode(&Meta::default(), &report).expect("encode")).expect("decode");
        assert_eq!(back.report, report);
        assert_eq!(json(&back.report), json(&report));
    }

    #[test]
    fn overwrite_replaces_the_whole_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("run.mtr");
        fs::write(&path, vec![0xaa; 1 << 20]).expect("write a big old file");
        write_report(&path, &Report::default()).expect("write recording");
        assert_eq!(read(&path).expect("read").report, Report::default());
    }

    #[test]
    fn truncated_file_names_path_and_offsets() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("run.mtr");
        let bytes = encode(&Meta::default(), &sample()).expect("encode");
        let cut = bytes.len() - 30;
        fs::write(&path, &bytes[..cut]).expect("write truncated");
        let msg = read(&path).expect_err("truncated").to_string();
        assert!(msg.starts_with(&format!("{}: truncated at byte {cut} (expected ", path.display())), "{msg}");
    }

    #[test]
    fn corrupt_magic_is_not_a_recording() {
        let mut bytes = encode(&Meta::default(), &sample()).expect("encode");
        bytes[1] = b'X';
        let err = decode(&bytes).expect_err("bad magic");
        assert!(err.to_string().starts_with("not a memtrace recording"), "{err}");
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("report.json");
        fs::write(&path, json(&sample())).expect("write JSON");
        let msg = read(&path).expect_err("JSON is not a recording").to_string();
        assert!(msg.contains("report.json: not a memtrace recording"), "{msg}");
        assert!(msg.contains("looks like JSON"), "{msg}");
    }

    #[test]
    fn future_version_is_refused_clearly() {
        let mut bytes = encode(&Meta::default(), &sample()).expect("encode");
        bytes[8..12].copy_from_slice(&9u32.to_le_bytes());
        let err = decode(&bytes).expect_err("version 9");
        assert!(
            err.to_string().starts_with("recording format version 9 is newer than this memtrace (1)"),
            "{err}"
        );
    }

    #[test]
    fn unknown_sections_are_skipped() {
        let report = serde_json::to_vec(&sample()).expect("serialize");
        let bytes = format::encode(
            0x0001_0000,
            &[
                (99, b"from the future".as_slice()),
                (SECTION_REPORT, report.as_slice()),
                (100, b"\x00\x01".as_slice()),
            ],
        )
        .expect("encode");
        let rec = decode(&bytes).expect("read around unknown sections");
        assert_eq!(rec.report, sample());
        assert_eq!(rec.meta, Meta::default());
    }

    #[test]
    fn report_section_is_required() {
        let bytes = format::encode(0, &[(SECTION_META, b"{}".as_slice())]).expect("encode");
        let err = decode(&bytes).expect_err("no report");
        assert_eq!(err.to_string(), "incomplete recording: it holds no report section");
    }

    #[test]
    fn unparsable_report_is_corrupt() {
        let bytes = format::encode(0, &[(SECTION_REPORT, b"{\"version\":".as_slice())]).expect("encode");
        let err = decode(&bytes).expect_err("bad JSON");
        assert!(
            err.to_string().starts_with("corrupt section at byte 16: the report does not parse"),
            "{err}"
        );
    }
}
