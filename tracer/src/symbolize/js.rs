//! JavaScript frames named from V8's heap ([`super::v8`]), carried in unwound stacks.
//!
//! Interpreted frames all return into the same interpreter code, so two stacks through
//! different JS functions have the same addresses. A frame the V8 reader names is
//! therefore replaced, in the stack, by a token: an address outside any address space
//! that stands for (pc, function, position). Stacks of different functions stay apart,
//! and symbolization turns the token back into its frame, unless the perf map names the
//! pc (it wins when present).

use std::collections::HashMap;
use std::ops::Range;

use super::perfmap::JIT_MODULE;
use super::unwind::UnwoundFrame;
use super::v8::{JsFrame, Place, Refusal, StackCopy, V8Reader};
use super::{ProcessSymbols, Region, RegionKind};
use crate::procfs::maps::MapEntry;
use crate::report::{Frame, FrameKind};

/// Tokens are `TOKEN_TAG | index`: non-canonical on x86-64 with 4- or 5-level paging, so
/// no user or kernel address looks like one.
const TOKEN_TAG: u64 = 0xE5A0_0000_0000_0000;
const TOKEN_MASK: u64 = 0xFFF0_0000_0000_0000;
/// Distinct JS frames kept; past it, frames keep their plain address.
const MAX_TOKENS: usize = 1 << 20;

/// Whether the process runs a V8 memtrace can read.
#[derive(Debug, Default)]
pub(super) enum V8State {
    /// No V8 found yet: the modules that may hold one and were looked at, and why the
    /// last of them could not be used (node's launcher has no V8 of its own when it links
    /// libnode, so this is said only once every module was seen).
    #[default]
    Unknown,
    Looking {
        tried: Vec<usize>,
        refusal: Refusal,
    },
    /// A node module was seen and its V8 cannot be read (the reason was logged).
    Refused,
    Ready {
        reader: Box<V8Reader>,
        /// The module holding V8.
        module: usize,
        /// Process addresses of the embedded builtins: in the executable's text, and where
        /// V8 remapped them (near its code, for short calls). `None` when the file does not
        /// say (no `.symtab`): then every frame in the module is looked at.
        builtins: Option<Vec<Range<u64>>>,
    },
}

/// Where V8's code is in a process, and its frame layout: what the allocator view's
/// kernel walk needs to keep JS frames apart and their slots for naming.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V8Code {
    /// The executable mapping of the module holding V8.
    pub native: Range<u64>,
    /// The embedded builtins in it, and where V8 remapped them.
    pub builtins: Vec<Range<u64>>,
    /// The lowest frame slot's offset from the frame pointer (negative).
    pub lowest: i64,
    /// An interpreted frame's bytecode array and bytecode offset slots (negative).
    pub bytecode_array: i64,
    pub bytecode_offset: i64,
}

#[derive(Debug, Default)]
pub(super) struct JsTokens {
    frames: Vec<(u64, Frame)>,
    ids: HashMap<(u64, JsFrame), u64>,
}

impl JsTokens {
    fn token(&mut self, pc: u64, js: JsFrame) -> Option<u64> {
        if let Some(&token) = self.ids.get(&(pc, js.clone())) {
            return Some(token);
        }
        if self.frames.len() >= MAX_TOKENS {
            return None;
        }
        let token = TOKEN_TAG | self.frames.len() as u64;
        let frame = Frame {
            function: js.function.clone(),
            module: JIT_MODULE.to_string(),
            file: js.file.clone(),
            line: js.line,
            kind: FrameKind::Js,
        };
        self.frames.push((pc, frame));
        self.ids.insert((pc, js), token);
        Some(token)
    }

    /// Estimated heap bytes: each token's frame, and its key (the same strings again).
    pub fn heap_bytes(&self) -> usize {
        self.frames.iter().map(|(_, f)| 2 * (super::frames_bytes(std::slice::from_ref(f)) + 8) + 32).sum()
    }

    /// The pc and frame a token stands for.
    pub fn get(&self, addr: u64) -> Option<&(u64, Frame)> {
        if addr & TOKEN_MASK != TOKEN_TAG {
            return None;
        }
        self.frames.get((addr & !TOKEN_MASK) as usize)
    }
}

/// node, nodejs, node20, nsolid, libnode.so.115: files that may hold V8.
fn may_embed_v8(path: &str) -> bool {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let base = path.rsplit('/').next().unwrap_or(path);
    let digits_after =
        |prefix: &str| base.strip_prefix(prefix).is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit()));
    digits_after("node") || digits_after("nodejs") || digits_after("nsolid") || base.starts_with("libnode.so")
}

