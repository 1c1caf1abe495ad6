//! JS frames of the node-buffers view (`--malloc-probes node-buffers`), named from V8's
//! heap without a perf map.
//!
//! The kernel walk (`tracer-ebpf/src/probes/js_stack.rs`) keeps, with each new stack, the
//! words below the frame pointer of every frame that may be V8's. Userspace tells it where
//! V8's code is ([`HeapJs::set_code`]) so that it can tell native frames apart and hash
//! interpreted frames by their bytecode, and names the frames as soon as the stack is
//! announced (the heap moves), through the same V8 reader as the syscall views.

use std::ops::Range;

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData},
};
use log::{debug, info};
use tracer_common::{
    MALLOC_JS_SLOT_BYTES, MAP_MALLOC_JS_SLOTS, MAP_MALLOC_V8_CODE, MallocJsFrame, MallocJsSlots, MallocStack,
    V8CODE_BUILTINS, V8CODE_BUILTINS_MAX, V8CODE_NATIVE, V8CODE_OFFSETS, V8CodeRange,
};

use super::HeapError;
use crate::symbolize::V8Code;
use crate::symbolize::unwind::UnwoundFrame;

/// Names the JS frames of a stack: given its frames (frame pointers where known), the
/// stack pointer and the windows of stack words kept, returns the stack's addresses with
/// named frames replaced by the symbolizer's tokens, and the address space they are in.
pub(crate) trait JsNamer {
    /// Where V8's code is in the process, once known.
    fn v8_code(&mut self) -> Option<V8Code>;
    fn name(&mut self, frames: &[UnwoundFrame], sp: u64, windows: &[(u64, Vec<u8>)]) -> (u32, Vec<u64>);
}

/// The node-buffers view's JS tables.
pub(super) struct HeapJs {
    slots: BpfHashMap<MapData, u64, MallocJsSlots>,
    code: Array<MapData, V8CodeRange>,
    /// What the kernel was told, once it was.
    told: Option<V8Code>,
}

impl HeapJs {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, HeapError> {
        Ok(Self {
            slots: crate::bpf::take_map(ebpf, MAP_MALLOC_JS_SLOTS)?,
            code: crate::bpf::take_map(ebpf, MAP_MALLOC_V8_CODE)?,
            told: None,
        })
    }

    /// Tells the kernel where V8's code is, once the namer knows, and again when that
    /// changes (called every 100 ms: right after an exec node is not mapped yet, and V8
    /// remaps its builtins once it starts).
    pub(super) fn set_code(&mut self, namer: &mut dyn JsNamer) {
        let Some(code) = namer.v8_code() else { return };
        if self.told.as_ref() == Some(&code) {
            return;
        }
        if code.lowest.unsigned_abs() > MALLOC_JS_SLOT_BYTES as u64
            || code.bytecode_array >= 0
            || code.bytecode_offset >= 0
        {
            info!(
                "malloc: V8's frame slots reach {} bytes below the frame pointer (memtrace keeps {MALLOC_JS_SLOT_BYTES}): JS frames of Buffer stacks are named only from a perf map",
                -code.lowest
            );
            self.told = Some(code);
            return;
        }
        let range = |r: &Range<u64>| V8CodeRange { start: r.start, end: r.end };
        let mut writes = vec![(V8CODE_NATIVE, range(&code.native))];
        for (i, b) in code.builtins.iter().take(V8CODE_BUILTINS_MAX as usize).enumerate() {
            writes.push((V8CODE_BUILTINS + i as u32, range(b)));
        }
        writes.push((
            V8CODE_OFFSETS,
            V8CodeRange {
                start: code.bytecode_array.unsigned_abs(),
                end: code.bytecode_offset.unsigned_abs(),
            },
        ));
        for (slot, value) in writes {
            if let Err(e) = self.code.set(slot, value, 0) {
                debug!("malloc: telling the kernel where V8's code is failed: {e}");
                return;
            }
        }
        debug!("malloc: V8 code for the Buffer stacks: {code:?}");
        self.told = Some(code);
    }

    /// The addresses of kernel stack `id` with its JS frames named, when the kernel kept
    /// their slots; `None` otherwise.
    pub(super) fn name(
        &self,
        id: u64,
        stack: &MallocStack,
        addrs: &[u64],
        namer: &mut dyn JsNamer,
    ) -> Option<(u32, Vec<u64>)> {
        let slots = self.slots.get(&id, 0).ok()?;
        let (frames, windows) = frames_and_windows(stack, &slots, addrs);
        if log::log_enabled!(log::Level::Trace) {
            for (i, f) in frames.iter().enumerate() {
                let w =
                    f.fp.and_then(|fp| windows.iter().find(|(s, _)| *s + MALLOC_JS_SLOT_BYTES as u64 == fp));
                log::trace!(
                    "stack {id:#x} frame {i}: {:#x} fp {:x?} window {:x?}",
                    f.addr,
                    f.fp,
                    w.map(|(_, b)| b
                        .chunks(8)
                        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
                        .collect::<Vec<_>>())
                );
            }
        }
        if windows.is_empty() {
            return None;
        }
        Some(namer.name(&frames, slots.sp, &windows))
    }
}

