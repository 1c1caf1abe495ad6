//! The allocator view (`--track malloc`): reads the kernel's tables of outstanding heap
//! allocations and per-stack totals as snapshots, and turns them into the model's
//! per-stack aggregates (`Source::Malloc`) for the one report.
//!
//! The kernel side is `tracer-ebpf/src/probes/malloc.rs`; the probes are attached by
//! [`crate::bpf::uprobe`].

pub mod aggregate;
pub mod args;
pub mod duty;
mod js;

use std::{collections::HashMap, time::Instant};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
};
use log::{debug, info, warn};
use tracer_common::{
    MALLOC_STACK_DEPTH, MALLOC_UNKNOWN_STACK, MAP_MALLOC_COUNTERS, MAP_MALLOC_LIVE, MAP_MALLOC_NEW_STACKS,
    MAP_MALLOC_STACKS, MAP_MALLOC_TOTALS, MCOUNTER_ALLOC_BYTES, MCOUNTER_ANNOUNCE_FULL, MCOUNTER_CALLS,
    MCOUNTER_CFI_DEPTH, MCOUNTER_CFI_NO_ROW, MCOUNTER_CFI_READ_FAILED, MCOUNTER_CFI_WALKS, MCOUNTER_COUNT,
    MCOUNTER_FAILED, MCOUNTER_FREE_BYTES, MCOUNTER_FREES, MCOUNTER_FREES_UNKNOWN, MCOUNTER_JS_SLOTS_FULL,
    MCOUNTER_LIVE_FULL, MCOUNTER_LIVE_FULL_BYTES, MCOUNTER_PENDING_FULL, MCOUNTER_PENDING_STALE,
    MCOUNTER_REUSED, MCOUNTER_SKIPPED, MCOUNTER_STACK_FAILED, MCOUNTER_STACKS_FULL, MCOUNTER_TOTALS_FULL,
    MCOUNTER_TRACKED, MCOUNTER_V8_UNKNOWN, MallocLive, MallocStack, MallocStackTotals,
};

pub use aggregate::{HeapAgg, aggregate_live, aggregate_totals};
pub use args::MallocArgs;
use duty::{DutyCycle, Switch};
use js::HeapJs;
pub(crate) use js::JsNamer;

use crate::{
    bpf::{
        cfi_table::CfiMaps,
        uprobe::{self, AttachedAllocator, MallocSettings, UprobeError},
    },
    model::{Source, StackAgg, StackId, StackTable},
    units::human_bytes,
};

#[derive(Debug, thiserror::Error)]
pub enum HeapError {
    #[error(transparent)]
    Bpf(#[from] crate::bpf::BpfError),
    #[error(transparent)]
    Uprobe(#[from] Box<UprobeError>),
}

/// The kernel's malloc counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MallocCounters {
    pub calls: u64,
    pub tracked: u64,
    pub skipped: u64,
    pub frees: u64,
    pub frees_unknown: u64,
    pub live_full: u64,
    pub live_full_bytes: u64,
    pub stacks_full: u64,
    pub stack_failed: u64,
    pub totals_full: u64,
    pub pending_full: u64,
    pub pending_stale: u64,
    pub failed: u64,
    pub reused: u64,
    pub announce_full: u64,
    pub alloc_bytes: u64,
    pub free_bytes: u64,
    pub v8_unknown: u64,
    pub js_slots_full: u64,
    /// Stacks walked through CFI, and those cut short (see `MCOUNTER_CFI_*`).
    pub cfi_walks: u64,
    pub cfi_no_row: u64,
    pub cfi_read_failed: u64,
    pub cfi_depth: u64,
}

impl MallocCounters {
    fn from_slots(c: &[u64; MCOUNTER_COUNT as usize]) -> Self {
        let at = |i: u32| c[i as usize];
        Self {
            calls: at(MCOUNTER_CALLS),
            tracked: at(MCOUNTER_TRACKED),
            skipped: at(MCOUNTER_SKIPPED),
            frees: at(MCOUNTER_FREES),
            frees_unknown: at(MCOUNTER_FREES_UNKNOWN),
            live_full: at(MCOUNTER_LIVE_FULL),
            live_full_bytes: at(MCOUNTER_LIVE_FULL_BYTES),
            stacks_full: at(MCOUNTER_STACKS_FULL),
            stack_failed: at(MCOUNTER_STACK_FAILED),
            totals_full: at(MCOUNTER_TOTALS_FULL),
            pending_full: at(MCOUNTER_PENDING_FULL),
            pending_stale: at(MCOUNTER_PENDING_STALE),
            failed: at(MCOUNTER_FAILED),
            reused: at(MCOUNTER_REUSED),
            announce_full: at(MCOUNTER_ANNOUNCE_FULL),
            alloc_bytes: at(MCOUNTER_ALLOC_BYTES),
            free_bytes: at(MCOUNTER_FREE_BYTES),
            v8_unknown: at(MCOUNTER_V8_UNKNOWN),
            js_slots_full: at(MCOUNTER_JS_SLOTS_FULL),
            cfi_walks: at(MCOUNTER_CFI_WALKS),
            cfi_no_row: at(MCOUNTER_CFI_NO_ROW),
            cfi_read_failed: at(MCOUNTER_CFI_READ_FAILED),
            cfi_depth: at(MCOUNTER_CFI_DEPTH),
        }
    }

