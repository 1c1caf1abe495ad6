//! Names JavaScript frames from V8's own heap, for node processes started without
//! `--perf-basic-prof`.
//!
//! At attach the `v8dbg_*` constants of the node executable (or libnode) give the heap
//! layout ([`constants`]). For every event, the frames whose pc is in V8 code are read
//! from the stack copy and the heap ([`frames`]), with the functions and scripts found
//! cached by address and checked on reuse ([`cache`]). Names and lines follow V8's own
//! rules (`DebugName`, line of the function's start), so they match what a perf map says.

mod cache;
mod code;
pub(crate) mod constants;
pub(crate) mod elf;
mod frames;
pub(crate) mod heap;
mod maps;
pub(crate) mod positions;
pub(crate) mod remote;
pub(crate) mod scopeinfo;
pub(crate) mod strings;

use std::fs::File;
use std::ops::Range;
use std::time::{Duration, Instant};

pub(crate) use constants::Refusal;
#[cfg(test)]
pub(crate) use frames::FrameStats;
pub(crate) use frames::{JsFrame, Place, StackCopy};

use super::unwind::UnwoundFrame;
use constants::Layout;
use frames::Learnt;
use maps::ReadOnlyMaps;
use remote::ProcessMemory;

/// The V8 of one process: its layout, its memory and what was learnt of its functions.
#[derive(Debug)]
pub(crate) struct V8Reader {
    layout: Layout,
    memory: ProcessMemory,
    learnt: Learnt,
    /// Stated (file) addresses of the embedded builtins, when the file says.
    builtins: Option<Range<u64>>,
    /// Stacks resolved and the time it took: wall clock, and this thread's CPU time
    /// (what a loaded machine does not inflate).
    stacks: u64,
    busy: Duration,
    cpu: Duration,
    /// The same for the stacks that found every function cached (the steady state).
    cached_stacks: u64,
    cached_cpu: Duration,
}

impl V8Reader {
    /// Reads the layout of the V8 in `file` (node or libnode, as mapped by `pid`).
    pub fn attach(pid: u32, file: &File, name: &str) -> Result<Self, Refusal> {
        let meta = elf::read_elf(file, name)?;
        let layout = Layout::new(&meta)?;
        Ok(Self {
            layout,
            memory: ProcessMemory::new(pid),
            learnt: Learnt { read_only: ReadOnlyMaps::of(pid), ..Learnt::default() },
            builtins: meta.builtins,
            stacks: 0,
            busy: Duration::ZERO,
            cpu: Duration::ZERO,
            cached_stacks: 0,
            cached_cpu: Duration::ZERO,
        })
    }

    pub fn version(&self) -> (u32, u32, u32) {
        self.layout.version
    }

    /// Offsets from a frame pointer of V8's frame slots: the lowest one, and an
    /// interpreted frame's bytecode array and bytecode offset.
    pub fn frame_offsets(&self) -> (i64, i64, i64) {
        let l = &self.layout;
        let lowest = l.fp_context.min(l.fp_function).min(l.fp_bytecode_array).min(l.fp_bytecode_offset);
        (lowest, l.fp_bytecode_array, l.fp_bytecode_offset)
    }

    /// File addresses of the embedded builtins (`None` when the file has no `.symtab`).
    pub fn builtins(&self) -> Option<Range<u64>> {
        self.builtins.clone()
    }

    /// The JS frames of an unwound stack, by frame index.
    pub fn resolve(
        &mut self,
        frames: &[UnwoundFrame],
        stack: StackCopy<'_>,
        place: &dyn Fn(usize, u64) -> Option<Place>,
    ) -> Vec<Option<JsFrame>> {
        let started = Instant::now();
        let cpu_started = thread_cpu_time();
        let misses = self.learnt.caches.stats.function_misses;
        let out = frames::resolve(&self.layout, &mut self.memory, &mut self.learnt, frames, stack, place);
        self.stacks += 1;
        self.busy += started.elapsed();
        let cpu = thread_cpu_time().saturating_sub(cpu_started);
        self.cpu += cpu;
        if self.learnt.caches.stats.function_misses == misses {
            self.cached_stacks += 1;
            self.cached_cpu += cpu;
        }
        out
    }

    #[cfg(test)]
    pub fn stats(&self) -> FrameStats {
        self.learnt.stats
    }

    /// One line on what the reader did: frames named and not, cost, cache size.
    pub fn summary(&self) -> String {
        let s = self.learnt.stats;
        let (functions, scripts) = self.learnt.caches.len();
        let looked_at = s.named() + s.unnamed();
        format!(
            "JS frames from the V8 heap: {} named ({} interpreted, {} compiled, {} of them by their code), {} unnamed ({:.1}%: {} beyond the stack copy, {} moved, {} mismatched), {} not JS; {} stacks, {:.1} µs each ({:.1} µs of CPU; {:.1} µs when all cached), {} reads; cache {} functions, {} scripts, {} KiB",
            s.named(),
            s.named_interpreted,
            s.named_compiled,
            s.named_by_code,
            s.unnamed(),
            if looked_at == 0 { 0.0 } else { s.unnamed() as f64 * 100.0 / looked_at as f64 },
            s.beyond_copy,
            s.moved,
            s.mismatched,
            s.not_js,
            self.stacks,
            per_stack(self.busy, self.stacks),
            per_stack(self.cpu, self.stacks),
            per_stack(self.cached_cpu, self.cached_stacks),
            self.memory.calls,
            functions,
            scripts,
            (self.learnt.caches.bytes() + self.learnt.code.bytes()) / 1024
        )
    }
}

fn per_stack(total: Duration, stacks: u64) -> f64 {
    if stacks == 0 { 0.0 } else { total.as_secs_f64() * 1e6 / stacks as f64 }
}

/// CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to the valid pointer it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
