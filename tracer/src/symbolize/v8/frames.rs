//! The JS frames of one captured stack, read while the event is ingested.
//!
//! A frame whose pc is in V8 code keeps, below its frame pointer, a context or a frame-type
//! marker (a Smi: stub, entry and exit frames), the `JSFunction`, and for interpreted frames
//! the `BytecodeArray` and the bytecode offset. The slots come from the stack copy taken with
//! the event; the objects they point to are read now, in a few batched reads, and believed
//! only when they check out: the `JSFunction` and its `SharedFunctionInfo` have the right
//! instance types, and the function's own bytecode is the frame's `BytecodeArray`
//! (interpreted) or its code holds the frame's pc (compiled). An object the garbage
//! collector moved since the capture fails these checks and the frame stays unnamed
//! rather than misnamed.

use super::cache::Caches;
use super::code::CodeFinder;
use super::constants::Layout;
use super::heap::{Heap, dword, half, object_address, smi, word};
use super::maps::ReadOnlyMaps;
use super::remote::Memory;
use crate::symbolize::unwind::UnwoundFrame;

/// Where a pc is, as far as V8 is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    /// Anonymous executable memory: code V8 generated.
    Jit,
    /// V8's embedded builtins in the executable: the interpreter runs there.
    Builtins,
}

/// The stack bytes captured with the event: from `sp` up, and windows around single
/// frames (`(address, bytes)`: the allocator view keeps only the words near V8 frames'
/// frame pointers).
#[derive(Clone, Copy, Debug)]
pub(crate) struct StackCopy<'a> {
    pub sp: u64,
    pub bytes: &'a [u8],
    pub windows: &'a [(u64, Vec<u8>)],
}

impl StackCopy<'_> {
    fn slice(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let within = |start: u64, bytes: &'_ [u8]| -> Option<(usize, usize)> {
            let from = usize::try_from(addr.checked_sub(start)?).ok()?;
            let to = from.checked_add(len)?;
            (to <= bytes.len()).then_some((from, to))
        };
        if let Some((from, to)) = within(self.sp, self.bytes) {
            return self.bytes.get(from..to);
        }
        self.windows.iter().find_map(|(start, bytes)| {
            let (from, to) = within(*start, bytes)?;
            bytes.get(from..to)
        })
    }
}

/// A JS frame, named.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct JsFrame {
    pub function: String,
    pub file: String,
    /// 1-based line of the function's start: what a perf map gives. 0 when unknown.
    pub line: u32,
    /// Tells apart frames of one function at different places: the 1-based line being
    /// executed when known, else the bytecode offset with the top bit set, else 0
    /// (compiled code, where the pc does it).
    pub position: u32,
}

/// What became of the frames that were looked at, for the unnamed share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FrameStats {
    /// Frames in V8 code with a known frame pointer.
    pub candidates: u64,
    pub named_interpreted: u64,
    pub named_compiled: u64,
    /// Compiled frames named from the code holding their pc, their `JSFunction` having
    /// other code now (on-stack replacement) or having moved.
    pub named_by_code: u64,
    /// Stub, entry and exit frames (a frame-type marker), and builtins without a JS frame.
    pub not_js: u64,
    /// Interpreted frames whose slots are beyond the stack copy: not read, since the
    /// stack there may hold another call by now.
    pub beyond_copy: u64,
    /// Unreadable memory, or objects of the wrong type (moved by the GC since).
    pub moved: u64,
    /// Well-formed objects that do not belong to the frame (the function's bytecode is
    /// not the frame's, the pc is outside its code).
    pub mismatched: u64,
}

impl FrameStats {
    pub fn named(&self) -> u64 {
        self.named_interpreted + self.named_compiled
    }

    /// JS-looking frames left unnamed.
    pub fn unnamed(&self) -> u64 {
        self.beyond_copy + self.moved + self.mismatched
    }
}

/// Bytes read of each object: enough for every field used.
const FUNCTION_BYTES: usize = 64;
const SFI_BYTES: usize = 56;
const CODE_BYTES: usize = 72;
const BYTECODE_BYTES: usize = 48;

