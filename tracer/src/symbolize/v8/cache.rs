//! What was learnt about functions and scripts, by heap address.
//!
//! Objects move, and a freed address is reused for another object, so every entry keeps a
//! fingerprint (words of the object it was made from) that is compared with the object
//! found at that address now; a different object replaces the entry. `JSFunctions` are never
//! cached: they are re-read from the frame on every event.

use std::collections::HashMap;

use super::constants::Layout;
use super::heap::{Heap, HeapError, object_address, smi, word};
use super::positions::{LineEnds, PositionEntry, decode_table};
use super::scopeinfo::function_info;
use super::strings::{read_string, visit_string};

/// Entries kept before a cache is emptied and refilled.
const MAX_FUNCTIONS: usize = 1 << 16;
const MAX_SCRIPTS: usize = 1 << 12;
/// Longest script name read, and largest source scanned for line ends (characters).
const MAX_SCRIPT_NAME: usize = 4096;
const MAX_SOURCE: usize = 64 << 20;
/// Most lines taken from a script's `line_ends`, and bytes of a position table.
const MAX_LINES: usize = 4 << 20;
const MAX_POSITION_TABLE: usize = 1 << 20;

/// A function as a perf map names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FunctionEntry {
    /// `name_or_scope_info` and `script_or_debug_info` of the `SharedFunctionInfo`.
    fingerprint: (u64, u64),
    pub name: String,
    pub script: Option<u64>,
    /// The script's name (its URL or path), read with the function.
    pub file: String,
    /// 1-based line of the function's start (the perf map's line), 0 when unknown.
    pub line: u32,
    /// The bytecode's position table, by (`BytecodeArray`, table) address.
    positions: Option<((u64, u64), Vec<PositionEntry>)>,
}

#[derive(Clone, Debug)]
pub(crate) struct ScriptEntry {
    /// `source` and `name` of the Script.
    fingerprint: (u64, u64),
    pub name: String,
    line_offset: i64,
    lines: Option<LineEnds>,
}

