//! Loading the eBPF object, attaching its programs, and kernel feature checks.

pub mod features;
pub mod teardown;
pub mod uprobe;

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use log::{debug, warn};
use tracer_common::{
    COUNTER_COUNT, GLOBAL_EXIT_GROUP_DEAD_OFFSET, GLOBAL_FAULT_SAMPLE_PERIOD, GLOBAL_FOLLOW_CHILDREN,
    GLOBAL_OOM_RECORD_LEN, GLOBAL_SOLE_TGID, GLOBAL_STACK_COPY_BYTES, GLOBAL_TRACK_FLAGS, MAP_COUNTERS,
    MAP_EVENTS, MAP_OOM_EVENTS, MAP_TRACED, TRACK_BRK, TRACK_FAULTS, TRACK_MMAP, TRACK_OOM,
};

/// The eBPF object built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "this memtrace was built without its eBPF object (AYA_BUILD_SKIP was set); rebuild with `cargo build -p tracer` after `cargo xtask setup`"
    )]
    NoObject,
    #[error("memtrace must run as root: it loads eBPF programs and reads tracefs (try: sudo memtrace ...)")]
    NotRoot,
    #[error(
        "tracefs is not mounted at /sys/kernel/tracing and mounting it failed ({0}); run: mount -t tracefs tracefs /sys/kernel/tracing"
    )]
    Tracefs(std::io::Error),
    #[error(
        "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing): memtrace reads user registers at syscalls through BTF-typed helpers; use a kernel built with CONFIG_DEBUG_INFO_BTF=y (run `memtrace doctor`)"
    )]
    NoBtf,
    #[error("load the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program {program} is missing from the eBPF object")]
    MissingProgram { program: &'static str },
    #[error("attach {program} to tracepoint {category}:{name}: {source}")]
    Attach {
        program: &'static str,
        category: &'static str,
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("trace process {pid}: add it to the table of traced processes: {source}")]
    Seed {
        pid: u32,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("open map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// One program and where it attaches. The program is named after its attach point.
struct Attachment {
    program: &'static str,
    category: &'static str,
    name: &'static str,
    family: u32,
}

const fn tp(program: &'static str, category: &'static str, name: &'static str, family: u32) -> Attachment {
    Attachment { program, category, name, family }
}

const ATTACHMENTS: &[Attachment] = &[
    tp("tp_sys_enter_mmap", "syscalls", "sys_enter_mmap", TRACK_MMAP),
    tp("tp_sys_exit_mmap", "syscalls", "sys_exit_mmap", TRACK_MMAP),
    tp("tp_sys_enter_munmap", "syscalls", "sys_enter_munmap", TRACK_MMAP),
    tp("tp_sys_exit_munmap", "syscalls", "sys_exit_munmap", TRACK_MMAP),
    tp("tp_sys_enter_mremap", "syscalls", "sys_enter_mremap", TRACK_MMAP),
    tp("tp_sys_exit_mremap", "syscalls", "sys_exit_mremap", TRACK_MMAP),
    tp("tp_sys_enter_mprotect", "syscalls", "sys_enter_mprotect", TRACK_MMAP),
    tp("tp_sys_exit_mprotect", "syscalls", "sys_exit_mprotect", TRACK_MMAP),
    tp("tp_sys_enter_madvise", "syscalls", "sys_enter_madvise", TRACK_MMAP),
    tp("tp_sys_exit_madvise", "syscalls", "sys_exit_madvise", TRACK_MMAP),
    tp("tp_sys_enter_brk", "syscalls", "sys_enter_brk", TRACK_BRK),
    tp("tp_sys_exit_brk", "syscalls", "sys_exit_brk", TRACK_BRK),
    tp("tp_page_fault_user", "exceptions", "page_fault_user", TRACK_FAULTS),
    tp("tp_oom_mark_victim", "oom", "mark_victim", TRACK_OOM),
];

/// The process lifecycle, attached whenever processes are traced: the set of traced
/// processes follows forks and exits in the kernel, and userspace hears of each change.
const LIFECYCLE: &[Attachment] = &[
    tp("tp_task_newtask", "task", "task_newtask", 0),
    tp("tp_sched_process_exec", "sched", "sched_process_exec", 0),
    tp("tp_sched_process_exit", "sched", "sched_process_exit", 0),
];

/// Where `sched:sched_process_exit` says whether the whole process ended.
const EXIT_FORMAT: &str = "/sys/kernel/tracing/events/sched/sched_process_exit/format";

/// What to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Thread-group ids to trace; none traces no process (only machine-wide OOM kills).
    pub targets: Vec<u32>,
    /// Trace the processes the targets fork (and theirs), from their first instruction.
    pub follow_children: bool,
    /// `TRACK_*` bits.
    pub track: u32,
    /// Bytes of user stack copied per allocation event.
    pub stack_copy_bytes: u32,
    /// Ring buffer size in bytes (a power of two, at least one page).
    pub ring_buffer_bytes: u32,
    /// One not-present page fault in this many is sent with its stack.
    pub fault_sample_period: u32,
    /// The malloc-family probes (`--track malloc`).
    pub malloc: uprobe::MallocSettings,
    /// Bytes of an `oom:mark_victim` record ([`crate::events::OomFormat::record_len`]).
    pub oom_record_len: u32,
}

/// The loaded and attached programs with the maps userspace reads.
pub struct Tracer {
    /// Kept alive: dropping it detaches the programs.
    ebpf: Ebpf,
    events: Option<RingBuf<MapData>>,
    oom_events: Option<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    /// The traced processes (the kernel keeps it up to date).
    _traced: aya::maps::HashMap<MapData, u32, u32>,
    /// Uprobes attached for the session (the exit hold of `memtrace run`).
    links: Vec<aya::programs::uprobe::UProbeLink>,
}

impl Tracer {
    /// Loads the object and attaches every program whose family is tracked.
    pub fn load(options: &LoadOptions) -> Result<Self, BpfError> {
        if OBJECT.is_empty() {
            return Err(BpfError::NoObject);
        }
        require_root()?;
        if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(BpfError::NoBtf);
        }
        ensure_tracefs()?;
        raise_memlock();
        let mut loader = EbpfLoader::new();
        uprobe::configure_loader(&mut loader, &options.malloc);
        let follow_children = u32::from(options.follow_children);
        let group_dead_offset = exit_group_dead_offset();
        let sole_tgid = match options.targets.as_slice() {
            [one] if !options.follow_children => *one,
            _ => 0,
        };
        let mut ebpf = loader
            .override_global(GLOBAL_FOLLOW_CHILDREN, &follow_children, true)
            .override_global(GLOBAL_SOLE_TGID, &sole_tgid, true)
            .override_global(GLOBAL_EXIT_GROUP_DEAD_OFFSET, &group_dead_offset, true)
            .override_global(GLOBAL_TRACK_FLAGS, &options.track, true)
            .override_global(GLOBAL_STACK_COPY_BYTES, &options.stack_copy_bytes, true)
            .override_global(GLOBAL_FAULT_SAMPLE_PERIOD, &options.fault_sample_period, true)
            .override_global(GLOBAL_OOM_RECORD_LEN, &options.oom_record_len, true)
            .map_max_entries(MAP_EVENTS, options.ring_buffer_bytes)
            .load(OBJECT)
            .map_err(BpfError::Load)?;
        // Seeded before any program runs, so that none misses a target's first event.
        let mut traced: aya::maps::HashMap<MapData, u32, u32> = take_map(&mut ebpf, MAP_TRACED)?;
        for &pid in &options.targets {
            traced.insert(pid, 1, 0).map_err(|source| BpfError::Seed { pid, source })?;
        }
        let lifecycle = LIFECYCLE.iter().filter(|_| !options.targets.is_empty());
        for a in ATTACHMENTS.iter().filter(|a| a.family & options.track != 0).chain(lifecycle) {
            let attach_err = |source| BpfError::Attach {
                program: a.program,
                category: a.category,
                name: a.name,
                source: Box::new(source),
            };
            let program: &mut TracePoint = ebpf
                .program_mut(a.program)
                .ok_or(BpfError::MissingProgram { program: a.program })?
                .try_into()
                .map_err(attach_err)?;
            program.load().map_err(attach_err)?;
            program.attach(a.category, a.name).map_err(attach_err)?;
            debug!("attached {} to {}:{}", a.program, a.category, a.name);
        }
        let events = take_map(&mut ebpf, MAP_EVENTS)?;
        let oom_events = take_map(&mut ebpf, MAP_OOM_EVENTS)?;
        let counters = take_map(&mut ebpf, MAP_COUNTERS)?;
        Ok(Self {
            ebpf,
            events: Some(events),
            oom_events: Some(oom_events),
            counters,
            _traced: traced,
            links: Vec::new(),
        })
    }

    /// The loaded object, for probe families that attach or read maps of their own.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Keeps `links` attached for the session.
    pub fn keep_links(&mut self, links: Vec<aya::programs::uprobe::UProbeLink>) {
        self.links.extend(links);
    }

    /// The ring buffer, to be polled by the caller (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The ring buffer of OOM records, to be polled by the caller (once).
    pub fn take_oom_events(&mut self) -> Option<RingBuf<MapData>> {
        self.oom_events.take()
    }

    /// Kernel-side counters summed over CPUs, indexed by `COUNTER_*`.
    #[must_use]
    pub fn counters(&self) -> [u64; COUNTER_COUNT as usize] {
        let mut out = [0; COUNTER_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}

/// Offset of `group_dead` in the `sched:sched_process_exit` record, or 0 when this kernel
/// does not have the field (the kernel side then takes the leader's exit as the process's).
fn exit_group_dead_offset() -> u32 {
    let text = std::fs::read_to_string(EXIT_FORMAT).unwrap_or_default();
    let offset = crate::events::field_offset(&text, "group_dead").unwrap_or(0);
    debug!("sched_process_exit: group_dead at offset {offset}");
    u32::try_from(offset).unwrap_or(0)
}

/// Takes a map out of the loaded object, typed.
pub fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
    T::try_from(map).map_err(|source| BpfError::Map { name, source })
}

/// Loading eBPF programs and reading tracefs need root: say so before anything else fails
/// with a less helpful permission error.
pub fn require_root() -> Result<(), BpfError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 { Ok(()) } else { Err(BpfError::NotRoot) }
}

const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs when it is missing (fresh machines here have it unmounted).
pub fn ensure_tracefs() -> Result<(), BpfError> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "tracefs", TRACEFS])
        .status()
        .map_err(BpfError::Tracefs)?;
    if status.success() && Path::new(TRACEFS).join("events").is_dir() {
        debug!("mounted tracefs at {TRACEFS}");
        Ok(())
    } else {
        Err(BpfError::Tracefs(std::io::Error::other(format!("mount exited with {status}"))))
    }
}

/// Kernels >= 5.11 account BPF memory to the cgroup, so a refused raise only matters
/// on older kernels (and is a warning there, not an error).
fn raise_memlock() {
    let limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: passes a valid pointer to a local rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit) } == 0 {
        return;
    }
    let err = std::io::Error::last_os_error();
    if kernel_at_least(5, 11) {
        debug!(
            "could not raise RLIMIT_MEMLOCK ({err}); not needed: this kernel accounts BPF memory to the cgroup"
        );
    } else {
        warn!("could not raise RLIMIT_MEMLOCK ({err}); loading may fail on kernels before 5.11");
    }
}

/// Whether the running kernel's release is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}
