//! The malloc-family uprobes: find the allocator the target really uses (from
//! `/proc/PID/maps` and the module's ELF symbols), and attach to it for that process only.
//!
//! glibc's malloc (or any C library's, or one linked into the executable) is followed. A
//! replacement allocator (jemalloc, tcmalloc, mimalloc, ...) is refused: it frees through
//! entry points of its own (`sdallocx`, its own `operator delete`), so probing its `free`
//! alone would report memory it gave back as leaked.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        ProgramError, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
    },
};
use log::debug;
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
use tracer_common::{
    GLOBAL_MALLOC_MIN_SIZE, GLOBAL_MALLOC_SAMPLE_BYTES, GLOBAL_MALLOC_WAIT_EXEC, MAP_MALLOC_JS_SLOTS,
    MAP_MALLOC_LIVE, MAP_MALLOC_NEW_STACKS, MAP_MALLOC_PENDING, MAP_MALLOC_STACKS, MAP_MALLOC_TOTALS,
    cfi::{CFI_CHUNKS_MAX, MAP_CFI_BIASES, MAP_CFI_ROWS, cookie},
};

use crate::{bpf::cfi_table::CfiMaps, procfs::maps::MapEntry};

mod duty;
pub mod needed;
mod placement;
pub use placement::{ProbePoint, emulated_len, locked_instruction_len, probe_point};

/// Settings of the malloc probes, written into the object before load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MallocSettings {
    /// Whether malloc is tracked at all (the tables shrink to nothing when not).
    pub enabled: bool,
    /// Sampling period in bytes (0: every allocation).
    pub sample_bytes: u64,
    /// Allocations below this size are not recorded.
    pub min_size: u64,
    /// Outstanding allocations kept at most.
    pub max_live: u32,
    /// Distinct allocation stacks kept at most.
    pub max_stacks: u32,
    /// Probe Node's `ArrayBuffer` allocator instead of the malloc family.
    pub node_buffers: bool,
    /// `memtrace run`: arm the probes at the target's next exec (they are attached to the
    /// shell that waits to exec the command).
    pub wait_exec: bool,
    /// `--malloc-duty`: the share of the time (percent) the node-buffers allocation probes
    /// are attached; 100 always.
    pub duty_percent: u32,
}

impl Default for MallocSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            sample_bytes: 0,
            min_size: 0,
            max_live: 1 << 20,
            max_stacks: 1 << 16,
            node_buffers: false,
            wait_exec: false,
            duty_percent: 100,
        }
    }
}

/// Threads with an allocator call in progress at once, at most.
const MAX_THREADS: u32 = 16384;

/// Sets the malloc globals and table sizes on `loader`.
pub fn configure_loader<'a>(loader: &mut EbpfLoader<'a>, settings: &'a MallocSettings) {
    static YES: u32 = 1;
    static NO: u32 = 0;
    loader
        .override_global(GLOBAL_MALLOC_SAMPLE_BYTES, &settings.sample_bytes, true)
        .override_global(GLOBAL_MALLOC_MIN_SIZE, &settings.min_size, true)
        .override_global(GLOBAL_MALLOC_WAIT_EXEC, if settings.wait_exec { &YES } else { &NO }, true);
    if settings.enabled {
        loader
            .map_max_entries(MAP_MALLOC_LIVE, settings.max_live.max(1))
            .map_max_entries(MAP_MALLOC_STACKS, settings.max_stacks.max(1))
            .map_max_entries(MAP_MALLOC_TOTALS, settings.max_stacks.saturating_add(1))
            .map_max_entries(MAP_MALLOC_PENDING, MAX_THREADS)
            // Node's BackingStore probes keep the kernel's frame-pointer walk.
            .map_max_entries(MAP_CFI_ROWS, if settings.node_buffers { 1 } else { CFI_CHUNKS_MAX })
            .map_max_entries(
                MAP_MALLOC_JS_SLOTS,
                if settings.node_buffers { settings.max_stacks.max(1) } else { 1 },
            );
    } else {
        loader
            .map_max_entries(MAP_MALLOC_LIVE, 1)
            .map_max_entries(MAP_MALLOC_STACKS, 1)
            .map_max_entries(MAP_MALLOC_TOTALS, 1)
            .map_max_entries(MAP_MALLOC_PENDING, 1)
            .map_max_entries(MAP_CFI_ROWS, 1)
            .map_max_entries(MAP_CFI_BIASES, 1)
            .map_max_entries(MAP_MALLOC_JS_SLOTS, 1)
            .map_max_entries(MAP_MALLOC_NEW_STACKS, 4096);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UprobeError {
    #[error(
        "process {pid} allocates with {name} ({path}): --track malloc follows glibc's malloc family only, and {name} frees through entry points of its own, so its memory would look leaked; use --track mmap,brk (it maps its memory with mmap)"
    )]
    ReplacementAllocator { pid: u32, name: &'static str, path: String },
    #[error(
        "process {pid} maps no C library and its executable {exe} defines no malloc (statically linked and stripped, or a runtime with its own allocator such as Go's): --track malloc cannot see its allocations; use --track mmap,brk"
    )]
    NoAllocator { pid: u32, exe: String },
    #[error("read /proc/{pid}/maps: {source} (has the process exited?)")]
    Maps {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parse the ELF file {path}: {source}")]
    Elf {
        path: String,
        #[source]
        source: object::Error,
    },
    #[error(
        "--malloc-probes node-buffers: process {pid} ({exe}) is not a Node.js whose executable or libnode has V8's BackingStore symbols (v8::internal::BackingStore::SetAllocatorFromIsolate and its destructor; Node 14 or later); use --malloc-probes libc"
    )]
    NotNode { pid: u32, exe: String },
    #[error("{path} has no `{symbol}` function to probe")]
    MissingSymbol { path: String, symbol: &'static str },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("find the files the command will load: {0}")]
    Needed(#[from] needed::NeededError),
    #[error("attach uprobe {path}:{symbol} for pid {pid}: {source}")]
    Attach {
        path: String,
        symbol: &'static str,
        pid: u32,
        #[source]
        source: ProgramError,
    },
}

/// One line of `/proc/PID/maps` (what this module needs of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub executable: bool,
    pub offset: u64,
    pub inode: u64,
    pub path: String,
}