    /// Allocations memtrace could not follow (tables full): the report is missing them.
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.live_full + self.pending_full
    }

    /// Estimated bytes outstanding, all stacks.
    #[must_use]
    pub fn outstanding_bytes(&self) -> u64 {
        self.alloc_bytes.saturating_sub(self.free_bytes)
    }

    /// What a user must know about the completeness of the allocator view.
    #[must_use]
    pub fn warnings(&self, settings: &MallocSettings) -> Vec<String> {
        let mut out = Vec::new();
        if self.live_full > 0 {
            out.push(format!(
                "malloc: the table of outstanding allocations ({} entries) was full: {} allocations ({}) were not followed; raise --malloc-max-live or sample with --malloc-sample-bytes",
                settings.max_live,
                self.live_full,
                human_bytes(self.live_full_bytes)
            ));
        }
        if self.stacks_full > 0 {
            out.push(format!(
                "malloc: the stack table ({} stacks) was full: {} allocations are reported under an unknown stack; raise --malloc-max-stacks",
                settings.max_stacks, self.stacks_full
            ));
        }
        if self.pending_full > 0 {
            out.push(format!(
                "malloc: {} allocator calls were lost (more than {} threads inside the allocator at once)",
                self.pending_full, 16384
            ));
        }
        if self.stack_failed > 0 {
            out.push(format!(
                "malloc: {} allocations have no stack (the user stack could not be walked)",
                self.stack_failed
            ));
        }
        if self.v8_unknown > 0 {
            out.push(format!(
                "malloc: {} Buffers allocated before memtrace knew where V8's code is (the first moments of the trace) have no stack",
                self.v8_unknown
            ));
        }
        if self.js_slots_full > 0 {
            out.push(format!(
                "malloc: the JS frames of {} Buffer stacks are unnamed (their table, --malloc-max-stacks entries, was full)",
                self.js_slots_full
            ));
        }
        let cut = self.cfi_no_row + self.cfi_read_failed + self.cfi_depth;
        if cut > 0 {
            out.push(format!(
                "malloc: {cut} of {} stacks walked through glibc/libstdc++ unwind tables stop early ({} at code without a usable unwind row, {} at an unreadable stack, {} at the depth limit); they keep the frames found up to there",
                self.cfi_walks, self.cfi_no_row, self.cfi_read_failed, self.cfi_depth
            ));
        }
        if self.totals_full > 0 {
            out.push(format!(
                "malloc: {} stacks have no running totals (table full); the final report is exact, the growth history is not",
                self.totals_full
            ));
        }
        out
    }
}

