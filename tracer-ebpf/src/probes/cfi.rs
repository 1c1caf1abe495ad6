//! The allocator view's stacks through modules without frame pointers (glibc, ld.so,
//! libstdc++): CFI rows where the pc is in such a module, frame pointers elsewhere.
//!
//! Userspace puts the modules' unwind tables (`tracer_common::cfi`) into `CFI_ROWS` and
//! `CFI_MODULES` before the probes attach. A process's load bias per module is learned
//! here from the probes' own hits (their attach cookie names the module and the probed
//! address), or seeded by userspace from `/proc/PID/maps`. A stack whose leaf is in no
//! tabled module (an allocator linked into the executable) is not walked here: it keeps
//! the kernel's frame-pointer walk at its old cost.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_NOEXIST, pt_regs},
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_attach_cookie},
    macros::{map, uprobe},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::ProbeContext,
};
use tracer_common::{
    CfiBiases, CfiChunk, CfiModule, CfiRow, MALLOC_STACK_DEPTH, MCOUNTER_CFI_DEPTH, MCOUNTER_CFI_NO_ROW,
    MCOUNTER_CFI_READ_FAILED, MCOUNTER_CFI_WALKS,
    cfi::{CFI_CHUNK_ROWS, CFI_CHUNKS_MAX, CFI_MODULES_MAX, CFI_SEARCH_STEPS, cfa, cookie},
};

use crate::probes::{
    malloc::{count, stack_scratch, target_tid},
    window::{StackWindow, WINDOW_WORDS},
};

/// Sizes are overridden by userspace (one chunk when no table is needed).
#[map(name = "CFI_ROWS")]
static CFI_ROWS: Array<CfiChunk> = Array::with_max_entries(CFI_CHUNKS_MAX, 0);

/// Row `index` of the tables.
#[inline(always)]
fn row_at(index: u32) -> Option<CfiRow> {
    let chunk = CFI_ROWS.get(index / CFI_CHUNK_ROWS as u32)?;
    chunk.rows.get(index as usize & (CFI_CHUNK_ROWS - 1)).copied()
}

#[map(name = "CFI_MODULES")]
static CFI_MODULES: Array<CfiModule> = Array::with_max_entries(CFI_MODULES_MAX as u32, 0);

/// LRU: a process that exits leaves its entry to be evicted; a pid reused by another
/// process relearns its biases from its first hits.
#[map(name = "CFI_BIASES")]
static CFI_BIASES: LruHashMap<u32, CfiBiases> = LruHashMap::with_max_entries(4096, 0);

/// Records the load bias the current hit reveals (see `tracer_common::cfi::cookie`).
#[inline(always)]
fn learn(ctx: &ProbeContext, tgid: u32) {
    // SAFETY: the program's own context.
    let Some((slot, vaddr)) = cookie::decode(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) }) else {
        return;
    };
    // SAFETY: the context of a uprobe is the user registers saved by the kernel.
    let ip = unsafe { (*ctx.regs).rip };
    let bias = ip.wrapping_sub(vaddr);
    if CFI_BIASES.get_ptr(tgid).is_none() {
        let mut fresh = CfiBiases::default();
        if slot < CFI_MODULES_MAX {
            fresh.bias[slot] = bias;
        }
        // Not over an entry another CPU or userspace made meanwhile: it is updated below.
        if CFI_BIASES.insert(tgid, &fresh, u64::from(BPF_NOEXIST)).is_ok() {
            return;
        }
    }
    if let Some(known) = CFI_BIASES.get_ptr_mut(tgid) {
        // SAFETY: a valid pointer to the map value; a racing update writes the same bias.
        let known = unsafe { &mut *known };
        if slot < CFI_MODULES_MAX && known.bias[slot] != bias {
            known.bias[slot] = bias;
        }
    }
}

/// A probe that only learns where its module is loaded: ld.so's `_dl_debug_state` (at
/// startup and every dlopen) and libstdc++'s `DT_INIT` (at its load), whose frames the
/// allocator's stacks cross before any allocator probe in them has hit.
#[uprobe]
pub fn uprobe_cfi_learn(ctx: ProbeContext) -> u32 {
    if target_tid().is_some() {
        learn(&ctx, (bpf_get_current_pid_tgid() >> 32) as u32);
    }
    0
}