/// One frame under examination.
#[derive(Debug, Default)]
struct Candidate {
    index: usize,
    /// The pc to look up: a return address points past its call.
    pc: u64,
    jit: bool,
    function: u64,
    /// The `SharedFunctionInfo` (tagged) the frame was found to run.
    sfi: u64,
    /// The frame's `BytecodeArray`, when the slot holds an object, and its bytecode offset
    /// (interpreted frames; baseline frames keep the feedback vector there).
    bytecode: Option<(u64, Option<i64>)>,
    function_header: Vec<u8>,
    bytecode_header: Vec<u8>,
    sfi_header: Vec<u8>,
    code_header: Vec<u8>,
    /// Types of the `JSFunction`, SFI, code and the frame's `BytecodeArray`.
    types: [Option<u16>; 4],
    /// The SFI's bytecode, found through its function data.
    sfi_bytecode: Option<u64>,
    failed: Option<Failure>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Moved,
    Mismatched,
}

/// Finds and names the JS frames of `frames`. `place` says, per frame index and pc,
/// whether the pc is in V8 code.
/// What the reader learnt and counted, across stacks.
#[derive(Debug, Default)]
pub(crate) struct Learnt {
    pub caches: Caches,
    pub code: CodeFinder,
    pub read_only: ReadOnlyMaps,
    pub stats: FrameStats,
}

pub(crate) fn resolve(
    layout: &Layout,
    memory: &mut dyn Memory,
    learnt: &mut Learnt,
    frames: &[UnwoundFrame],
    stack: StackCopy<'_>,
    place: &dyn Fn(usize, u64) -> Option<Place>,
) -> Vec<Option<JsFrame>> {
    let Learnt { caches, code, read_only, stats } = learnt;
    let mut out = vec![None; frames.len()];
    let mut candidates = slots(layout, memory, stats, frames, stack, place);
    if candidates.is_empty() {
        return out;
    }
    read_objects(layout, memory, read_only, &mut candidates);
    let mut heap = Heap::new(layout, memory);
    for c in candidates.iter().filter(|c| c.failed.is_none() && c.jit && c.sfi_bytecode.is_none()) {
        code.learn(&mut heap, word(&c.function_header, layout.js_function_code), &c.code_header);
    }
    for c in &mut candidates {
        let mut by_code = false;
        if c.failed.is_some() && c.jit {
            // The JSFunction does not vouch for the frame: the code holding the pc may.
            if let Ok(sfi) = code.function_at(&mut heap, c.pc)
                && let Ok(addr) = heap.typed(sfi, layout.type_sfi, "SharedFunctionInfo")
                && let Ok(header) = heap.read(addr, SFI_BYTES)
            {
                c.sfi = sfi;
                c.sfi_header = header;
                c.failed = None;
                c.bytecode = None;
                by_code = true;
            }
        }
        if c.failed.is_some() && std::env::var_os("DBG").is_some() {
            eprintln!(
                "DBG fail map {:#x} sfimap {:#x} {:?} jit {} pc {:#x} fn {:#x} bc {:x?} types {:?} fnhdr {} sfihdr {} sfi_bytecode {:x?}",
                word(&c.function_header, 0),
                word(&c.sfi_header, 0),
                c.failed,
                c.jit,
                c.pc,
                c.function,
                c.bytecode,
                c.types,
                c.function_header.len(),
                c.sfi_header.len(),
                c.sfi_bytecode
            );
        }
        match c.failed {
            Some(Failure::Moved) => stats.moved += 1,
            Some(Failure::Mismatched) => stats.mismatched += 1,
            None => {}
        }
        if c.failed.is_some() {
            continue;
        }
        let sfi = object_address(c.sfi).unwrap_or(0);
        let Ok(entry) = caches.function(&mut heap, sfi, &c.sfi_header) else {
            stats.moved += 1;
            continue;
        };
        let (function, file, line) = (entry.name.clone(), entry.file.clone(), entry.line);
        let mut position = 0;
        if let (Some((bytecode, Some(offset))), Some(_)) = (c.bytecode, c.sfi_bytecode) {
            let table = word(&c.bytecode_header, layout.bytecode_array_positions);
            position = caches
                .bytecode_line(&mut heap, sfi, bytecode, table, offset)
                .unwrap_or(0x8000_0000 | (offset as u32 & 0x7fff_ffff));
            stats.named_interpreted += 1;
        } else {
            stats.named_compiled += 1;
            stats.named_by_code += u64::from(by_code);
        }
        let function = if function.is_empty() { "(anonymous)".to_string() } else { function };
        out[c.index] = Some(JsFrame { function, file, line, position });
    }
    out
}

