//! Process modules, user-stack unwinding and symbolization.
//!
//! [`ProcessSymbols`] follows one traced process: it opens every executable file the
//! process maps and keeps the handles, so stacks can still be symbolized after the process
//! exits; unwinds captured user stacks with the modules' CFI (framehop) and frame pointers;
//! and names addresses with blazesym (ELF/DWARF) or, for JIT code, the runtime's perf map,
//! else, for node, V8's own heap ([`v8`]).

mod js;
pub(crate) mod module;
mod native;
#[cfg(test)]
mod node_test;
pub(crate) mod perfmap;
#[cfg(test)]
mod tests;
pub(crate) mod unwind;
pub(crate) mod v8;

pub use js::V8Code;

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use framehop::ExplicitModuleSectionInfo;

use crate::procfs::maps::{self, MapEntry};
use crate::report::{Frame, FrameKind};
use module::ModuleFile;
use native::NativeSymbolizer;
use perfmap::PerfMapReader;
use unwind::StackUnwinder;

/// The user registers captured with a stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

#[derive(thiserror::Error, Debug)]
pub enum SymbolizeError {
    #[error("process {pid} does not exist (it may have exited)")]
    NoSuchProcess { pid: u32 },
    #[error("cannot read {}: permission denied — run memtrace as root (or as the target's user)", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is no longer the file the process mapped (inode {inode}); it was probably replaced by an upgrade — run as root so /proc/PID/map_files reaches the original",
        path.display()
    )]
    FileReplaced { path: PathBuf, inode: u64 },
}

/// How often an unknown address may trigger a re-read of `/proc/PID/maps`.
const MAPS_REFRESH_INTERVAL: Duration = Duration::from_millis(100);
/// Bytes of cached symbolizations kept before the cache is cleared: the cache only saves
/// time, and each address's frames are owned strings (JIT code at new addresses would grow
/// it for as long as the target runs).
const CACHE_LIMIT_BYTES: usize = 8 << 20;

/// An executable region of the process.
#[derive(Clone, Debug)]
struct Region {
    start: u64,
    end: u64,
    kind: RegionKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum RegionKind {
    /// A mapping of `modules[module]` at file `offset`.
    File { module: usize, offset: u64 },
    /// Anonymous or pseudo (`[vdso]`) executable memory: JIT code lives here.
    Anon { name: String },
}

#[derive(Clone, Debug)]
struct Cached {
    frames: Vec<Frame>,
    /// `Some(generation)` when the frames came from the perf map of that generation.
    perf_generation: Option<u64>,
}

/// Symbols and unwind information of one traced process.
#[derive(Debug)]
pub struct ProcessSymbols {
    pid: u32,
    /// Deduplicated by (device, inode).
    modules: Vec<ModuleFile>,
    module_index: HashMap<(u64, u64), usize>,
    /// Sorted by start, non-overlapping. Regions the process unmapped stay until something
    /// new is mapped over them, so stacks captured earlier still resolve.
    regions: Vec<Region>,
    unwinder: StackUnwinder,
    native: NativeSymbolizer,
    perf_map: PerfMapReader,
    /// Bumped when a region is added or replaced.
    regions_generation: u64,
    /// Keyed by (address, is a return address).
    cache: HashMap<(u64, bool), Cached>,
    /// Estimated heap bytes of `cache`.
    cache_bytes: usize,
    last_maps_refresh: Instant,
    /// From `/proc/PID/stat`, to notice the pid being reused by another process.
    start_time: Option<u64>,
    v8: js::V8State,
    js_tokens: js::JsTokens,
}

impl ProcessSymbols {
    /// Reads /proc/PID/maps, opens every file-backed executable mapping's file and keeps the
    /// handle open (so it survives the target's exit), parses CFI sections with `object`.
    /// Error if the pid does not exist.
    pub fn new(pid: u32) -> Result<Self, SymbolizeError> {
        let status_path = PathBuf::from(format!("/proc/{pid}/status"));
        let status =
            std::fs::read_to_string(&status_path).map_err(|source| proc_error(pid, status_path, source))?;
        let status = maps::parse_status(&status);
        let ns_pid = status.ns_pid.unwrap_or(pid);
        // The target's own /tmp, which differs from ours when it runs in a container.
        let perf_path = PathBuf::from(format!("/proc/{pid}/root/tmp/perf-{ns_pid}.map"));
        let mut symbols = Self {
            pid,
            modules: Vec::new(),
            module_index: HashMap::new(),
            regions: Vec::new(),
            unwinder: StackUnwinder::new(),
            native: NativeSymbolizer::new(),
            perf_map: PerfMapReader::new(perf_path, status.uids),
            regions_generation: 0,
            cache: HashMap::new(),
            cache_bytes: 0,
            last_maps_refresh: Instant::now(),
            start_time: read_start_time(pid),
            v8: js::V8State::default(),
            js_tokens: js::JsTokens::default(),
        };
        symbols.refresh_maps()?;
        symbols.refresh_perf_map();
        log::debug!(
            "pid {pid}: {} modules, {} executable regions, perf map {}",
            symbols.modules.len(),
            symbols.regions.len(),
            symbols.perf_map.path().display()
        );
        Ok(symbols)
    }

