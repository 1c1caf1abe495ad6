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
        uprobe::{UProbeAttachLocation, UProbeLink, UProbeScope},
    },
};
use log::debug;
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
use tracer_common::{
    GLOBAL_MALLOC_MIN_SIZE, GLOBAL_MALLOC_SAMPLE_BYTES, GLOBAL_MALLOC_WAIT_EXEC, MAP_MALLOC_LIVE,
    MAP_MALLOC_NEW_STACKS, MAP_MALLOC_PENDING, MAP_MALLOC_STACKS, MAP_MALLOC_TOTALS,
};

use crate::procfs::maps::MapEntry;

pub mod needed;

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
            .map_max_entries(MAP_MALLOC_PENDING, MAX_THREADS);
    } else {
        loader
            .map_max_entries(MAP_MALLOC_LIVE, 1)
            .map_max_entries(MAP_MALLOC_STACKS, 1)
            .map_max_entries(MAP_MALLOC_TOTALS, 1)
            .map_max_entries(MAP_MALLOC_PENDING, 1)
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
        "--malloc-probes node-buffers: process {pid} ({exe}) is not a Node.js that exports node::NodeArrayBufferAllocator (Node 12 or later); use --malloc-probes libc"
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

/// The C++ `operator new` family (size first). Probed so that stacks are taken where the
/// caller's frame is intact: libstdc++ has no frame pointers, so from inside its `malloc`
/// call the frame-pointer walk skips the function that called `new`.
const CXX_FUNCTIONS: &[(&str, &str, bool)] = &[
    ("_Znwm", "uprobe_operator_new", true),
    ("_Znam", "uprobe_operator_new", true),
    ("_ZnwmRKSt9nothrow_t", "uprobe_operator_new", true),
    ("_ZnamRKSt9nothrow_t", "uprobe_operator_new", true),
    ("_ZnwmSt11align_val_t", "uprobe_operator_new", true),
    ("_ZnamSt11align_val_t", "uprobe_operator_new", true),
    ("_ZnwmSt11align_val_tRKSt9nothrow_t", "uprobe_operator_new", true),
    ("_ZnamSt11align_val_tRKSt9nothrow_t", "uprobe_operator_new", true),
];

/// Node's `ArrayBuffer` allocator (methods: `this` first), for `--malloc-probes node-buffers`.
const NODE_FUNCTIONS: &[(&str, &str, bool)] = &[
    ("_ZN4node24NodeArrayBufferAllocator4FreeEPvm", "uprobe_node_buffer_free", false),
    ("_ZN4node24NodeArrayBufferAllocator8AllocateEm", "uprobe_node_buffer_alloc", true),
    ("_ZN4node24NodeArrayBufferAllocator21AllocateUninitializedEm", "uprobe_node_buffer_alloc", true),
];

const RETURN_PROGRAM: &str = "uretprobe_alloc";

/// A defined function of an ELF file: where it is in the file and in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionLocation {
    /// File offset of its first instruction.
    pub file_offset: u64,
    pub size: u64,
    /// Where the uprobe goes: the first instruction, or the second when the first cannot
    /// be probed (see [`locked_instruction_len`]).
    pub probe_offset: u64,
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
        let skip = usize::try_from(file_offset)
            .ok()
            .and_then(|start| data.get(start..start.saturating_add(16)))
            .and_then(locked_instruction_len)
            .unwrap_or(0);
        found.insert(
            name,
            FunctionLocation { file_offset, size: symbol.size(), probe_offset: file_offset + skip as u64 },
        );
    }
    Ok(found)
}

/// The length of `code`'s first instruction when it is a LOCK-prefixed read-modify-write
/// of memory (`lock add/or/adc/sbb/and/sub/xor mem, reg|imm`, `lock inc/dec/not/neg mem`).
///
/// x86 uprobes refuse LOCK-prefixed instructions (the kernel answers ENOTSUPP), and Node's
/// `NodeArrayBufferAllocator::Free` starts with `lock sub %rdx,0x10(%rdi)`. Such an
/// instruction writes only memory and flags, so at the next one the arguments and the
/// stack are still as at entry: the probe goes there. `xadd` and `cmpxchg`, which write a
/// register, are not skipped. The instruction is decoded by iced-x86: a wrong length would
/// put the int3 inside an instruction and corrupt the target's code.
#[must_use]
pub fn locked_instruction_len(code: &[u8]) -> Option<usize> {
    use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic, OpKind};
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    if !decoder.can_decode() {
        return None;
    }
    let instruction = decoder.decode();
    if instruction.is_invalid() || instruction.code() == Code::INVALID || !instruction.has_lock_prefix() {
        return None;
    }
    let memory_only = matches!(
        instruction.mnemonic(),
        Mnemonic::Add
            | Mnemonic::Or
            | Mnemonic::Adc
            | Mnemonic::Sbb
            | Mnemonic::And
            | Mnemonic::Sub
            | Mnemonic::Xor
            | Mnemonic::Inc
            | Mnemonic::Dec
            | Mnemonic::Not
            | Mnemonic::Neg
    );
    (memory_only && instruction.op0_kind() == OpKind::Memory).then_some(instruction.len())
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
}

