//! The live-memory model: which ranges the target holds, and which stack made them.

pub mod frames;
pub mod ranges;
pub mod stacks;

use std::collections::{BTreeMap, HashMap, HashSet};

use tracer_common::{MemEvent, kind};

pub use ranges::{RangeMap, Segment};
pub use stacks::StackTable;

/// Index into the [`StackTable`]. `StackId(0)` is the unknown stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackId(pub u32);

/// One allocation (one mmap, one brk growth); its pieces share it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllocId(pub u64);

pub use crate::report::Source;

const MAP_ANONYMOUS: u32 = 0x20;
const MREMAP_DONTUNMAP: u32 = 4;

/// An address-space change, independent of how it was observed (kernel event or test
/// script).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemOp {
    /// Anonymous mapping (file mappings are page cache, not memory the target holds).
    Map {
        addr: u64,
        len: u64,
        reserved: bool,
    },
    /// A file mapping: only replaces what it lands on.
    MapFile {
        addr: u64,
        len: u64,
    },
    Unmap {
        addr: u64,
        len: u64,
    },
    Remap {
        old_addr: u64,
        old_len: u64,
        addr: u64,
        len: u64,
        dont_unmap: bool,
    },
    Brk {
        new_brk: u64,
    },
    Protect {
        addr: u64,
        len: u64,
        reserved: bool,
    },
    /// madvise(DONTNEED/FREE/REMOVE): pages given back, mapping kept.
    Release {
        addr: u64,
        len: u64,
    },
    /// A sampled first touch of the page at `addr`, standing for `bytes`.
    Fault {
        addr: u64,
        bytes: u64,
    },
}

impl MemOp {
    /// Converts a kernel event; `None` for kinds that are not address-space changes.
    #[must_use]
    pub fn from_event(ev: &MemEvent) -> Option<Self> {
        Some(match ev.header.kind {
            kind::MMAP if ev.flags & MAP_ANONYMOUS != 0 || ev.fd < 0 => {
                Self::Map { addr: ev.addr, len: ev.len, reserved: ev.prot == 0 }
            }
            kind::MMAP => Self::MapFile { addr: ev.addr, len: ev.len },
            kind::MUNMAP => Self::Unmap { addr: ev.addr, len: ev.len },
            kind::MREMAP => Self::Remap {
                old_addr: ev.old_addr,
                old_len: ev.old_len,
                addr: ev.addr,
                len: ev.len,
                dont_unmap: ev.flags & MREMAP_DONTUNMAP != 0,
            },
            kind::BRK => Self::Brk { new_brk: ev.addr },
            kind::MPROTECT => Self::Protect { addr: ev.addr, len: ev.len, reserved: ev.prot == 0 },
            kind::MADVISE => Self::Release { addr: ev.addr, len: ev.len },
            kind::FAULT => Self::Fault { addr: ev.addr, bytes: ev.len },
            _ => return None,
        })
    }
}

fn page_align(len: u64) -> u64 {
    len.saturating_add(4095) & !4095
}

/// Running totals over the whole trace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub allocated_bytes: u64,
    pub freed_bytes: u64,
    pub released_bytes: u64,
    /// Bytes of first-touched pages, estimated from the fault samples.
    pub faulted_bytes: u64,
    pub ops: u64,
}

/// A traced process, by its place in the session's list of processes (a pid can be
/// reused; this cannot). `ProcIndex(0)` is the first target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcIndex(pub u32);

/// Outstanding memory of one stack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackAgg {
    /// The process that holds it.
    pub proc: ProcIndex,
    pub stack: StackId,
    pub bytes: u64,
    pub count: u64,
    pub oldest_ts_ns: u64,
    /// The view this memory is seen in.
    pub source: Source,
    /// Byte-weighted mean allocation time of the held memory (0: unknown): a leak's is
    /// spread over the run, memory in flight is young.
    pub mean_ts_ns: u64,
}

/// A sampled resident page: who touched it first, and how many bytes it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultSample {
    pub stack: StackId,
    pub ts_ns: u64,
    pub bytes: u64,
}

#[derive(Debug, Default)]
pub struct LiveModel {
    ranges: RangeMap,
    /// Sampled resident pages by page address.
    faults: BTreeMap<u64, FaultSample>,
    brk: Option<u64>,
    next_alloc: u64,
    totals: Totals,
}

impl LiveModel {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The program break when tracing started (end of `[heap]`), so that the first brk
    /// growth is measured from it.
    pub fn set_initial_brk(&mut self, brk: u64) {
        self.brk = Some(brk);
    }