    /// Re-reads /proc/PID/maps: adds new modules (dlopen), keeps old ones. Cheap when nothing
    /// changed. Err if the process is gone (existing data stays usable).
    pub fn refresh_maps(&mut self) -> Result<(), SymbolizeError> {
        self.last_maps_refresh = Instant::now();
        let path = PathBuf::from(format!("/proc/{}/maps", self.pid));
        let text = std::fs::read_to_string(&path).map_err(|source| proc_error(self.pid, path, source))?;
        if self.start_time.is_some() && read_start_time(self.pid) != self.start_time {
            // The traced process is gone and another one got its pid.
            return Err(SymbolizeError::NoSuchProcess { pid: self.pid });
        }
        for entry in maps::parse_maps(&text) {
            if entry.executable && !self.is_known_region(&entry) {
                self.add_region(&entry);
            }
        }
        self.settle_v8();
        Ok(())
    }

    /// Unwinds one captured stack. Returns addresses leaf first: regs.ip then return addresses.
    ///
    /// Uses framehop over `stack` (bytes at `[regs.sp, regs.sp + stack.len())`). If that yields
    /// at most one frame and `fp_frames` (the kernel's frame-pointer walk, leaf first) has
    /// more, returns `fp_frames` instead. Depth is bounded by 128 frames. JS frames that V8's
    /// heap names are replaced by tokens standing for the function (see [`js`]): call this
    /// while the event is fresh, since the heap moves.
    pub fn unwind(&mut self, regs: Regs, stack: &[u8], fp_frames: &[u64]) -> Vec<u64> {
        let mut cfi = self.unwinder.unwind(regs, stack);
        if cfi.addrs().any(|addr| self.region_at(addr).is_none()) && self.refresh_maps_rate_limited() {
            cfi = self.unwinder.unwind(regs, stack);
        }
        let frames = unwind::combine(cfi, fp_frames);
        if frames.iter().any(|f| self.region_at(f.addr).is_none()) {
            self.refresh_maps_rate_limited();
        }
        self.name_js_frames(&frames, regs.sp, stack)
    }

