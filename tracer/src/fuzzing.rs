//! Entry points for the fuzz targets in `tracer/fuzz` (`cargo +nightly fuzz run NAME`):
//! one function per parser of input memtrace does not control, each calling the
//! crate-internal parser so that the parsers themselves stay `pub(crate)`.
//!
//! A target panics only when the parser breaks one of its own promises (a crash, or
//! an invariant written out below); malformed input must come back as an error or be
//! skipped. The unit tests replay the corpus kept in the repository through every
//! target, so a crash found once stays fixed without nightly.
#![allow(clippy::missing_panics_doc, reason = "a fuzz target panics exactly when it finds a bug")]

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::events::{self, Event, OomFormat};
use crate::procfs::{self, maps, smaps};
use crate::record::{self, format};
use crate::symbolize::perfmap::{PerfMap, parse_symbol};
use crate::symbolize::v8::{
    constants::{ElfMetadata, Layout},
    heap::{Heap, object_address},
    positions::{LineEnds, decode_table, script_offset_at},
    remote::FakeMemory,
    scopeinfo::{function_info, scope_slots},
    strings::{Chunk, read_string},
};

/// `/proc/PID/maps` text.
pub fn proc_maps(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for entry in maps::parse_maps(&text) {
        assert!(entry.start <= entry.end, "a mapping ends before it starts: {entry:?}");
        let _ = (entry.is_file_backed(), entry.path_on_disk());
    }
}

/// `/proc/PID/status` text, and the cgroup files read the same way.
pub fn proc_status(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = maps::parse_status(&text);
    let _ = procfs::parse_status(&text);
    let _ = procfs::parse_cgroup(&text);
    let _ = procfs::parse_keyed(&text, "oom_kill");
    let _ = procfs::parse_limit(&text);
}

/// `/proc/PID/stat` text.
pub fn proc_stat(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = maps::parse_start_time(&text);
    for n in [0, 1, 2, 3, 22, 47, 52, usize::MAX] {
        let _ = procfs::stat_field(&text, n);
    }
}

/// `/proc/PID/smaps` text.
pub fn smaps(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = smaps::parse_smaps(&text, true);
    let _ = smaps::parse_smaps(&text, false);
}

/// A perf map, fed whole and in pieces: both must name every address alike (the
/// target appends to the file while memtrace reads it, so pieces end anywhere).
pub fn perf_map(data: &[u8]) {
    let Some((&step, rest)) = data.split_first() else { return };
    let mut whole = PerfMap::default();
    whole.feed(rest);
    let mut pieces = PerfMap::default();
    for chunk in rest.chunks(usize::from(step).max(1)) {
        pieces.feed(chunk);
    }
    for line in String::from_utf8_lossy(rest).lines() {
        let _ = parse_symbol(line);
        let Some(start) = line.split_whitespace().next() else { continue };
        let Ok(addr) = u64::from_str_radix(start.trim_start_matches("0x"), 16) else { continue };
        assert_eq!(whole.lookup(addr), pieces.lookup(addr), "address {addr:#x}, pieces of {step} bytes");
    }
}

/// A recording file (`--record`), read as `memtrace report` reads it, then rendered.
pub fn recording(data: &[u8]) {
    if let Ok(container) = format::decode(data) {
        for section in &container.sections {
            let _ = section.data();
        }
    }
    if let Ok(rec) = record::decode(data) {
        render(&rec.report);
    }
}

/// The report section of a recording: `data` is stored as a well-formed container's
/// report (checksums right), so the fuzzer works on the JSON and the renderers.
pub fn recording_report(data: &[u8]) {
    let Ok(bytes) = format::encode(0, &[(record::SECTION_REPORT, data)]) else { return };
    if let Ok(rec) = record::decode(&bytes) {
        render(&rec.report);
    }
}

fn render(report: &crate::report::Report) {
    use crate::export::{self, FlameValue};
    let sink = std::io::sink;
    let _ = export::write_text(report, 10, sink());
    let _ = export::write_json(report, sink());
    let _ = export::write_pprof(report, sink());
    let _ = export::write_speedscope(report, sink());
    for value in [FlameValue::Outstanding, FlameValue::Count, FlameValue::Growth] {
        let _ = export::write_folded(report, value, sink());
    }
    let _ = export::write_flamegraph(report, FlameValue::Outstanding, sink());
}