/// Frames in V8 code and their slots, from the stack copy (or, for compiled frames past
/// its end, read now and checked against the frame chain).
fn slots(
    layout: &Layout,
    memory: &mut dyn Memory,
    stats: &mut FrameStats,
    frames: &[UnwoundFrame],
    stack: StackCopy<'_>,
    place: &dyn Fn(usize, u64) -> Option<Place>,
) -> Vec<Candidate> {
    let lowest = layout
        .fp_context
        .min(layout.fp_function)
        .min(layout.fp_bytecode_array)
        .min(layout.fp_bytecode_offset);
    let window = (16 - lowest) as usize;
    let mut out = Vec::new();
    let mut remote = Vec::new();
    for (index, frame) in frames.iter().enumerate() {
        let Some(place) = place(index, frame.addr) else { continue };
        let Some(fp) = frame.fp.filter(|&fp| fp % 8 == 0 && fp > stack.sp) else { continue };
        stats.candidates += 1;
        let start = fp.wrapping_add_signed(lowest);
        let pc = if index == 0 { frame.addr } else { frame.addr - 1 };
        let candidate = Candidate { index, pc, jit: place == Place::Jit, ..Candidate::default() };
        if let Some(bytes) = stack.slice(start, window) {
            out.push((candidate, bytes.to_vec()));
        } else if place == Place::Jit {
            remote.push((candidate, start));
        } else {
            stats.beyond_copy += 1;
        }
    }
    if !remote.is_empty() {
        let requests: Vec<(u64, usize)> = remote.iter().map(|&(_, start)| (start, window)).collect();
        for ((candidate, start), bytes) in remote.into_iter().zip(memory.read_many(&requests)) {
            // The frame must still be the one unwound: the saved frame pointer and return
            // address above it are the next frame's.
            let fp = start.wrapping_add_signed(-lowest);
            let next = frames.get(candidate.index + 1);
            let chained = bytes.as_ref().is_some_and(|b| {
                next.is_none_or(|n| {
                    word(b, fp - start + 8) == n.addr && n.fp.is_none_or(|nfp| word(b, fp - start) == nfp)
                })
            });
            match bytes {
                Some(bytes) if chained => out.push((candidate, bytes)),
                _ => stats.moved += 1,
            }
        }
    }
    out.into_iter()
        .filter_map(|(mut c, bytes)| {
            let slot = |offset: i64| word(&bytes, (offset - lowest) as u64);
            if smi(slot(layout.fp_context)).is_some() {
                stats.not_js += 1;
                return None;
            }
            c.function = slot(layout.fp_function);
            if object_address(c.function).is_none() {
                stats.not_js += 1;
                return None;
            }
            let array = slot(layout.fp_bytecode_array);
            // The slot holds the offset from the tagged BytecodeArray, header included.
            let header = layout.bytecode_array_data.cast_signed() - 1;
            let offset = smi(slot(layout.fp_bytecode_offset)).map(|o| o - header);
            c.bytecode = object_address(array).map(|_| (array, offset));
            if !c.jit && c.bytecode.is_none_or(|(_, offset)| offset.is_none()) {
                // A builtin with a frame of its own (Array.prototype.map…), not user code.
                stats.not_js += 1;
                return None;
            }
            Some(c)
        })
        .collect()
}

