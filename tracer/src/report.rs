//! The report: what every exporter renders. Its JSON form is the contract of
//! DESIGN.md (version 1): sizes in bytes, times in seconds, frames leaf first.

use serde::{Deserialize, Serialize};

/// Version of the JSON report. Bump it when a field changes meaning.
///
/// Version 2: `leaks` holds only flagged suspects, one per culprit (others are in
/// `other_suspects`, segment growth in `segments`); `sources` may name `js-heap`.
pub const REPORT_VERSION: u32 = 2;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub version: u32,
    pub target: Target,
    pub duration_s: f64,
    /// What was traced: `mmap`, `brk`, `faults`, `malloc`, `js-heap`, `oom`.
    pub tracked: Vec<String>,
    pub totals: Totals,
    /// Flagged suspects (`leak`, or growing with too few snapshots to judge), one per
    /// culprit, sorted by `score`, highest first.
    pub leaks: Vec<Leak>,
    pub oom_kills: Vec<OomKill>,
    pub timeline: Vec<TimelinePoint>,
    pub lost_events: u64,
    #[serde(default)]
    pub warnings: Vec<Warning>,
    /// Culprits that hold memory without a `leak` verdict: warm-up, churn (in flight when
    /// tracing stopped), unattributed (first touch only).
    #[serde(default)]
    pub other_suspects: Vec<Leak>,
    /// Segments (malloc arenas, V8 heap pages) that grew, with who extended them.
    #[serde(default)]
    pub segments: Vec<SegmentGrowth>,
    /// Where the resident memory is.
    #[serde(default)]
    pub memory: Option<MemoryBreakdown>,
    /// When the cgroup limit is reached at the recent rate (absent in older reports).
    #[serde(default)]
    pub time_to_limit: Option<TimeToLimit>,
    /// Every process traced: the targets, and with `--children` the processes they forked.
    #[serde(default)]
    pub processes: Vec<Process>,
}

/// A process traced in the run. A pid names one process here: a reused pid is another
/// entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    /// Its pid in its own pid namespace (a container's), when that differs from `pid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ns_pid: Option<u32>,
    /// The traced process that forked it (absent for a target).
    pub parent_pid: Option<u32>,
    pub comm: String,
    pub cmdline: String,
    /// Seconds since tracing started (negative: it started before).
    pub started_s: f64,
    /// Seconds since tracing started; absent while it runs.
    pub exited_s: Option<f64>,
    pub oom_killed: bool,
    /// Times it exec'd while traced (each replaces its memory with a new image's).
    pub execs: u32,
}

/// A suspect's memory in one process, in the suspect's view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessShare {
    pub pid: u32,
    pub bytes: u64,
    pub count: u64,
    /// The process ended while traced: this is what it held when it exited.
    pub exited: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    pub exited: bool,
    pub oom_killed: bool,
    /// How the target ended, when it ended while traced and memtrace could tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<Exit>,
    /// `--cgroup`: the cgroup traced (its directory); `pid` is then its first process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// How a process ended: its exit code, or the signal that killed it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Exit {
    /// The code it passed to `exit` (absent when a signal killed it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that killed it, by name (`SIGSEGV`) and number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal_number: Option<i32>,
    /// Whether the kernel wrote a core dump.
    pub core_dumped: bool,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.signal, self.signal_number, self.code) {
            (Some(name), _, _) => write!(f, "killed by {name}")?,
            (None, Some(n), _) => write!(f, "killed by signal {n}")?,
            (None, None, Some(code)) => write!(f, "exited with code {code}")?,
            (None, None, None) => write!(f, "exited")?,
        }
        if self.core_dumped {
            write!(f, " (core dumped)")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Bytes allocated while tracing and not released when the report was made.
    pub outstanding_bytes: u64,
    pub allocated_bytes: u64,
    pub freed_bytes: u64,
    /// Resident bytes first touched while tracing and still held, by the page-fault
    /// samples (a second view of the same memory: not part of `outstanding_bytes`).
    #[serde(default)]
    pub resident_bytes: u64,
    /// Every view's total, over all suspects and segments.
    #[serde(default)]
    pub views: Vec<ViewTotal>,
}

/// A view of held memory: each source of evidence says how many bytes a stack holds in
/// it. Views are never added together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// Anonymous mappings made while traced (`mmap`, `mremap`), by the stack that mapped them.
    #[default]
    Mmap,
    /// Growth of the program break: glibc's main arena.
    Brk,
    /// Resident pages by the stack that first touched them (sampled page faults).
    Faults,
    /// Heap blocks from the malloc family (`--track malloc`).
    Malloc,
    /// Live objects on the V8 heap, from V8's sampling heap profiler.
    JsHeap,
}