/// What the Node side sends: the agent's lines (its hello, its snapshot replies with the
/// sampling heap profile, decoded into stacks) and the inspector's JSON (`/json/list`,
/// the answer to `Runtime.evaluate`).
pub fn inspector_json(data: &[u8]) {
    use crate::jsheap::{channel, inspector, profile};
    if let Ok(reply) = serde_json::from_slice::<channel::AgentReply>(data)
        && let Some(flat) = &reply.profile
    {
        for stack in profile::live_stacks(flat) {
            assert!(!stack.frames.is_empty(), "a stack without frames");
            assert!(stack.frames.len() <= profile::MAX_DEPTH, "{} frames", stack.frames.len());
            assert!(stack.frames.iter().all(|f| f.file != profile::AGENT_URL), "the agent's own objects");
        }
    }
    let _ = serde_json::from_slice::<channel::Hello>(data);
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let _ = inspector::evaluation(&value);
    if let Ok(targets) = serde_json::from_value::<Vec<inspector::ListedTarget>>(value) {
        for target in &targets {
            assert!(inspector::websocket_path(target).starts_with('/'), "a WebSocket path without its slash");
        }
    }
}

/// A file in memory, as memtrace opens the modules of the target.
fn memfd(data: &[u8]) -> Option<std::fs::File> {
    use std::{io::Write as _, os::fd::FromRawFd as _};
    // SAFETY: a NUL-terminated name and no flags; the fd is checked before use.
    let fd = unsafe { libc::memfd_create(c"memtrace-fuzz".as_ptr(), 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a new descriptor this function owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(data).ok()?;
    Some(file)
}

/// An ELF file of the traced process, read as memtrace reads one: the modules it
/// symbolizes and unwinds through (segments, CFI sections, then a CFI unwind in it), the
/// allocator it probes (its symbols and where the probes go), what it loads (`DT_NEEDED`,
/// `ld.so.cache`), and node's V8 metadata.
pub fn elf(data: &[u8]) {
    use crate::bpf::uprobe::{
        needed::{LdCache, dynamic_info},
        resolve_functions,
    };
    use crate::symbolize::{Regs, module, unwind::StackUnwinder};
    if let Ok(found) = resolve_functions(data, &["malloc", "free", "calloc", "realloc", "_exit"]) {
        for (name, f) in found {
            assert!(f.file_offset < data.len() as u64, "{name} at {:#x} past the file", f.file_offset);
        }
    }
    if let Ok(info) = dynamic_info(data) {
        let _ = LdCache::parse(data, info.machine);
    }
    let Some(file) = memfd(data) else { return };
    if let Ok(info) = module::read_elf(&file) {
        const BASE: u64 = 0x7f00_0000_0000;
        for load in &info.loads {
            let map = maps::MapEntry {
                start: BASE,
                end: BASE + 0x10_0000,
                readable: true,
                writable: false,
                executable: load.executable,
                offset: load.file_offset & !4095,
                dev: 0,
                inode: 0,
                path: "/fuzz".into(),
            };
            let _ = info.bias_for(&map);
        }
        let mut unwinder = StackUnwinder::new();
        unwinder.add_module("/fuzz", BASE..BASE + (1 << 32), BASE, info.unwind.section_info());
        let stack = &data[..data.len().min(1024)];
        let text = info.unwind.text().unwrap_or(0..0);
        for ip in [text.start, text.start.saturating_add(text.end.saturating_sub(text.start) / 2), 0x1000] {
            let regs = Regs { ip: BASE.saturating_add(ip), sp: 0x7ffe_0000_0000, bp: 0x7ffe_0000_0100 };
            let unwound = unwinder.unwind(regs, stack);
            assert!(unwound.addrs().count() <= 128, "unwinding is bounded");
        }
    }
    let _ = crate::symbolize::v8::elf::read_elf(&file, "/fuzz");
}

/// The cgroup files memtrace reads, NUL-separated: `cgroup.procs`, `/proc/self/mountinfo`,
/// `/proc/self/cgroup` (or `/proc/PID/cgroup`), and a limit file (`memory.max`,
/// `memory.limit_in_bytes`) with the keyed files (`memory.events`, `memory.stat`).
pub fn cgroup_files(data: &[u8]) {
    use crate::session::cgroup::{parse_procs, v1_hierarchy, v1_mount_options};
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let (procs, mountinfo, proc_cgroup, limit) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    assert!(parse_procs(procs).all(|pid| pid != 0), "pid 0 is no process");
    for dir in ["/sys/fs/cgroup/memory/app", "/sys/fs/cgroup", "/"] {
        if let Some(options) = v1_mount_options(mountinfo, std::path::Path::new(dir)) {
            let _ = v1_hierarchy(proc_cgroup, &options);
        }
    }
    let _ = v1_hierarchy(proc_cgroup, &["memory".to_string()]);
    if let Some((_, path)) = procfs::parse_cgroup(proc_cgroup) {
        let root = std::path::Path::new("/nonexistent-memtrace-fuzz");
        let memcg = procfs::memcg_under(root, proc_cgroup);
        assert_eq!(memcg.map(|m| m.path), Some(path), "the cgroup path as /proc gives it");
    }
    let _ = procfs::parse_limit(limit);
    for key in ["oom_kill", "max", "oom", "hierarchical_memory_limit"] {
        let _ = procfs::parse_keyed(limit, key);
    }
}

/// The `oom:mark_victim` format of kernel 6.18 (this machine's).
const MARK_VICTIM_FORMAT: &str = include_str!("../fuzz/corpus/oom_format/mark_victim-6.18.txt");

/// A ring buffer record, decoded as the event loop decodes it.
pub fn event(data: &[u8]) {
    static OOM: OnceLock<Option<OomFormat>> = OnceLock::new();
    match events::decode(data) {
        Ok(Event::Mem { stack: Some(stack), .. }) => {
            let frames = stack.fp_frames();
            assert!(frames.len() <= tracer_common::FP_STACK_DEPTH, "{} frames", frames.len());
        }
        Ok(Event::Oom { event }) => {
            if let Some(format) = OOM.get_or_init(|| OomFormat::parse(MARK_VICTIM_FORMAT).ok()) {
                let _ = format.decode(event);
            }
        }
        _ => {}
    }
}

/// A tracepoint `format` file, then an OOM record decoded with it: text up to the first
/// NUL byte, the record after it.
pub fn oom_format(data: &[u8]) {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let text = String::from_utf8_lossy(&data[..split]);
    let _ = events::field_offset(&text, "group_dead");
    let Ok(format) = OomFormat::parse(&text) else { return };
    assert!(format.record_len() as usize <= tracer_common::OOM_RECORD_MAX);
    let mut record = data.get(split + 1..).unwrap_or_default().to_vec();
    record.resize(record.len().max(size_of::<tracer_common::OomEvent>()), 0);
    let _ = format.decode(&record);
}

/// `v8dbg_*` constants as `NAME VALUE` lines, and a `version MAJOR.MINOR.BUILD` line.
pub fn v8_layout(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = Layout::new(&metadata(&text, None));
}

/// A source position table (bytes of its `ByteArray`), and line ends of a source.
pub fn v8_positions(data: &[u8]) {
    if let Some(entries) = decode_table(data) {
        let mut last = i64::MIN;
        for e in &entries {
            let _ = e.script_offset();
            last = last.max(e.code_offset);
        }
        for offset in [-1, 0, 10, last, i64::MAX] {
            let _ = script_offset_at(&entries, offset);
        }
    }
    let units: Vec<u16> = data.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    let mut scanner = LineEnds::scanner();
    scanner.feed(&Chunk::OneByte(data));
    scanner.feed(&Chunk::TwoByte(&units));
    let ends = scanner.finish();
    let chars = i64::try_from(data.len() + units.len()).unwrap_or(i64::MAX);
    for offset in [-1, 0, chars / 2, chars, chars + 1] {
        let _ = ends.line(offset);
    }
}

/// The tagged words of a `ScopeInfo` after its map, with the node 20 and node 18 layouts.
pub fn v8_scope_slots(data: &[u8]) {
    let words: Vec<u64> =
        data.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect();
    for layout in [node20(), node18()] {
        let _ = scope_slots(&layout.scope_info, &words);
    }
}

/// A V8 string in a heap image (see [`heap_image`]), read as frame names are read.
pub fn v8_string(data: &[u8]) {
    let (tagged, mut memory) = parse_heap_image(data);
    let mut heap = Heap::new(node20(), &mut memory);
    if let Ok(text) = read_string(&mut heap, tagged, 4096) {
        assert!(text.chars().count() <= 4096, "{} characters over the cap", text.chars().count());
    }
}

/// A `SharedFunctionInfo` in a heap image: its name, script and start position.
pub fn v8_function_info(data: &[u8]) {
    let (tagged, mut memory) = parse_heap_image(data);
    let mut heap = Heap::new(node20(), &mut memory);
    let Some(addr) = object_address(tagged) else { return };
    if let Ok(header) = heap.read(addr, 56) {
        let _ = function_info(&mut heap, &header);
    }
}

/// A heap image: the tagged value to read (u64), then regions of memory, each its
/// address (u64), its length (u16) and its bytes, all little-endian. A last region cut
/// short holds what is left.
#[must_use]
pub fn heap_image(tagged: u64, regions: &[(u64, &[u8])]) -> Vec<u8> {
    let mut out = tagged.to_le_bytes().to_vec();
    for &(addr, bytes) in regions {
        for (i, piece) in bytes.chunks(usize::from(u16::MAX)).enumerate() {
            out.extend_from_slice(&(addr + (i * usize::from(u16::MAX)) as u64).to_le_bytes());
            out.extend_from_slice(&(piece.len() as u16).to_le_bytes());
            out.extend_from_slice(piece);
        }
    }
    out
}

fn parse_heap_image(data: &[u8]) -> (u64, FakeMemory) {
    let le64 = |b: &[u8]| b.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    let tagged = le64(data);
    let mut memory = FakeMemory::default();
    let mut rest = data.get(8..).unwrap_or_default();
    while rest.len() >= 10 {
        let addr = le64(rest);
        let len = usize::from(u16::from_le_bytes([rest[8], rest[9]]));
        let bytes = &rest[10..];
        let bytes = &bytes[..len.min(bytes.len())];
        memory.insert(addr, bytes.to_vec());
        rest = &rest[10 + bytes.len()..];
    }
    (tagged, memory)
}

/// Constants as `NAME VALUE` lines; `version` from a `version A.B.C` line, else `default`.
fn metadata(text: &str, default: Option<(u32, u32, u32)>) -> ElfMetadata {
    let mut constants = HashMap::new();
    let mut version = default;
    for line in text.lines() {
        let Some((name, value)) = line.split_once(' ') else { continue };
        if name == "version" {
            let parts: Vec<u32> = value.trim().split('.').filter_map(|p| p.parse().ok()).collect();
            if let [major, minor, build] = parts[..] {
                version = Some((major, minor, build));
            }
        } else if let Ok(value) = value.trim().parse() {
            constants.insert(name.to_string(), value);
        }
    }
    ElfMetadata { constants, version, builtins: None }
}

fn layout_of(text: &str, version: (u32, u32, u32)) -> Option<Layout> {
    Layout::new(&metadata(text, Some(version))).ok()
}

fn node20() -> &'static Layout {
    static LAYOUT: OnceLock<Option<Layout>> = OnceLock::new();
    LAYOUT
        .get_or_init(|| layout_of(include_str!("symbolize/v8/testdata/v8dbg-node20.txt"), (11, 3, 244)))
        .as_ref()
        .unwrap_or_else(|| unreachable!("the node 20 constants in the repository make a layout"))
}

fn node18() -> &'static Layout {
    static LAYOUT: OnceLock<Option<Layout>> = OnceLock::new();
    LAYOUT
        .get_or_init(|| layout_of(include_str!("symbolize/v8/testdata/v8dbg-node18.txt"), (10, 2, 154)))
        .as_ref()
        .unwrap_or_else(|| unreachable!("the node 18 constants in the repository make a layout"))
}

/// A fuzz target: it takes any bytes.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, as `tracer/fuzz/fuzz_targets` names them.
pub const TARGETS: &[(&str, Target)] = &[
    ("cgroup_files", cgroup_files),
    ("elf", elf),
    ("event", event),
    ("inspector_json", inspector_json),
    ("oom_format", oom_format),
    ("perf_map", perf_map),
    ("proc_maps", proc_maps),
    ("proc_stat", proc_stat),
    ("proc_status", proc_status),
    ("recording", recording),
    ("recording_report", recording_report),
    ("smaps", smaps),
    ("v8_function_info", v8_function_info),
    ("v8_layout", v8_layout),
    ("v8_positions", v8_positions),
    ("v8_scope_slots", v8_scope_slots),
    ("v8_string", v8_string),
];

#[cfg(test)]
mod tests;