/// Reads the objects every candidate points to, in rounds of one system call each, and
/// checks them: `JSFunction` → SFI and code → the SFI's function data.
fn read_objects(
    layout: &Layout,
    memory: &mut dyn Memory,
    read_only: &mut ReadOnlyMaps,
    candidates: &mut [Candidate],
) {
    read_functions(layout, memory, candidates);
    // Round 2: the JSFunctions' maps, SFIs and code; the BytecodeArrays' maps.
    let mut plan = Plan::default();
    for (i, c) in candidates.iter().enumerate().filter(|(_, c)| c.failed.is_none()) {
        plan.type_of(i, 0, word(&c.function_header, layout.map), layout);
        plan.object(i, Field::Sfi, word(&c.function_header, layout.js_function_shared), SFI_BYTES);
        if c.jit {
            plan.object(i, Field::Code, word(&c.function_header, layout.js_function_code), CODE_BYTES);
        }
        if let Some((array, _)) = c.bytecode {
            plan.object(i, Field::Bytecode, array, BYTECODE_BYTES);
        }
    }
    for (i, field, bytes) in plan.run(memory, read_only) {
        let c = &mut candidates[i];
        match (field, bytes) {
            (Field::Type(slot), Some(b)) => c.types[slot] = half(&b, 0),
            (Field::Sfi, Some(b)) => c.sfi_header = b,
            (Field::Code, Some(b)) => c.code_header = b,
            (Field::Bytecode, Some(b)) => c.bytecode_header = b,
            _ => {}
        }
    }
    // Round 3: the maps of the SFIs, code and BytecodeArrays; the SFIs' function data.
    let mut plan = Plan::default();
    for (i, c) in candidates.iter_mut().enumerate().filter(|(_, c)| c.failed.is_none()) {
        if !c.types[0].is_some_and(|t| layout.is_js_function(t)) || c.sfi_header.is_empty() {
            c.failed = Some(Failure::Moved);
            continue;
        }
        plan.type_of(i, 1, word(&c.sfi_header, layout.map), layout);
        if !c.code_header.is_empty() {
            plan.type_of(i, 2, word(&c.code_header, layout.map), layout);
        }
        if c.bytecode.is_some() {
            plan.type_of(i, 3, word(&c.bytecode_header, layout.map), layout);
            plan.object(i, Field::Data, word(&c.sfi_header, layout.sfi_function_data), CODE_BYTES);
        }
    }
    let mut data: Vec<Vec<u8>> = vec![Vec::new(); candidates.len()];
    for (i, field, bytes) in plan.run(memory, read_only) {
        match (field, bytes) {
            (Field::Type(slot), Some(b)) => candidates[i].types[slot] = half(&b, 0),
            (Field::Data, Some(b)) => data[i] = b,
            _ => {}
        }
    }
    // Round 4: the function data's map, to find the SFI's bytecode in it.
    let mut plan = Plan::default();
    for (i, _) in candidates.iter().enumerate().filter(|(_, c)| c.failed.is_none()) {
        if !data[i].is_empty() {
            plan.type_of(i, 0, word(&data[i], layout.map), layout);
        }
    }
    let mut data_types = vec![None; candidates.len()];
    for (i, _, bytes) in plan.run(memory, read_only) {
        data_types[i] = bytes.and_then(|b| half(&b, 0));
    }
    check(layout, candidates, &data, &data_types);
}

/// Believes a candidate only when its objects hang together: the `JSFunction`'s SFI is an
/// SFI, and the SFI's bytecode is the frame's (interpreted and baseline frames), or the
/// `JSFunction`'s code holds the pc (compiled frames).
fn check(layout: &Layout, candidates: &mut [Candidate], data: &[Vec<u8>], data_types: &[Option<u16>]) {
    for (i, c) in candidates.iter_mut().enumerate().filter(|(_, c)| c.failed.is_none()) {
        if c.types[1] != Some(layout.type_sfi) {
            c.failed = Some(Failure::Moved);
            continue;
        }
        c.sfi = word(&c.function_header, layout.js_function_shared);
        c.sfi_bytecode =
            sfi_bytecode(layout, word(&c.sfi_header, layout.sfi_function_data), &data[i], data_types[i]);
        let interpreted = matches!((c.bytecode, c.sfi_bytecode), (Some((frame, _)), Some(own)) if frame == own)
            && c.types[3] == Some(layout.type_bytecode_array);
        if interpreted {
            continue;
        }
        c.sfi_bytecode = None;
        if !c.jit {
            c.failed = Some(Failure::Mismatched);
            continue;
        }
        if c.types[2] != Some(layout.type_code) {
            c.failed = Some(Failure::Moved);
            continue;
        }
        if !code_holds(layout, &c.code_header, word(&c.function_header, layout.js_function_code), c.pc) {
            c.failed = Some(Failure::Mismatched);
        }
    }
}

