//! The stacks of node-buffers probes, with what names their JS frames.
//!
//! A frame-pointer walk alone gives JS frames as bare addresses: JIT code that only a perf
//! map names, and interpreted frames that all return into the same interpreter builtin, so
//! that stacks through different JS functions would even share one hash. This walk keeps,
//! for each frame outside the node module's native code, the words below its frame
//! pointer (the `JSFunction`, and for interpreted frames the `BytecodeArray` and offset),
//! stored once per stack for userspace's V8 reader; the hash of an interpreted frame
//! includes its bytecode array and offset, so that two JS paths stay two stacks.
//!
//! Until userspace has said where V8's code is (`MALLOC_V8_CODE`, all zero), Buffers are
//! recorded under the unknown stack, counted (`MCOUNTER_V8_UNKNOWN`): interpreted frames
//! could not be told apart.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, pt_regs},
    helpers::generated::bpf_probe_read_user as raw_read_user,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use tracer_common::{
    MALLOC_JS_FRAMES, MALLOC_JS_SLOT_BYTES, MALLOC_STACK_DEPTH, MALLOC_UNKNOWN_STACK, MCOUNTER_JS_SLOTS_FULL,
    MCOUNTER_STACK_FAILED, MCOUNTER_V8_UNKNOWN, MallocJsFrame, MallocJsSlots, MallocStack, V8CODE_BUILTINS,
    V8CODE_NATIVE, V8CODE_OFFSETS, V8CODE_SLOTS, V8CodeRange,
};

use crate::{
    maps::{SCRATCH_JS_STACK, claim_scratch},
    probes::{
        malloc::{Stored, count, mix, store_stack},
        window::{StackWindow, WINDOW_WORDS},
    },
};

#[map(name = "MALLOC_JS_SLOTS")]
static MALLOC_JS_SLOTS: HashMap<u64, MallocJsSlots> = HashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC);

#[map(name = "MALLOC_V8_CODE")]
static MALLOC_V8_CODE: Array<V8CodeRange> = Array::with_max_entries(V8CODE_SLOTS, 0);

/// Bytes of the user stack read in one piece at each probe, from `sp` up: at a Buffer
/// allocation in an Express service, the 32 frames nearest the probe lie within 2.9-4.7
/// KiB of `sp` (measured on `examples/leaky-service`); deeper frames are read one by one.
const WINDOW_BYTES: u32 = 6 * 1024;
const _: () = assert!(WINDOW_BYTES as usize <= WINDOW_WORDS * 8);

/// Where the stack and its V8 frames are assembled (too large for the BPF stack), with
/// each frame's frame pointer.
#[repr(C)]
struct Scratch {
    stack: MallocStack,
    fps: [u64; MALLOC_STACK_DEPTH],
    js: MallocJsSlots,
    /// A Node stack at a Buffer allocation is 40-60 frames with up to three words read
    /// from each.
    window: StackWindow,
}

#[map(name = "MALLOC_JS_SCRATCH")]
static MALLOC_JS_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Seeds this walk's hashes apart from `malloc::capture_stack`'s.
const SEED: u64 = 0x6a73_7374_6163_6b01;

/// What userspace said of V8's code (zero ranges until it did).
///
/// Every test reads the ranges afresh from the map: values the verifier has seen compared
/// with one frame's pc would otherwise carry that comparison's bounds into the next
/// iteration, so that no two iterations' states are alike and the loops cannot be
/// verified.
struct Code;

impl Code {
    #[inline(always)]
    fn range(slot: u32) -> V8CodeRange {
        match MALLOC_V8_CODE.get_ptr(slot) {
            // SAFETY: a valid pointer to an array element; volatile so that the load is
            // not hoisted out of the loops (see above).
            Some(p) => unsafe { core::ptr::read_volatile(p) },
            None => V8CodeRange { start: 0, end: 0 },
        }
    }

    #[inline(always)]
    fn in_builtins(pc: u64) -> bool {
        let a = Self::range(V8CODE_BUILTINS);
        if pc >= a.start && pc < a.end {
            return true;
        }
        let b = Self::range(V8CODE_BUILTINS + 1);
        pc >= b.start && pc < b.end
    }

    /// Whether a frame running at `pc` may be V8's: not in the module's native code, or
    /// in the builtins.
    #[inline(always)]
    fn may_be_js(pc: u64) -> bool {
        let native = Self::range(V8CODE_NATIVE);
        !(pc >= native.start && pc < native.end) || Self::in_builtins(pc)
    }

    /// Mixes into `h` what tells interpreted frames apart: their bytecode array and offset.
    #[inline(always)]
    fn mix_frame(scratch: &mut Scratch, h: u64, ret: u64, fp: u64) -> u64 {
        if !Self::in_builtins(ret.wrapping_sub(1)) {
            return h;
        }
        let offsets = Self::range(V8CODE_OFFSETS);
        if offsets.start == 0 {
            return h;
        }
        let array = scratch.window.word(fp.wrapping_sub(offsets.start)).unwrap_or(0);
        let offset = scratch.window.word(fp.wrapping_sub(offsets.end)).unwrap_or(0);
        mix(mix(h, array), offset)
    }
}

