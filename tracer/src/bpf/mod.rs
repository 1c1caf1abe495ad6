//! Loading the eBPF object, attaching its programs, and kernel feature checks.

pub mod cfi_table;
pub mod counters;
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
    COUNTER_COUNT, GLOBAL_ATTACH_ID_OFFSET, GLOBAL_ATTACH_PID_OFFSET, GLOBAL_ATTACH_ROOT_OFFSET,
    GLOBAL_CGROUP_HIERARCHY, GLOBAL_CGROUP_MODE, GLOBAL_EXIT_GROUP_DEAD_OFFSET, GLOBAL_FAULT_SAMPLE_PERIOD,
    GLOBAL_FOLLOW_CHILDREN, GLOBAL_OOM_RECORD_LEN, GLOBAL_SOLE_TGID, GLOBAL_STACK_COPY_BYTES,
    GLOBAL_TRACK_FLAGS, MAP_CGROUPS, MAP_COUNTERS, MAP_EVENTS, MAP_OOM_EVENTS, MAP_TRACED, TRACK_BRK,
    TRACK_FAULTS, TRACK_MMAP, TRACK_OOM,
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
    #[error("trace cgroup {id}: add it to the table of traced cgroups: {source}")]
    SeedCgroup {
        id: u64,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "read {ATTACH_FORMAT}: {0} — --cgroup follows processes that join the cgroup through this tracepoint"
    )]
    AttachFormat(String),
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

/// In attach order. Each syscall's exit is attached before its entry, so that an entry
/// saved by the kernel always has its exit program there to take it (otherwise a call
/// made between the two attaches would be counted as one whose exit was never seen).
const ATTACHMENTS: &[Attachment] = &[
    tp("tp_sys_exit_mmap", "syscalls", "sys_exit_mmap", TRACK_MMAP),
    tp("tp_sys_enter_mmap", "syscalls", "sys_enter_mmap", TRACK_MMAP),
    tp("tp_sys_exit_munmap", "syscalls", "sys_exit_munmap", TRACK_MMAP),
    tp("tp_sys_enter_munmap", "syscalls", "sys_enter_munmap", TRACK_MMAP),
    tp("tp_sys_exit_mremap", "syscalls", "sys_exit_mremap", TRACK_MMAP),
    tp("tp_sys_enter_mremap", "syscalls", "sys_enter_mremap", TRACK_MMAP),
    tp("tp_sys_exit_mprotect", "syscalls", "sys_exit_mprotect", TRACK_MMAP),
    tp("tp_sys_enter_mprotect", "syscalls", "sys_enter_mprotect", TRACK_MMAP),
    tp("tp_sys_exit_madvise", "syscalls", "sys_exit_madvise", TRACK_MMAP),
    tp("tp_sys_enter_madvise", "syscalls", "sys_enter_madvise", TRACK_MMAP),
    tp("tp_sys_exit_brk", "syscalls", "sys_exit_brk", TRACK_BRK),
    tp("tp_sys_enter_brk", "syscalls", "sys_enter_brk", TRACK_BRK),
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

/// `--cgroup`: a process that joins the cgroup (or one of its descendants) is traced.
const CGROUP_ATTACH: Attachment = tp("tp_cgroup_attach_task", "cgroup", "cgroup_attach_task", 0);

/// Where `cgroup:cgroup_attach_task` keeps the moved process and its new cgroup.
const ATTACH_FORMAT: &str = "/sys/kernel/tracing/events/cgroup/cgroup_attach_task/format";

/// Where `sched:sched_process_exit` says whether the whole process ended.
const EXIT_FORMAT: &str = "/sys/kernel/tracing/events/sched/sched_process_exit/format";

/// What to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Thread-group ids to trace; none traces no process (only machine-wide OOM kills).
    pub targets: Vec<u32>,
    /// Trace the processes the targets fork (and theirs), from their first instruction.
    pub follow_children: bool,
    /// `--cgroup`: the cgroups whose processes are traced, joining ones included.
    pub cgroup: Option<CgroupFilter>,
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

/// The cgroups traced with `--cgroup`, as the kernel names them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupFilter {
    /// The hierarchy id: 0 for cgroup v2, else the v1 hierarchy's (`/proc/PID/cgroup`).
    pub hierarchy: u32,
    /// Cgroup ids (kernfs ids: the directories' inode numbers), the cgroup's and its
    /// descendants'.
    pub ids: Vec<u64>,
}