/// The allocator view of one traced process.
pub struct HeapTracker {
    allocator: AttachedAllocator,
    settings: MallocSettings,
    live: BpfHashMap<MapData, u64, MallocLive>,
    stacks: BpfHashMap<MapData, u64, MallocStack>,
    totals: PerCpuHashMap<MapData, u64, MallocStackTotals>,
    counters: PerCpuArray<MapData, u64>,
    new_stacks: RingBuf<MapData>,
    /// The unwind tables of the modules without frame pointers.
    cfi: CfiMaps,
    /// Kernel stack id → the session's stack id.
    ids: HashMap<u64, StackId>,
    /// `--malloc-duty`: when the allocation probes are attached.
    duty: Option<DutyCycle>,
    /// The probes were set from the command's files before it ran (`memtrace run`).
    from_files: bool,
    /// node-buffers: the V8 frames the kernel keeps with each stack.
    js: Option<HeapJs>,
}

/// Attaches the allocator of `pid`, except in the modules (inodes) `probed` already. Right
/// after an exec the C library comes a moment later: the session waits for it first
/// (`session::os::wait_for_allocator`, without blocking the runtime).
fn attach_when_mapped(
    ebpf: &mut Ebpf,
    cfi: &mut CfiMaps,
    pid: u32,
    node_buffers: bool,
    probed: &[u64],
) -> Result<AttachedAllocator, HeapError> {
    let resolved = uprobe::resolve(pid, node_buffers).map_err(Box::new)?;
    let allocator = uprobe::attach_resolved(ebpf, cfi, pid, &resolved, probed).map_err(Box::new)?;
    info!("malloc: probing {} functions of {} in process {pid}", allocator.functions.len(), allocator.module);
    Ok(allocator)
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, HeapError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    Ok(crate::bpf::take_map(ebpf, name)?)
}

impl HeapTracker {
    /// Takes the malloc tables from the loaded object and attaches the probes to `pid`.
    ///
    /// With `settings.wait_exec` (`memtrace run`), `pid` is the shell that will exec the
    /// command: the probes go on its C library now, armed by the exec, so that they see
    /// the command's first allocation; [`Self::after_exec`] completes them.
    ///
    /// With `files` (the command's executable and libraries, read before it runs), the
    /// probes go on the command's own allocator from those files, filtered by pid, before
    /// any of them is mapped: a program that lives a millisecond is followed too.
    pub fn attach(
        ebpf: &mut Ebpf,
        pid: u32,
        settings: MallocSettings,
        files: Option<&uprobe::CommandFiles>,
    ) -> Result<Self, HeapError> {
        let live = take(ebpf, MAP_MALLOC_LIVE)?;
        let stacks = take(ebpf, MAP_MALLOC_STACKS)?;
        let totals = take(ebpf, MAP_MALLOC_TOTALS)?;
        let counters = take(ebpf, MAP_MALLOC_COUNTERS)?;
        let new_stacks = take(ebpf, MAP_MALLOC_NEW_STACKS)?;
        let mut cfi = CfiMaps::take(ebpf)?;
        let js = if settings.node_buffers { Some(HeapJs::take(ebpf)?) } else { None };
        let from_files = files.filter(|_| settings.wait_exec).map(|files| {
            let resolved = uprobe::resolve_command(pid, files, settings.node_buffers)?;
            uprobe::attach_resolved(ebpf, &mut cfi, pid, &resolved, &[])
        });
        let allocator = if let Some(allocator) = from_files {
            allocator.map_err(Box::new)?
        } else if settings.wait_exec {
            // `sched:sched_process_exec` (attached with the process lifecycle) arms them.
            if settings.node_buffers {
                AttachedAllocator::default()
            } else {
                let mut allocator = uprobe::attach(ebpf, &mut cfi, pid, false).unwrap_or_else(|e| {
                    debug!("malloc: nothing to probe before exec ({e}); probing after it");
                    AttachedAllocator::default()
                });
                match uprobe::attach_system_cxx(ebpf, &mut cfi, pid) {
                    Ok(cxx) => allocator.extend(cxx),
                    Err(e) => debug!("malloc: no table for the system libstdc++ before exec: {e}"),
                }
                allocator
            }
        } else {
            attach_when_mapped(ebpf, &mut cfi, pid, settings.node_buffers, &[])?
        };
        let duty =
            if allocator.can_cycle() { DutyCycle::new(settings.duty_percent, Instant::now()) } else { None };
        let from_files = files.is_some() && settings.wait_exec;
        Ok(Self {
            allocator,
            settings,
            live,
            stacks,
            totals,
            counters,
            new_stacks,
            cfi,
            ids: HashMap::new(),
            duty,
            from_files,
            js,
        })
    }