    /// The program break as last seen (a forked child starts from its parent's).
    #[must_use]
    pub fn brk(&self) -> Option<u64> {
        self.brk
    }

    #[must_use]
    pub fn totals(&self) -> Totals {
        self.totals
    }

    #[must_use]
    pub fn ranges(&self) -> &RangeMap {
        &self.ranges
    }

    /// Bytes allocated while tracing and still held.
    #[must_use]
    pub fn outstanding_bytes(&self) -> u64 {
        self.ranges.usable_bytes()
    }

    /// Resident bytes first touched while tracing and not released (estimated from
    /// samples).
    #[must_use]
    pub fn resident_bytes(&self) -> u64 {
        self.faults.values().map(|f| f.bytes).sum()
    }

    /// Forgets sampled pages in `[start, end)`: the memory was given back.
    fn release_pages(&mut self, start: u64, end: u64) {
        if end <= start || self.faults.is_empty() {
            return;
        }
        let pages: Vec<u64> = self.faults.range(start..end).map(|(k, _)| *k).collect();
        for p in pages {
            self.faults.remove(&p);
        }
    }

    /// mremap moves resident pages with the mapping.
    fn move_pages(&mut self, old_addr: u64, kept: u64, old_len: u64, addr: u64, dont_unmap: bool) {
        if self.faults.is_empty() {
            return;
        }
        let moved: Vec<(u64, FaultSample)> =
            self.faults.range(old_addr..old_addr + kept).map(|(k, v)| (*k, *v)).collect();
        if !dont_unmap || kept < old_len {
            self.release_pages(old_addr, old_addr + old_len);
        }
        for (k, v) in moved {
            self.faults.insert(k - old_addr + addr, v);
        }
    }

    fn new_alloc(&mut self) -> AllocId {
        self.next_alloc += 1;
        AllocId(self.next_alloc)
    }

    fn freed(&mut self, removed: &[(u64, Segment)]) {
        let bytes: u64 = removed.iter().filter(|(_, s)| !s.reserved).map(|(k, s)| s.end - k).sum();
        self.totals.freed_bytes += bytes;
    }

    /// Applies one change made at `ts_ns` by the code at `stack`.
    pub fn apply(&mut self, op: MemOp, stack: StackId, ts_ns: u64) {
        self.totals.ops += 1;
        match op {
            MemOp::Map { addr, len, reserved } => {
                let len = page_align(len);
                let seg = Segment {
                    end: addr + len,
                    stack,
                    alloc: self.new_alloc(),
                    ts_ns,
                    source: Source::Mmap,
                    reserved,
                };
                // A fixed mapping over old memory replaces its pages.
                self.release_pages(addr, addr + len);
                let removed = self.ranges.insert(addr, seg);
                self.freed(&removed);
                if !reserved {
                    self.totals.allocated_bytes += len;
                }
            }
            MemOp::MapFile { addr, len } | MemOp::Unmap { addr, len } => {
                let removed = self.ranges.remove(addr, addr + page_align(len));
                self.freed(&removed);
                self.release_pages(addr, addr + page_align(len));
            }
            MemOp::Remap { old_addr, old_len, addr, len, dont_unmap } => {
                let (old_len, len) = (page_align(old_len), page_align(len));
                self.move_pages(old_addr, old_len.min(len), old_len, addr, dont_unmap);
                self.remap(old_addr, old_len, addr, len, dont_unmap, stack, ts_ns);
            }
            MemOp::Brk { new_brk } => self.brk_to(new_brk, stack, ts_ns),
            MemOp::Protect { addr, len, reserved } => {
                let changed = self.ranges.set_reserved(addr, addr + page_align(len), reserved);
                let bytes: u64 = changed.iter().map(|(k, s)| s.end - k).sum();
                if reserved {
                    self.totals.freed_bytes += bytes;
                } else {
                    self.totals.allocated_bytes += bytes;
                }
            }
            MemOp::Release { addr, len } => {
                self.totals.released_bytes += page_align(len);
                self.release_pages(addr, addr + page_align(len));
            }
            MemOp::Fault { addr, bytes } => {
                self.totals.faulted_bytes += bytes;
                self.faults.insert(addr & !4095, FaultSample { stack, ts_ns, bytes });
            }
        }
    }

