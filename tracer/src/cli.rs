//! Command line: `memtrace attach|run|oom|report|doctor`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{duration::parse_duration, export::FlameValue};

/// `:9464` → 127.0.0.1:9464 (loopback unless told otherwise); else a socket address.
fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') { format!("127.0.0.1{s}") } else { s.to_string() };
    full.parse().map_err(|_| format!("invalid address {s:?}: expected e.g. :9464 or 127.0.0.1:9464"))
}

/// `80%` or `0.8` → 0.8.
fn parse_share(s: &str) -> Result<f64, String> {
    let (num, scale) = s.strip_suffix('%').map_or((s, 1.0), |n| (n, 100.0));
    let v: f64 = num.trim().parse().map_err(|_| format!("invalid share {s:?}: expected e.g. 80%"))?;
    let v = v / scale;
    if v > 0.0 && v <= 1.0 { Ok(v) } else { Err(format!("{s} is not between 0% and 100%")) }
}

#[derive(Debug, Parser)]
#[command(
    name = "memtrace",
    version,
    about = "Find the code that holds memory in a live process, from the kernel, with eBPF",
    long_about = "memtrace traces a running process (or one it launches) with eBPF and reports \
which stacks hold memory that is never given back, with native and Node.js JavaScript frames, \
the memory timeline, and OOM kills.\n\nRun Node.js with --perf-basic-prof (and \
--interpreted-frames-native-stack) so that JavaScript frames are named."
)]
pub struct Cli {
    /// More logging (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace running processes until Ctrl-C, SIGTERM, --duration, or their exit.
    Attach {
        /// Process ids to trace (all their threads); the report is for the first.
        #[arg(required_unless_present = "cgroup", num_args = 1.., value_name = "PID")]
        pids: Vec<u32>,
        /// Trace every process of this cgroup and its sub-cgroups (v2 or v1: a systemd
        /// unit's, e.g. /sys/fs/cgroup/system.slice/app.service, or a container's), and
        /// each process that joins them or is forked in them while tracing. A path as
        /// /proc/PID/cgroup shows it is looked up under /sys/fs/cgroup. Tracing goes on when
        /// the cgroup empties, until --duration or Ctrl-C.
        #[arg(long, value_name = "PATH")]
        cgroup: Option<PathBuf>,
        #[command(flatten)]
        trace: TraceArgs,
    },
    /// Watch a running process live, full screen (`attach --live`); q stops tracing and
    /// writes every output asked for, as Ctrl-C does.
    Top {
        /// Process id to trace (all its threads).
        pid: u32,
        #[command(flatten)]
        trace: TraceArgs,
    },
    /// Launch a command and trace it from its first instruction.
    Run {
        /// Run the command as root. By default, when memtrace runs through sudo, the
        /// command runs as the user who ran sudo (`SUDO_UID`/`SUDO_GID`, with that user's
        /// groups, HOME, USER and LOGNAME).
        #[arg(long)]
        as_root: bool,
        #[command(flatten)]
        trace: TraceArgs,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Watch the whole machine for OOM kills.
    Oom {
        /// Stop after this long (default: until Ctrl-C).
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Write the OOM records as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Render a recording made with --record, or show what grew between two.
    Report {
        /// A recording written by `memtrace attach|run --record FILE`.
        recording: PathBuf,
        /// Show what grew from RECORDING (earlier) to this later recording.
        ///
        /// Stacks are matched by their frames (function, module, file and line) and
        /// weighed by outstanding bytes in the later recording minus the earlier one.
        /// The text report lists the stacks that grew, most first, then those that
        /// shrank. --json writes a diff document (`diff_version` 1) with both sides and
        /// every changed stack's `delta_bytes` (negative when it shrank). --folded and
        /// --flamegraph show only the stacks that grew, weighed by the bytes they grew
        /// (folded stacks cannot carry negative values). --pprof, --speedscope and
        /// --flamegraph-kind do not apply.
        #[arg(long, value_name = "LATER")]
        diff: Option<PathBuf>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Check whether this machine and user can run memtrace.
    Doctor,
}

/// Sources that can be tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Track {
    /// mmap, munmap, mremap, mprotect, madvise (syscall tracepoints, ~1% overhead).
    Mmap,
    /// brk (the glibc main heap growing and shrinking).
    Brk,
    /// First-touch page faults, sampled (RSS attribution: who made RSS grow).
    Faults,
    /// malloc-family uprobes: heap blocks by call site, exact but costly (three traps per
    /// malloc+free pair, each on an instruction the kernel emulates; a Node service keeps
    /// well under 25% of its throughput). See --malloc-probes node-buffers for Node.
    Malloc,
    /// OOM kills, machine-wide.
    Oom,
}

impl Track {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Mmap => "mmap",
            Self::Brk => "brk",
            Self::Faults => "faults",
            Self::Malloc => "malloc",
            Self::Oom => "oom",
        }
    }
}