    /// Once a second: switches the duty-cycled probes ([`Self::tick`]) and interns the
    /// new stacks ([`Self::poll_new_stacks`]).
    pub(crate) fn poll(&mut self, ebpf: &mut Ebpf, table: &mut StackTable, namer: &mut dyn JsNamer) {
        self.tick(ebpf);
        if let Some(js) = self.js.as_mut() {
            js.set_code(namer);
        }
        self.poll_new_stacks(table, namer);
    }

    /// node-buffers: a descriptor that polls readable when the kernel announces a new
    /// stack, so that its JS frames are named within milliseconds (the garbage collector
    /// moves what they point to); `None` when nothing needs naming so soon.
    pub(crate) fn new_stacks_fd(&self) -> Option<std::io::Result<std::os::fd::OwnedFd>> {
        use std::os::fd::AsFd;
        self.js.as_ref()?;
        Some(self.new_stacks.as_fd().try_clone_to_owned())
    }

    /// node-buffers: tells the kernel where V8's code is, if the namer knows (until then
    /// Buffers are recorded without a stack).
    pub(crate) fn set_v8_code(&mut self, namer: &mut dyn JsNamer) {
        if let Some(js) = self.js.as_mut() {
            js.set_code(namer);
        }
    }

    /// `--malloc-duty`: attaches or detaches the allocation probes when their window
    /// opens or closes (called about once a second).
    pub fn tick(&mut self, ebpf: &mut Ebpf) {
        let Some(duty) = self.duty.as_mut() else { return };
        match duty.due(Instant::now()) {
            Some(Switch::Arm) => {
                if let Err(e) = self.allocator.arm_allocations(ebpf) {
                    warn!(
                        "malloc: attaching the allocation probes again failed ({e}); the rest of the run sees no new allocations"
                    );
                }
            }
            Some(Switch::Disarm) => self.allocator.disarm_allocations(),
            None => {}
        }
    }

    /// The share of the time the allocation probes were attached (1 without duty cycling).
    fn armed_share(&self) -> f64 {
        self.duty.as_ref().map_or(1.0, |d| d.armed_share(Instant::now()))
    }

    /// `memtrace run`, once the command has exec'd: probes its allocator if it is not the
    /// one already probed (a statically linked command, or another C library), and learns
    /// where the probed functions now are.
    pub fn after_exec(&mut self, ebpf: &mut Ebpf, pid: u32) -> Result<(), HeapError> {
        if self.from_files {
            // Everything is probed already; the command may be gone by now.
            self.allocator.refresh_addresses(pid);
            return Ok(());
        }
        let probed = self.allocator.probed_modules();
        let more = attach_when_mapped(ebpf, &mut self.cfi, pid, self.settings.node_buffers, &probed)?;
        self.allocator.extend(more);
        self.allocator.refresh_addresses(pid);
        Ok(())
    }

    /// Learns where the probed functions are in `pid` now (it is held at its exit).
    pub fn refresh_addresses(&mut self, pid: u32) {
        self.allocator.refresh_addresses(pid);
    }

    /// The module whose allocator is followed.
    #[must_use]
    pub fn module(&self) -> &str {
        &self.allocator.module
    }

    #[must_use]
    pub fn counters(&self) -> MallocCounters {
        let mut slots = [0; MCOUNTER_COUNT as usize];
        for (i, slot) in slots.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        MallocCounters::from_slots(&slots)
    }