    #[allow(clippy::too_many_arguments, reason = "one mremap call's arguments plus who made it")]
    fn remap(
        &mut self,
        old_addr: u64,
        old_len: u64,
        addr: u64,
        len: u64,
        dont_unmap: bool,
        stack: StackId,
        ts_ns: u64,
    ) {
        let kept = old_len.min(len);
        let moved = if dont_unmap {
            // The old range stays mapped (emptied); its pieces are copied, not moved.
            self.ranges
                .iter()
                .filter(|(k, s)| *k < old_addr + kept && s.end > old_addr)
                .map(|(k, s)| (k, *s))
                .collect()
        } else {
            let mut moved = self.ranges.remove(old_addr, old_addr + old_len);
            // The tail beyond the new length is freed by a shrink.
            let tail: Vec<_> = moved.iter().filter(|(k, _)| *k >= old_addr + kept).copied().collect();
            self.freed(&tail);
            moved.retain(|(k, _)| *k < old_addr + kept);
            moved
        };
        for (k, mut seg) in moved {
            let start = k.max(old_addr);
            seg.end = seg.end.min(old_addr + kept) - old_addr + addr;
            let removed = self.ranges.insert(start - old_addr + addr, seg);
            self.freed(&removed);
        }
        if len > old_len {
            let seg = Segment {
                end: addr + len,
                stack,
                alloc: self.new_alloc(),
                ts_ns,
                source: Source::Mmap,
                reserved: false,
            };
            let removed = self.ranges.insert(addr + old_len, seg);
            self.freed(&removed);
            self.totals.allocated_bytes += len - old_len;
        }
    }

    fn brk_to(&mut self, new_brk: u64, stack: StackId, ts_ns: u64) {
        let Some(old) = self.brk.replace(new_brk) else {
            return;
        };
        if new_brk > old {
            let seg = Segment {
                end: new_brk,
                stack,
                alloc: self.new_alloc(),
                ts_ns,
                source: Source::Brk,
                reserved: false,
            };
            let removed = self.ranges.insert(old, seg);
            self.freed(&removed);
            self.totals.allocated_bytes += new_brk - old;
        } else if new_brk < old {
            let removed = self.ranges.remove(new_brk, old);
            self.freed(&removed);
            self.release_pages(new_brk, old);
        }
    }

    /// Adds to `held` every stack this model attributes something to: its ranges (reserved
    /// ones too, which an mprotect can make usable under their stack) and sampled pages.
    pub fn held_stacks(&self, held: &mut HashSet<StackId>) {
        held.extend(self.ranges.iter().map(|(_, s)| s.stack));
        held.extend(self.faults.values().map(|f| f.stack));
    }

    /// Outstanding memory grouped by stack, biggest first: mapped memory by the stack
    /// that mapped it, and (separately, with source `Faults`) resident pages by the stack
    /// that first touched them.
    #[must_use]
    pub fn by_stack(&self) -> Vec<StackAgg> {
        self.by_stack_before(u64::MAX)
    }