/// A tabled module as mapped in this process: its runtime text range and its bias.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Mapped {
    lo: u64,
    hi: u64,
    bias: u64,
    row_lo: u32,
    rows: u32,
}

/// A walk in progress: the registers of the frame being unwound, and the process's
/// tabled modules.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WalkState {
    pc: u64,
    sp: u64,
    bp: u64,
    mapped: [Mapped; CFI_MODULES_MAX],
}

/// Per CPU, like the stack being assembled (`MALLOC_STACK_SCRATCH`).
#[map(name = "CFI_WALK")]
static CFI_WALK: PerCpuArray<WalkState> = PerCpuArray::with_max_entries(1, 0);

/// The row in effect at module address `addr` (the last with `pc <= addr`) among the
/// `rows` rows from `row_lo`, as its 8 bytes (`CfiRow`); 0 (an `UNSUPPORTED` row) when
/// there is none. A global function: the verifier checks its loop once, not once per
/// frame of the walk.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn memtrace_cfi_find_row(row_lo: u32, rows: u32, addr: u64) -> u64 {
    let mut lo = row_lo;
    let mut n = rows;
    if n == 0 {
        return 0;
    }
    for _ in 0..CFI_SEARCH_STEPS {
        if n <= 1 {
            break;
        }
        let half = n / 2;
        let mid = lo + half;
        let Some(row) = row_at(mid) else { return 0 };
        if u64::from(row.pc) <= addr {
            lo = mid;
            n -= half;
        } else {
            n = half;
        }
    }
    match row_at(lo) {
        Some(row) if u64::from(row.pc) <= addr => {
            u64::from(row.pc)
                | (u64::from(row.cfa_offset) << 32)
                | (u64::from(row.cfa_reg) << 48)
                | (u64::from(row.rbp_offset as u8) << 56)
        }
        _ => 0,
    }
}

/// The top of the user stack, read once per walk (`probes::window`): an allocation in a
/// Node service is 20-60 frames deep, two words read from each.
#[map(name = "CFI_STACK_WINDOW")]
static CFI_STACK_WINDOW: PerCpuArray<StackWindow> = PerCpuArray::with_max_entries(1, 0);

/// Bytes of the window: two pages (most of a Node allocation's stack; deeper frames are
/// read word by word).
const WINDOW_BYTES: u32 = 8 * 1024;
const _: () = assert!(WINDOW_BYTES as usize <= WINDOW_WORDS * 8);

/// The user word at `addr`, from the walk's window when it holds it.
#[inline(always)]
fn read(addr: u64) -> Option<u64> {
    let window = CFI_STACK_WINDOW.get_ptr_mut(0)?;
    // SAFETY: the per-CPU slot is this program's while it runs (the caller's claim).
    unsafe { &mut *window }.word(addr)
}

/// The slot of the tabled module that holds `pc`.
#[inline(always)]
fn tabled(mapped: &[Mapped; CFI_MODULES_MAX], pc: u64) -> Option<usize> {
    mapped.iter().position(|m| m.rows != 0 && pc >= m.lo && pc < m.hi)
}

/// What one step of a walk did.
const STEP_NEXT: u32 = 0;
const STEP_END: u32 = 1;