/// The frames of a kernel stack, as [`MallocStack::addresses`] orders them, with the frame
/// pointers the kernel kept, and one window of stack words per kept frame: the
/// `MALLOC_JS_SLOT_BYTES` below its frame pointer, then the saved frame pointer and
/// return address above it when the walk knows them (else zeros).
fn frames_and_windows(
    stack: &MallocStack,
    slots: &MallocJsSlots,
    addrs: &[u64],
) -> (Vec<UnwoundFrame>, Vec<(u64, Vec<u8>)>) {
    let depth = (stack.depth as usize).min(stack.ips.len());
    // `addresses` puts `ret_addr` at index 1 unless the walk has it already.
    let ret_inserted = addrs.len() > depth;
    // Where kept frame `i` is in `addrs`: 0 is the caller's (`ret_addr`), i the frame of
    // `ips[i]`.
    let position = |i: usize| -> Option<usize> {
        match i {
            0 => ret_inserted.then_some(1),
            i if i < depth => Some(if ret_inserted { i + 1 } else { i }),
            _ => None,
        }
    };
    let mut frames: Vec<UnwoundFrame> = addrs.iter().map(|&addr| UnwoundFrame { addr, fp: None }).collect();
    let kept: Vec<(usize, &MallocJsFrame)> = slots
        .frames
        .iter()
        .enumerate()
        .filter(|(i, _)| slots.mask & (1 << i) != 0)
        .filter_map(|(i, frame)| Some((position(i)?, frame)))
        .collect();
    for &(p, frame) in &kept {
        if let Some(f) = frames.get_mut(p) {
            f.fp = Some(frame.fp);
        }
    }
    let windows = kept
        .iter()
        .filter(|(_, frame)| frame.fp >= MALLOC_JS_SLOT_BYTES as u64)
        .map(|&(p, frame)| {
            let mut bytes: Vec<u8> = frame.slots.iter().flat_map(|w| w.to_ne_bytes()).collect();
            // Above fp: the caller's frame pointer and this frame's return address, which
            // are the next frame's fp and address.
            let next = frames.get(p + 1);
            bytes.extend(next.and_then(|n| n.fp).unwrap_or(0).to_ne_bytes());
            bytes.extend(next.map_or(0, |n| n.addr).to_ne_bytes());
            (frame.fp - MALLOC_JS_SLOT_BYTES as u64, bytes)
        })
        .collect();
    (frames, windows)
}

#[cfg(test)]
mod tests {
    use tracer_common::{MALLOC_JS_FRAMES, MALLOC_STACK_DEPTH, MallocJsFrame};

    use super::*;

    fn stack(ips: &[u64], ret_addr: u64) -> MallocStack {
        let mut s = MallocStack { ret_addr, depth: ips.len() as u32, _pad: 0, ips: [0; MALLOC_STACK_DEPTH] };
        s.ips[..ips.len()].copy_from_slice(ips);
        s
    }

    fn slots(frames: &[(usize, u64)]) -> MallocJsSlots {
        let mut s =
            MallocJsSlots { mask: 0, sp: 0x7000, frames: [MallocJsFrame::default(); MALLOC_JS_FRAMES] };
        for &(i, fp) in frames {
            s.mask |= 1 << i;
            s.frames[i] = MallocJsFrame { fp, slots: [i as u64, 2, 3, 4, 5, 6] };
        }
        s
    }

    fn word(b: &[u8], i: usize) -> u64 {
        u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
    }

    #[test]
    fn frames_get_their_frame_pointers_and_windows() {
        // ips: the probed function, then the walk's return addresses; ret_addr is the
        // caller's, inserted at index 1.
        let st = stack(&[0x100, 0x300, 0x400], 0x200);
        let mut addrs = [0; MALLOC_STACK_DEPTH + 1];
        let n = st.addresses(&mut addrs);
        assert_eq!(&addrs[..n], &[0x100, 0x200, 0x300, 0x400]);
        let kept = slots(&[(0, 0x8000), (2, 0x9000)]);
        let (frames, windows) = frames_and_windows(&st, &kept, &addrs[..n]);
        let fps: Vec<Option<u64>> = frames.iter().map(|f| f.fp).collect();
        assert_eq!(fps, [None, Some(0x8000), None, Some(0x9000)]);
        assert_eq!(windows.len(), 2);
        let (start, bytes) = &windows[0];
        assert_eq!(*start, 0x8000 - MALLOC_JS_SLOT_BYTES as u64);
        assert_eq!(bytes.len(), MALLOC_JS_SLOT_BYTES + 16);
        // Slots as kept, then the next frame's (unknown) fp and its address.
        assert_eq!(word(bytes, 0), 0);
        assert_eq!((word(bytes, 6), word(bytes, 7)), (0, 0x300));
        // The last frame has nothing above it.
        assert_eq!((word(&windows[1].1, 6), word(&windows[1].1, 7)), (0, 0));
    }

    #[test]
    fn frames_without_an_inserted_return_address_keep_their_positions() {
        // The probe sat after the prologue: the walk's second address is ret_addr.
        let st = stack(&[0x100, 0x200, 0x300], 0x200);
        let mut addrs = [0; MALLOC_STACK_DEPTH + 1];
        let n = st.addresses(&mut addrs);
        assert_eq!(&addrs[..n], &[0x100, 0x200, 0x300]);
        let kept = slots(&[(0, 0x8000), (1, 0x8800), (5, 0x9900)]);
        let (frames, windows) = frames_and_windows(&st, &kept, &addrs[..n]);
        let fps: Vec<Option<u64>> = frames.iter().map(|f| f.fp).collect();
        assert_eq!(fps, [None, Some(0x8800), None]);
        // Frame 0 has no place without an inserted ret_addr; frame 5 is past the depth.
        assert_eq!(windows.len(), 1);
    }
}