    /// [`Self::by_stack`] counting only memory allocated at or before `cutoff_ns`
    /// (`--min-age`).
    #[must_use]
    pub fn by_stack_before(&self, cutoff_ns: u64) -> Vec<StackAgg> {
        let mut out = self.mapped_by_stack(cutoff_ns);
        out.extend(self.faults_by_stack(cutoff_ns));
        out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.stack.cmp(&b.stack)));
        out
    }

    fn faults_by_stack(&self, cutoff_ns: u64) -> Vec<StackAgg> {
        let mut aggs: HashMap<StackId, StackAgg> = HashMap::new();
        for f in self.faults.values().filter(|f| f.ts_ns <= cutoff_ns) {
            let agg = aggs.entry(f.stack).or_insert_with(|| StackAgg {
                stack: f.stack,
                oldest_ts_ns: u64::MAX,
                source: Source::Faults,
                ..StackAgg::default()
            });
            agg.bytes += f.bytes;
            agg.count += 1;
            agg.oldest_ts_ns = agg.oldest_ts_ns.min(f.ts_ns);
        }
        aggs.into_values().collect()
    }

    fn mapped_by_stack(&self, cutoff_ns: u64) -> Vec<StackAgg> {
        let mut aggs: HashMap<(StackId, Source), (StackAgg, HashSet<AllocId>, u128)> = HashMap::new();
        for (start, seg) in self.ranges.iter().filter(|(_, s)| !s.reserved && s.ts_ns <= cutoff_ns) {
            let (agg, allocs, weighted) = aggs.entry((seg.stack, seg.source)).or_insert_with(|| {
                let agg = StackAgg {
                    stack: seg.stack,
                    oldest_ts_ns: u64::MAX,
                    source: seg.source,
                    ..StackAgg::default()
                };
                (agg, HashSet::new(), 0)
            });
            agg.bytes += seg.end - start;
            *weighted += u128::from(seg.ts_ns) * u128::from(seg.end - start);
            agg.oldest_ts_ns = agg.oldest_ts_ns.min(seg.ts_ns);
            allocs.insert(seg.alloc);
        }
        aggs.into_values()
            .map(|(mut agg, allocs, weighted)| {
                agg.count = allocs.len() as u64;
                agg.mean_ts_ns = weighted.checked_div(u128::from(agg.bytes)).map_or(0, |m| m as u64);
                agg
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn by(model: &LiveModel, stack: u32) -> Option<StackAgg> {
        model.by_stack().into_iter().find(|a| a.stack == StackId(stack))
    }

    #[test]
    fn unmapped_memory_is_not_outstanding() {
        let mut m = LiveModel::new();
        m.apply(MemOp::Map { addr: 0x10_0000, len: MIB, reserved: false }, StackId(1), 1);
        m.apply(MemOp::Map { addr: 0x40_0000, len: MIB, reserved: false }, StackId(2), 2);
        m.apply(MemOp::Unmap { addr: 0x40_0000, len: MIB }, StackId(0), 3);
        assert_eq!(m.outstanding_bytes(), MIB);
        assert!(by(&m, 2).is_none());
        let leak = by(&m, 1).expect("stack 1 holds memory");
        assert_eq!((leak.bytes, leak.count, leak.oldest_ts_ns), (MIB, 1, 1));
        assert_eq!(m.totals().allocated_bytes, 2 * MIB);
        assert_eq!(m.totals().freed_bytes, MIB);
    }

    #[test]
    fn min_age_cutoff_counts_only_older_memory() {
        let mut m = LiveModel::new();
        m.apply(MemOp::Map { addr: 0x10_0000, len: MIB, reserved: false }, StackId(1), 100);
        m.apply(MemOp::Map { addr: 0x40_0000, len: MIB, reserved: false }, StackId(1), 900);
        m.apply(MemOp::Fault { addr: 0x40_0000, bytes: 4096 }, StackId(2), 950);
        let old = m.by_stack_before(500);
        assert_eq!(old.len(), 1);
        assert_eq!((old[0].bytes, old[0].count), (MIB, 1));
        assert_eq!(m.by_stack().len(), 2);
    }

    #[test]
    fn partial_unmap_keeps_one_allocation() {
        let mut m = LiveModel::new();
        m.apply(MemOp::Map { addr: 0x10_0000, len: 4 * MIB, reserved: false }, StackId(1), 1);
        m.apply(MemOp::Unmap { addr: 0x10_0000 + MIB, len: MIB }, StackId(0), 2);
        let leak = by(&m, 1).expect("still held");
        assert_eq!((leak.bytes, leak.count), (3 * MIB, 1));
    }

    #[test]
    fn mremap_moves_and_grows() {
        let mut m = LiveModel::new();
        m.apply(MemOp::Map { addr: 0x10_0000, len: MIB, reserved: false }, StackId(1), 1);
        m.apply(
            MemOp::Remap {
                old_addr: 0x10_0000,
                old_len: MIB,
                addr: 0x80_0000,
                len: 3 * MIB,
                dont_unmap: false,
            },
            StackId(2),
            2,
        );
        assert_eq!(by(&m, 1).map(|a| a.bytes), Some(MIB), "moved part keeps its stack");
        assert_eq!(by(&m, 2).map(|a| a.bytes), Some(2 * MIB), "growth belongs to the mremap caller");
        assert!(m.ranges().iter().all(|(k, _)| k >= 0x80_0000), "nothing left at the old address");
        m.apply(
            MemOp::Remap {
                old_addr: 0x80_0000,
                old_len: 3 * MIB,
                addr: 0x80_0000,
                len: MIB / 2,
                dont_unmap: false,
            },
            StackId(3),
            3,
        );
        assert_eq!(m.outstanding_bytes(), MIB / 2);
        assert!(by(&m, 2).is_none());
    }

    #[test]
    fn brk_growth_and_shrink() {
        let mut m = LiveModel::new();
        m.set_initial_brk(0x100_0000);
        m.apply(MemOp::Brk { new_brk: 0x102_1000 }, StackId(5), 1);
        m.apply(MemOp::Brk { new_brk: 0x104_2000 }, StackId(6), 2);
        assert_eq!(m.outstanding_bytes(), 0x4_2000);
        m.apply(MemOp::Brk { new_brk: 0x101_0000 }, StackId(7), 3);
        assert_eq!(by(&m, 5).map(|a| a.bytes), Some(0x1_0000));
        assert!(by(&m, 6).is_none());
        assert_eq!(by(&m, 5).map(|a| a.source), Some(Source::Brk));
    }

    #[test]
    fn brk_without_known_start_is_not_guessed() {
        let mut m = LiveModel::new();
        m.apply(MemOp::Brk { new_brk: 0x200_0000 }, StackId(5), 1);
        assert_eq!(m.outstanding_bytes(), 0);
        m.apply(MemOp::Brk { new_brk: 0x200_2000 }, StackId(5), 2);
        assert_eq!(m.outstanding_bytes(), 0x2000);
    }

    #[test]
    fn reservations_count_once_committed() {
        let mut m = LiveModel::new();
        m.apply(MemOp::Map { addr: 0x1000_0000, len: 64 * MIB, reserved: true }, StackId(1), 1);
        assert_eq!(m.outstanding_bytes(), 0);
        m.apply(MemOp::Protect { addr: 0x1000_0000, len: 2 * MIB, reserved: false }, StackId(0), 2);
        assert_eq!(by(&m, 1).map(|a| a.bytes), Some(2 * MIB));
        m.apply(MemOp::Unmap { addr: 0x1000_0000, len: 64 * MIB }, StackId(0), 3);
        assert_eq!(m.outstanding_bytes(), 0);
        assert_eq!(m.totals().freed_bytes, 2 * MIB);
    }

    #[test]
    fn file_mapping_over_anonymous_memory_frees_it() {
        let mut m = LiveModel::new();
        m.apply(MemOp::Map { addr: 0x10_0000, len: MIB, reserved: false }, StackId(1), 1);
        m.apply(MemOp::MapFile { addr: 0x10_0000, len: MIB / 2 }, StackId(2), 2);
        assert_eq!(m.outstanding_bytes(), MIB / 2);
    }

    #[test]
    fn fault_samples_are_released_with_their_memory() {
        let mut m = LiveModel::new();
        m.apply(MemOp::Map { addr: 0x10_0000, len: MIB, reserved: false }, StackId(1), 1);
        m.apply(MemOp::Fault { addr: 0x10_0123, bytes: 64 * 4096 }, StackId(9), 2);
        m.apply(MemOp::Fault { addr: 0x10_8000, bytes: 64 * 4096 }, StackId(9), 3);
        m.apply(MemOp::Fault { addr: 0x90_0000, bytes: 64 * 4096 }, StackId(8), 4);
        let faults: Vec<_> = m.by_stack().into_iter().filter(|a| a.source == Source::Faults).collect();
        assert_eq!(faults.len(), 2);
        assert_eq!(faults[0].stack, StackId(9));
        assert_eq!((faults[0].bytes, faults[0].count), (128 * 4096, 2));
        m.apply(MemOp::Release { addr: 0x10_0000, len: 0x1000 }, StackId(0), 5);
        assert_eq!(m.resident_bytes(), 128 * 4096, "madvise(DONTNEED) gave one sampled page back");
        m.apply(MemOp::Unmap { addr: 0x10_0000, len: MIB }, StackId(0), 6);
        assert_eq!(m.resident_bytes(), 64 * 4096);
        m.apply(
            MemOp::Remap {
                old_addr: 0x90_0000,
                old_len: 4096,
                addr: 0xA0_0000,
                len: 8192,
                dont_unmap: false,
            },
            StackId(0),
            7,
        );
        assert_eq!(
            m.faults.keys().copied().collect::<Vec<_>>(),
            vec![0xA0_0000],
            "the page moved with mremap"
        );
        m.set_initial_brk(0xA0_0000 + 8192);
        m.apply(MemOp::Brk { new_brk: 0xA0_0000 }, StackId(0), 8);
        assert_eq!(m.resident_bytes(), 0, "brk shrink released it");
    }

    #[test]
    fn kernel_event_conversion() {
        let mut ev =
            MemEvent { addr: 1, len: 2, prot: 3, flags: MAP_ANONYMOUS, fd: -1, ..MemEvent::default() };
        ev.header.kind = kind::MMAP;
        assert_eq!(MemOp::from_event(&ev), Some(MemOp::Map { addr: 1, len: 2, reserved: false }));
        ev.flags = 0x2;
        ev.fd = 3;
        assert_eq!(MemOp::from_event(&ev), Some(MemOp::MapFile { addr: 1, len: 2 }));
        ev.header.kind = kind::OOM_MARK_VICTIM;
        assert_eq!(MemOp::from_event(&ev), None);
    }
}