/// Unwinds frame `i` of the walk in `CFI_WALK` (records its pc in `MALLOC_STACK_SCRATCH`
/// and moves the registers to its caller's frame). A global function, so that the
/// verifier checks one step on its own instead of every path through 64 of them.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn memtrace_cfi_step(i: u32) -> u32 {
    let (Some(state), Some(stack)) = (CFI_WALK.get_ptr_mut(0), stack_scratch()) else { return STEP_END };
    // SAFETY: the per-CPU slots are this program's while it runs.
    let (state, stack) = unsafe { (&mut *state, &mut *stack) };
    // Opaque to the compiler, so that the bounds check stays where the verifier sees it.
    let i = core::hint::black_box(i as usize);
    let (pc, sp, bp) = (state.pc, state.sp, state.bp);
    let Some(slot) = stack.ips.get_mut(i) else { return STEP_END };
    *slot = pc;
    stack.depth = i as u32 + 1;
    // A return address points after its call: look up the call itself.
    let lookup = if i == 0 { pc } else { pc.wrapping_sub(1) };
    let next = if let Some(slot) = tabled(&state.mapped, lookup) {
        let Some(m) = state.mapped.get(slot) else { return STEP_END };
        let packed = memtrace_cfi_find_row(m.row_lo, m.rows, lookup.wrapping_sub(m.bias));
        let row = CfiRow {
            pc: packed as u32,
            cfa_offset: (packed >> 32) as u16,
            cfa_reg: (packed >> 48) as u8,
            rbp_offset: (packed >> 56) as u8 as i8,
        };
        let base = match row.cfa_reg {
            cfa::RSP => sp,
            cfa::RBP => bp,
            cfa::END => return STEP_END,
            _ => {
                count(MCOUNTER_CFI_NO_ROW);
                return STEP_END;
            }
        };
        let cfa = base.wrapping_add(u64::from(row.cfa_offset));
        if cfa <= sp {
            count(MCOUNTER_CFI_READ_FAILED);
            return STEP_END;
        }
        let Some(ra) = read(cfa.wrapping_sub(8)) else {
            count(MCOUNTER_CFI_READ_FAILED);
            return STEP_END;
        };
        if row.rbp_offset != 0 {
            let Some(saved) = read(cfa.wrapping_add((i64::from(row.rbp_offset) * 8) as u64)) else {
                count(MCOUNTER_CFI_READ_FAILED);
                return STEP_END;
            };
            state.bp = saved;
        }
        state.sp = cfa;
        ra
    } else {
        // A frame that keeps its frame pointer: [bp] = the caller's bp, [bp + 8] = the
        // return address. bp == 0 is the outermost frame; a bp below the stack pointer is
        // no frame record (the walk ends there, as the kernel's does).
        if bp == 0 || bp < sp {
            return STEP_END;
        }
        let (Some(caller_bp), Some(ra)) = (read(bp), read(bp.wrapping_add(8))) else {
            count(MCOUNTER_CFI_READ_FAILED);
            return STEP_END;
        };
        state.sp = bp.wrapping_add(16);
        state.bp = caller_bp;
        ra
    };
    if next == 0 {
        return STEP_END;
    }
    if i == MALLOC_STACK_DEPTH - 1 {
        count(MCOUNTER_CFI_DEPTH);
        return STEP_END;
    }
    state.pc = next;
    STEP_NEXT
}

/// Unwinds the user stack from the probe's registers into the stack scratch slot when the
/// leaf is in a tabled module, and returns whether it did. The caller hashes and stores
/// the stack.
#[inline(always)]
pub(crate) fn walk(ctx: &ProbeContext) -> bool {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    learn(ctx, tgid);
    let Some(biases) = CFI_BIASES.get_ptr(tgid) else { return false };
    let Some(state) = CFI_WALK.get_ptr_mut(0) else { return false };
    // SAFETY: a valid pointer to the map value; the per-CPU slot is this program's.
    let (biases, state) = unsafe { (*biases, &mut *state) };
    for (slot, m) in state.mapped.iter_mut().enumerate() {
        *m = Mapped::default();
        let bias = biases.bias[slot];
        if bias == 0 {
            continue;
        }
        let Some(module) = CFI_MODULES.get(slot as u32) else { continue };
        *m = Mapped {
            lo: module.text_lo.wrapping_add(bias),
            hi: module.text_hi.wrapping_add(bias),
            bias,
            row_lo: module.row_lo,
            rows: module.rows,
        };
    }
    // SAFETY: the context of a uprobe is the user registers saved by the kernel.
    let regs: &pt_regs = unsafe { &*ctx.regs };
    if tabled(&state.mapped, regs.rip).is_none() {
        return false;
    }
    state.pc = regs.rip;
    state.sp = regs.rsp;
    state.bp = regs.rbp;
    let Some(window) = CFI_STACK_WINDOW.get_ptr_mut(0) else { return false };
    // SAFETY: the per-CPU slot is this program's while it runs (the caller's claim).
    unsafe { &mut *window }.load(regs.rsp, WINDOW_BYTES);
    let Some(stack) = stack_scratch() else { return false };
    // SAFETY: as above.
    let stack = unsafe { &mut *stack };
    stack.ret_addr = 0;
    stack._pad = 0;
    stack.depth = 0;
    count(MCOUNTER_CFI_WALKS);
    for i in 0..MALLOC_STACK_DEPTH as u32 {
        if memtrace_cfi_step(i) != STEP_NEXT {
            break;
        }
    }
    true
}