impl Mapping {
    fn file_name(&self) -> &str {
        let path = self.path.strip_suffix(" (deleted)").unwrap_or(&self.path);
        path.rsplit('/').next().unwrap_or(path)
    }
}

/// Parses `/proc/PID/maps`; lines that do not parse, and non-file mappings, are skipped.
#[must_use]
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    crate::procfs::maps::parse_maps(text)
        .into_iter()
        .filter(MapEntry::is_file_backed)
        .map(|m| Mapping {
            start: m.start,
            end: m.end,
            executable: m.executable,
            offset: m.offset,
            inode: m.inode,
            path: m.path,
        })
        .collect()
}

/// Allocator libraries that replace malloc and free through entry points of their own.
const REPLACEMENTS: &[(&str, &str)] = &[
    ("libjemalloc", "jemalloc"),
    ("libtcmalloc", "tcmalloc"),
    ("libmimalloc", "mimalloc"),
    ("libhoard", "Hoard"),
    ("libsnmalloc", "snmalloc"),
    ("librpmalloc", "rpmalloc"),
];

/// Which modules of the target matter for its allocator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Modules {
    /// The main executable (its path as mapped).
    pub exe: Option<String>,
    /// The C library (glibc's `libc.so.6`, musl's `libc.musl-*.so.1` / `ld-musl-*`).
    pub libc: Option<String>,
    /// The C++ runtime (`operator new`).
    pub cxx: Option<String>,
    /// A replacement allocator: its name and path.
    pub replacement: Option<(&'static str, String)>,
}

/// Sorts the target's modules by role. `exe` is `/proc/PID/exe`'s target.
#[must_use]
pub fn classify(maps: &[Mapping], exe: Option<&str>) -> Modules {
    let mut modules = Modules { exe: exe.map(str::to_string), ..Modules::default() };
    for m in maps {
        let name = m.file_name();
        if modules.replacement.is_none()
            && let Some((_, allocator)) = REPLACEMENTS.iter().find(|(prefix, _)| name.starts_with(prefix))
        {
            modules.replacement = Some((allocator, m.path.clone()));
        }
        let is_libc = name == "libc.so.6"
            || (name.starts_with("libc-2.") && Path::new(name).extension().is_some_and(|e| e == "so"))
            || name.starts_with("libc.musl-")
            || name.starts_with("ld-musl-");
        if is_libc && modules.libc.is_none() {
            modules.libc = Some(m.path.clone());
        }
        if name.starts_with("libstdc++.so") && modules.cxx.is_none() {
            modules.cxx = Some(m.path.clone());
        }
    }
    if modules.exe.is_none() {
        modules.exe = maps.first().map(|m| m.path.clone());
    }
    modules
}

/// The malloc family as probed: symbol, entry program, and whether its return is needed.
const C_FUNCTIONS: &[(&str, &str, bool)] = &[
    ("free", "uprobe_free", false),
    ("malloc", "uprobe_malloc", true),
    ("calloc", "uprobe_calloc", true),
    ("realloc", "uprobe_realloc", true),
    ("reallocarray", "uprobe_reallocarray", true),
    ("posix_memalign", "uprobe_posix_memalign", true),
    ("aligned_alloc", "uprobe_memalign", true),
    ("memalign", "uprobe_memalign", true),
    ("valloc", "uprobe_valloc", true),
    ("pvalloc", "uprobe_pvalloc", true),
];