/// Walks the user stack by frame pointers from the probe's registers, stores it (with its
/// V8 frames the first time) and returns its id.
///
/// The loops are written for the verifier: each iteration depends only on its index and
/// on memory, and the depth lives in memory (a zero address ends the stack), so that the
/// paths that leave a loop at different depths are one state afterwards.
#[inline(always)]
pub(crate) fn capture(regs: *const pt_regs) -> u64 {
    // Uprobe programs are preemptible: another task's may hold this CPU's scratch (see
    // `maps::SCRATCH_BUSY`).
    let Some(_claim) = claim_scratch(SCRATCH_JS_STACK) else {
        return MALLOC_UNKNOWN_STACK;
    };
    let Some(scratch) = MALLOC_JS_SCRATCH.get_ptr_mut(0) else {
        return MALLOC_UNKNOWN_STACK;
    };
    // SAFETY: the per-CPU scratch slot is ours while `_claim` lives.
    let scratch = unsafe { &mut *scratch };
    if Code::range(V8CODE_NATIVE).end == 0 {
        // Interpreted frames cannot be told apart yet: two JS paths would share a stack.
        count(MCOUNTER_V8_UNKNOWN);
        return MALLOC_UNKNOWN_STACK;
    }
    // SAFETY: the context of a uprobe is the user registers saved by the kernel.
    let (ip, sp, rbp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
    let stack = &mut scratch.stack;
    stack.ips[0] = ip;
    stack._pad = 0;
    stack.depth = 1;
    scratch.window.load(sp, WINDOW_BYTES);
    // The user stack's top word: the return address into the caller, whose frame pointer
    // is still `rbp` at the probed function's entry.
    scratch.stack.ret_addr = scratch.window.word(sp).unwrap_or(0);
    if scratch.stack.ret_addr == 0 {
        count(MCOUNTER_STACK_FAILED);
        return MALLOC_UNKNOWN_STACK;
    }
    scratch.fps[0] = rbp;
    let h = mix(mix(SEED, ip), scratch.stack.ret_addr);
    let h = Code::mix_frame(scratch, h, scratch.stack.ret_addr, rbp);
    let mut h = walk(scratch, sp, rbp, h);
    if h == MALLOC_UNKNOWN_STACK {
        h = 1;
    }
    match store_stack(h, &scratch.stack) {
        Stored::New => {
            keep_js_frames(h, scratch, sp);
            h
        }
        Stored::Known => h,
        Stored::Lost => MALLOC_UNKNOWN_STACK,
    }
}

/// The frame-pointer walk: `ips[i]` the return addresses, `fps[i]` the frame pointer of
/// the frame running there, a zero address after the last one. Returns `h` with each
/// frame mixed in (its return address, and what tells interpreted frames apart).
#[inline(always)]
fn walk(scratch: &mut Scratch, sp: u64, rbp: u64, mut h: u64) -> u64 {
    let mut fp = rbp;
    for i in 1..MALLOC_STACK_DEPTH {
        scratch.stack.ips[i] = 0;
        if fp == 0 || fp & 7 != 0 || fp <= sp {
            break;
        }
        let (next, ret) = match (scratch.window.word(fp), scratch.window.word(fp + 8)) {
            (Some(next), Some(ret)) => (next, ret),
            _ => break,
        };
        if ret == 0 {
            break;
        }
        scratch.stack.ips[i] = ret;
        scratch.fps[i] = next;
        scratch.stack.depth = (i + 1) as u32;
        h = Code::mix_frame(scratch, mix(h, ret), ret, next);
        // The caller's frame is above this one; anything else is not a frame chain.
        if next <= fp {
            if i + 1 < MALLOC_STACK_DEPTH {
                scratch.stack.ips[i + 1] = 0;
            }
            break;
        }
        fp = next;
    }
    h
}

/// Stores the words below the frame pointer of every frame of a new stack that may be
/// V8's: `frames[0]` for the caller (`ret_addr`), `frames[i]` for `ips[i]`.
#[inline(always)]
fn keep_js_frames(h: u64, scratch: &mut Scratch, sp: u64) {
    let js = &mut scratch.js;
    js.sp = sp;
    js.mask = 0;
    if Code::may_be_js(scratch.stack.ret_addr.wrapping_sub(1))
        && read_slots(&mut js.frames[0], scratch.fps[0])
    {
        js.mask = 1;
    }
    for i in 1..MALLOC_JS_FRAMES {
        let ret = scratch.stack.ips[i];
        if ret == 0 {
            break;
        }
        if Code::may_be_js(ret.wrapping_sub(1)) && read_slots(&mut js.frames[i], scratch.fps[i]) {
            js.mask |= 1 << i;
        }
    }
    if js.mask == 0 {
        return;
    }
    match MALLOC_JS_SLOTS.insert(h, &*js, u64::from(BPF_NOEXIST)) {
        // Stored meanwhile by another CPU.
        Ok(()) | Err(-17) => {}
        // Full: the stack's JS frames stay unnamed.
        Err(_) => count(MCOUNTER_JS_SLOTS_FULL),
    }
}

/// Reads the words below `fp` into `frame`, straight into the map value (a copy through
/// the BPF stack would leave each iteration's words there, and no two iterations would
/// look alike to the verifier).
#[inline(always)]
fn read_slots(frame: &mut MallocJsFrame, fp: u64) -> bool {
    if fp == 0 || fp & 7 != 0 || fp < MALLOC_JS_SLOT_BYTES as u64 {
        return false;
    }
    frame.fp = fp;
    let from = fp - MALLOC_JS_SLOT_BYTES as u64;
    // SAFETY: writes exactly the size of `frame.slots`; a checked read of user memory.
    let ret = unsafe {
        raw_read_user(
            frame.slots.as_mut_ptr().cast(),
            MALLOC_JS_SLOT_BYTES as u32,
            from as *const core::ffi::c_void,
        )
    };
    ret == 0
}