    /// Symbolizes addresses as returned by [`Self::unwind`]: index 0 is an exact ip, the others
    /// are return addresses (looked up at `addr - 1`). Returns, per address, its frames
    /// innermost first (inlined functions expanded). A return address outside every
    /// executable mapping and the perf map is not code (a frame-pointer walk through a
    /// function that uses `rbp` for data) and gets no frame: an empty `Vec`.
    pub fn symbolize(&mut self, addrs: &[u64]) -> Vec<Vec<Frame>> {
        let generation = self.perf_map.map().generation();
        let mut out: Vec<Option<Vec<Frame>>> = addrs
            .iter()
            .enumerate()
            .map(|(i, &addr)| {
                if let Some(frame) = self.js_token_frame(addr, i > 0) {
                    return Some(vec![frame]);
                }
                let cached = self.cache.get(&(addr, i > 0))?;
                match cached.perf_generation {
                    Some(g) if g != generation => None,
                    _ => Some(cached.frames.clone()),
                }
            })
            .collect();
        if out.iter().all(Option::is_some) {
            return out.into_iter().flatten().collect();
        }

        let lookup = |i: usize, addr: u64| if i == 0 { addr } else { addr.saturating_sub(1) };
        let missing: Vec<usize> = (0..addrs.len()).filter(|&i| out[i].is_none()).collect();
        if missing.iter().any(|&i| self.region_at(lookup(i, addrs[i])).is_none()) {
            self.refresh_maps_rate_limited();
        }
        let in_file = |this: &Self, i: usize| {
            matches!(this.region_at(lookup(i, addrs[i])), Some(Region { kind: RegionKind::File { .. }, .. }))
        };
        if missing
            .iter()
            .any(|&i| !in_file(self, i) && self.perf_map.map().lookup(lookup(i, addrs[i])).is_none())
        {
            self.refresh_perf_map();
        }

        // Native addresses, batched per module.
        let mut by_module: HashMap<usize, Vec<(usize, u64)>> = HashMap::new();
        for &i in &missing {
            let addr = lookup(i, addrs[i]);
            if let Some(Region { start, kind: RegionKind::File { module, offset }, .. }) =
                self.region_at(addr)
            {
                by_module.entry(*module).or_default().push((i, addr - start + offset));
            }
        }
        for (module, items) in by_module {
            let offsets: Vec<u64> = items.iter().map(|&(_, offset)| offset).collect();
            let results = self.symbolize_native(module, &offsets);
            for ((i, offset), frames) in items.into_iter().zip(results) {
                let frames = frames.unwrap_or_else(|| {
                    // The address's own offset (a return address is looked up at addr - 1).
                    let offset = offset + (addrs[i] - lookup(i, addrs[i]));
                    vec![unknown_in_module(&self.modules[module].name, offset)]
                });
                self.remember((addrs[i], i > 0), frames.clone(), None);
                out[i] = Some(frames);
            }
        }

        // JIT code and anything else outside file-backed modules.
        let generation = self.perf_map.map().generation();
        for &i in &missing {
            if out[i].is_some() {
                continue;
            }
            let addr = lookup(i, addrs[i]);
            if let Some(frame) = self.perf_map.map().lookup(addr) {
                let frames = vec![frame.clone()];
                self.remember((addrs[i], i > 0), frames.clone(), Some(generation));
                out[i] = Some(frames);
            } else {
                out[i] = Some(match self.region_at(addr) {
                    Some(Region { kind: RegionKind::Anon { name }, .. }) => {
                        vec![unknown_frame(addrs[i], name)]
                    }
                    // The exact ip of the event is kept whatever it is; a return address
                    // that points at no code is not a frame.
                    _ if i == 0 => vec![unknown_frame(addrs[i], "")],
                    _ => Vec::new(),
                });
            }
        }
        out.into_iter().flatten().collect()
    }

    /// Reads what was appended to /tmp/perf-PID.map since last time (cheap if nothing new).
    pub fn refresh_perf_map(&mut self) {
        self.perf_map.refresh();
    }

    /// Number of modules known, for logs/tests.
    pub fn module_count(&self) -> usize {
        self.modules.len()
    }

    fn symbolize_native(&mut self, module: usize, offsets: &[u64]) -> Vec<Option<Vec<Frame>>> {
        let file = &self.modules[module];
        let Some(path) = file.fd_path() else {
            return vec![None; offsets.len()];
        };
        self.native.symbolize(&path, &file.name, offsets)
    }

    fn remember(&mut self, key: (u64, bool), frames: Vec<Frame>, perf_generation: Option<u64>) {
        if self.cache_bytes >= CACHE_LIMIT_BYTES {
            self.cache.clear();
            self.cache_bytes = 0;
        }
        let bytes = cached_bytes(&frames);
        if let Some(old) = self.cache.insert(key, Cached { frames, perf_generation }) {
            self.cache_bytes -= cached_bytes(&old.frames);
        }
        self.cache_bytes += bytes;
    }

    /// Estimated heap bytes of what this process's symbols keep per address seen (the
    /// symbolization cache and the JS frame tokens), for the memory log.
    pub fn cache_bytes(&self) -> usize {
        self.cache_bytes + self.js_tokens.heap_bytes()
    }

    /// Re-reads the maps unless that was done less than [`MAPS_REFRESH_INTERVAL`] ago.
    /// Returns whether a re-read happened and found new regions.
    fn refresh_maps_rate_limited(&mut self) -> bool {
        if self.last_maps_refresh.elapsed() < MAPS_REFRESH_INTERVAL {
            return false;
        }
        let before = self.regions_generation;
        match self.refresh_maps() {
            Ok(()) => {}
            Err(err) => log::debug!("refresh maps of pid {}: {err}", self.pid),
        }
        let changed = before != self.regions_generation;
        if changed {
            log::debug!("pid {}: maps changed, {} modules", self.pid, self.modules.len());
        }
        changed
    }

    fn region_at(&self, addr: u64) -> Option<&Region> {
        let index = self.regions.partition_point(|r| r.start <= addr).checked_sub(1)?;
        let region = &self.regions[index];
        (addr < region.end).then_some(region)
    }

    fn is_known_region(&self, entry: &MapEntry) -> bool {
        let Some(region) = self.region_at(entry.start) else {
            return false;
        };
        if region.start != entry.start || region.end != entry.end {
            return false;
        }
        match &region.kind {
            RegionKind::File { module, offset } => {
                *offset == entry.offset
                    && entry.is_file_backed()
                    && self.module_index.get(&(entry.dev, entry.inode)) == Some(module)
            }
            RegionKind::Anon { name } => !entry.is_file_backed() && *name == entry.path,
        }
    }