#[derive(Debug, Args, Clone)]
#[command(group = clap::ArgGroup::new("push").args(["pyroscope", "otlp_profiles"]).multiple(true))]
pub struct TraceArgs {
    /// Stop after this long (e.g. 30s, 10m, 1h); default: until Ctrl-C or the target exits.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// What to trace (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "mmap,brk,faults,oom")]
    pub track: Vec<Track>,
    /// Also trace every process the targets fork (and theirs), from its first instruction:
    /// worker pools, `cluster` workers, sandboxed job processes. Not with --track malloc.
    #[arg(long)]
    pub children: bool,
    /// How often to take a timeline snapshot (default: a twentieth of --duration,
    /// between 1s and 10s; 5s without --duration).
    #[arg(long, value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Page faults: send one in N first touches with its stack (each stands for N pages).
    /// Lower is more precise and costs more.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub fault_sample: u32,
    /// Warn (on stderr and in the report) when the target's memory cgroup usage reaches
    /// this share of its limit, e.g. `80%`, with the stacks growing at that moment.
    #[arg(long, value_parser = parse_share)]
    pub warn_at: Option<f64>,
    /// Report only memory older than this.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub min_age: Duration,
    /// Bytes of user stack copied per allocation event for unwinding (512..=16384).
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(512..=16384))]
    pub stack_bytes: u32,
    /// Ring buffer size in MiB (power of two).
    #[arg(long, default_value_t = 16)]
    pub ring_buffer_mib: u32,
    /// Memory memtrace may spend on its stack table, in MiB. Near it, stacks that hold no
    /// memory and were not seen for a minute are forgotten; at it, new stacks are
    /// reported as unknown (both are counted in the status line).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub stack_table_mib: u64,
    /// Serve Prometheus metrics over HTTP at this address while tracing, e.g. `:9464`
    /// (which means 127.0.0.1:9464) or `0.0.0.0:9464` to expose them beyond this machine.
    #[arg(long, value_parser = parse_listen_addr)]
    pub metrics: Option<SocketAddr>,
    /// Write a recording of the run for `memtrace report` (written when tracing stops,
    /// however it stops).
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Frames the culprit search skips, as a regular expression matched against a frame's
    /// `function file:line` and its module (repeatable), e.g. `--culprit-skip '^myLogger'`.
    #[arg(long = "culprit-skip", value_name = "REGEX")]
    pub culprit_skip: Vec<String>,
    /// Push the profile (as --pprof writes it) to Grafana Pyroscope at this URL every
    /// --interval and at the end, e.g. `http://pyroscope:4040`. Authentication from
    /// `$MEMTRACE_PYROSCOPE_TOKEN` (bearer) or `$MEMTRACE_PYROSCOPE_BASIC_AUTH`
    /// (user:password), the tenant from `$MEMTRACE_PYROSCOPE_TENANT`. Failed pushes are
    /// counted, never fatal.
    #[arg(long, value_name = "URL")]
    pub pyroscope: Option<String>,
    /// Push the profile as OTLP profiles (the alpha `v1development` signal) to an
    /// OpenTelemetry collector's OTLP/HTTP endpoint every --interval and at the end, e.g.
    /// `http://collector:4318`. Headers from `$OTEL_EXPORTER_OTLP_HEADERS`.
    #[arg(long, value_name = "URL")]
    pub otlp_profiles: Option<String>,
    /// A label of the pushed profiles (repeatable; a resource attribute in OTLP);
    /// `service_name` defaults to the target's command name.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = crate::push::pyroscope::parse_label, requires = "push")]
    pub labels: Vec<(String, String)>,
    /// Show a full-screen live view while tracing, refreshed every second (the timeline
    /// interval defaults to 1s). Needs a terminal; without one, the status line is shown.
    #[arg(long)]
    pub live: bool,
    /// The JS heap view of a Node.js target: live JS objects by the JS stack that made
    /// them, from V8's sampling heap profiler. `auto` opens it for Node targets: memtrace
    /// sends SIGUSR1 (which an application's own SIGUSR1 listener also receives), its
    /// inspector listens for one round trip (tens of milliseconds) while memtrace installs
    /// an in-process agent, and is closed again; the agent stops when memtrace does, however
    /// it stops. A target started with --inspect keeps its inspector as it was.
    #[arg(long, value_enum, default_value_t = JsHeapMode::Auto, value_name = "MODE")]
    pub js_heap: JsHeapMode,
    /// The JS heap view samples one allocation per this many bytes on average (V8's
    /// sampling interval): lower is more precise and costs the target more.
    #[arg(long, value_parser = crate::heap::parse_size, default_value = "512k", value_name = "BYTES")]
    pub js_heap_interval: u64,
    /// How often the JS heap view reads V8's profile (default 30s, or a sixth of
    /// --duration when that is shorter; never more often than --interval; also once at
    /// the end). Each read makes V8 run a full garbage collection, after which a busy
    /// service recompiles its hot functions: every 6.5 s that cost the example service 8%
    /// of its throughput, every 1 s 17%. Lower gives the view's growth more points and
    /// costs the target more.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub js_heap_every: Option<Duration>,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub malloc: crate::heap::MallocArgs,
}

