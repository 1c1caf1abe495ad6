//! The report: what every exporter renders. Its JSON form is the contract of
//! DESIGN.md (version 1): sizes in bytes, times in seconds, frames leaf first.

use serde::{Deserialize, Serialize};

/// Version of the JSON report. Bump it when a field changes meaning.
pub const REPORT_VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub version: u32,
    pub target: Target,
    pub duration_s: f64,
    /// Sources traced: `mmap`, `brk`, `faults`, `malloc`, `oom`.
    pub tracked: Vec<String>,
    pub totals: Totals,
    /// Sorted by `score`, highest first.
    pub leaks: Vec<Leak>,
    pub oom_kills: Vec<OomKill>,
    pub timeline: Vec<TimelinePoint>,
    pub lost_events: u64,
    #[serde(default)]
    pub warnings: Vec<Warning>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    pub exited: bool,
    pub oom_killed: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Bytes allocated while tracing and not released when the report was made.
    pub outstanding_bytes: u64,
    pub allocated_bytes: u64,
    pub freed_bytes: u64,
    /// Resident bytes first touched while tracing and still held, by the page-fault
    /// samples (a second view of the same memory: not part of `outstanding_bytes`).
    #[serde(default)]
    pub resident_bytes: u64,
}

/// Outstanding memory grouped by the stack that allocated it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Leak {
    pub bytes: u64,
    pub count: u64,
    pub oldest_age_s: f64,
    pub growth_bytes_per_s: f64,
    pub score: f64,
    /// Which tracked sources contributed: `mmap`, `brk`, `malloc`, `faults`.
    pub sources: Vec<String>,
    /// Leaf first.
    pub frames: Vec<Frame>,
    /// `leak` (still growing at the end), `warm-up` (grew, then flat), `churn` (gives
    /// memory back), or `unknown` (too few snapshots).
    #[serde(default)]
    pub verdict: String,
    /// Why it was ranked so, e.g. "grew 31 MB/min in 9 of 10 intervals".
    #[serde(default)]
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Frame {
    pub function: String,
    pub module: String,
    pub file: String,
    pub line: u32,
    pub kind: FrameKind,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameKind {
    Native,
    Js,
    Kernel,
    #[default]
    Unknown,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OomKill {
    pub pid: u32,
    pub comm: String,
    pub anon_rss_bytes: u64,
    pub file_rss_bytes: u64,
    pub shmem_rss_bytes: u64,
    pub total_vm_bytes: u64,
    pub oom_score_adj: i64,
    pub cgroup: String,
    pub memcg_limit_bytes: u64,
    /// Seconds since tracing started.
    #[serde(default)]
    pub t_s: f64,
    #[serde(default)]
    pub cmdline: String,
    /// `cgroup` when the victim's memory cgroup hit its limit, `machine` when the whole
    /// machine ran out, `unknown` when the victim's cgroup could not be read.
    #[serde(default)]
    pub scope: String,
    /// The task that was running (allocating) when the kernel chose the victim.
    #[serde(default)]
    pub trigger_pid: u32,
    #[serde(default)]
    pub trigger_comm: String,
    #[serde(default)]
    pub pgtables_bytes: u64,
    #[serde(default)]
    pub uid: Option<u32>,
    /// Memory charged to the victim's cgroup when the kill was seen.
    #[serde(default)]
    pub memcg_usage_bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    pub t_s: f64,
    pub rss_bytes: u64,
    pub outstanding_bytes: u64,
    #[serde(default)]
    pub rss_anon_bytes: u64,
    #[serde(default)]
    pub rss_file_bytes: u64,
    #[serde(default)]
    pub rss_shmem_bytes: u64,
    /// Resident bytes attributed to stacks by page-fault samples.
    #[serde(default)]
    pub resident_bytes: u64,
    /// Memory charged to the target's cgroup, and its limit (0: none or unknown).
    #[serde(default)]
    pub memcg_usage_bytes: u64,
    #[serde(default)]
    pub memcg_limit_bytes: u64,
    /// Heap blocks allocated while tracing and not freed (`--track malloc`; 0 otherwise).
    #[serde(default)]
    pub heap_bytes: u64,
}

/// Something the user was told during the run (e.g. `--warn-at` crossed).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Warning {
    pub t_s: f64,
    pub message: String,
}

impl Frame {
    /// One-line rendering used by the text report and the folded/flamegraph exporters:
    /// `function` plus ` file:line` where known, or the module when there is no file.
    #[must_use]
    pub fn label(&self) -> String {
        let function = if self.function.is_empty() { "[unknown]" } else { &self.function };
        if !self.file.is_empty() && self.line > 0 {
            let file = self.file.rsplit('/').next().unwrap_or(&self.file);
            format!("{function} {file}:{}", self.line)
        } else if !self.module.is_empty() {
            let module = self.module.rsplit('/').next().unwrap_or(&self.module);
            format!("{function} [{module}]")
        } else {
            function.to_string()
        }
    }
}
