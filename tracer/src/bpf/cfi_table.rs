//! Unwind tables for the allocator view's in-kernel CFI walk (`tracer-ebpf`'s
//! `probes::cfi`): the `.eh_frame` of a module without frame pointers (glibc, ld.so,
//! libstdc++) reduced to sorted rows that say where the caller's stack pointer, return
//! address and rbp are (`tracer_common::cfi`), put into the kernel's maps before the
//! probes attach.
//!
//! A row follows what x86-64 code needs at a call site: the CFA is `rsp + n` or
//! `rbp + n`, the return address is at `CFA − 8`, rbp is unchanged or saved at
//! `CFA − 8·k`. Anything else (a CFA expression, as in PLT stubs; a return address
//! elsewhere; an address no FDE covers) is an `UNSUPPORTED` row: the kernel stops there
//! and counts it. An undefined return address (`_start`, `clone3`) is the stack's end.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData},
};
use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, LittleEndian, RegisterRule, UnwindContext, UnwindSection as _,
    X86_64,
};
use log::{debug, warn};
use object::{Object as _, ObjectSection as _, ObjectSegment as _, SegmentFlags};
use tracer_common::{
    CfiBiases, CfiChunk, CfiModule, CfiRow,
    cfi::{
        CFI_CHUNK_ROWS, CFI_MODULES_MAX, CFI_ROWS_MAX, MAP_CFI_BIASES, MAP_CFI_MODULES, MAP_CFI_ROWS, cfa,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum CfiTableError {
    #[error("parse the ELF file: {0}")]
    Elf(#[from] object::Error),
    #[error("the module has no .eh_frame section")]
    NoEhFrame,
    #[error("the module has no executable segment")]
    NoText,
    #[error("the module's addresses do not fit 32 bits")]
    TooLarge,
    #[error("parse .eh_frame: {0}")]
    Cfi(#[from] gimli::Error),
    #[error("{0}")]
    Map(#[from] aya::maps::MapError),
}

/// One module's table: its executable range and rows, module addresses (before load bias).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModuleTable {
    pub text_lo: u64,
    pub text_hi: u64,
    pub rows: Vec<CfiRow>,
}

impl ModuleTable {
    /// The row in effect at module address `addr` (as the kernel's binary search finds it).
    #[must_use]
    pub fn lookup(&self, addr: u64) -> Option<CfiRow> {
        let i = self.rows.partition_point(|r| u64::from(r.pc) <= addr);
        i.checked_sub(1).map(|i| self.rows[i])
    }
}

const UNSUPPORTED: CfiRow = CfiRow { pc: 0, cfa_offset: 0, cfa_reg: cfa::UNSUPPORTED, rbp_offset: 0 };

/// The row for one CFI table row, or `UNSUPPORTED`.
fn convert(
    cfa_rule: &CfaRule<usize>,
    ra: Option<&RegisterRule<usize>>,
    rbp: Option<&RegisterRule<usize>>,
) -> CfiRow {
    if matches!(ra, Some(RegisterRule::Undefined)) {
        return CfiRow { pc: 0, cfa_offset: 0, cfa_reg: cfa::END, rbp_offset: 0 };
    }
    let (reg, offset) = match *cfa_rule {
        CfaRule::RegisterAndOffset { register, offset } => (register, offset),
        CfaRule::Expression(_) => return UNSUPPORTED,
    };
    let cfa_reg = match reg {
        X86_64::RSP => cfa::RSP,
        X86_64::RBP => cfa::RBP,
        _ => return UNSUPPORTED,
    };
    let Ok(cfa_offset) = u16::try_from(offset) else { return UNSUPPORTED };
    if !matches!(ra, Some(RegisterRule::Offset(-8))) {
        return UNSUPPORTED;
    }
    let rbp_offset = match rbp {
        None | Some(RegisterRule::SameValue | RegisterRule::Undefined) => 0,
        Some(&RegisterRule::Offset(n)) if n < 0 && n % 8 == 0 => match i8::try_from(n / 8) {
            Ok(words) => words,
            Err(_) => return UNSUPPORTED,
        },
        Some(_) => return UNSUPPORTED,
    };
    CfiRow { pc: 0, cfa_offset, cfa_reg, rbp_offset }
}

/// Builds the table of an ELF image from its `.eh_frame`.
pub fn build(data: &[u8]) -> Result<ModuleTable, CfiTableError> {
    let file = object::File::parse(data)?;
    let (mut text_lo, mut text_hi) = (u64::MAX, 0);
    for segment in file.segments() {
        if let SegmentFlags::Elf { p_flags } = segment.flags()
            && p_flags & object::elf::PF_X != 0
        {
            text_lo = text_lo.min(segment.address());
            text_hi = text_hi.max(segment.address() + segment.size());
        }
    }
    if text_lo >= text_hi {
        return Err(CfiTableError::NoText);
    }
    if u32::try_from(text_hi).is_err() {
        return Err(CfiTableError::TooLarge);
    }
    let section = file.section_by_name(".eh_frame").ok_or(CfiTableError::NoEhFrame)?;
    let mut eh_frame = EhFrame::new(section.data()?, LittleEndian);
    eh_frame.set_address_size(8);
    let mut bases = BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = file.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }
    // (start, end, row) of every CFI row.
    let mut spans: Vec<(u64, u64, CfiRow)> = Vec::new();
    let mut ctx = UnwindContext::new();
    let mut entries = eh_frame.entries(&bases);
    while let Some(entry) = entries.next()? {
        let CieOrFde::Fde(partial) = entry else { continue };
        let Ok(fde) = partial.parse(gimli::UnwindSection::cie_from_offset) else {
            continue;
        };
        let mut table = fde.rows(&eh_frame, &bases, &mut ctx)?;
        while let Some(row) = table.next_row()? {
            let converted =
                convert(row.cfa(), row.register(X86_64::RA).as_ref(), row.register(X86_64::RBP).as_ref());
            spans.push((row.start_address(), row.end_address(), converted));
        }
    }
    spans.sort_by_key(|&(start, end, _)| (start, end));
    // The entry point's code, when no FDE covers it (ld.so's `_start` and
    // `_dl_start_user`, below every library constructor), is the outermost frame.
    let entry = file.entry();
    let gap = |from: u64, to: u64| {
        let pc = from as u32;
        if (from..to).contains(&entry) {
            CfiRow { pc, cfa_reg: cfa::END, ..UNSUPPORTED }
        } else {
            CfiRow { pc, ..UNSUPPORTED }
        }
    };
    let mut rows: Vec<CfiRow> = Vec::with_capacity(spans.len());
    let mut covered_to = 0;
    if let Some(&(first, _, _)) = spans.first()
        && entry >= text_lo
        && entry < first
    {
        push(&mut rows, gap(entry, first));
        covered_to = first;
    }
    for (start, end, row) in spans {
        if start >= end || start < covered_to {
            // Empty, or overlapping an earlier FDE (kept as the first says).
            continue;
        }
        if start > covered_to && covered_to != 0 {
            push(&mut rows, gap(covered_to, start));
        }
        let Ok(pc) = u32::try_from(start) else { return Err(CfiTableError::TooLarge) };
        push(&mut rows, CfiRow { pc, ..row });
        covered_to = end;
    }
    if covered_to != 0 {
        let Ok(pc) = u32::try_from(covered_to) else { return Err(CfiTableError::TooLarge) };
        push(&mut rows, CfiRow { pc, ..UNSUPPORTED });
    }
    Ok(ModuleTable { text_lo, text_hi, rows })
}

/// Appends `row`, or drops it when it says what the previous row says.
fn push(rows: &mut Vec<CfiRow>, row: CfiRow) {
    if let Some(last) = rows.last()
        && (CfiRow { pc: row.pc, ..*last }) == row
    {
        return;
    }
    rows.push(row);
}

/// The module address (vaddr) of file offset `offset` of an ELF image.
#[must_use]
pub fn vaddr_of_offset(data: &[u8], offset: u64) -> Option<u64> {
    let file = object::File::parse(data).ok()?;
    file.segments().find_map(|seg| {
        let (start, size) = seg.file_range();
        (offset >= start && offset < start + size).then(|| offset - start + seg.address())
    })
}

/// The tables in the kernel's maps, one slot per module (by inode).
pub struct CfiMaps {
    rows: Array<MapData, CfiChunk>,
    modules: Array<MapData, CfiModule>,
    biases: BpfHashMap<MapData, u32, CfiBiases>,
}

impl CfiMaps {
    /// Takes the maps out of the loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, crate::bpf::BpfError> {
        Ok(Self {
            rows: crate::bpf::take_map(ebpf, MAP_CFI_ROWS)?,
            modules: crate::bpf::take_map(ebpf, MAP_CFI_MODULES)?,
            biases: crate::bpf::take_map(ebpf, MAP_CFI_BIASES)?,
        })
    }

    /// The slot of the module with inode `inode`, putting its table in when it is not
    /// there yet (`data` is the module's file). `None`: no table (no room, no CFI), said
    /// in the log; its frames are then walked by frame pointers.
    pub fn ensure(&mut self, path: &Path, inode: u64, data: &[u8]) -> Option<usize> {
        let mut used = 0;
        let mut free = None;
        for slot in 0..CFI_MODULES_MAX {
            let module = self.modules.get(&(slot as u32), 0).ok().unwrap_or_default();
            if module.rows == 0 {
                free = free.or(Some(slot));
                continue;
            }
            if module.inode == inode {
                return Some(slot);
            }
            // Each table starts a chunk of its own.
            used = used.max((module.row_lo + module.rows).next_multiple_of(CFI_CHUNK_ROWS as u32));
        }
        let Some(slot) = free else {
            warn!(
                "malloc: no room for the unwind table of {}; its frames are walked by frame pointers",
                path.display()
            );
            return None;
        };
        let started = std::time::Instant::now();
        let table = match build(data) {
            Ok(table) if !table.rows.is_empty() => table,
            Ok(_) => {
                warn!("malloc: {} has no CFI; its frames are walked by frame pointers", path.display());
                return None;
            }
            Err(e) => {
                warn!(
                    "malloc: no unwind table for {} ({e}); its frames are walked by frame pointers",
                    path.display()
                );
                return None;
            }
        };
        let capacity = (self.rows.len() * CFI_CHUNK_ROWS as u32).min(CFI_ROWS_MAX);
        let Ok(count) = u32::try_from(table.rows.len()) else { return None };
        if u64::from(used) + u64::from(count) > u64::from(capacity) {
            warn!(
                "malloc: the unwind table of {} ({count} rows) does not fit ({used} of {capacity} used); its frames are walked by frame pointers",
                path.display()
            );
            return None;
        }
        let first_chunk = used / CFI_CHUNK_ROWS as u32;
        for (i, rows) in table.rows.chunks(CFI_CHUNK_ROWS).enumerate() {
            let mut chunk = CfiChunk::default();
            chunk.rows[..rows.len()].copy_from_slice(rows);
            if let Err(e) = self.rows.set(first_chunk + i as u32, chunk, 0) {
                warn!("malloc: write the unwind table of {}: {e}", path.display());
                return None;
            }
        }
        let module =
            CfiModule { text_lo: table.text_lo, text_hi: table.text_hi, row_lo: used, rows: count, inode };
        if let Err(e) = self.modules.set(slot as u32, module, 0) {
            warn!("malloc: write the unwind table of {}: {e}", path.display());
            return None;
        }
        debug!(
            "malloc: unwind table of {} in slot {slot}: {count} rows in {:.0?}",
            path.display(),
            started.elapsed()
        );
        Some(slot)
    }

    /// Seeds the load bias of `slot` in process `tgid` (from its memory map), for modules
    /// whose probes will not hit again (a process traced after its start).
    pub fn seed(&mut self, tgid: u32, slot: usize, bias: u64) {
        if slot >= CFI_MODULES_MAX || bias == 0 {
            return;
        }
        let mut biases = self.biases.get(&tgid, 0).unwrap_or_default();
        biases.bias[slot] = bias;
        if let Err(e) = self.biases.insert(tgid, biases, 0) {
            debug!("malloc: seed the load bias of slot {slot} in {tgid}: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
