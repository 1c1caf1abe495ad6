//! The live-memory model: which ranges the target holds, and which stack made them.

pub mod ranges;
pub mod stacks;

use std::collections::{HashMap, HashSet};

use tracer_common::{MemEvent, kind};

pub use ranges::{RangeMap, Segment};
pub use stacks::StackTable;

/// Index into the [`StackTable`]. `StackId(0)` is the unknown stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackId(pub u32);

/// One allocation (one mmap, one brk growth); its pieces share it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllocId(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Mmap,
    Brk,
}

impl Source {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Mmap => "mmap",
            Self::Brk => "brk",
        }
    }
}

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
}

impl MemOp {
    /// Converts a kernel event; `None` for kinds that are not address-space changes.
    #[must_use]
    pub fn from_event(ev: &MemEvent) -> Option<Self> {
        Some(match ev.header.kind {
            kind::MMAP if ev.flags & MAP_ANONYMOUS != 0 || ev.fd < 0 => Self::Map {
                addr: ev.addr,
                len: ev.len,
                reserved: ev.prot == 0,
            },
            kind::MMAP => Self::MapFile {
                addr: ev.addr,
                len: ev.len,
            },
            kind::MUNMAP => Self::Unmap {
                addr: ev.addr,
                len: ev.len,
            },
            kind::MREMAP => Self::Remap {
                old_addr: ev.old_addr,
                old_len: ev.old_len,
                addr: ev.addr,
                len: ev.len,
                dont_unmap: ev.flags & MREMAP_DONTUNMAP != 0,
            },
            kind::BRK => Self::Brk { new_brk: ev.addr },
            kind::MPROTECT => Self::Protect {
                addr: ev.addr,
                len: ev.len,
                reserved: ev.prot == 0,
            },
            kind::MADVISE => Self::Release {
                addr: ev.addr,
                len: ev.len,
            },
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
    pub ops: u64,
}

/// Outstanding memory of one stack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackAgg {
    pub stack: StackId,
    pub bytes: u64,
    pub count: u64,
    pub oldest_ts_ns: u64,
    pub sources: Vec<Source>,
}

#[derive(Debug, Default)]
pub struct LiveModel {
    ranges: RangeMap,
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

    fn new_alloc(&mut self) -> AllocId {
        self.next_alloc += 1;
        AllocId(self.next_alloc)
    }

    fn freed(&mut self, removed: &[(u64, Segment)]) {
        let bytes: u64 = removed
            .iter()
            .filter(|(_, s)| !s.reserved)
            .map(|(k, s)| s.end - k)
            .sum();
        self.totals.freed_bytes += bytes;
    }

    /// Applies one change made at `ts_ns` by the code at `stack`.
    pub fn apply(&mut self, op: MemOp, stack: StackId, ts_ns: u64) {
        self.totals.ops += 1;
        match op {
            MemOp::Map {
                addr,
                len,
                reserved,
            } => {
                let len = page_align(len);
                let seg = Segment {
                    end: addr + len,
                    stack,
                    alloc: self.new_alloc(),
                    ts_ns,
                    source: Source::Mmap,
                    reserved,
                };
                let removed = self.ranges.insert(addr, seg);
                self.freed(&removed);
                if !reserved {
                    self.totals.allocated_bytes += len;
                }
            }
            MemOp::MapFile { addr, len } | MemOp::Unmap { addr, len } => {
                let removed = self.ranges.remove(addr, addr + page_align(len));
                self.freed(&removed);
            }
            MemOp::Remap {
                old_addr,
                old_len,
                addr,
                len,
                dont_unmap,
            } => {
                self.remap(
                    old_addr,
                    page_align(old_len),
                    addr,
                    page_align(len),
                    dont_unmap,
                    stack,
                    ts_ns,
                );
            }
            MemOp::Brk { new_brk } => self.brk_to(new_brk, stack, ts_ns),
            MemOp::Protect {
                addr,
                len,
                reserved,
            } => {
                let changed = self
                    .ranges
                    .set_reserved(addr, addr + page_align(len), reserved);
                let bytes: u64 = changed.iter().map(|(k, s)| s.end - k).sum();
                if reserved {
                    self.totals.freed_bytes += bytes;
                } else {
                    self.totals.allocated_bytes += bytes;
                }
            }
            MemOp::Release { len, .. } => self.totals.released_bytes += page_align(len),
        }
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one mremap call's arguments plus who made it"
    )]
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
            let tail: Vec<_> = moved
                .iter()
                .filter(|(k, _)| *k >= old_addr + kept)
                .copied()
                .collect();
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
        }
    }

    /// Outstanding memory grouped by stack, biggest first.
    #[must_use]
    pub fn by_stack(&self) -> Vec<StackAgg> {
        let mut aggs: HashMap<StackId, (StackAgg, HashSet<AllocId>)> = HashMap::new();
        for (start, seg) in self.ranges.iter().filter(|(_, s)| !s.reserved) {
            let (agg, allocs) = aggs.entry(seg.stack).or_insert_with(|| {
                (
                    StackAgg {
                        stack: seg.stack,
                        oldest_ts_ns: u64::MAX,
                        ..StackAgg::default()
                    },
                    HashSet::new(),
                )
            });
            agg.bytes += seg.end - start;
            agg.oldest_ts_ns = agg.oldest_ts_ns.min(seg.ts_ns);
            if !agg.sources.contains(&seg.source) {
                agg.sources.push(seg.source);
            }
            allocs.insert(seg.alloc);
        }
        let mut out: Vec<StackAgg> = aggs
            .into_values()
            .map(|(mut agg, allocs)| {
                agg.count = allocs.len() as u64;
                agg
            })
            .collect();
        out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.stack.cmp(&b.stack)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn by(model: &LiveModel, stack: u32) -> Option<StackAgg> {
        model
            .by_stack()
            .into_iter()
            .find(|a| a.stack == StackId(stack))
    }

    #[test]
    fn unmapped_memory_is_not_outstanding() {
        let mut m = LiveModel::new();
        m.apply(
            MemOp::Map {
                addr: 0x10_0000,
                len: MIB,
                reserved: false,
            },
            StackId(1),
            1,
        );
        m.apply(
            MemOp::Map {
                addr: 0x40_0000,
                len: MIB,
                reserved: false,
            },
            StackId(2),
            2,
        );
        m.apply(
            MemOp::Unmap {
                addr: 0x40_0000,
                len: MIB,
            },
            StackId(0),
            3,
        );
        assert_eq!(m.outstanding_bytes(), MIB);
        assert!(by(&m, 2).is_none());
        let leak = by(&m, 1).expect("stack 1 holds memory");
        assert_eq!((leak.bytes, leak.count, leak.oldest_ts_ns), (MIB, 1, 1));
        assert_eq!(m.totals().allocated_bytes, 2 * MIB);
        assert_eq!(m.totals().freed_bytes, MIB);
    }

    #[test]
    fn partial_unmap_keeps_one_allocation() {
        let mut m = LiveModel::new();
        m.apply(
            MemOp::Map {
                addr: 0x10_0000,
                len: 4 * MIB,
                reserved: false,
            },
            StackId(1),
            1,
        );
        m.apply(
            MemOp::Unmap {
                addr: 0x10_0000 + MIB,
                len: MIB,
            },
            StackId(0),
            2,
        );
        let leak = by(&m, 1).expect("still held");
        assert_eq!((leak.bytes, leak.count), (3 * MIB, 1));
    }

    #[test]
    fn mremap_moves_and_grows() {
        let mut m = LiveModel::new();
        m.apply(
            MemOp::Map {
                addr: 0x10_0000,
                len: MIB,
                reserved: false,
            },
            StackId(1),
            1,
        );
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
        assert_eq!(
            by(&m, 1).map(|a| a.bytes),
            Some(MIB),
            "moved part keeps its stack"
        );
        assert_eq!(
            by(&m, 2).map(|a| a.bytes),
            Some(2 * MIB),
            "growth belongs to the mremap caller"
        );
        assert!(
            m.ranges().iter().all(|(k, _)| k >= 0x80_0000),
            "nothing left at the old address"
        );
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
        m.apply(
            MemOp::Brk {
                new_brk: 0x102_1000,
            },
            StackId(5),
            1,
        );
        m.apply(
            MemOp::Brk {
                new_brk: 0x104_2000,
            },
            StackId(6),
            2,
        );
        assert_eq!(m.outstanding_bytes(), 0x4_2000);
        m.apply(
            MemOp::Brk {
                new_brk: 0x101_0000,
            },
            StackId(7),
            3,
        );
        assert_eq!(by(&m, 5).map(|a| a.bytes), Some(0x1_0000));
        assert!(by(&m, 6).is_none());
        assert_eq!(by(&m, 5).map(|a| a.sources), Some(vec![Source::Brk]));
    }

    #[test]
    fn brk_without_known_start_is_not_guessed() {
        let mut m = LiveModel::new();
        m.apply(
            MemOp::Brk {
                new_brk: 0x200_0000,
            },
            StackId(5),
            1,
        );
        assert_eq!(m.outstanding_bytes(), 0);
        m.apply(
            MemOp::Brk {
                new_brk: 0x200_2000,
            },
            StackId(5),
            2,
        );
        assert_eq!(m.outstanding_bytes(), 0x2000);
    }

    #[test]
    fn reservations_count_once_committed() {
        let mut m = LiveModel::new();
        m.apply(
            MemOp::Map {
                addr: 0x1000_0000,
                len: 64 * MIB,
                reserved: true,
            },
            StackId(1),
            1,
        );
        assert_eq!(m.outstanding_bytes(), 0);
        m.apply(
            MemOp::Protect {
                addr: 0x1000_0000,
                len: 2 * MIB,
                reserved: false,
            },
            StackId(0),
            2,
        );
        assert_eq!(by(&m, 1).map(|a| a.bytes), Some(2 * MIB));
        m.apply(
            MemOp::Unmap {
                addr: 0x1000_0000,
                len: 64 * MIB,
            },
            StackId(0),
            3,
        );
        assert_eq!(m.outstanding_bytes(), 0);
        assert_eq!(m.totals().freed_bytes, 2 * MIB);
    }

    #[test]
    fn file_mapping_over_anonymous_memory_frees_it() {
        let mut m = LiveModel::new();
        m.apply(
            MemOp::Map {
                addr: 0x10_0000,
                len: MIB,
                reserved: false,
            },
            StackId(1),
            1,
        );
        m.apply(
            MemOp::MapFile {
                addr: 0x10_0000,
                len: MIB / 2,
            },
            StackId(2),
            2,
        );
        assert_eq!(m.outstanding_bytes(), MIB / 2);
    }

    #[test]
    fn kernel_event_conversion() {
        let mut ev = MemEvent {
            addr: 1,
            len: 2,
            prot: 3,
            flags: MAP_ANONYMOUS,
            fd: -1,
            ..MemEvent::default()
        };
        ev.header.kind = kind::MMAP;
        assert_eq!(
            MemOp::from_event(&ev),
            Some(MemOp::Map {
                addr: 1,
                len: 2,
                reserved: false
            })
        );
        ev.flags = 0x2;
        ev.fd = 3;
        assert_eq!(
            MemOp::from_event(&ev),
            Some(MemOp::MapFile { addr: 1, len: 2 })
        );
        ev.header.kind = kind::OOM_MARK_VICTIM;
        assert_eq!(MemOp::from_event(&ev), None);
    }
}
