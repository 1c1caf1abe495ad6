//! Address ranges of the target, each piece keyed to the allocation that created it.

use std::collections::BTreeMap;

use super::{AllocId, Source, StackId};

/// A piece of mapped memory. Pieces of one allocation share its [`AllocId`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub end: u64,
    pub stack: StackId,
    pub alloc: AllocId,
    pub ts_ns: u64,
    pub source: Source,
    /// `PROT_NONE`: reserved address space, not memory the process can use.
    pub reserved: bool,
}

/// Non-overlapping segments by start address.
#[derive(Clone, Debug, Default)]
pub struct RangeMap {
    segs: BTreeMap<u64, Segment>,
}

impl RangeMap {
    #[must_use]
    pub fn len(&self) -> usize {
        self.segs.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Segment)> {
        self.segs.iter().map(|(s, seg)| (*s, seg))
    }

    /// Cuts segments so that none straddles `at`.
    fn split_at(&mut self, at: u64) {
        let Some((&start, seg)) = self.segs.range(..at).next_back() else {
            return;
        };
        if seg.end > at {
            let mut tail = *seg;
            let head_end = at;
            tail.end = seg.end;
            if let Some(head) = self.segs.get_mut(&start) {
                head.end = head_end;
            }
            self.segs.insert(at, tail);
        }
    }

    /// Removes `[start, end)` and returns the removed pieces as `(start, segment)`.
    pub fn remove(&mut self, start: u64, end: u64) -> Vec<(u64, Segment)> {
        if end <= start {
            return Vec::new();
        }
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.segs.range(start..end).map(|(k, _)| *k).collect();
        keys.into_iter().filter_map(|k| self.segs.remove(&k).map(|s| (k, s))).collect()
    }

    /// Inserts a segment over `[start, seg.end)`, replacing what was there (returned).
    pub fn insert(&mut self, start: u64, seg: Segment) -> Vec<(u64, Segment)> {
        let removed = self.remove(start, seg.end);
        if seg.end > start {
            self.segs.insert(start, seg);
        }
        removed
    }

    /// Marks `[start, end)` reserved or usable; returns the bytes whose state changed as
    /// `(start, segment-before-change)` pieces.
    pub fn set_reserved(&mut self, start: u64, end: u64, reserved: bool) -> Vec<(u64, Segment)> {
        if end <= start {
            return Vec::new();
        }
        self.split_at(start);
        self.split_at(end);
        let mut changed = Vec::new();
        for (&k, seg) in self.segs.range_mut(start..end) {
            if seg.reserved != reserved {
                changed.push((k, *seg));
                seg.reserved = reserved;
            }
        }
        changed
    }

    /// Bytes of usable (not reserved) memory.
    #[must_use]
    pub fn usable_bytes(&self) -> u64 {
        self.segs.iter().filter(|(_, s)| !s.reserved).map(|(k, s)| s.end - k).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(end: u64, stack: u32, alloc: u64) -> Segment {
        Segment {
            end,
            stack: StackId(stack),
            alloc: AllocId(alloc),
            ts_ns: 0,
            source: Source::Mmap,
            reserved: false,
        }
    }

    #[test]
    fn partial_unmap_splits_in_three() {
        let mut m = RangeMap::default();
        m.insert(0x1000, seg(0x5000, 1, 1));
        let removed = m.remove(0x2000, 0x3000);
        assert_eq!(removed, vec![(0x2000, seg(0x3000, 1, 1))]);
        let pieces: Vec<_> = m.iter().map(|(s, g)| (s, g.end)).collect();
        assert_eq!(pieces, vec![(0x1000, 0x2000), (0x3000, 0x5000)]);
        assert_eq!(m.usable_bytes(), 0x3000);
    }

    #[test]
    fn unmap_across_segments_and_gaps() {
        let mut m = RangeMap::default();
        m.insert(0x1000, seg(0x2000, 1, 1));
        m.insert(0x4000, seg(0x6000, 2, 2));
        let removed = m.remove(0x1800, 0x5000);
        assert_eq!(removed.iter().map(|(s, g)| g.end - s).sum::<u64>(), 0x800 + 0x1000);
        let pieces: Vec<_> = m.iter().map(|(s, g)| (s, g.end, g.stack.0)).collect();
        assert_eq!(pieces, vec![(0x1000, 0x1800, 1), (0x5000, 0x6000, 2)]);
    }

    #[test]
    fn insert_over_existing_replaces_it() {
        let mut m = RangeMap::default();
        m.insert(0x1000, seg(0x4000, 1, 1));
        let replaced = m.insert(0x2000, seg(0x3000, 2, 2));
        assert_eq!(replaced, vec![(0x2000, seg(0x3000, 1, 1))]);
        let pieces: Vec<_> = m.iter().map(|(s, g)| (s, g.stack.0)).collect();
        assert_eq!(pieces, vec![(0x1000, 1), (0x2000, 2), (0x3000, 1)]);
    }

    #[test]
    fn reserved_ranges_are_not_usable_until_committed() {
        let mut m = RangeMap::default();
        let mut s = seg(0x10000, 1, 1);
        s.reserved = true;
        m.insert(0, s);
        assert_eq!(m.usable_bytes(), 0);
        let changed = m.set_reserved(0x4000, 0x8000, false);
        assert_eq!(changed.len(), 1);
        assert_eq!(m.usable_bytes(), 0x4000);
        assert!(m.set_reserved(0x4000, 0x8000, false).is_empty(), "no change the second time");
    }
}