/// The C++ `operator new` family (size first), probed where the C++ runtime has no unwind
/// table for the probes' CFI walk (a statically linked one): stacks are then taken where
/// the caller's frame is intact, since from inside its `malloc` call the frame-pointer
/// walk would skip the function that called `new`.
const CXX_FUNCTIONS: &[(&str, &str, bool)] = &[
    ("_Znwm", "uprobe_operator_new", true),
    ("_Znam", "uprobe_operator_new", true),
    ("_ZnwmRKSt9nothrow_t", "uprobe_operator_new", true),
    ("_ZnamRKSt9nothrow_t", "uprobe_operator_new", true),
    ("_ZnwmSt11align_val_t", "uprobe_operator_new", true),
    ("_ZnamSt11align_val_t", "uprobe_operator_new", true),
    ("_ZnwmSt11align_val_tRKSt9nothrow_t", "uprobe_operator_new", true),
    ("_ZnamSt11align_val_tRKSt9nothrow_t", "uprobe_operator_new", true),
    (DT_INIT, LEARN_PROGRAM, false),
];

/// A shared libstdc++ is walked through by its unwind table: its `operator new` calls
/// `malloc`, whose probe's walk crosses the `operator new` frame to the caller, so the
/// scalar forms are not probed. Probing them cost two traps more per C++ allocation (its
/// entry and return) for the same stack: on a Node service, 757,000 of them in 10 s, and
/// 2.2 s of its programs (see the README). The array forms are: `operator new[]` ends in
/// a tail call of `operator new`, which leaves no `operator new[]` frame for the walk to
/// name (a block from `new[]` would be reported as from `new`).
const CXX_TABLED: &[(&str, &str, bool)] = &[
    ("_Znam", "uprobe_operator_new", true),
    ("_ZnamRKSt9nothrow_t", "uprobe_operator_new", true),
    ("_ZnamSt11align_val_t", "uprobe_operator_new", true),
    ("_ZnamSt11align_val_tRKSt9nothrow_t", "uprobe_operator_new", true),
    (DT_INIT, LEARN_PROGRAM, false),
];

/// V8's backing stores (methods: `this` first), for `--malloc-probes node-buffers`: one
/// trap per Buffer or `ArrayBuffer` allocated and one per freed (`probes::backing_store`).
/// Frees come first (see [`attach_resolved`]). An empty program marks a function that is
/// not probed but whose frames are the allocator's, so that the mapped view does not count
/// the memory it maps for a large Buffer a second time.
const NODE_FUNCTIONS: &[(&str, &str, bool)] = &[
    ("_ZN2v88internal12BackingStoreD2Ev", "uprobe_backing_store_free", false),
    ("_ZN2v88internal12BackingStoreD1Ev", "uprobe_backing_store_free", false),
    (NODE_NEW_STORE, "uprobe_backing_store_new", false),
    (
        "_ZN2v88internal12BackingStore14WrapAllocationEPvmPFvS2_mS2_ES2_NS0_10SharedFlagE",
        "uprobe_backing_store_wrap",
        false,
    ),
    (
        "_ZN2v88internal12BackingStore14WrapAllocationEPNS0_7IsolateEPvmNS0_10SharedFlagEb",
        "uprobe_backing_store_wrap_isolate",
        false,
    ),
    ("_ZN2v88internal12BackingStore10ReallocateEPNS0_7IsolateEm", "uprobe_backing_store_realloc", true),
    (
        "_ZN2v88internal12BackingStore8AllocateEPNS0_7IsolateEmNS0_10SharedFlagENS0_15InitializedFlagE",
        "",
        false,
    ),
    ("_ZN4node24NodeArrayBufferAllocator8AllocateEm", "", false),
    ("_ZN4node24NodeArrayBufferAllocator21AllocateUninitializedEm", "", false),
];

/// `v8::internal::BackingStore::SetAllocatorFromIsolate`: called on every store
/// `BackingStore::Allocate` makes, once it holds its memory.
const NODE_NEW_STORE: &str = "_ZN2v88internal12BackingStore23SetAllocatorFromIsolateEPNS0_7IsolateE";

const RETURN_PROGRAM: &str = "uretprobe_alloc";

/// The program that only learns where a module without frame pointers is loaded (see
/// `probes::cfi` in the eBPF crate); its functions are not the allocator's.
const LEARN_PROGRAM: &str = "uprobe_cfi_learn";

/// ld.so: `_dl_debug_state` runs at startup and at every dlopen/dlclose, before the
/// allocations its frames lead to (TLS of new threads, dlopen's own blocks).
const LOADER_FUNCTIONS: &[(&str, &str, bool)] = &[("_dl_debug_state", LEARN_PROGRAM, false)];

/// Pseudo-symbol of a module's `DT_INIT` function, which the loader calls when it loads
/// the module (libstdc++'s runs before its own constructors allocate).
const DT_INIT: &str = "DT_INIT";

/// A defined function of an ELF file: where it is in the file and in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionLocation {
    /// File offset of its first instruction.
    pub file_offset: u64,
    pub size: u64,
    /// Where the uprobe goes (see [`probe_point`]).
    pub probe_offset: u64,
    /// Whether the kernel emulates the probed instruction (one trap a hit, not two).
    pub emulated: bool,
}

