//! In-kernel CFI unwinding for the allocator view: compact unwind tables of the modules
//! that keep no frame pointers (glibc, ld.so, libstdc++), built by userspace from their
//! `.eh_frame` and walked by the malloc probes through those modules' frames.
//!
//! A table is a run of [`CfiRow`]s sorted by address (module addresses, before load bias):
//! the row in effect at address `a` is the last one whose `pc <= a`. Each module has a slot
//! ([`CfiModule`]) naming its rows and its text range; a process's load bias per slot is
//! kept in [`CfiBiases`] (learned by the kernel from the probes' hits, see
//! [`cookie`], or seeded by userspace from `/proc/PID/maps`).

/// Modules with a table, at most.
pub const CFI_MODULES_MAX: usize = 4;
/// Rows of all tables together, at most (8 bytes each).
pub const CFI_ROWS_MAX: u32 = 1 << 18;
/// Rows per entry of [`MAP_CFI_ROWS`]: userspace writes a table in few syscalls.
pub const CFI_CHUNK_ROWS: usize = 64;
/// Entries of [`MAP_CFI_ROWS`].
pub const CFI_CHUNKS_MAX: u32 = CFI_ROWS_MAX / CFI_CHUNK_ROWS as u32;
/// Halvings of a binary search over a module's rows: enough for [`CFI_ROWS_MAX`].
pub const CFI_SEARCH_STEPS: u32 = 18;

/// Rows of the unwind tables in [`CfiChunk`]s: row `i` is `rows[i % 64]` of entry `i / 64`.
pub const MAP_CFI_ROWS: &str = "CFI_ROWS";
/// The modules with a table, by slot.
pub const MAP_CFI_MODULES: &str = "CFI_MODULES";
/// Load biases by process: tgid → [`CfiBiases`].
pub const MAP_CFI_BIASES: &str = "CFI_BIASES";

/// How a row finds the canonical frame address (the caller's stack pointer).
pub mod cfa {
    /// No rule memtrace can follow here (a CFA expression, a register other than rsp/rbp,
    /// or an address no FDE covers): the walk stops and counts it.
    pub const UNSUPPORTED: u8 = 0;
    /// `CFA = rsp + offset`.
    pub const RSP: u8 = 1;
    /// `CFA = rbp + offset`.
    pub const RBP: u8 = 2;
    /// The return address is undefined: the outermost frame (`_start`, `clone3`).
    pub const END: u8 = 3;
}

/// One row of an unwind table (8 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CfiRow {
    /// First module address (vaddr) the row applies to.
    pub pc: u32,
    /// Added to the CFA register.
    pub cfa_offset: u16,
    /// One of [`cfa`]'s constants.
    pub cfa_reg: u8,
    /// Where the caller's rbp was saved, in 8-byte words from the CFA (`CFA + 8·n`, always
    /// negative); 0 when rbp is not saved (it still holds the caller's value).
    pub rbp_offset: i8,
}

/// [`CFI_CHUNK_ROWS`] consecutive rows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CfiChunk {
    pub rows: [CfiRow; CFI_CHUNK_ROWS],
}

impl Default for CfiChunk {
    fn default() -> Self {
        Self { rows: [CfiRow::default(); CFI_CHUNK_ROWS] }
    }
}

/// A module with a table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CfiModule {
    /// The module's executable addresses (vaddr, before load bias): `[text_lo, text_hi)`.
    pub text_lo: u64,
    pub text_hi: u64,
    /// Its rows in [`MAP_CFI_ROWS`]: `[row_lo, row_lo + rows)`.
    pub row_lo: u32,
    pub rows: u32,
    /// The module file's inode (userspace's key; the kernel ignores it).
    pub inode: u64,
}

/// A process's load bias per module slot (0: not known).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CfiBiases {
    pub bias: [u64; CFI_MODULES_MAX],
}

/// The attach cookie of a probe in a module with a table: its slot and the module address
/// (vaddr) of the probed instruction, from which a hit learns the module's load bias
/// (`bias = ip − vaddr`; a uprobe's handler sees the probed address as its ip).
#[allow(
    clippy::inline_always,
    reason = "called from the eBPF probes, whose hot path must not depend on the optimiser's inlining choices"
)]
pub mod cookie {
    const SLOT_SHIFT: u32 = 56;
    const VADDR_MASK: u64 = (1 << 48) - 1;

    /// The cookie of a probe at `vaddr` of the module in `slot`.
    #[must_use]
    pub const fn encode(slot: usize, vaddr: u64) -> u64 {
        (((slot as u64) + 1) << SLOT_SHIFT) | (vaddr & VADDR_MASK)
    }

    /// The slot and vaddr of a cookie; `None` for a probe outside the tabled modules.
    #[inline(always)]
    #[must_use]
    pub const fn decode(cookie: u64) -> Option<(usize, u64)> {
        let slot = (cookie >> SLOT_SHIFT) as usize;
        if slot == 0 || slot > super::CFI_MODULES_MAX {
            return None;
        }
        Some((slot - 1, cookie & VADDR_MASK))
    }
}

const _: () = assert!(core::mem::size_of::<CfiRow>() == 8);
const _: () = assert!(core::mem::size_of::<CfiModule>() == 32);
const _: () = assert!(core::mem::size_of::<CfiChunk>() == 8 * CFI_CHUNK_ROWS);
const _: () = assert!(CFI_CHUNK_ROWS.is_power_of_two());
const _: () = assert!(core::mem::size_of::<CfiBiases>() == 8 * CFI_MODULES_MAX);
const _: () = assert!(1 << CFI_SEARCH_STEPS >= CFI_ROWS_MAX);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `repr(C)`, `Copy`, integers only, no implicit padding (sizes asserted
    // above): every bit pattern is valid.
    unsafe impl aya::Pod for super::CfiRow {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::CfiModule {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::CfiChunk {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::CfiBiases {}
}
