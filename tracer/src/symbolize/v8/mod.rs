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
mod constants;
mod frames;
mod heap;
mod positions;
mod remote;
mod scopeinfo;
mod strings;

use std::fs::File;
use std::ops::Range;
use std::time::{Duration, Instant};

pub(crate) use constants::Refusal;
pub(crate) use frames::{FrameStats, JsFrame, Place, StackCopy};

use super::unwind::UnwoundFrame;
use cache::Caches;
use code::CodeFinder;
use constants::Layout;
use remote::ProcessMemory;

/// The V8 of one process: its layout, its memory and what was learnt of its functions.
#[derive(Debug)]
pub(crate) struct V8Reader {
    layout: Layout,
    memory: ProcessMemory,
    caches: Caches,
    code: CodeFinder,
    stats: FrameStats,
    /// Stated (file) addresses of the embedded builtins, when the file says.
    builtins: Option<Range<u64>>,
    /// Stacks resolved and the time it took.
    stacks: u64,
    busy: Duration,
}

impl V8Reader {
    /// Reads the layout of the V8 in `file` (node or libnode, as mapped by `pid`).
    pub fn attach(pid: u32, file: &File, name: &str) -> Result<Self, Refusal> {
        let meta = constants::read_elf(file, name)?;
        let layout = Layout::new(&meta)?;
        Ok(Self {
            layout,
            memory: ProcessMemory::new(pid),
            caches: Caches::default(),
            code: CodeFinder::default(),
            stats: FrameStats::default(),
            builtins: meta.builtins,
            stacks: 0,
            busy: Duration::ZERO,
        })
    }

    pub fn version(&self) -> (u32, u32, u32) {
        self.layout.version
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
        let out = frames::resolve(
            &self.layout,
            &mut self.memory,
            &mut self.caches,
            &mut self.code,
            &mut self.stats,
            frames,
            stack,
            place,
        );
        self.stacks += 1;
        self.busy += started.elapsed();
        out
    }

    #[cfg(test)]
    pub fn stats(&self) -> FrameStats {
        self.stats
    }

    /// One line on what the reader did: frames named and not, cost, cache size.
    pub fn summary(&self) -> String {
        let s = self.stats;
        let (functions, scripts) = self.caches.len();
        let looked_at = s.named() + s.unnamed();
        format!(
            "JS frames from the V8 heap: {} named ({} interpreted, {} compiled, {} of them by their code), {} unnamed ({:.1}%: {} beyond the stack copy, {} moved, {} mismatched), {} not JS; {} stacks, {:.1} µs each, {} reads; cache {} functions, {} scripts, {} KiB",
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
            if self.stacks == 0 { 0.0 } else { self.busy.as_secs_f64() * 1e6 / self.stacks as f64 },
            self.memory.calls,
            functions,
            scripts,
            (self.caches.bytes() + self.code.bytes()) / 1024
        )
    }
}