/// Finds the defined functions `names` in an ELF image (dynamic symbols first, then the
/// full symbol table), with their file offsets.
pub fn resolve_functions(
    data: &[u8],
    names: &[&'static str],
) -> Result<HashMap<&'static str, FunctionLocation>, object::Error> {
    let file = object::File::parse(data)?;
    let wanted: HashSet<&str> = names.iter().copied().collect();
    let mut found = HashMap::new();
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        if !symbol.is_definition() || symbol.kind() != object::SymbolKind::Text {
            continue;
        }
        let Ok(name) = symbol.name() else { continue };
        let Some(&name) = wanted.get(name) else { continue };
        let Some(&name) = names.iter().find(|n| **n == name) else { continue };
        if found.contains_key(name) {
            continue;
        }
        let address = symbol.address();
        let Some(file_offset) = file.segments().find_map(|seg| {
            let (offset, size) = seg.file_range();
            (address >= seg.address() && address < seg.address() + size)
                .then(|| address - seg.address() + offset)
        }) else {
            continue;
        };
        // Within the function: a probe never lands in the next one.
        let window = if symbol.size() == 0 { 64 } else { symbol.size().min(64) as usize };
        let point = usize::try_from(file_offset)
            .ok()
            .and_then(|start| data.get(start..start.saturating_add(window)))
            .map_or(ProbePoint { skip: 0, emulated: false }, probe_point);
        found.insert(
            name,
            FunctionLocation {
                file_offset,
                size: symbol.size(),
                probe_offset: file_offset + point.skip as u64,
                emulated: point.emulated,
            },
        );
    }
    Ok(found)
}

/// Where a probed function lives in the target's memory, to recognize its frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbedFunction {
    pub symbol: &'static str,
    pub module: String,
    pub inode: u64,
    pub file_offset: u64,
    pub size: u64,
    /// Its address range in the target (empty until the module is mapped).
    pub start: u64,
    pub end: u64,
}

/// The attached probes. Dropping it (or [`Self::detach`]) removes them.
#[derive(Default)]
pub struct AttachedAllocator {
    /// Module whose malloc is followed (empty: none yet).
    pub module: String,
    pub inode: u64,
    /// Functions probed, with their addresses in the target.
    pub functions: Vec<ProbedFunction>,
    links: Vec<UProbeLink>,
    /// Allocation probes that duty cycling detaches and attaches again (see `duty`).
    cycled: Vec<duty::CycledProbe>,
    cycled_links: Vec<UProbeLink>,
    detached: bool,
}

impl AttachedAllocator {
    /// Removes every probe: the tables stop changing (and the target stops paying).
    /// Slow: see [`crate::bpf::teardown`].
    pub fn detach(&mut self) {
        self.links.clear();
        self.cycled_links.clear();
        self.detached = true;
    }

    /// Whether `addr` is inside one of the probed functions.
    #[must_use]
    pub fn contains(&self, addr: u64) -> bool {
        self.functions.iter().any(|f| addr >= f.start && addr < f.end)
    }

    /// Inodes of the modules probed.
    #[must_use]
    pub fn probed_modules(&self) -> Vec<u64> {
        let mut inodes: Vec<u64> = self.functions.iter().map(|f| f.inode).collect();
        inodes.sort_unstable();
        inodes.dedup();
        inodes
    }

    /// Adds the probes of `other` (another module of the same process).
    pub fn extend(&mut self, other: AttachedAllocator) {
        if self.module.is_empty() {
            self.module = other.module;
            self.inode = other.inode;
        }
        self.functions.extend(other.functions);
        self.links.extend(other.links);
        self.cycled.extend(other.cycled);
        self.cycled_links.extend(other.cycled_links);
    }

    /// Recomputes where the probed functions are from the process's memory map (after an
    /// exec the same library is mapped elsewhere). Keeps the old ranges when the map is
    /// gone (the process exited).
    pub fn refresh_addresses(&mut self, pid: u32) {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return };
        let maps = parse_maps(&text);
        for f in &mut self.functions {
            // By inode: the path may differ (`/lib` and `/usr/lib` are one directory).
            let module = maps.iter().find(|m| m.inode == f.inode);
            if let Some(start) = module.and_then(|m| runtime_address(&maps, m, f.file_offset)) {
                f.start = start;
                f.end = start + f.size.max(1);
            }
        }
    }
}

/// The file to hand to the kernel for `mapping`: the process's own view of the path
/// (its mount namespace), or the mapping itself when the path no longer names that file.
fn attach_path(pid: u32, mapping: &Mapping) -> PathBuf {
    if mapping.end == 0 {
        // Found from the command's files, not mapped yet (see [`CommandFiles`]).
        return PathBuf::from(&mapping.path);
    }
    let rooted = PathBuf::from(format!("/proc/{pid}/root{}", mapping.path));
    match std::fs::metadata(&rooted) {
        Ok(meta) if meta.ino() == mapping.inode => rooted,
        _ => PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", mapping.start, mapping.end)),
    }
}