/// Round 1: the `JSFunction`s, followed once through a forwarding word.
fn read_functions(layout: &Layout, memory: &mut dyn Memory, candidates: &mut [Candidate]) {
    let requests: Vec<(u64, usize)> = candidates.iter().map(|c| (c.function & !3, FUNCTION_BYTES)).collect();
    for (c, got) in candidates.iter_mut().zip(memory.read_many(&requests)) {
        match got {
            Some(bytes) => c.function_header = bytes,
            None => c.failed = Some(Failure::Moved),
        }
    }
    // A JSFunction the scavenger moved since the capture has its new address in its map
    // word until the old space is reused; follow it once (what is found there is checked
    // like any other JSFunction).
    let forwarded: Vec<usize> = (0..candidates.len())
        .filter(|&i| {
            let map = word(&candidates[i].function_header, layout.map);
            candidates[i].failed.is_none() && map != 0 && smi(map).is_some()
        })
        .collect();
    if !forwarded.is_empty() {
        let requests: Vec<(u64, usize)> = forwarded
            .iter()
            .map(|&i| (word(&candidates[i].function_header, layout.map), FUNCTION_BYTES))
            .collect();
        for (&i, got) in forwarded.iter().zip(memory.read_many(&requests)) {
            let c = &mut candidates[i];
            c.function = word(&c.function_header, layout.map) | 1;
            match got {
                Some(bytes) => c.function_header = bytes,
                None => c.failed = Some(Failure::Moved),
            }
        }
    }
}

/// The `BytecodeArray` an SFI's function data leads to: the data itself, the bytecode of an
/// `InterpreterData` (`--interpreted-frames-native-stack`), or that of baseline code.
fn sfi_bytecode(layout: &Layout, tagged: u64, data: &[u8], data_type: Option<u16>) -> Option<u64> {
    let data_type = data_type?;
    if data_type == layout.type_bytecode_array {
        Some(tagged)
    } else if Some(data_type) == layout.type_interpreter_data {
        Some(word(data, layout.interpreter_data_bytecode))
    } else if data_type == layout.type_code {
        // Baseline code keeps the bytecode (or an InterpreterData, not followed here).
        Some(word(data, layout.code.bytecode))
    } else {
        None
    }
}

/// Whether the code object `code` (tagged, header read) holds `pc`.
fn code_holds(layout: &Layout, header: &[u8], code: u64, pc: u64) -> bool {
    let code_layout = layout.code;
    let start = if code_layout.start_is_pointer {
        word(header, code_layout.instruction_start)
    } else {
        (code & !3) + code_layout.instruction_start
    };
    let Some(size) = dword(header, code_layout.instruction_size) else { return false };
    start != 0 && (start..start + u64::from(size)).contains(&pc)
}

/// What a read in a [`Plan`] is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    /// The instance type of a map, into `Candidate::types[slot]`.
    Type(usize),
    Sfi,
    Code,
    Bytecode,
    Data,
}

/// Reads to make in one system call, each for a candidate.
#[derive(Default)]
struct Plan {
    requests: Vec<(u64, usize)>,
    owners: Vec<(usize, Field)>,
    /// The map of each type read, in order.
    maps: Vec<u64>,
}

impl Plan {
    fn object(&mut self, candidate: usize, field: Field, tagged: u64, len: usize) {
        if let Some(addr) = object_address(tagged) {
            self.requests.push((addr, len));
            self.owners.push((candidate, field));
        }
    }

    fn type_of(&mut self, candidate: usize, slot: usize, map: u64, layout: &Layout) {
        if let Some(addr) = object_address(map) {
            self.requests.push((addr + layout.map_instance_type, 2));
            self.owners.push((candidate, Field::Type(slot)));
            self.maps.push(map);
        }
    }

    /// Reads what was planned, but for the types of read-only maps already known.
    fn run(
        self,
        memory: &mut dyn Memory,
        read_only: &mut ReadOnlyMaps,
    ) -> Vec<(usize, Field, Option<Vec<u8>>)> {
        let mut out = Vec::with_capacity(self.owners.len());
        let mut requests = Vec::with_capacity(self.requests.len());
        let mut asked = Vec::with_capacity(self.requests.len());
        let mut type_maps = self.maps.iter();
        for ((i, field), request) in self.owners.into_iter().zip(self.requests) {
            let map =
                if matches!(field, Field::Type(_)) { type_maps.next().copied().unwrap_or(0) } else { 0 };
            if let Some(known) = read_only.known(map).filter(|_| map != 0) {
                out.push((i, field, Some(known.to_le_bytes().to_vec())));
            } else {
                requests.push(request);
                asked.push((i, field, map));
            }
        }
        if !requests.is_empty() {
            for ((i, field, map), bytes) in asked.into_iter().zip(memory.read_many(&requests)) {
                if map != 0
                    && let Some(t) = bytes.as_deref().and_then(|b| half(b, 0))
                {
                    read_only.learn(map, t);
                }
                out.push((i, field, bytes));
            }
        }
        out
    }
}
