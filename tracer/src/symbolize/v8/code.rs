//! The function of optimized code found from a pc alone, for frames whose `JSFunction` now
//! has other code: on-stack replacement (a loop tiered up while running keeps executing
//! code the function does not point to) and code replaced since the capture.
//!
//! Instructions start at a 32-byte boundary right after a fixed header: the
//! `InstructionStream`'s `{map, code}` (V8 11) or the whole Code object (V8 10). The header
//! is found by looking back from the pc for the map word every such header starts with,
//! and believed only when its Code says its instructions start there and hold the pc. The
//! Code's deoptimization data names the `SharedFunctionInfo`.

use std::collections::BTreeMap;

use super::constants::Layout;
use super::heap::{Heap, HeapError, dword, object_address, word};

/// How far back from a pc the instructions' start is looked for.
const MAX_CODE_SIZE: u64 = 512 * 1024;
const SCAN_CHUNK: u64 = 16 * 1024;
const ALIGNMENT: u64 = 32;
/// Code ranges remembered.
const MAX_RANGES: usize = 1 << 14;

#[derive(Debug, Default)]
pub(crate) struct CodeFinder {
    /// The map word of every `InstructionStream` (V8 11) or Code (V8 10): learnt from the
    /// first compiled frame checked the usual way.
    header_map: Option<u64>,
    /// Instruction start → (end, the Code object's tagged address when found).
    ranges: BTreeMap<u64, (u64, u64)>,
    pub scans: u64,
}

impl CodeFinder {
    /// Learns the header map from a Code object (tagged `code`, header `code_header`) that
    /// was checked to hold a frame's pc.
    pub fn learn(&mut self, heap: &mut Heap<'_>, code: u64, code_header: &[u8]) {
        if self.header_map.is_some() {
            return;
        }
        let layout = heap.layout;
        let object = if layout.code.start_is_pointer {
            word(code_header, layout.code.instruction_stream)
        } else {
            code
        };
        if let Some(addr) = object_address(object)
            && let Ok(bytes) = heap.read(addr, 8)
        {
            self.header_map = object_address(word(&bytes, 0)).map(|_| word(&bytes, 0));
        }
    }

    /// The `SharedFunctionInfo` (tagged) of the optimized code holding `pc`.
    pub fn function_at(&mut self, heap: &mut Heap<'_>, pc: u64) -> Result<u64, HeapError> {
        let layout = heap.layout;
        let map = self.header_map.ok_or(HeapError::Malformed("no code header map learnt yet"))?;
        let cached =
            self.ranges.range(..=pc).next_back().filter(|(_, (end, _))| pc < *end).map(|(&start, _)| start);
        let code = match cached.map(|start| Self::check(heap, map, start, pc)) {
            Some(Ok(code)) => code,
            other => {
                if let Some(start) = cached
                    && matches!(other, Some(Err(_)))
                {
                    self.ranges.remove(&start);
                }
                self.scans += 1;
                let (start, end, code) = Self::scan(heap, map, pc)?;
                if self.ranges.len() >= MAX_RANGES {
                    self.ranges.clear();
                }
                self.ranges.insert(start, (end, code));
                code
            }
        };
        let header = heap.read(
            object_address(code).ok_or(HeapError::NotObject(code))?,
            layout.code.bytecode as usize + 8,
        )?;
        let deopt = word(&header, layout.code.bytecode);
        let data = heap.array(deopt, layout.type_fixed_array, 8, 64)?;
        let index = layout.code.deopt_sfi_index as usize * 8;
        data.get(index..index + 8).map(|w| word(w, 0)).ok_or(HeapError::Malformed("deoptimization data"))
    }

    /// The Code (tagged) whose instructions start at `start` and hold `pc`.
    fn check(heap: &mut Heap<'_>, map: u64, start: u64, pc: u64) -> Result<u64, HeapError> {
        let layout = heap.layout;
        let header = start.checked_sub(layout.code.header_size).ok_or(HeapError::Malformed("code start"))?;
        let words = heap.read(header, 16)?;
        if word(&words, 0) != map {
            return Err(HeapError::Malformed("no code header"));
        }
        let code = if layout.code.start_is_pointer { word(&words, 8) } else { header | 1 };
        let addr = heap.typed(code, layout.type_code, "Code")?;
        let fields =
            heap.read(addr, layout.code.instruction_size.max(layout.code.instruction_start) as usize + 8)?;
        let begins =
            if layout.code.start_is_pointer { word(&fields, layout.code.instruction_start) } else { start };
        let size = dword(&fields, layout.code.instruction_size).ok_or(HeapError::Malformed("code size"))?;
        if begins != start || !(start..start + u64::from(size)).contains(&pc) {
            return Err(HeapError::Malformed("code does not hold the pc"));
        }
        Ok(code)
    }

    /// Looks back from `pc` for a code header; returns (start, end, code).
    fn scan(heap: &mut Heap<'_>, map: u64, pc: u64) -> Result<(u64, u64, u64), HeapError> {
        let layout = heap.layout;
        let back = layout.code.header_size;
        let mut upper = pc - pc % ALIGNMENT;
        let lowest = pc.saturating_sub(MAX_CODE_SIZE);
        while upper > lowest {
            let from = upper.saturating_sub(SCAN_CHUNK).max(lowest);
            let Ok(bytes) = heap.read(from - back, (upper - from + back) as usize) else {
                return Err(HeapError::Unreadable { addr: from, len: (upper - from) as usize });
            };
            let mut start = upper;
            while start >= from {
                if word(&bytes, start - from) == map
                    && let Ok(code) = Self::check(heap, map, start, pc)
                {
                    let size = code_size(heap, code)?;
                    return Ok((start, start + size, code));
                }
                start = match start.checked_sub(ALIGNMENT) {
                    Some(s) => s,
                    None => break,
                };
            }
            upper = from;
        }
        Err(HeapError::Malformed("no code holds the pc"))
    }

    pub fn bytes(&self) -> usize {
        self.ranges.len() * 40
    }
}

fn code_size(heap: &mut Heap<'_>, code: u64) -> Result<u64, HeapError> {
    let layout: &Layout = heap.layout;
    let fields = heap.read(code & !3, layout.code.instruction_size as usize + 4)?;
    dword(&fields, layout.code.instruction_size).map(u64::from).ok_or(HeapError::Malformed("code size"))
}