/// One module to probe and its functions.
struct Plan {
    mapping: Mapping,
    path: PathBuf,
    locations: HashMap<&'static str, FunctionLocation>,
    table: &'static [(&'static str, &'static str, bool)],
    /// The module's file, when its frames are unwound by CFI in the kernel (it keeps no
    /// frame pointers: the C library, ld.so, libstdc++).
    cfi: Option<Vec<u8>>,
}

fn plan(
    pid: u32,
    maps: &[Mapping],
    module: &str,
    table: &'static [(&'static str, &'static str, bool)],
) -> Result<Plan, UprobeError> {
    plan_keeping(pid, maps, module, table, false)
}

/// [`plan`] for a module without frame pointers: its frames are unwound by CFI.
fn cfi_plan(
    pid: u32,
    maps: &[Mapping],
    module: &str,
    table: &'static [(&'static str, &'static str, bool)],
) -> Result<Plan, UprobeError> {
    plan_keeping(pid, maps, module, table, true)
}

fn plan_keeping(
    pid: u32,
    maps: &[Mapping],
    module: &str,
    table: &'static [(&'static str, &'static str, bool)],
    keep_file: bool,
) -> Result<Plan, UprobeError> {
    let mapping = maps
        .iter()
        .find(|m| m.path == module)
        .ok_or_else(|| UprobeError::NoAllocator { pid, exe: module.to_string() })?
        .clone();
    let path = attach_path(pid, &mapping);
    let data = std::fs::read(&path)
        .map_err(|source| UprobeError::Read { path: path.display().to_string(), source })?;
    let names: Vec<&'static str> = table.iter().map(|(name, _, _)| *name).collect();
    let mut locations = resolve_functions(&data, &names)
        .map_err(|source| UprobeError::Elf { path: module.to_string(), source })?;
    if names.contains(&DT_INIT)
        && let Some(location) = dt_init(&data)
    {
        locations.insert(DT_INIT, location);
    }
    Ok(Plan { mapping, path, locations, table, cfi: keep_file.then_some(data) })
}

/// Where a module's `DT_INIT` function is, as a probe location.
fn dt_init(data: &[u8]) -> Option<FunctionLocation> {
    let file = object::read::elf::ElfFile64::<object::Endianness>::parse(data).ok()?;
    let endian = file.endian();
    let vaddr = file.elf_program_headers().iter().find_map(|header| {
        let entries = object::read::elf::ProgramHeader::dynamic(header, endian, data).ok()??;
        entries.iter().find_map(|entry| {
            (entry.d_tag.get(endian) == u64::from(object::elf::DT_INIT)).then(|| entry.d_val.get(endian))
        })
    })?;
    let file_offset = file.segments().find_map(|seg| {
        let (offset, size) = seg.file_range();
        (vaddr >= seg.address() && vaddr < seg.address() + size).then(|| vaddr - seg.address() + offset)
    })?;
    let start = usize::try_from(file_offset).ok()?;
    let point = probe_point(data.get(start..start.saturating_add(16))?);
    Some(FunctionLocation {
        file_offset,
        size: 1,
        probe_offset: file_offset + point.skip as u64,
        emulated: point.emulated,
    })
}

/// The dynamic loader of a process: mapped (`ld-linux-*`), or named by the executable's
/// `PT_INTERP` (a command not started yet).
fn loader_mapping(maps: &[Mapping], exe: Option<&str>) -> Option<Mapping> {
    if let Some(m) = maps.iter().find(|m| m.file_name().starts_with("ld-linux")) {
        return Some(m.clone());
    }
    let data = std::fs::read(exe?).ok()?;
    let info = needed::dynamic_info(&data).ok()?;
    let path = std::fs::canonicalize(info.interpreter?).ok()?;
    let inode = std::fs::metadata(&path).ok()?.ino();
    Some(Mapping {
        start: 0,
        end: 0,
        executable: true,
        offset: 0,
        inode,
        path: path.to_string_lossy().into_owned(),
    })
}

/// The probes a process needs, found from its memory map; attach with [`attach_resolved`].
pub struct Resolved {
    maps: Vec<Mapping>,
    plans: Vec<Plan>,
}

impl Resolved {
    /// The module whose allocator would be followed, and its inode.
    #[must_use]
    pub fn module(&self) -> (&str, u64) {
        self.plans.first().map_or(("", 0), |p| (p.mapping.path.as_str(), p.mapping.inode))
    }
}

/// Finds the allocator of process `pid`: the malloc family (in the executable when it
/// defines one, else in the C library, plus libstdc++'s operator new), or with
/// `node_buffers` Node's `ArrayBuffer` allocator only. Refuses replacement allocators.
pub fn resolve(pid: u32, node_buffers: bool) -> Result<Resolved, UprobeError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|source| UprobeError::Maps { pid, source })?;
    let maps = parse_maps(&text);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let exe = exe.as_ref().map(|p| p.to_string_lossy().into_owned());
    resolve_in(pid, maps, exe.as_deref(), node_buffers)
}