    /// Adds an executable mapping, replacing whatever older regions it overlaps.
    fn add_region(&mut self, entry: &MapEntry) {
        let first = self.regions.partition_point(|r| r.end <= entry.start);
        let last = first + self.regions[first..].partition_point(|r| r.start < entry.end);
        let replaced = last > first;
        for old in self.regions.drain(first..last) {
            if matches!(old.kind, RegionKind::File { .. }) {
                self.unwinder.remove_module(old.start);
            }
        }
        if replaced {
            // Cached names of the replaced range are stale now.
            self.cache.retain(|&(addr, _), _| addr < entry.start || addr > entry.end);
            self.cache_bytes = self.cache.values().map(|c| cached_bytes(&c.frames)).sum();
        }
        self.regions_generation += 1;
        let kind = if entry.is_file_backed() {
            let key = (entry.dev, entry.inode);
            let module = if let Some(&module) = self.module_index.get(&key) {
                module
            } else {
                self.modules.push(ModuleFile::open(self.pid, entry));
                self.module_index.insert(key, self.modules.len() - 1);
                self.modules.len() - 1
            };
            self.consider_v8_module(module);
            self.note_v8_mapping(module, entry);
            let file = &self.modules[module];
            let elf = file.elf.as_ref();
            if let Some((elf, bias)) = elf.and_then(|elf| Some((elf, elf.bias_for(entry)?))) {
                self.unwinder.add_module(&file.name, entry.start..entry.end, bias, elf.unwind.section_info());
            } else {
                if elf.is_some() {
                    log::debug!("no PT_LOAD of {} holds offset {:#x}", file.name, entry.offset);
                }
                // No unwind data: framehop walks frame pointers through it.
                let sections = ExplicitModuleSectionInfo::default();
                self.unwinder.add_module(&file.name, entry.start..entry.end, entry.start, sections);
            }
            RegionKind::File { module, offset: entry.offset }
        } else {
            RegionKind::Anon { name: entry.path.clone() }
        };
        self.regions.insert(first, Region { start: entry.start, end: entry.end, kind });
    }
}

impl Drop for ProcessSymbols {
    fn drop(&mut self) {
        if let Some(summary) = self.js_summary() {
            log::info!("pid {}: {summary}", self.pid);
        }
    }
}

fn proc_error(pid: u32, path: PathBuf, source: std::io::Error) -> SymbolizeError {
    if source.kind() == ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH) {
        SymbolizeError::NoSuchProcess { pid }
    } else {
        io_error(path, source)
    }
}

/// An I/O error on `path`, with a hint when it is a permission problem.
pub(crate) fn io_error(path: PathBuf, source: std::io::Error) -> SymbolizeError {
    if source.kind() == ErrorKind::PermissionDenied {
        SymbolizeError::PermissionDenied { path }
    } else {
        SymbolizeError::Io { path, source }
    }
}

fn read_start_time(pid: u32) -> Option<u64> {
    maps::parse_start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// A frame in a module that has no symbol for it: `libfoo.so+0x1234` (the file offset),
/// which `addr2line -e` or `objdump --start-address` can take.
fn unknown_in_module(module: &str, file_offset: u64) -> Frame {
    let name = module.strip_suffix(" (deleted)").unwrap_or(module);
    let name = name.rsplit('/').next().unwrap_or(name);
    Frame {
        function: format!("{name}+{file_offset:#x}"),
        module: module.to_string(),
        kind: FrameKind::Unknown,
        ..Frame::default()
    }
}

/// Heap bytes of a frame list, estimated: each allocation with its malloc header.
pub(crate) fn frames_bytes(frames: &[Frame]) -> usize {
    let string = |s: &String| if s.capacity() == 0 { 0 } else { s.capacity() + 16 };
    16 + std::mem::size_of_val(frames)
        + frames.iter().map(|f| string(&f.function) + string(&f.module) + string(&f.file)).sum::<usize>()
}

fn cached_bytes(frames: &[Frame]) -> usize {
    // The map slot: key, value and a control byte.
    std::mem::size_of::<((u64, bool), Cached)>() + 1 + frames_bytes(frames)
}

fn unknown_frame(addr: u64, module: &str) -> Frame {
    Frame {
        function: format!("{addr:#x}"),
        module: module.to_string(),
        kind: FrameKind::Unknown,
        ..Frame::default()
    }
}