impl ProcessSymbols {
    /// Looks for V8 in a module just opened; logs why when it cannot be read.
    pub(super) fn consider_v8_module(&mut self, module: usize) {
        let file = &self.modules[module];
        let tried = match &self.v8 {
            V8State::Unknown => false,
            V8State::Looking { tried, .. } => tried.contains(&module),
            V8State::Refused | V8State::Ready { .. } => true,
        };
        if tried || !may_embed_v8(&file.name) {
            return;
        }
        let Some(handle) = file.file() else { return };
        match V8Reader::attach(self.pid, handle, &file.name) {
            Ok(reader) => {
                let (major, minor, build) = reader.version();
                log::info!(
                    "pid {}: names JS frames from the heap of V8 {major}.{minor}.{build} in {}",
                    self.pid,
                    file.name
                );
                self.v8 = V8State::Ready { reader: Box::new(reader), module, builtins: None };
            }
            Err(refusal) => {
                log::debug!("pid {}: no V8 to read in {}: {refusal}", self.pid, file.name);
                let mut tried = match std::mem::take(&mut self.v8) {
                    V8State::Looking { tried, .. } => tried,
                    _ => Vec::new(),
                };
                tried.push(module);
                self.v8 = V8State::Looking { tried, refusal };
            }
        }
    }

    /// After a pass over the process's mappings: if a module may hold V8 but none could be
    /// read, says why, once.
    pub(super) fn settle_v8(&mut self) {
        if let V8State::Looking { refusal, .. } = &self.v8 {
            log::warn!(
                "pid {}: JS frames cannot be read from V8's heap: {refusal}; they are named only from /tmp/perf-{}.map (node --perf-basic-prof), else left as addresses",
                self.pid,
                self.pid
            );
            self.v8 = V8State::Refused;
        }
    }

    /// Places the builtins once the executable mapping of the V8 module is known.
    pub(super) fn note_v8_mapping(&mut self, module: usize, entry: &MapEntry) {
        let V8State::Ready { reader, module: v8_module, builtins } = &mut self.v8 else { return };
        if *v8_module != module || !entry.executable {
            return;
        }
        let (Some(stated), Some(elf)) = (reader.builtins(), self.modules[module].elf.as_ref()) else {
            return;
        };
        if let Some(bias) = elf.bias_for(entry) {
            let start = (stated.start + bias).max(entry.start);
            let end = (stated.end + bias).min(entry.end);
            if start < end {
                builtins.get_or_insert_with(Vec::new).push(start..end);
            }
        }
    }

    /// Replaces the frames V8 names with tokens. `sp` and `stack` are the stack copy.
    pub(super) fn name_js_frames(&mut self, frames: &[UnwoundFrame], sp: u64, stack: &[u8]) -> Vec<u64> {
        self.name_js_frames_in(frames, StackCopy { sp, bytes: stack, windows: &[] })
    }

    /// Where V8's code is, for the allocator view's kernel walk (see
    /// `tracer_common::MAP_MALLOC_V8_CODE`): `None` until the node module, its executable
    /// mapping and its builtins are known.
    pub(crate) fn v8_code(&self) -> Option<V8Code> {
        let V8State::Ready { reader, module, builtins } = &self.v8 else { return None };
        let mut regions = self
            .regions
            .iter()
            .filter(|r| matches!(r.kind, RegionKind::File { module: m, .. } if m == *module));
        let (native, builtins) = match builtins {
            Some(builtins) => (
                regions.find(|r| builtins.iter().any(|b| r.start <= b.start && b.end <= r.end))?,
                builtins.clone(),
            ),
            // A stripped module (Debian's libnode) does not say where its builtins are:
            // its interpreted frames count as native (unnamed, and not told apart by their
            // bytecode, as any frame-pointer walk); compiled frames are still named.
            None => (regions.max_by_key(|r| r.end - r.start)?, Vec::new()),
        };
        let (lowest, bytecode_array, bytecode_offset) = reader.frame_offsets();
        Some(V8Code { native: native.start..native.end, builtins, lowest, bytecode_array, bytecode_offset })
    }

