//! Kernel snapshots to per-stack aggregates: pure functions, tested without root.

use std::collections::HashMap;

use tracer_common::{MALLOC_COUNT_ONE, MallocLive, MallocStackTotals, sampling};

use crate::model::{Source, StackAgg, StackTable};

/// Outstanding heap memory of one kernel stack id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapAgg {
    pub kernel_stack: u64,
    /// Estimated bytes (exact when not sampling).
    pub bytes: u64,
    /// Estimated allocations, in units of [`MALLOC_COUNT_ONE`].
    pub count_fp: u64,
    /// Allocations actually recorded (samples).
    pub recorded: u64,
    /// Oldest outstanding allocation (`bpf_ktime_get_ns`).
    pub oldest_ts_ns: u64,
    /// Byte-weighted mean allocation time of the outstanding blocks (0: unknown, as from
    /// the running totals).
    pub mean_ts_ns: u64,
}

impl HeapAgg {
    /// The estimated number of allocations, rounded.
    #[must_use]
    pub fn count(&self) -> u64 {
        (self.count_fp + MALLOC_COUNT_ONE / 2) / MALLOC_COUNT_ONE
    }
}

/// Groups the outstanding allocations `live` by stack, counting only those made at or
/// before `cutoff_ns` (`--min-age`). `period` is the sampling period the kernel used.
/// Biggest first.
pub fn aggregate_live(
    live: impl IntoIterator<Item = MallocLive>,
    cutoff_ns: u64,
    period: u64,
) -> Vec<HeapAgg> {
    let mut by_stack: HashMap<u64, HeapAgg> = HashMap::new();
    let mut weighted: HashMap<u64, u128> = HashMap::new();
    for entry in live.into_iter().filter(|e| e.ts_ns <= cutoff_ns) {
        *weighted.entry(entry.stack_id).or_default() +=
            u128::from(entry.ts_ns) * u128::from(entry.weight.max(1));
        let agg = by_stack.entry(entry.stack_id).or_insert_with(|| HeapAgg {
            kernel_stack: entry.stack_id,
            oldest_ts_ns: u64::MAX,
            ..HeapAgg::default()
        });
        agg.bytes += entry.weight;
        agg.count_fp += sampling::weight_count(entry.size, period);
        agg.recorded += 1;
        agg.oldest_ts_ns = agg.oldest_ts_ns.min(entry.ts_ns);
    }
    for agg in by_stack.values_mut() {
        let w = weighted.get(&agg.kernel_stack).copied().unwrap_or(0);
        let total = u128::from(agg.bytes.max(agg.recorded));
        agg.mean_ts_ns = w.checked_div(total).map_or(0, |m| m as u64);
    }
    sorted(by_stack.into_values().collect())
}

/// Per-stack outstanding memory from the kernel's running totals (one value per CPU), as
/// read at a snapshot: allocated minus freed. `oldest_ts_ns` is the stack's first
/// allocation (the totals do not know which allocations are still held).
pub fn aggregate_totals<'a>(
    totals: impl IntoIterator<Item = (u64, &'a [MallocStackTotals])>,
) -> Vec<HeapAgg> {
    let mut out = Vec::new();
    for (stack, per_cpu) in totals {
        let mut sum = MallocStackTotals::default();
        let mut first = u64::MAX;
        for t in per_cpu {
            sum.alloc_bytes += t.alloc_bytes;
            sum.alloc_count += t.alloc_count;
            sum.free_bytes += t.free_bytes;
            sum.free_count += t.free_count;
            if t.first_ts_ns != 0 {
                first = first.min(t.first_ts_ns);
            }
        }
        // A free can be counted on one CPU before its allocation is visible on another
        // only in a torn read; never report negative memory.
        let bytes = sum.alloc_bytes.saturating_sub(sum.free_bytes);
        if bytes == 0 {
            continue;
        }
        out.push(HeapAgg {
            kernel_stack: stack,
            bytes,
            count_fp: sum.alloc_count.saturating_sub(sum.free_count),
            recorded: 0,
            oldest_ts_ns: if first == u64::MAX { 0 } else { first },
            mean_ts_ns: 0,
        });
    }
    sorted(out)
}

/// Drops the mapped-memory aggregates whose stack (leaf first) runs through the probed
/// allocator (`inside` says whether an address is in one of its functions): the large
/// blocks it maps are counted block by block by the allocator view. Resident pages and
/// the break's growth stay: they are other views (who touched pages first; the arena
/// segment, whose growth against flat live blocks is fragmentation).
pub fn drop_allocator_internal(
    mapped: Vec<StackAgg>,
    table: &StackTable,
    inside: impl Fn(u64) -> bool,
) -> Vec<StackAgg> {
    mapped
        .into_iter()
        .filter(|agg| {
            matches!(agg.source, Source::Faults | Source::Brk)
                || !table.get(agg.stack).iter().enumerate().any(|(i, &addr)| {
                    // Return addresses point after their call instruction.
                    inside(if i == 0 { addr } else { addr.saturating_sub(1) })
                })
        })
        .collect()
}

fn sorted(mut aggs: Vec<HeapAgg>) -> Vec<HeapAgg> {
    aggs.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.kernel_stack.cmp(&b.kernel_stack)));
    aggs
}

#[cfg(test)]
mod tests {
    use tracer_common::{MALLOC_STACK_DEPTH, MallocStack};