/// The files a command will map, as [`Mapping`]s without addresses (the executable
/// first): what `memtrace run` probes before the command runs.
#[derive(Clone, Debug)]
pub struct CommandFiles {
    pub exe: String,
    pub maps: Vec<Mapping>,
    /// Libraries the loader will look for where memtrace did not find them.
    pub missing: Vec<String>,
}

impl CommandFiles {
    /// Reads the executable that `program` runs (through `#!`) and its dependencies.
    pub fn of(program: &Path) -> Result<Self, UprobeError> {
        let image = needed::executable_image(program)?;
        let deps = needed::dependencies(&image, &needed::LoaderEnv::from_env())?;
        let mapping = |path: &Path| {
            let path = std::fs::canonicalize(path).ok()?;
            let inode = std::fs::metadata(&path).ok()?.ino();
            let path = path.to_string_lossy().into_owned();
            Some(Mapping { start: 0, end: 0, executable: true, offset: 0, inode, path })
        };
        let maps: Vec<Mapping> =
            std::iter::once(&deps.exe).chain(&deps.libraries).filter_map(|p| mapping(p)).collect();
        let exe = maps.first().map(|m| m.path.clone()).unwrap_or_default();
        Ok(Self { exe, maps, missing: deps.missing })
    }
}

/// [`resolve`] for a command about to be exec'd by process `pid`, from its files.
pub fn resolve_command(pid: u32, files: &CommandFiles, node_buffers: bool) -> Result<Resolved, UprobeError> {
    if !files.missing.is_empty() {
        debug!("libraries not found for {}: {}", files.exe, files.missing.join(", "));
    }
    resolve_in(pid, files.maps.clone(), Some(&files.exe), node_buffers)
}

fn resolve_in(
    pid: u32,
    maps: Vec<Mapping>,
    exe: Option<&str>,
    node_buffers: bool,
) -> Result<Resolved, UprobeError> {
    let modules = classify(&maps, exe);
    if node_buffers {
        let exe = modules.exe.clone().unwrap_or_default();
        // V8 is in the executable (nodejs.org's builds) or in libnode (Debian's).
        let mut candidates = vec![exe.clone()];
        candidates.extend(
            maps.iter().filter(|m| m.file_name().starts_with("libnode.so")).map(|m| m.path.clone()).take(1),
        );
        let node = candidates
            .iter()
            .filter_map(|module| plan(pid, &maps, module, NODE_FUNCTIONS).ok())
            .find(|p| {
                p.locations.contains_key(NODE_NEW_STORE)
                    && (p.locations.contains_key("_ZN2v88internal12BackingStoreD2Ev")
                        || p.locations.contains_key("_ZN2v88internal12BackingStoreD1Ev"))
            })
            .ok_or(UprobeError::NotNode { pid, exe })?;
        return Ok(Resolved { maps, plans: vec![node] });
    }
    if let Some((name, path)) = modules.replacement.clone() {
        return Err(UprobeError::ReplacementAllocator { pid, name, path });
    }
    let exe_name = modules.exe.clone().unwrap_or_default();
    // An executable that defines malloc itself (static linking) is its own allocator.
    let exe_plan = modules
        .exe
        .as_deref()
        .filter(|exe| maps.iter().any(|m| m.path == *exe))
        .map(|exe| plan(pid, &maps, exe, C_FUNCTIONS))
        .transpose()?
        .filter(|p| p.locations.contains_key("malloc") && p.locations.contains_key("free"));
    let allocator = if let Some(p) = exe_plan {
        p
    } else {
        let libc =
            modules.libc.as_deref().ok_or_else(|| UprobeError::NoAllocator { pid, exe: exe_name.clone() })?;
        cfi_plan(pid, &maps, libc, C_FUNCTIONS)?
    };
    for symbol in ["malloc", "free"] {
        if !allocator.locations.contains_key(symbol) {
            return Err(UprobeError::MissingSymbol { path: allocator.mapping.path.clone(), symbol });
        }
    }
    let cxx_module = modules.cxx.clone().or_else(|| {
        // A statically linked C++ runtime lives in the executable.
        (allocator.mapping.path == exe_name).then(|| exe_name.clone())
    });
    let mut plans = vec![allocator];
    if let Some(cxx) = cxx_module {
        let cxx_plan = if cxx == exe_name {
            plan(pid, &maps, &cxx, CXX_FUNCTIONS)
        } else {
            cfi_plan(pid, &maps, &cxx, CXX_TABLED)
        };
        match cxx_plan {
            Ok(p) => plans.push(p),
            Err(e) => debug!("no operator new probes: {e}"),
        }
    }
    let mut maps = maps;
    if plans.first().is_some_and(|p| p.cfi.is_some())
        && let Some(loader) = loader_mapping(&maps, modules.exe.as_deref())
    {
        if !maps.iter().any(|m| m.path == loader.path) {
            maps.push(loader.clone());
        }
        match cfi_plan(pid, &maps, &loader.path, LOADER_FUNCTIONS) {
            Ok(p) => plans.push(p),
            Err(e) => debug!("no unwind table for the loader {}: {e}", loader.path),
        }
    }
    Ok(Resolved { maps, plans })
}

