//! Interning of unwound stacks, bounded in memory so that a long trace cannot grow without
//! limit.
//!
//! A stack is its addresses (kept once, to recognise it again) and, once symbolized, the
//! ids of its frames in a [`FrameTable`]. The table has a memory limit: past a share of it,
//! [`StackTable::evict`] forgets the stacks that hold nothing and were not seen recently
//! (the caller says which hold memory); at the limit, new stacks get the unknown id and
//! are counted.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::{BuildHasher as _, Hash as _, Hasher as _, RandomState},
    mem::size_of,
};

use super::{
    StackId,
    frames::{BLOCK_OVERHEAD, FrameId, FrameTable, map_slot_bytes},
};
use crate::report::{Frame, FrameKind};

/// Eviction starts when the table reaches this share of its limit, and goes down to
/// [`EVICT_TO`] of it.
const EVICT_AT: f64 = 0.9;
const EVICT_TO: f64 = 0.7;

/// Ids of the stacks whose key hashes alike (nearly always one).
#[derive(Debug)]
enum Slot {
    One(StackId),
    Many(Vec<StackId>),
}

impl Slot {
    fn ids(&self) -> &[StackId] {
        match self {
            Self::One(id) => std::slice::from_ref(id),
            Self::Many(ids) => ids,
        }
    }
}

#[derive(Debug)]
struct Entry {
    space: u32,
    /// Addresses, leaf first; empty for a stack known by its frames.
    pcs: Box<[u64]>,
    /// The frames, once symbolized (from the start for a stack known by its frames).
    frames: Option<Box<[FrameId]>>,
    /// Interned by its frames ([`StackTable::intern_frames`]): its key is its frames.
    named: bool,
    /// The [`StackTable::tick`] it was last interned at.
    last_seen: u64,
    hash: u64,
}

impl Entry {
    fn heap_bytes(&self) -> usize {
        let block =
            |bytes: usize| if bytes == 0 { 0 } else { bytes.next_multiple_of(16) + BLOCK_OVERHEAD / 2 };
        // A BTreeMap node holds up to 11 entries; about two thirds full.
        let node = (size_of::<StackId>() + size_of::<Self>()) * 3 / 2;
        node + block(self.pcs.len() * 8)
            + self.frames.as_ref().map_or(0, |f| block(f.len() * size_of::<FrameId>()))
            + map_slot_bytes(size_of::<(u64, Slot)>())
    }
}

/// Stacks by id. Id 0 is the unknown stack (no capture, or the table was full). Ids are
/// never reused: an evicted stack seen again gets a new id.
///
/// Most stacks are addresses to symbolize; views that see stacks already named (the JS
/// heap profile) intern their frames instead ([`Self::intern_frames`]).
///
/// Addresses mean something only in an address space: a stack is interned in a *space*
/// (one program image; a forked child shares its parent's until it execs), and the same
/// addresses in two spaces are two stacks.
#[derive(Debug)]
pub struct StackTable {
    index: HashMap<u64, Slot>,
    hasher: RandomState,
    entries: BTreeMap<StackId, Entry>,
    frames: FrameTable,
    /// Address stacks not symbolized yet, in the order they came.
    pending: Vec<StackId>,
    next: u32,
    limit_bytes: usize,
    /// Heap bytes of the entries and the index (the frame table is counted apart).
    entry_bytes: usize,
    tick: u64,
    overflowed: u64,
    evicted: u64,
}

impl StackTable {
    /// A table that spends at most about `limit_bytes` of memtrace's memory.
    #[must_use]
    pub fn new(limit_bytes: usize) -> Self {
        Self {
            index: HashMap::new(),
            hasher: RandomState::new(),
            entries: BTreeMap::new(),
            frames: FrameTable::new(),
            pending: Vec::new(),
            next: 1,
            limit_bytes,
            entry_bytes: 0,
            tick: 0,
            overflowed: 0,
            evicted: 0,
        }
    }

    fn hash_addrs(&self, space: u32, pcs: &[u64]) -> u64 {
        let mut h = self.hasher.build_hasher();
        0u8.hash(&mut h);
        space.hash(&mut h);
        pcs.hash(&mut h);
        h.finish()
    }

    fn hash_frames(&self, frames: &[FrameId]) -> u64 {
        let mut h = self.hasher.build_hasher();
        1u8.hash(&mut h);
        frames.hash(&mut h);
        h.finish()
    }

    fn find(&self, hash: u64, is: impl Fn(&Entry) -> bool) -> Option<StackId> {
        let slot = self.index.get(&hash)?;
        slot.ids().iter().copied().find(|id| self.entries.get(id).is_some_and(&is))
    }