impl Source {
    /// The name used in `--track`, the JSON and labels.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Mmap => "mmap",
            Self::Brk => "brk",
            Self::Faults => "faults",
            Self::Malloc => "malloc",
            Self::JsHeap => "js-heap",
        }
    }

    /// What the view's bytes are, for column headers.
    #[must_use]
    pub fn view(self) -> &'static str {
        match self {
            Self::Mmap => "mapped",
            Self::Brk => "arena",
            Self::Faults => "touched",
            Self::Malloc => "malloc",
            Self::JsHeap => "js-heap",
        }
    }

    /// Whether bytes in this view belong to the stack that holds them, so that their
    /// growth can support a `leak` verdict. The program break grows for whichever malloc
    /// crosses the top, and a page is first touched by whoever writes it first (the
    /// allocator, the garbage collector, a later user of reused memory): neither says
    /// who holds the memory.
    #[must_use]
    pub fn names_holder(self) -> bool {
        matches!(self, Self::Mmap | Self::Malloc | Self::JsHeap)
    }

    /// Whether memory seen in `self` is shown when an export shows `view`: the program
    /// break and anonymous mappings are both address ranges mapped while traced (never
    /// the same bytes), so the mapped view's exports include the break's growth.
    #[must_use]
    pub fn shown_in(self, view: Self) -> bool {
        self == view || view == Self::Mmap && self == Self::Brk
    }

    /// Parses [`Self::name`].
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Mmap, Self::Brk, Self::Faults, Self::Malloc, Self::JsHeap]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the growth of held memory says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Still growing at the end, and keeps what it took.
    Leak,
    /// Grew, then flat (a cache, a pool).
    WarmUp,
    /// Gives memory back; what it holds at the end is in flight.
    Churn,
    /// Grew, but what it holds is young: most of it was allocated late in the trace
    /// (garbage not yet collected, a burst in progress, or a leak that started late).
    InFlight,
    /// Too few snapshots to judge.
    #[default]
    Unknown,
    /// Seen only in a view that cannot say who holds the memory (first touch, or the
    /// growth of a segment such as a malloc arena): no verdict is made.
    Unattributed,
}

impl Verdict {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Leak => "leak",
            Self::WarmUp => "warm-up",
            Self::Churn => "churn",
            Self::InFlight => "in-flight",
            Self::Unknown => "unknown",
            Self::Unattributed => "unattributed",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One suspect: the memory held by stacks that share a culprit, the first frame from
/// the leaf that is the application's (see `analysis::culprit`). Its `bytes`, `count`,
/// growth and verdict come from one view, `view`; `evidence` has every view's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Leak {
    pub bytes: u64,
    pub count: u64,
    pub oldest_age_s: f64,
    pub growth_bytes_per_s: f64,
    pub score: f64,
    /// Views with evidence for this culprit.
    pub sources: Vec<Source>,
    /// The largest stack variant's frames, leaf first.
    pub frames: Vec<Frame>,
    #[serde(default)]
    pub verdict: Verdict,
    /// Why it was ranked so, e.g. "grew 31 MB/min in 9 of 10 intervals".
    #[serde(default)]
    pub reason: String,
    /// The frame to fix.
    #[serde(default)]
    pub culprit: Frame,
    /// The next application frame towards the root: one culprit called from two places
    /// (an allocation helper) is two suspects.
    #[serde(default)]
    pub caller: Option<Frame>,
    /// The view `bytes` and the verdict come from (absent in version-1 reports).
    #[serde(default)]
    pub view: Option<Source>,
    /// What each view says about this culprit.
    #[serde(default)]
    pub evidence: Vec<Evidence>,
    /// The distinct stacks under the culprit, per view, biggest first.
    #[serde(default)]
    pub variants: Vec<Variant>,
    /// The process holding the most of it (0 in reports made before processes were kept).
    #[serde(default)]
    pub pid: u32,
    /// Its memory in each process that holds some, in `view`, most first: a culprit found
    /// in several workers is one suspect.
    #[serde(default)]
    pub processes: Vec<ProcessShare>,
}

/// A culprit's memory in one view.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub source: Option<Source>,
    pub bytes: u64,
    pub count: u64,
    pub growth_bytes_per_s: f64,
    pub verdict: Verdict,
}

/// One stack under a culprit, in one view.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    pub source: Option<Source>,
    pub bytes: u64,
    pub count: u64,
    /// Leaf first.
    pub frames: Vec<Frame>,
}

/// A region that grows as a whole, whose growth the stack that extended it does not own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SegmentKind {
    /// glibc's arenas: the program break and the arena heaps of other threads.
    #[default]
    MallocArena,
    /// Pages of V8's heap, mapped by V8's page allocator and garbage collector.
    V8Heap,
}

impl SegmentKind {
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::MallocArena => "malloc arena",
            Self::V8Heap => "V8 heap pages",
        }
    }
}

/// What the growth of a segment says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SegmentVerdict {
    Growing,
    #[default]
    Flat,
    /// The segment grows while the live blocks inside it do not.
    Fragmentation,
}

/// A growing segment and the stacks that extended it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SegmentGrowth {
    pub kind: SegmentKind,
    /// Held in the view that extends the segment (`brk`/`mmap`), at the end.
    pub bytes: u64,
    pub growth_bytes_per_s: f64,
    pub verdict: SegmentVerdict,
    pub reason: String,
    /// How to see who holds memory inside it, and what that costs.
    pub advice: String,
    /// Who extended it (or first touched it); not who holds it.
    pub extended_by: Vec<Leak>,
}