/// Where the system's C++ runtime is, for probes set before a command has mapped it.
const SYSTEM_CXX: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
    "/lib/x86_64-linux-gnu/libstdc++.so.6",
    "/usr/lib64/libstdc++.so.6",
    "/usr/lib/libstdc++.so.6",
];

/// Tables the system's libstdc++ for process `pid` before the process maps it (`memtrace
/// run`: the command is about to be exec'd), with its learning probe (`CXX_TABLED`).
/// Uprobes belong to the file, so it takes effect when the process maps it.
pub fn attach_system_cxx(
    ebpf: &mut Ebpf,
    cfi: &mut CfiMaps,
    pid: u32,
) -> Result<AttachedAllocator, UprobeError> {
    let Some((path, inode)) = SYSTEM_CXX.iter().find_map(|p| {
        std::fs::canonicalize(p).ok().and_then(|p| Some((p.clone(), std::fs::metadata(&p).ok()?.ino())))
    }) else {
        return Ok(AttachedAllocator::default());
    };
    let path = path.to_string_lossy().into_owned();
    let maps = vec![Mapping { start: 0, end: 0, executable: true, offset: 0, inode, path: path.clone() }];
    let cxx = cfi_plan(pid, &maps, &path, CXX_TABLED)?;
    attach_resolved(ebpf, cfi, pid, &Resolved { maps, plans: vec![cxx] }, &[])
}

/// The program that holds a `memtrace run` command at `_exit` (see `uprobe_exit`).
const EXIT_FUNCTIONS: &[(&str, &str, bool)] = &[("_exit", "uprobe_exit", false)];

/// Probes `_exit` of the command's C library (or of a static executable) for process
/// `pid`: the command stops there until memtrace has read its memory map, so that even a
/// program that lives a millisecond is symbolized. Returns the links to keep.
pub fn attach_exit_hold(
    ebpf: &mut Ebpf,
    pid: u32,
    files: &CommandFiles,
) -> Result<Vec<UProbeLink>, UprobeError> {
    let modules = classify(&files.maps, Some(&files.exe));
    let mut candidates = vec![files.exe.clone()];
    candidates.extend(modules.libc.clone());
    let plan = candidates
        .iter()
        .filter_map(|module| plan(pid, &files.maps, module, EXIT_FUNCTIONS).ok())
        .find(|p| p.locations.contains_key("_exit"))
        .ok_or_else(|| UprobeError::MissingSymbol { path: files.exe.clone(), symbol: "_exit" })?;
    let Some((symbol, program, _)) = EXIT_FUNCTIONS.first() else { return Ok(Vec::new()) };
    let location = plan.locations[symbol];
    let probe: &mut UProbe = ebpf
        .program_mut(program)
        .ok_or(UprobeError::MissingProgram(program))?
        .try_into()
        .map_err(|_| UprobeError::MissingProgram(program))?;
    let scope = NonZeroU32::new(pid).map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
    let link = attach_one(probe, &plan.path, location.probe_offset, scope, None)
        .map_err(|source| UprobeError::Attach { path: plan.mapping.path.clone(), symbol, pid, source })?;
    debug!("holding process {pid} at {}:_exit", plan.mapping.path);
    Ok(vec![link])
}

/// Attaches the allocator probes to process `pid` (all its threads); see [`resolve`].
pub fn attach(
    ebpf: &mut Ebpf,
    cfi: &mut CfiMaps,
    pid: u32,
    node_buffers: bool,
) -> Result<AttachedAllocator, UprobeError> {
    attach_resolved(ebpf, cfi, pid, &resolve(pid, node_buffers)?, &[])
}