    /// Adds a new entry, or gives the unknown id when the table is full.
    fn add(&mut self, entry: Entry) -> StackId {
        let bytes = entry.heap_bytes();
        if self.heap_bytes() + bytes > self.limit_bytes || self.next == u32::MAX {
            self.overflowed += 1;
            return StackId(0);
        }
        let id = StackId(self.next);
        self.next += 1;
        match self.index.get_mut(&entry.hash) {
            None => {
                self.index.insert(entry.hash, Slot::One(id));
            }
            Some(Slot::One(other)) => {
                let other = *other;
                self.index.insert(entry.hash, Slot::Many(vec![other, id]));
            }
            Some(Slot::Many(ids)) => ids.push(id),
        }
        if !entry.named {
            self.pending.push(id);
        }
        self.entry_bytes += bytes;
        self.entries.insert(id, entry);
        id
    }

    /// The id of a stack known by its frames (leaf first), adding it if new. It shares
    /// the table's limit with address stacks and has no addresses.
    pub fn intern_frames(&mut self, frames: &[Frame]) -> StackId {
        if frames.is_empty() {
            return StackId(0);
        }
        let ids: Box<[FrameId]> = frames.iter().map(|f| self.frames.intern(f)).collect();
        let hash = self.hash_frames(&ids);
        let tick = self.tick;
        if let Some(id) = self.find(hash, |e| e.named && e.frames.as_deref() == Some(&ids[..])) {
            self.seen(id, tick);
            return id;
        }
        self.add(Entry { space: 0, pcs: Box::new([]), frames: Some(ids), named: true, last_seen: tick, hash })
    }

    /// The id of `frames` (leaf first) in space 0, adding it if new (see
    /// [`Self::intern_in`]).
    pub fn intern(&mut self, frames: &[u64]) -> StackId {
        self.intern_in(0, frames)
    }

    /// The id of `pcs` (leaf first) in `space`, adding it if new. When the table is
    /// full, new stacks get the unknown id and are counted.
    pub fn intern_in(&mut self, space: u32, pcs: &[u64]) -> StackId {
        if pcs.is_empty() {
            return StackId(0);
        }
        let hash = self.hash_addrs(space, pcs);
        let tick = self.tick;
        if let Some(id) = self.find(hash, |e| !e.named && e.space == space && *e.pcs == *pcs) {
            self.seen(id, tick);
            return id;
        }
        self.add(Entry { space, pcs: pcs.into(), frames: None, named: false, last_seen: tick, hash })
    }