impl ScriptEntry {
    /// The 1-based line of a character offset.
    pub fn line(&self, offset: i64) -> Option<u32> {
        let line = i64::from(self.lines.as_ref()?.line(offset)?) + self.line_offset + 1;
        u32::try_from(line).ok()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Caches {
    functions: HashMap<u64, FunctionEntry>,
    scripts: HashMap<u64, ScriptEntry>,
    pub stats: CacheStats,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CacheStats {
    pub function_hits: u64,
    pub function_misses: u64,
    /// Entries whose address now holds another object.
    pub stale: u64,
}

impl Caches {
    /// The function of the `SharedFunctionInfo` at `sfi` (untagged), whose first bytes
    /// (`header`) were read for this event.
    pub fn function(
        &mut self,
        heap: &mut Heap<'_>,
        sfi: u64,
        header: &[u8],
    ) -> Result<&FunctionEntry, HeapError> {
        let layout = heap.layout;
        let fingerprint = (word(header, layout.sfi_name_or_scope_info), word(header, layout.sfi_script));
        match self.functions.get(&sfi) {
            Some(entry) if entry.fingerprint == fingerprint => {
                self.stats.function_hits += 1;
            }
            other => {
                if other.is_some() {
                    self.stats.stale += 1;
                }
                self.stats.function_misses += 1;
                let info = function_info(heap, header)?;
                let (mut line, mut file) = (0, String::new());
                if let Some(script) = info.script
                    && let Ok(entry) = self.script(heap, script)
                {
                    file.clone_from(&entry.name);
                    line = info.start_position.and_then(|start| entry.line(start)).unwrap_or(0);
                }
                if self.functions.len() >= MAX_FUNCTIONS {
                    self.functions.clear();
                }
                let entry = FunctionEntry {
                    fingerprint,
                    name: info.name,
                    script: info.script,
                    file,
                    line,
                    positions: None,
                };
                self.functions.insert(sfi, entry);
            }
        }
        self.functions.get(&sfi).ok_or(HeapError::Malformed("cache"))
    }

    /// The 1-based line that bytecode `offset` of the function at `sfi` is on, when the
    /// bytecode has a position table (V8 makes them lazily: often it has none).
    pub fn bytecode_line(
        &mut self,
        heap: &mut Heap<'_>,
        sfi: u64,
        bytecode: u64,
        table: u64,
        offset: i64,
    ) -> Option<u32> {
        let layout = heap.layout;
        object_address(table)?;
        let entry = self.functions.get_mut(&sfi)?;
        if entry.positions.as_ref().is_none_or(|(key, _)| *key != (bytecode, table)) {
            let bytes = heap.array(table, layout.type_byte_array, 1, MAX_POSITION_TABLE).ok()?;
            entry.positions = Some(((bytecode, table), decode_table(&bytes)?));
        }
        let (_, entries) = entry.positions.as_ref()?;
        let position = super::positions::script_offset_at(entries, offset)?;
        let script = entry.script?;
        self.scripts.get(&script)?.line(position)
    }

    /// The script at `tagged`, read and its line ends computed unless cached.
    pub fn script(&mut self, heap: &mut Heap<'_>, tagged: u64) -> Result<&ScriptEntry, HeapError> {
        let layout = heap.layout;
        let addr = heap.typed(tagged, layout.type_script, "Script")?;
        let header = heap.read(addr, layout.script_line_ends.max(layout.script_line_offset) as usize + 8)?;
        let fingerprint = (word(&header, layout.script_source), word(&header, layout.script_name));
        if self.scripts.get(&tagged).is_none_or(|s| s.fingerprint != fingerprint) {
            let entry = read_script(heap, layout, &header, fingerprint);
            if self.scripts.len() >= MAX_SCRIPTS {
                self.scripts.clear();
            }
            self.scripts.insert(tagged, entry);
        }
        self.scripts.get(&tagged).ok_or(HeapError::Malformed("cache"))
    }

    /// Approximate heap bytes the caches hold.
    pub fn bytes(&self) -> usize {
        let functions: usize = self
            .functions
            .values()
            .map(|f| {
                size_of::<(u64, FunctionEntry)>()
                    + f.name.capacity()
                    + f.file.capacity()
                    + f.positions.as_ref().map_or(0, |(_, p)| p.capacity() * size_of::<PositionEntry>())
            })
            .sum();
        let scripts: usize = self
            .scripts
            .values()
            .map(|s| {
                size_of::<(u64, ScriptEntry)>()
                    + s.name.capacity()
                    + s.lines.as_ref().map_or(0, LineEnds::bytes)
            })
            .sum();
        functions + scripts
    }

    pub fn len(&self) -> (usize, usize) {
        (self.functions.len(), self.scripts.len())
    }
}

fn read_script(heap: &mut Heap<'_>, layout: &Layout, header: &[u8], fingerprint: (u64, u64)) -> ScriptEntry {
    let (source, name) = fingerprint;
    let name = match heap.object(name) {
        Ok((_, t)) if layout.is_string(t) => read_string(heap, name, MAX_SCRIPT_NAME).unwrap_or_default(),
        _ => String::new(),
    };
    let line_offset = smi(word(header, layout.script_line_offset)).unwrap_or(0);
    let line_ends = word(header, layout.script_line_ends);
    let lines = if let Ok(bytes) = heap.array(line_ends, layout.type_fixed_array, 8, MAX_LINES) {
        let ends: Option<Vec<u32>> =
            bytes.chunks_exact(8).map(|w| smi(word(w, 0)).and_then(|v| u32::try_from(v).ok())).collect();
        ends.map(LineEnds::from_ends)
    } else {
        // Not computed yet (V8 does it on demand): scan the source.
        let mut scanner = LineEnds::scanner();
        visit_string(heap, source, MAX_SOURCE, &mut |chunk| scanner.feed(&chunk))
            .ok()
            .map(|_| scanner.finish())
    };
    if lines.is_none() {
        log::debug!("script {name:?}: no line ends and no readable source; its frames get no line");
    }
    ScriptEntry { fingerprint, name, line_offset, lines }
}