    /// Interns the stacks the kernel stored since the last call, so that the session
    /// symbolizes them while the target lives.
    pub(crate) fn poll_new_stacks(&mut self, table: &mut StackTable, namer: &mut dyn JsNamer) {
        let mut fresh = Vec::new();
        while let Some(item) = self.new_stacks.next() {
            if let Ok(bytes) = <[u8; 8]>::try_from(&item[..]) {
                fresh.push(u64::from_ne_bytes(bytes));
            }
        }
        for id in fresh {
            self.intern_new(id, table, namer);
        }
    }

    /// The session's stack ids this view refers to (the session's stack table keeps them).
    pub fn stack_ids(&self) -> impl Iterator<Item = StackId> + '_ {
        self.ids.values().copied()
    }

    /// Interns a stack the kernel announced, its JS frames named while the heap still
    /// holds what they point to.
    fn intern_new(&mut self, kernel_stack: u64, table: &mut StackTable, namer: &mut dyn JsNamer) {
        if kernel_stack == MALLOC_UNKNOWN_STACK || self.ids.contains_key(&kernel_stack) {
            return;
        }
        let Ok(stack) = self.stacks.get(&kernel_stack, 0) else { return };
        let mut addrs = [0; MALLOC_STACK_DEPTH + 1];
        let n = stack.addresses(&mut addrs);
        let with_js = self.js.as_ref().and_then(|js| js.name(kernel_stack, &stack, &addrs[..n], namer));
        let id = match with_js {
            Some((space, tokens)) => table.intern_in(space, &tokens),
            None => table.intern(&addrs[..n]),
        };
        self.ids.insert(kernel_stack, id);
    }

    /// The session's id for kernel stack `kernel_stack`, interning it on first sight (a
    /// snapshot may meet a stack before its announcement is read).
    fn stack_id(&mut self, kernel_stack: u64, table: &mut StackTable, namer: &mut dyn JsNamer) -> StackId {
        self.intern_new(kernel_stack, table, namer);
        self.ids.get(&kernel_stack).copied().unwrap_or(StackId(0))
    }

    /// Outstanding heap memory by stack from the kernel's running totals: cheap enough
    /// for every snapshot (one read per stack, not per allocation).
    pub(crate) fn snapshot(&mut self, table: &mut StackTable, namer: &mut dyn JsNamer) -> Vec<StackAgg> {
        let per_cpu: Vec<(u64, Vec<MallocStackTotals>)> = self
            .totals
            .iter()
            .filter_map(Result::ok)
            .map(|(stack, values)| (stack, values.to_vec()))
            .collect();
        let aggs = aggregate_totals(per_cpu.iter().map(|(stack, values)| (*stack, values.as_slice())));
        self.stack_aggs(&aggs, table, namer)
    }

    /// Ends the allocator view: reads every outstanding allocation made at or before
    /// `cutoff_ns`, grouped by stack.
    pub(crate) fn finish(
        &mut self,
        cutoff_ns: u64,
        table: &mut StackTable,
        namer: &mut dyn JsNamer,
    ) -> Vec<StackAgg> {
        if let Some(duty) = self.duty.as_mut() {
            duty.stop(Instant::now());
        }
        self.poll_new_stacks(table, namer);
        let started = std::time::Instant::now();
        let entries: Vec<MallocLive> = self.live.iter().filter_map(Result::ok).map(|(_, v)| v).collect();
        debug!("malloc: read {} outstanding allocations in {:.2?}", entries.len(), started.elapsed());
        let aggs = aggregate_live(entries, cutoff_ns, self.settings.sample_bytes);
        self.stack_aggs(&aggs, table, namer)
    }

    /// The session's aggregates; with duty cycling, bytes and blocks scaled by the share
    /// of the time the allocation probes were attached (see [`duty`]).
    fn stack_aggs(
        &mut self,
        aggs: &[HeapAgg],
        table: &mut StackTable,
        namer: &mut dyn JsNamer,
    ) -> Vec<StackAgg> {
        let share = self.armed_share();
        aggs.iter()
            .map(|agg| StackAgg {
                stack: self.stack_id(agg.kernel_stack, table, namer),
                bytes: duty::scale(agg.bytes, share),
                count: duty::scale(agg.count(), share),
                oldest_ts_ns: agg.oldest_ts_ns,
                source: Source::Malloc,
                // The allocator view follows the first target only.
                proc: crate::model::ProcIndex(0),
                mean_ts_ns: agg.mean_ts_ns,
            })
            .collect()
    }

    /// Merges the allocator view into the mapped view: drops mapped memory that the
    /// allocator obtained for itself (its arenas and large blocks, which the allocator
    /// view already counts block by block), then adds the heap aggregates.
    #[must_use]
    pub fn merge(&self, mapped: Vec<StackAgg>, heap: Vec<StackAgg>, table: &StackTable) -> Vec<StackAgg> {
        let mut out = aggregate::drop_allocator_internal(mapped, table, |addr| self.allocator.contains(addr));
        out.extend(heap);
        out
    }

    /// What is probed and how, for the user.
    #[must_use]
    pub fn describe(&self) -> String {
        let mode = if tracer_common::sampling::is_sampling(self.settings.sample_bytes) {
            format!("sampling one allocation per {} on average", human_bytes(self.settings.sample_bytes))
        } else {
            "every allocation".to_string()
        };
        let min = if self.settings.min_size > 0 {
            format!(" of at least {}", human_bytes(self.settings.min_size))
        } else {
            String::new()
        };
        if self.settings.node_buffers {
            let duty = if self.duty.is_some() {
                format!(
                    "; allocation probes attached {}% of every {} s (frees always), held bytes scaled by the time they were attached",
                    self.settings.duty_percent,
                    duty::PERIOD.as_secs()
                )
            } else {
                String::new()
            };
            return format!(
                "probing V8's backing stores in {} (Buffers and ArrayBuffers only, one trap per allocation and one per free); recording {mode}{min}{duty}",
                self.allocator.module
            );
        }
        let cxx = self.allocator.functions.iter().filter(|f| f.symbol.starts_with("_Zn")).count();
        format!(
            "probing {} functions of {}{}; recording {mode}{min}",
            self.allocator.functions.len() - cxx,
            self.allocator.module,
            if cxx > 0 { format!(" and {cxx} operator new") } else { String::new() },
        )
    }

    /// What the allocator probes saw, for the end of the run.
    #[must_use]
    pub fn summary(&self) -> String {
        let c = self.counters();
        format!(
            "malloc: {} allocator calls, {} recorded, {} skipped (sampling/min size), {} frees matched, {} frees of unknown pointers ignored (allocated before tracing, or not sampled), {} failed calls",
            c.calls, c.tracked, c.skipped, c.frees, c.frees_unknown, c.failed
        )
    }

    /// Conditions that make the allocator view incomplete (tables full, lost calls).
    #[must_use]
    pub fn warnings(&self) -> Vec<String> {
        self.counters().warnings(&self.settings)
    }

    /// A one-line summary for the status line.
    #[must_use]
    pub fn status(&self) -> String {
        let c = self.counters();
        let share = self.armed_share();
        if self.duty.is_some() {
            return format!(
                "heap ~{} ({} calls seen, probes attached {:.0}% of the time)",
                human_bytes(duty::scale(c.outstanding_bytes(), share)),
                c.calls,
                share * 100.0
            );
        }
        format!("heap {} ({} calls)", human_bytes(c.outstanding_bytes()), c.calls)
    }

    #[must_use]
    pub fn settings(&self) -> &MallocSettings {
        &self.settings
    }
}

/// Parses a size in bytes: `4096`, `64k`, `64KiB`, `1m`, `1MiB`, `2g` (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits.parse().map_err(|_| format!("`{text}` is not a size (e.g. 4096, 64k, 1MiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (use k, m or g)")),
    };
    value.checked_mul(1 << shift).ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests;