/// Attaches what [`resolve`] found, except in the modules (inodes) `probed` already.
pub fn attach_resolved(
    ebpf: &mut Ebpf,
    cfi: &mut CfiMaps,
    pid: u32,
    resolved: &Resolved,
    probed: &[u64],
) -> Result<AttachedAllocator, UprobeError> {
    let Resolved { maps, plans } = resolved;
    let (module, inode) = resolved.module();
    let plans: Vec<&Plan> = plans.iter().filter(|p| !probed.contains(&p.mapping.inode)).collect();
    // The unwind tables go in before any probe can hit; then each probe in a tabled module
    // carries its slot and address in its cookie.
    let slots: Vec<Option<usize>> = plans
        .iter()
        .map(|p| {
            let data = p.cfi.as_deref()?;
            let slot = cfi.ensure(&p.path, p.mapping.inode, data)?;
            if p.mapping.end != 0
                && let Some(vaddr) = crate::bpf::cfi_table::vaddr_of_offset(data, p.mapping.offset)
            {
                // Mapped already: the probes may not hit again (ld.so's, libstdc++'s).
                cfi.seed(pid, slot, p.mapping.start.wrapping_sub(vaddr));
            }
            Some(slot)
        })
        .collect();
    let scope = NonZeroU32::new(pid).map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
    let mut links = Vec::new();
    let mut functions = Vec::new();
    let mut cycled = Vec::new();
    let mut cycled_links = Vec::new();
    // Frees first, then returns, then entries: an allocation is never recorded without
    // its free being watched, and no call is entered without its return being watched.
    for phase in 0..3 {
        for (plan, slot) in plans.iter().zip(&slots) {
            let mut seen = HashSet::new();
            for &(symbol, entry, needs_return) in plan.table {
                let Some(location) = plan.locations.get(symbol) else {
                    if phase == 0 {
                        debug!("{} has no {symbol}; not probed", plan.mapping.path);
                    }
                    continue;
                };
                // aligned_alloc and memalign are one function in glibc.
                if !seen.insert(location.probe_offset) {
                    continue;
                }
                if entry.is_empty() {
                    // A marker: its frames are the allocator's; nothing is attached.
                    if phase == 0 {
                        functions.push(probed_function(maps, &plan.mapping, symbol, location));
                    }
                    continue;
                }
                let program = match phase {
                    0 if !needs_return => entry,
                    1 if needs_return => RETURN_PROGRAM,
                    2 if needs_return => entry,
                    _ => continue,
                };
                let probe: &mut UProbe = ebpf
                    .program_mut(program)
                    .ok_or(UprobeError::MissingProgram(program))?
                    .try_into()
                    .map_err(|_| UprobeError::MissingProgram(program))?;
                let cookie = slot.zip(plan.cfi.as_deref()).and_then(|(slot, data)| {
                    crate::bpf::cfi_table::vaddr_of_offset(data, location.probe_offset)
                        .map(|vaddr| cookie::encode(slot, vaddr))
                });
                if program == LEARN_PROGRAM && cookie.is_none() {
                    continue;
                }
                let link = attach_one(probe, &plan.path, location.probe_offset, scope, cookie).map_err(
                    |source| UprobeError::Attach { path: plan.mapping.path.clone(), symbol, pid, source },
                )?;
                if duty::CYCLED_PROGRAMS.contains(&program) {
                    cycled.push(duty::CycledProbe {
                        program,
                        symbol,
                        module: plan.mapping.path.clone(),
                        path: plan.path.clone(),
                        offset: location.probe_offset,
                        pid,
                    });
                    cycled_links.push(link);
                } else {
                    links.push(link);
                }
                if phase != 1 && program != LEARN_PROGRAM {
                    functions.push(probed_function(maps, &plan.mapping, symbol, location));
                    debug!(
                        "probing {}:{symbol} at file offset {:#x} (+{}), {}",
                        plan.mapping.path,
                        location.probe_offset,
                        location.probe_offset - location.file_offset,
                        if location.emulated {
                            "an instruction the kernel emulates"
                        } else {
                            "an instruction the kernel single-steps (a second trap per hit)"
                        }
                    );
                }
            }
        }
    }
    Ok(AttachedAllocator {
        module: module.to_string(),
        inode,
        functions,
        links,
        cycled,
        cycled_links,
        detached: false,
    })
}

fn probed_function(
    maps: &[Mapping],
    mapping: &Mapping,
    symbol: &'static str,
    location: &FunctionLocation,
) -> ProbedFunction {
    let start = runtime_address(maps, mapping, location.file_offset).unwrap_or(0);
    ProbedFunction {
        symbol,
        module: mapping.path.clone(),
        inode: mapping.inode,
        file_offset: location.file_offset,
        size: location.size,
        start,
        end: if start == 0 { 0 } else { start + location.size.max(1) },
    }
}

fn attach_one(
    probe: &mut UProbe,
    path: &Path,
    file_offset: u64,
    scope: UProbeScope,
    cookie: Option<u64>,
) -> Result<UProbeLink, ProgramError> {
    if probe.fd().is_err() {
        probe.load()?;
    }
    let point = UProbeAttachPoint { location: UProbeAttachLocation::AbsoluteOffset(file_offset), cookie };
    let id = probe.attach(point, path, scope)?;
    probe.take_link(id)
}

/// The address at which the target maps `file_offset` of `module`.
fn runtime_address(maps: &[Mapping], module: &Mapping, file_offset: u64) -> Option<u64> {
    maps.iter()
        .filter(|m| m.inode == module.inode && m.path == module.path)
        .find(|m| file_offset >= m.offset && file_offset < m.offset + (m.end - m.start))
        .map(|m| m.start + (file_offset - m.offset))
}

#[cfg(test)]
mod tests;