/// `--js-heap`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum JsHeapMode {
    /// Open the view when the target is Node.js.
    #[default]
    Auto,
    /// Never send the target SIGUSR1 nor open its inspector.
    Off,
}

/// What the flamegraph weighs each stack by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FlameKind {
    /// Bytes still allocated at the end.
    #[default]
    Outstanding,
    /// Allocations still not freed at the end.
    Count,
    /// How fast each stack's outstanding bytes grew, in bytes per second.
    Growth,
    /// All bytes allocated while tracing, freed or not (not kept per stack yet).
    Allocated,
    /// Resident bytes by the stack that first touched them (needs --track faults).
    Faults,
}

impl FlameKind {
    /// The exporters' value for this kind, or why a report of the `tracked` sources
    /// cannot provide it.
    pub fn flame_value<S: AsRef<str>>(self, tracked: &[S]) -> Result<FlameValue, String> {
        match self {
            Self::Outstanding => Ok(FlameValue::Outstanding),
            Self::Count => Ok(FlameValue::Count),
            Self::Growth => Ok(FlameValue::Growth),
            Self::Allocated => Err(
                "--flamegraph-kind allocated: reports keep outstanding bytes, counts and growth per stack, not bytes allocated; use outstanding, count or growth"
                    .to_string(),
            ),
            Self::Faults if tracked.iter().any(|t| t.as_ref() == "faults") => Ok(FlameValue::Faults),
            Self::Faults => Err(format!(
                "--flamegraph-kind faults: page faults were not traced (tracked: {}); trace with --track including faults, or use outstanding, count or growth",
                tracked.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(",")
            )),
        }
    }
}

#[derive(Debug, Args, Clone, Default)]
pub struct OutputArgs {
    /// Write the JSON report (format version 1).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an interactive flamegraph SVG of outstanding bytes by stack.
    #[arg(long)]
    pub flamegraph: Option<PathBuf>,
    /// What --flamegraph and --folded weigh stacks by.
    #[arg(long, value_enum, default_value_t = FlameKind::Outstanding)]
    pub flamegraph_kind: FlameKind,
    /// Write collapsed stacks (`frame;frame bytes`).
    #[arg(long)]
    pub folded: Option<PathBuf>,
    /// Write a gzipped pprof profile.
    #[arg(long)]
    pub pprof: Option<PathBuf>,
    /// Write a speedscope JSON file.
    #[arg(long)]
    pub speedscope: Option<PathBuf>,
    /// Stacks shown in the text report.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
}