/// The loaded and attached programs with the maps userspace reads.
pub struct Tracer {
    /// Kept alive: dropping it detaches the programs.
    ebpf: Ebpf,
    events: Option<RingBuf<MapData>>,
    oom_events: Option<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    /// The traced processes (the kernel keeps it up to date).
    traced: aya::maps::HashMap<MapData, u32, u32>,
    /// The traced cgroups (`--cgroup`).
    cgroups: Option<aya::maps::HashMap<MapData, u64, u32>>,
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
        let follow_children = u32::from(options.follow_children || options.cgroup.is_some());
        let cgroup_mode = u32::from(options.cgroup.is_some());
        let hierarchy = options.cgroup.as_ref().map_or(0, |c| c.hierarchy);
        let [root_offset, id_offset, pid_offset] =
            if options.cgroup.is_some() { attach_task_offsets()? } else { [0; 3] };
        let group_dead_offset = exit_group_dead_offset();
        let sole_tgid = match options.targets.as_slice() {
            [one] if follow_children == 0 => *one,
            _ => 0,
        };
        let mut ebpf = loader
            .override_global(GLOBAL_FOLLOW_CHILDREN, &follow_children, true)
            .override_global(GLOBAL_SOLE_TGID, &sole_tgid, true)
            .override_global(GLOBAL_CGROUP_MODE, &cgroup_mode, true)
            .override_global(GLOBAL_CGROUP_HIERARCHY, &hierarchy, true)
            .override_global(GLOBAL_ATTACH_ROOT_OFFSET, &root_offset, true)
            .override_global(GLOBAL_ATTACH_ID_OFFSET, &id_offset, true)
            .override_global(GLOBAL_ATTACH_PID_OFFSET, &pid_offset, true)
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
        let cgroups = match &options.cgroup {
            Some(filter) => {
                let mut map: aya::maps::HashMap<MapData, u64, u32> = take_map(&mut ebpf, MAP_CGROUPS)?;
                for &id in &filter.ids {
                    map.insert(id, 1, 0).map_err(|source| BpfError::SeedCgroup { id, source })?;
                }
                Some(map)
            }
            None => None,
        };
        let lifecycle = LIFECYCLE.iter().filter(|_| !options.targets.is_empty() || options.cgroup.is_some());
        let cgroup_attach = options.cgroup.as_ref().map(|_| &CGROUP_ATTACH);
        for a in
            ATTACHMENTS.iter().filter(|a| a.family & options.track != 0).chain(lifecycle).chain(cgroup_attach)
        {
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
            traced,
            cgroups,
            links: Vec::new(),
        })
    }

    /// Traces process `pid` from now on (one found in a traced cgroup by a rescan).
    pub fn trace_process(&mut self, pid: u32) -> Result<(), BpfError> {
        self.traced.insert(pid, 1, 0).map_err(|source| BpfError::Seed { pid, source })
    }

    /// Whether the kernel traces process `pid` now.
    #[must_use]
    pub fn is_traced(&self, pid: u32) -> bool {
        self.traced.get(&pid, 0).is_ok()
    }

    /// Traces cgroup `id` too (a descendant made after tracing started); a no-op without
    /// `--cgroup`.
    pub fn trace_cgroup(&mut self, id: u64) -> Result<(), BpfError> {
        match self.cgroups.as_mut() {
            Some(map) => map.insert(id, 1, 0).map_err(|source| BpfError::SeedCgroup { id, source }),
            None => Ok(()),
        }
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
    pub fn counters(&self) -> counters::Counters {
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

/// Offsets of `dst_root`, `dst_id` and `pid` in the `cgroup:cgroup_attach_task` record.
fn attach_task_offsets() -> Result<[u32; 3], BpfError> {
    let text = std::fs::read_to_string(ATTACH_FORMAT).map_err(|e| BpfError::AttachFormat(e.to_string()))?;
    let mut out = [0; 3];
    for (slot, field) in out.iter_mut().zip(["dst_root", "dst_id", "pid"]) {
        let offset = crate::events::field_offset(&text, field)
            .ok_or_else(|| BpfError::AttachFormat(format!("it has no field {field}")))?;
        *slot = u32::try_from(offset).map_err(|_| BpfError::AttachFormat(format!("{field} at {offset}")))?;
    }
    debug!("cgroup_attach_task: dst_root, dst_id, pid at {out:?}");
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::ATTACHMENTS;

    #[test]
    fn every_syscall_exit_is_attached_before_its_entry() {
        let position = |program: &str| ATTACHMENTS.iter().position(|a| a.program == program);
        let entries: Vec<&str> =
            ATTACHMENTS.iter().map(|a| a.program).filter(|p| p.starts_with("tp_sys_enter_")).collect();
        assert_eq!(entries.len(), 6, "{entries:?}");
        for entry in entries {
            let exit = entry.replace("tp_sys_enter_", "tp_sys_exit_");
            let (Some(e), Some(x)) = (position(entry), position(&exit)) else {
                panic!("{entry} has no {exit}");
            };
            assert!(x < e, "{exit} is attached after {entry}");
        }
    }
}