    /// [`Self::name_js_frames`] over any stack copy (the allocator view's windows).
    pub(crate) fn name_js_frames_in(&mut self, frames: &[UnwoundFrame], stack: StackCopy<'_>) -> Vec<u64> {
        let mut addrs: Vec<u64> = frames.iter().map(|f| f.addr).collect();
        if !stack.windows.is_empty()
            && frames.iter().any(|f| f.fp.is_some() && self.region_at(f.addr).is_none())
        {
            // JIT code V8 made since the memory map was read. Not rate limited: this is
            // once per new allocator stack, and the frames would stay unnamed for good.
            if let Err(e) = self.refresh_maps() {
                log::debug!("refresh maps of pid {}: {e}", self.pid);
            }
        }
        let places: Vec<Option<Place>> = frames
            .iter()
            .enumerate()
            .map(|(i, f)| self.v8_place(if i == 0 { f.addr } else { f.addr - 1 }))
            .collect();
        if places.iter().all(Option::is_none) {
            return addrs;
        }
        let V8State::Ready { reader, .. } = &mut self.v8 else { return addrs };
        let named = reader.resolve(frames, stack, &|i, _| places[i]);
        for (addr, js) in addrs.iter_mut().zip(named) {
            if let Some(token) = js.and_then(|js| self.js_tokens.token(*addr, js)) {
                *addr = token;
            }
        }
        addrs
    }

    /// Whether `pc` (already moved into its call for return addresses) is V8 code.
    fn v8_place(&self, pc: u64) -> Option<Place> {
        let V8State::Ready { module: v8_module, builtins, .. } = &self.v8 else { return None };
        match self.region_at(pc)? {
            Region { kind: RegionKind::Anon { name }, .. }
                if name.is_empty() || name.starts_with("[anon") =>
            {
                Some(Place::Jit)
            }
            Region { kind: RegionKind::File { module, .. }, .. } if module == v8_module => {
                builtins.as_ref().is_none_or(|b| b.iter().any(|r| r.contains(&pc))).then_some(Place::Builtins)
            }
            _ => None,
        }
    }

    /// The frame a token stands for: the perf map's, when it names the pc, else V8's.
    pub(super) fn js_token_frame(&self, addr: u64, return_address: bool) -> Option<Frame> {
        let (pc, frame) = self.js_tokens.get(addr)?;
        let lookup = if return_address { pc.saturating_sub(1) } else { *pc };
        let jit = matches!(self.region_at(lookup), Some(Region { kind: RegionKind::Anon { .. }, .. }));
        if jit && let Some(perf) = self.perf_map.map().lookup(lookup) {
            return Some(perf.clone());
        }
        Some(frame.clone())
    }

    /// What the V8 reader did, for the log and the benchmarks.
    pub fn js_summary(&self) -> Option<String> {
        match &self.v8 {
            V8State::Ready { reader, .. } => Some(reader.summary()),
            _ => None,
        }
    }

    /// Stops naming JS frames from the heap (benchmarks compare with and without).
    #[cfg(test)]
    pub(super) fn disable_v8(&mut self) {
        self.v8 = V8State::Refused;
    }

    #[cfg(test)]
    pub(super) fn js_stats(&self) -> Option<super::v8::FrameStats> {
        match &self.v8 {
            V8State::Ready { reader, .. } => Some(reader.stats()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_that_may_hold_v8() {
        for yes in [
            "/usr/bin/node",
            "/opt/node20",
            "/usr/bin/nodejs",
            "/usr/lib/libnode.so.115",
            "/x/node (deleted)",
        ] {
            assert!(may_embed_v8(yes), "{yes}");
        }
        for no in ["/usr/lib/libc.so.6", "/srv/app/build/addon.node", "/usr/bin/nodemon", "/usr/bin/python3"]
        {
            assert!(!may_embed_v8(no), "{no}");
        }
    }

    #[test]
    fn tokens_are_distinct_and_recognized() {
        let mut tokens = JsTokens::default();
        let js =
            |name: &str, position| JsFrame { function: name.into(), file: "/a.js".into(), line: 3, position };
        let a = tokens.token(0x1000, js("a", 5)).expect("token");
        assert_eq!(tokens.token(0x1000, js("a", 5)), Some(a), "same frame, same token");
        let b = tokens.token(0x1000, js("b", 5)).expect("token");
        let a_elsewhere = tokens.token(0x1000, js("a", 9)).expect("token");
        assert!(a != b && a != a_elsewhere, "same pc, other function or position: other token");
        let (pc, frame) = tokens.get(b).expect("a token");
        assert_eq!((*pc, frame.function.as_str(), frame.kind), (0x1000, "b", FrameKind::Js));
        assert_eq!(tokens.get(0x7fff_0000_1000), None, "user addresses are not tokens");
        assert_eq!(tokens.get(0xffff_ffff_8100_0000), None, "kernel addresses are not tokens");
    }
}