    use super::*;

    fn live(size: u64, stack_id: u64, ts_ns: u64, period: u64) -> MallocLive {
        MallocLive { size, stack_id, ts_ns, weight: sampling::weight_bytes(size, period) }
    }

    #[test]
    fn groups_by_stack_with_min_age() {
        let entries = [live(100, 1, 10, 0), live(300, 1, 5, 0), live(5000, 2, 50, 0), live(7, 3, 100, 0)];
        let aggs = aggregate_live(entries, 60, 0);
        assert_eq!(aggs.len(), 2, "stack 3 is younger than the cutoff: {aggs:?}");
        assert_eq!((aggs[0].kernel_stack, aggs[0].bytes, aggs[0].count()), (2, 5000, 1));
        assert_eq!((aggs[1].kernel_stack, aggs[1].bytes, aggs[1].count()), (1, 400, 2));
        assert_eq!(aggs[1].oldest_ts_ns, 5);
        assert_eq!(aggs[1].recorded, 2);
    }

    #[test]
    fn sampled_entries_are_scaled() {
        let period = 1000;
        // A 100-byte allocation kept with probability ~1/10 stands for ~1000 bytes and
        // ~10 allocations; a 4000-byte one is always kept, at its size.
        let aggs = aggregate_live([live(100, 1, 1, period), live(4000, 1, 2, period)], u64::MAX, period);
        assert_eq!(aggs.len(), 1);
        let agg = aggs[0];
        assert!(agg.bytes.abs_diff(5000) <= 1, "{agg:?}");
        assert_eq!(agg.count(), 11);
        assert_eq!(agg.recorded, 2);
    }

    #[test]
    fn totals_sum_cpus_and_subtract_frees() {
        let cpu0 = MallocStackTotals {
            alloc_bytes: 1000,
            alloc_count: 10 * MALLOC_COUNT_ONE,
            free_bytes: 200,
            free_count: 2 * MALLOC_COUNT_ONE,
            first_ts_ns: 0,
            last_ts_ns: 9,
        };
        let cpu1 = MallocStackTotals {
            alloc_bytes: 500,
            alloc_count: 5 * MALLOC_COUNT_ONE,
            free_bytes: 300,
            free_count: 3 * MALLOC_COUNT_ONE,
            first_ts_ns: 7,
            last_ts_ns: 8,
        };
        let freed = MallocStackTotals {
            alloc_bytes: 10,
            alloc_count: MALLOC_COUNT_ONE,
            free_bytes: 10,
            free_count: MALLOC_COUNT_ONE,
            first_ts_ns: 1,
            last_ts_ns: 1,
        };
        let a = [cpu0, cpu1];
        let b = [freed];
        let aggs = aggregate_totals([(4, &a[..]), (5, &b[..])]);
        assert_eq!(aggs.len(), 1, "a stack that freed everything holds nothing");
        assert_eq!((aggs[0].kernel_stack, aggs[0].bytes, aggs[0].count()), (4, 1000, 10));
        assert_eq!(aggs[0].oldest_ts_ns, 7);
    }

    #[test]
    fn mapped_memory_of_the_allocator_is_dropped() {
        let mut table = StackTable::new(1 << 20);
        // mmap ← (inside malloc, at 0x1000..0x1100) ← caller
        let internal = table.intern(&[0x7000, 0x1050, 0x4000]);
        // mmap called by the program itself
        let direct = table.intern(&[0x7000, 0x4010, 0x4020]);
        // a return address just past malloc's end is a call at its last instruction
        let edge = table.intern(&[0x7000, 0x1100, 0x4000]);
        let agg = |stack, source| StackAgg {
            stack,
            bytes: 4096,
            count: 1,
            oldest_ts_ns: 1,
            source,
            mean_ts_ns: 1,
            ..StackAgg::default()
        };
        let mapped = vec![
            agg(internal, Source::Mmap),
            agg(direct, Source::Mmap),
            agg(edge, Source::Brk),
            agg(internal, Source::Faults),
        ];
        let kept = drop_allocator_internal(mapped, &table, |addr| (0x1000..0x1100).contains(&addr));
        let kept: Vec<_> = kept.iter().map(|a| (a.stack, a.source)).collect();
        assert_eq!(kept, vec![(direct, Source::Mmap), (edge, Source::Brk), (internal, Source::Faults)]);
    }

    #[test]
    fn stack_addresses_put_the_return_address_back_once() {
        let mut stack = MallocStack { ret_addr: 0x20, depth: 3, _pad: 0, ips: [0; MALLOC_STACK_DEPTH] };
        stack.ips[..3].copy_from_slice(&[0x10, 0x30, 0x40]);
        let mut out = [0; MALLOC_STACK_DEPTH + 1];
        let n = stack.addresses(&mut out);
        assert_eq!(&out[..n], &[0x10, 0x20, 0x30, 0x40], "the kernel skipped the caller");
        stack.ips[..3].copy_from_slice(&[0x10, 0x20, 0x30]);
        let n = stack.addresses(&mut out);
        assert_eq!(&out[..n], &[0x10, 0x20, 0x30], "the kernel already had it");
        stack.depth = MALLOC_STACK_DEPTH as u32;
        stack.ret_addr = 0x99;
        assert_eq!(stack.addresses(&mut out), MALLOC_STACK_DEPTH + 1, "a full stack still fits");
    }
}