/// Where the target's resident memory is, from `/proc/PID/smaps`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryParts {
    pub v8_heap_bytes: u64,
    pub malloc_arena_bytes: u64,
    pub anon_mapping_bytes: u64,
    pub thread_stack_bytes: u64,
    pub jit_code_bytes: u64,
    pub file_bytes: u64,
    pub other_bytes: u64,
}

impl MemoryParts {
    /// Each part with its label, in a fixed order.
    #[must_use]
    pub fn parts(&self) -> [(&'static str, u64); 7] {
        [
            ("V8 heap", self.v8_heap_bytes),
            ("malloc arenas", self.malloc_arena_bytes),
            ("anonymous mappings", self.anon_mapping_bytes),
            ("thread stacks", self.thread_stack_bytes),
            ("JIT code", self.jit_code_bytes),
            ("file-backed", self.file_bytes),
            ("other", self.other_bytes),
        ]
    }

    #[must_use]
    pub fn total(&self) -> u64 {
        self.parts().iter().map(|(_, b)| b).sum()
    }
}

/// The resident memory's parts at the first and last snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBreakdown {
    pub first: MemoryParts,
    pub last: MemoryParts,
    /// Seconds between the two.
    pub span_s: u64,
}

/// One view's total: what no export may exceed or mix with another view's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewTotal {
    pub source: Option<Source>,
    pub bytes: u64,
    pub count: u64,
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
    /// V8's heap of a Node target with the JS heap view (`process.memoryUsage()`: used
    /// and total heap, external memory and `ArrayBuffer`s; 0 without the view).
    #[serde(default)]
    pub v8_heap_used_bytes: u64,
    #[serde(default)]
    pub v8_heap_total_bytes: u64,
    #[serde(default)]
    pub v8_external_bytes: u64,
    #[serde(default)]
    pub v8_array_buffers_bytes: u64,
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

impl Report {
    /// Every suspect: flagged, others, and the extenders of segments.
    pub fn all_suspects(&self) -> impl Iterator<Item = &Leak> {
        self.leaks
            .iter()
            .chain(&self.other_suspects)
            .chain(self.segments.iter().flat_map(|s| s.extended_by.iter()))
    }

    /// The view the report's bytes are best told in: the top leak's, else the view that
    /// names holders with the most bytes, else the mapped view.
    #[must_use]
    pub fn primary_view(&self) -> Source {
        if let Some(view) = self.leaks.first().and_then(|l| l.view) {
            return view;
        }
        self.totals
            .views
            .iter()
            .filter_map(|v| v.source.filter(|s| s.names_holder()).map(|s| (v.bytes, s)))
            .max()
            .map_or(Source::Mmap, |(_, s)| s)
    }

    /// Views with any evidence, in a fixed order.
    #[must_use]
    pub fn views_present(&self) -> Vec<Source> {
        let mut out: Vec<Source> = self.all_suspects().flat_map(|l| l.sources.iter().copied()).collect();
        out.sort();
        out.dedup();
        out
    }
}

impl Leak {
    /// The stack variants; a version-1 suspect (no variants) is its own one variant.
    #[must_use]
    pub fn variants_or_self(&self) -> Vec<Variant> {
        if !self.variants.is_empty() {
            return self.variants.clone();
        }
        // Version 1 put mapped and touched memory in separate suspects.
        let source = if self.sources.iter().all(|s| *s == Source::Faults) && !self.sources.is_empty() {
            Source::Faults
        } else {
            self.sources.first().copied().unwrap_or_default()
        };
        vec![Variant {
            source: Some(source),
            bytes: self.bytes,
            count: self.count,
            frames: self.frames.clone(),
        }]
    }

    /// Bytes held in one view.
    #[must_use]
    pub fn bytes_in(&self, view: Source) -> u64 {
        self.variants_or_self().iter().filter(|v| v.source == Some(view)).map(|v| v.bytes).sum()
    }
}

/// At the rate memory grew lately, when the memory cgroup's limit is reached.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimeToLimit {
    pub state: LimitState,
    /// What is compared with the limit: `memcg` (the cgroup's charged memory, what the
    /// kernel compares) or `rss` (the target's, when the cgroup's cannot be read).
    pub basis: String,
    /// 0: no limit.
    pub limit_bytes: u64,
    pub usage_bytes: u64,
    /// Least-squares slope over the recent window.
    pub growth_bytes_per_s: f64,
    /// Seconds until the limit at that rate (`growing`; 0 when `reached`).
    pub seconds: Option<f64>,
    /// Seconds of timeline the rate was fitted over.
    pub window_s: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitState {
    /// Growing clearly: `seconds` says when the limit is reached.
    Growing,
    /// Usage is at the limit now.
    Reached,
    /// Flat, shrinking, or moving less than the noise.
    NotGrowing,
    /// The cgroup has no limit (or none could be read).
    NoLimit,
    /// Too few timeline points to fit a rate.
    #[default]
    Unknown,
}
