//! Command-line options of the allocator view.

use clap::Args;

use super::parse_size;
use crate::bpf::uprobe::MallocSettings;

/// Options of `--track malloc`. Costs were measured with `cargo xtask bench malloc --node`
/// on a 2-CPU VM (kernel 6.18): see the README's table of modes.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Allocator tracking (--track malloc)")]
pub struct MallocArgs {
    /// Sample allocations: keep one per N bytes on average (an allocation of s < N bytes
    /// with probability s/N, counted as N bytes; larger ones always, at their size), so
    /// that reported bytes and counts are unbiased estimates. Keeps the kernel tables
    /// small, but every call still traps into the uprobes: ~11-12 µs per malloc+free pair
    /// measured here, against ~13-16 µs unsampled and 10 ns untraced. 0: every
    /// allocation, exact.
    #[arg(long, value_parser = parse_size, default_value = "0", value_name = "BYTES")]
    pub malloc_sample_bytes: u64,
    /// Do not record allocations smaller than this (exact for the others). Their calls
    /// still trap: ~11 µs per malloc+free pair measured here.
    #[arg(long, value_parser = parse_size, default_value = "0", value_name = "BYTES")]
    pub malloc_min_size: u64,
    /// Outstanding allocations followed at most; more are counted and reported as lost.
    #[arg(long, default_value_t = 1 << 20, value_name = "N")]
    pub malloc_max_live: u32,
    /// Distinct allocation stacks kept at most; allocations from further stacks are
    /// reported under an unknown stack, and counted.
    #[arg(long, default_value_t = 1 << 16, value_name = "N")]
    pub malloc_max_stacks: u32,
    /// Which allocator functions to probe: `libc`, the malloc family (every heap block,
    /// C++ `new` through its `malloc` call; every call pays; a Node service under load
    /// keeps 7-26% of its throughput), or `node-buffers`, V8's backing stores only
    /// (Buffers and `ArrayBuffers`, exact; plain mallocs pay nothing; one trap per
    /// allocation and one per free).
    #[arg(long, value_enum, default_value_t = MallocProbes::Libc, value_name = "WHICH")]
    pub malloc_probes: MallocProbes,
    /// With `--malloc-probes node-buffers`: attach the allocation probes only this
    /// percentage of the time (in 4 s cycles; frees are always probed, so nothing becomes
    /// a false leak) and scale the held bytes by the time they were attached: an estimate,
    /// unbiased for allocations that do not follow the cycle, for less of the traps' cost.
    #[arg(long, default_value_t = 100, value_name = "PERCENT", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub malloc_duty: u32,
}

/// `--malloc-probes`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MallocProbes {
    /// `malloc`, `calloc`, `realloc`, `reallocarray`, `posix_memalign`, `aligned_alloc`,
    /// `memalign`, `valloc`, `pvalloc`, `free` (and C++ `operator new` when the C++
    /// runtime is linked into the executable).
    #[default]
    Libc,
    /// V8's backing stores: `v8::internal::BackingStore::SetAllocatorFromIsolate` (every
    /// store `BackingStore::Allocate` makes), `WrapAllocation`, `Reallocate` and
    /// `~BackingStore`.
    NodeBuffers,
}

impl MallocArgs {
    /// The kernel settings; `enabled` when malloc is among the tracked sources.
    pub fn settings(&self, enabled: bool) -> Result<MallocSettings, String> {
        if self.malloc_duty < 100 && self.malloc_probes != MallocProbes::NodeBuffers {
            return Err(format!(
                "--malloc-duty {} needs --malloc-probes node-buffers: the malloc family's allocation probes have return probes whose traps stay while attached, and most of its frees would be of blocks not seen",
                self.malloc_duty
            ));
        }
        if self.malloc_sample_bytes > tracer_common::MALLOC_SAMPLE_BYTES_MAX {
            return Err(format!(
                "--malloc-sample-bytes {} is above the largest period, {} (4 GiB)",
                self.malloc_sample_bytes,
                tracer_common::MALLOC_SAMPLE_BYTES_MAX
            ));
        }
        Ok(MallocSettings {
            enabled,
            sample_bytes: self.malloc_sample_bytes,
            min_size: self.malloc_min_size,
            max_live: self.malloc_max_live.max(1),
            max_stacks: self.malloc_max_stacks.max(1),
            node_buffers: self.malloc_probes == MallocProbes::NodeBuffers,
            wait_exec: false,
            duty_percent: self.malloc_duty,
        })
    }
}
