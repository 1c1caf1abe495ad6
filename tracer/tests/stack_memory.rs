//! What a stack costs memtrace, measured with a counting allocator: the stack table
//! (addresses kept once, frames interned) against the representation it replaced
//! (addresses kept twice, every stack's frames as owned strings), on stacks shaped like a
//! Node service's.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    sync::atomic::{AtomicIsize, Ordering},
};

use memtrace::{
    model::{StackId, StackTable},
    report::{Frame, FrameKind},
};

/// Bytes held, as glibc's malloc charges them: the request plus its 8-byte header,
/// rounded to 16, at least 32.
static HELD: AtomicIsize = AtomicIsize::new(0);

struct Counting;

fn charged(size: usize) -> isize {
    ((size + 8 + 15) & !15).max(32).cast_signed()
}

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is
// updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(charged(layout.size()), Ordering::Relaxed);
        // SAFETY: the caller's layout is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(charged(layout.size()), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(charged(new_size) - charged(layout.size()), Ordering::Relaxed);
        // SAFETY: as for `dealloc`, and `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn held() -> isize {
    HELD.load(Ordering::Relaxed)
}

const STACKS: usize = 10_000;
const DEPTH: usize = 40;

/// A deterministic stand-in for randomness.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// Frames like a Node service's: C++ names in the node binary, JS functions in the app and
/// its dependencies, libc and libuv at the bottom.
fn frame_pool() -> Vec<Frame> {
    let mut pool = Vec::new();
    for i in 0..2000 {
        pool.push(Frame {
            function: format!(
                "v8::internal::Heap::AllocateRawWithRetryOrFailSlowPath{i}(int, v8::internal::AllocationType)"
            ),
            module: "/usr/bin/node".into(),
            kind: FrameKind::Native,
            ..Frame::default()
        });
    }
    for i in 0..1000 {
        pool.push(Frame {
            function: format!("handle{i}"),
            module: "[JIT]".into(),
            file: format!("/srv/app/node_modules/express/lib/router/layer{}.js", i % 40),
            line: i,
            kind: FrameKind::Js,
        });
    }
    for f in ["start_thread", "uv_run", "uv__io_poll", "node::Start", "main", "__libc_start_main"] {
        pool.push(Frame {
            function: f.into(),
            module: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
            kind: FrameKind::Native,
            ..Frame::default()
        });
    }
    pool
}

/// Stack `i`: its addresses and frames, leaf first. The leaf half varies, the root half is
/// the event loop's.
fn stack(i: usize, pool: &[Frame]) -> (Vec<u64>, Vec<Frame>) {
    let mut pcs = Vec::with_capacity(DEPTH);
    let mut frames = Vec::with_capacity(DEPTH);
    for d in 0..DEPTH {
        let pick = if d < DEPTH / 2 {
            mix((i * DEPTH + d) as u64) as usize % (pool.len() - 6)
        } else {
            pool.len() - 6 + d % 6
        };
        pcs.push(0x7f00_0000_0000 + (mix(i as u64 ^ (d as u64) << 32) & 0xffff_fff0));
        frames.push(pool[pick].clone());
    }
    (pcs, frames)
}

#[test]
fn a_stack_costs_under_a_kibibyte_and_the_estimate_holds() {
    let pool = frame_pool();
    let inputs: Vec<(Vec<u64>, Vec<Frame>)> = (0..STACKS).map(|i| stack(i, &pool)).collect();

    let before = held();
    let mut table = StackTable::new(usize::MAX);
    for (pcs, frames) in &inputs {
        let id = table.intern(pcs);
        table.set_frames(id, frames);
    }
    let new_bytes = (held() - before) as f64;

    let before = held();
    let mut by_pcs: HashMap<Box<[u64]>, StackId> = HashMap::new();
    let mut pcs_by_id: Vec<Box<[u64]>> = Vec::new();
    let mut frames_by_id: HashMap<StackId, Vec<Frame>> = HashMap::new();
    for (i, (pcs, frames)) in inputs.iter().enumerate() {
        let id = StackId(i as u32 + 1);
        by_pcs.insert(pcs.as_slice().into(), id);
        pcs_by_id.push(pcs.as_slice().into());
        frames_by_id.insert(id, frames.clone());
    }
    let old_bytes = (held() - before) as f64;

    let per_stack = new_bytes / STACKS as f64;
    let old_per_stack = old_bytes / STACKS as f64;
    let estimate = table.heap_bytes() as f64;
    println!(
        "{STACKS} stacks of {DEPTH} frames: {per_stack:.0} B a stack interned ({} distinct frames), \
         {old_per_stack:.0} B a stack as owned frames; the table estimates {:.0} B a stack",
        table.frame_count(),
        estimate / STACKS as f64
    );
    assert!(per_stack < 1024.0, "a stack costs {per_stack:.0} B");
    assert!(old_per_stack > 5.0 * per_stack, "owned frames: {old_per_stack:.0} B a stack");
    assert!(
        (estimate / new_bytes - 1.0).abs() < 0.25,
        "the limit is enforced on an estimate of {estimate:.0} B against {new_bytes:.0} B measured"
    );
    drop((by_pcs, pcs_by_id, frames_by_id));
}