    fn seen(&mut self, id: StackId, tick: u64) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.last_seen = tick;
        }
    }

    /// Advances the table's clock (the session does it once a second): eviction spares
    /// the stacks seen in the last ticks.
    pub fn tick(&mut self) {
        self.tick += 1;
    }

    /// Ticks so far.
    #[must_use]
    pub fn ticks(&self) -> u64 {
        self.tick
    }

    /// The space a stack was interned in.
    #[must_use]
    pub fn space(&self, id: StackId) -> u32 {
        self.entries.get(&id).map_or(0, |e| e.space)
    }

    /// The addresses of a stack (empty for the unknown stack, a stack known by its
    /// frames, and an evicted one).
    #[must_use]
    pub fn get(&self, id: StackId) -> &[u64] {
        self.entries.get(&id).map_or(&[], |e| &e.pcs)
    }

    /// Whether the stack was interned by its frames (it has no addresses to symbolize).
    #[must_use]
    pub fn is_named(&self, id: StackId) -> bool {
        self.entries.get(&id).is_some_and(|e| e.named)
    }

    /// The frames of a stack, leaf first: empty until it is symbolized (and for the
    /// unknown stack).
    #[must_use]
    pub fn frames(&self, id: StackId) -> Vec<Frame> {
        self.entries
            .get(&id)
            .and_then(|e| e.frames.as_deref())
            .map_or_else(Vec::new, |ids| ids.iter().map(|&f| self.frames.get(f)).collect())
    }

    /// Stores the frames symbolization gave an address stack.
    pub fn set_frames(&mut self, id: StackId, frames: &[Frame]) {
        if self.entries.get(&id).is_none_or(|e| e.named) {
            return;
        }
        let ids: Box<[FrameId]> = frames.iter().map(|f| self.frames.intern(f)).collect();
        if let Some(e) = self.entries.get_mut(&id).filter(|e| !e.named) {
            self.entry_bytes -= e.heap_bytes();
            e.frames = Some(ids);
            self.entry_bytes += e.heap_bytes();
        }
    }

    /// The address stacks interned since the last call, to symbolize.
    pub fn take_unsymbolized(&mut self) -> Vec<StackId> {
        let mut ids = std::mem::take(&mut self.pending);
        ids.retain(|id| self.entries.contains_key(id));
        ids
    }

    /// Puts back, first in line, stacks [`Self::take_unsymbolized`] gave that were not
    /// symbolized yet.
    pub fn requeue_unsymbolized(&mut self, ids: &[StackId]) {
        self.pending.splice(0..0, ids.iter().copied());
    }

    /// Address stacks whose frames have an unknown one (symbolized before their module
    /// was read).
    #[must_use]
    pub fn with_unknown_frames(&self) -> Vec<StackId> {
        self.entries
            .iter()
            .filter(|(_, e)| {
                !e.named
                    && e.frames
                        .as_deref()
                        .is_some_and(|f| f.iter().any(|&f| self.frames.kind(f) == FrameKind::Unknown))
            })
            .map(|(&id, _)| id)
            .collect()
    }

    /// Whether the table is past the share of its limit where [`Self::evict`] should run.
    #[must_use]
    pub fn wants_eviction(&self) -> bool {
        self.heap_bytes() as f64 >= EVICT_AT * self.limit_bytes as f64
    }

    /// Forgets stacks, least recently seen first, until the table is down to
    /// [`EVICT_TO`] of its limit: only stacks not in `held` (those that hold memory in a
    /// view, or that another table refers to) and not seen in the last `recent` ticks.
    /// Returns how many went.
    pub fn evict(&mut self, held: &HashSet<StackId>, recent: u64) -> usize {
        let target = (EVICT_TO * self.limit_bytes as f64) as usize;
        let cutoff = self.tick.saturating_sub(recent);
        let mut candidates: Vec<(u64, StackId)> = self
            .entries
            .iter()
            .filter(|(id, e)| e.last_seen < cutoff && !held.contains(id))
            .map(|(&id, e)| (e.last_seen, id))
            .collect();
        candidates.sort_unstable();
        let mut evicted = 0;
        for (_, id) in candidates {
            if self.heap_bytes() <= target {
                break;
            }
            self.remove(id);
            evicted += 1;
        }
        self.evicted += evicted as u64;
        if evicted > 0 {
            self.compact_frames();
        }
        evicted
    }

    fn remove(&mut self, id: StackId) {
        let Some(e) = self.entries.remove(&id) else { return };
        self.entry_bytes -= e.heap_bytes();
        match self.index.get_mut(&e.hash) {
            Some(Slot::Many(ids)) => {
                ids.retain(|&i| i != id);
                if let [one] = ids[..] {
                    self.index.insert(e.hash, Slot::One(one));
                }
            }
            Some(Slot::One(_)) => {
                self.index.remove(&e.hash);
            }
            None => {}
        }
    }

    /// Rebuilds the frame table with only the frames the remaining stacks use, when at
    /// most half of its frames are still used.
    fn compact_frames(&mut self) {
        let used: HashSet<FrameId> =
            self.entries.values().filter_map(|e| e.frames.as_deref()).flatten().copied().collect();
        if used.len() * 2 > self.frames.len() {
            return;
        }
        let mut fresh = FrameTable::new();
        let mut named = Vec::new();
        for (&id, e) in &mut self.entries {
            if let Some(ids) = e.frames.as_mut() {
                for f in ids.iter_mut() {
                    *f = fresh.intern(&self.frames.get(*f));
                }
                if e.named {
                    named.push(id);
                }
            }
        }
        self.frames = fresh;
        // A named stack's key is its frame ids, which changed.
        for id in named {
            let Some(e) = self.entries.get(&id) else { continue };
            let (old, new) = (e.hash, self.hash_frames(e.frames.as_deref().unwrap_or_default()));
            if let Some(e) = self.entries.get_mut(&id) {
                e.hash = new;
            }
            self.rehash(id, old, new);
        }
    }

    fn rehash(&mut self, id: StackId, old: u64, new: u64) {
        match self.index.get_mut(&old) {
            Some(Slot::Many(ids)) => {
                ids.retain(|&i| i != id);
                if let [one] = ids[..] {
                    self.index.insert(old, Slot::One(one));
                }
            }
            Some(Slot::One(_)) => {
                self.index.remove(&old);
            }
            None => {}
        }
        match self.index.get_mut(&new) {
            None => {
                self.index.insert(new, Slot::One(id));
            }
            Some(Slot::One(other)) => {
                let other = *other;
                self.index.insert(new, Slot::Many(vec![other, id]));
            }
            Some(Slot::Many(ids)) => ids.push(id),
        }
    }

    /// Stacks held now (without the unknown one).
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Stacks that found the table full.
    #[must_use]
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }

    /// Stacks forgotten by [`Self::evict`].
    #[must_use]
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// The memory limit.
    #[must_use]
    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    /// What the table costs on the heap, estimated from its contents.
    #[must_use]
    pub fn heap_bytes(&self) -> usize {
        self.entry_bytes + self.frames.heap_bytes() + self.pending.capacity() * size_of::<StackId>()
    }

    /// Distinct frames held.
    #[must_use]
    pub fn frame_count(&self) -> usize {
        self.frames.len()
    }
}

#[cfg(test)]
#[path = "stacks_tests.rs"]
mod tests;