impl AttachedAllocator {
    /// Removes every probe: the tables stop changing (and the target stops paying).
    /// Slow: see [`crate::bpf::teardown`].
    pub fn detach(&mut self) {
        self.links.clear();
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
}

fn plan(
    pid: u32,
    maps: &[Mapping],
    module: &str,
    table: &'static [(&'static str, &'static str, bool)],
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
    let locations = resolve_functions(&data, &names)
        .map_err(|source| UprobeError::Elf { path: module.to_string(), source })?;
    Ok(Plan { mapping, path, locations, table })
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
        let node = plan(pid, &maps, &exe, NODE_FUNCTIONS)
            .map_err(|_| UprobeError::NotNode { pid, exe: exe.clone() })?;
        if !NODE_FUNCTIONS.iter().all(|(symbol, _, _)| node.locations.contains_key(symbol)) {
            return Err(UprobeError::NotNode { pid, exe });
        }
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
        plan(pid, &maps, libc, C_FUNCTIONS)?
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
        match plan(pid, &maps, &cxx, CXX_FUNCTIONS) {
            Ok(p) => plans.push(p),
            Err(e) => debug!("no operator new probes: {e}"),
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

/// Probes `operator new` in the system's libstdc++ for process `pid` before the process
/// maps it (`memtrace run`: the command is about to be exec'd). Uprobes belong to the
/// file, so they take effect when the process maps it.
pub fn attach_system_cxx(ebpf: &mut Ebpf, pid: u32) -> Result<AttachedAllocator, UprobeError> {
    let Some((path, inode)) = SYSTEM_CXX.iter().find_map(|p| {
        std::fs::canonicalize(p).ok().and_then(|p| Some((p.clone(), std::fs::metadata(&p).ok()?.ino())))
    }) else {
        return Ok(AttachedAllocator::default());
    };
    let path = path.to_string_lossy().into_owned();
    let maps = vec![Mapping { start: 0, end: 0, executable: true, offset: 0, inode, path: path.clone() }];
    let cxx = plan(pid, &maps, &path, CXX_FUNCTIONS)?;
    attach_resolved(ebpf, pid, &Resolved { maps, plans: vec![cxx] }, &[])
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
    let link = attach_one(probe, &plan.path, location.probe_offset, scope)
        .map_err(|source| UprobeError::Attach { path: plan.mapping.path.clone(), symbol, pid, source })?;
    debug!("holding process {pid} at {}:_exit", plan.mapping.path);
    Ok(vec![link])
}

/// Attaches the allocator probes to process `pid` (all its threads); see [`resolve`].
pub fn attach(ebpf: &mut Ebpf, pid: u32, node_buffers: bool) -> Result<AttachedAllocator, UprobeError> {
    attach_resolved(ebpf, pid, &resolve(pid, node_buffers)?, &[])
}

/// Attaches what [`resolve`] found, except in the modules (inodes) `probed` already.
pub fn attach_resolved(
    ebpf: &mut Ebpf,
    pid: u32,
    resolved: &Resolved,
    probed: &[u64],
) -> Result<AttachedAllocator, UprobeError> {
    let Resolved { maps, plans } = resolved;
    let (module, inode) = resolved.module();
    let plans: Vec<&Plan> = plans.iter().filter(|p| !probed.contains(&p.mapping.inode)).collect();
    let scope = NonZeroU32::new(pid).map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
    let mut links = Vec::new();
    let mut functions = Vec::new();
    // Frees first, then returns, then entries: an allocation is never recorded without
    // its free being watched, and no call is entered without its return being watched.
    for phase in 0..3 {
        for plan in &plans {
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
                let link = attach_one(probe, &plan.path, location.probe_offset, scope).map_err(|source| {
                    UprobeError::Attach { path: plan.mapping.path.clone(), symbol, pid, source }
                })?;
                links.push(link);
                if phase != 1 {
                    let start = runtime_address(maps, &plan.mapping, location.file_offset).unwrap_or(0);
                    functions.push(ProbedFunction {
                        symbol,
                        module: plan.mapping.path.clone(),
                        inode: plan.mapping.inode,
                        file_offset: location.file_offset,
                        size: location.size,
                        start,
                        end: if start == 0 { 0 } else { start + location.size.max(1) },
                    });
                    debug!(
                        "probing {}:{symbol} at file offset {:#x}",
                        plan.mapping.path, location.probe_offset
                    );
                }
            }
        }
    }
    Ok(AttachedAllocator { module: module.to_string(), inode, functions, links })
}

fn attach_one(
    probe: &mut UProbe,
    path: &Path,
    file_offset: u64,
    scope: UProbeScope,
) -> Result<UProbeLink, ProgramError> {
    if probe.fd().is_err() {
        probe.load()?;
    }
    let id = probe.attach(UProbeAttachLocation::AbsoluteOffset(file_offset), path, scope)?;
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
