//! Interning of unwound stacks, bounded so that a long trace cannot grow without limit.

use std::collections::HashMap;

use super::StackId;
use crate::report::Frame;

/// Stacks by id. Id 0 is the unknown stack (no capture, or the table was full).
///
/// Most stacks are addresses to symbolize; views that see stacks already named (the JS
/// heap profile) intern their frames instead ([`Self::intern_frames`]).
///
/// Addresses mean something only in an address space: a stack is interned in a *space*
/// (one program image; a forked child shares its parent's until it execs), and the same
/// addresses in two spaces are two stacks.
#[derive(Debug)]
pub struct StackTable {
    ids: HashMap<u32, HashMap<Box<[u64]>, StackId>>,
    stacks: Vec<Box<[u64]>>,
    /// The space of each stack, by id.
    spaces: Vec<u32>,
    symbolic_ids: HashMap<Box<[Frame]>, StackId>,
    symbolic: HashMap<StackId, Box<[Frame]>>,
    capacity: usize,
    overflowed: u64,
}

impl StackTable {
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            ids: HashMap::new(),
            stacks: vec![Box::new([])],
            spaces: vec![0],
            symbolic_ids: HashMap::new(),
            symbolic: HashMap::new(),
            capacity,
            overflowed: 0,
        }
    }

    /// The id of a stack known by its frames (leaf first), adding it if new. It shares
    /// the table's capacity with address stacks and has no addresses.
    pub fn intern_frames(&mut self, frames: &[Frame]) -> StackId {
        if frames.is_empty() {
            return StackId(0);
        }
        if let Some(id) = self.symbolic_ids.get(frames) {
            return *id;
        }
        if self.stacks.len() > self.capacity {
            self.overflowed += 1;
            return StackId(0);
        }
        let id = StackId(self.stacks.len() as u32);
        self.stacks.push(Box::new([]));
        self.spaces.push(0);
        self.symbolic_ids.insert(frames.into(), id);
        self.symbolic.insert(id, frames.into());
        id
    }

    /// The frames of a stack interned by [`Self::intern_frames`].
    #[must_use]
    pub fn frames(&self, id: StackId) -> Option<&[Frame]> {
        self.symbolic.get(&id).map(|f| &f[..])
    }

    /// The id of `frames` (leaf first) in space 0, adding it if new (see
    /// [`Self::intern_in`]).
    pub fn intern(&mut self, frames: &[u64]) -> StackId {
        self.intern_in(0, frames)
    }

    /// The id of `frames` (leaf first) in `space`, adding it if new. When the table is
    /// full, new stacks get the unknown id and are counted.
    pub fn intern_in(&mut self, space: u32, frames: &[u64]) -> StackId {
        if frames.is_empty() {
            return StackId(0);
        }
        if let Some(id) = self.ids.get(&space).and_then(|ids| ids.get(frames)) {
            return *id;
        }
        if self.stacks.len() > self.capacity {
            self.overflowed += 1;
            return StackId(0);
        }
        let id = StackId(self.stacks.len() as u32);
        self.stacks.push(frames.into());
        self.spaces.push(space);
        self.ids.entry(space).or_default().insert(frames.into(), id);
        id
    }

    /// The space a stack was interned in.
    #[must_use]
    pub fn space(&self, id: StackId) -> u32 {
        self.spaces.get(id.0 as usize).copied().unwrap_or(0)
    }

    #[must_use]
    pub fn get(&self, id: StackId) -> &[u64] {
        self.stacks.get(id.0 as usize).map_or(&[], |s| s)
    }

    /// Stacks recorded (without the unknown one).
    #[must_use]
    pub fn len(&self) -> usize {
        self.stacks.len() - 1
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stacks that found the table full.
    #[must_use]
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interns_and_bounds() {
        let mut t = StackTable::new(2);
        let a = t.intern(&[1, 2, 3]);
        assert_eq!(t.intern(&[1, 2, 3]), a);
        let b = t.intern(&[4]);
        assert_ne!(a, b);
        assert_eq!(t.intern(&[5]), StackId(0), "full table gives the unknown stack");
        assert_eq!(t.overflowed(), 1);
        assert_eq!(t.get(a), &[1, 2, 3]);
        assert_eq!(t.intern(&[]), StackId(0));
    }

    #[test]
    fn the_same_addresses_in_two_spaces_are_two_stacks() {
        let mut t = StackTable::new(10);
        let a = t.intern_in(1, &[0x40_1000, 0x40_2000]);
        let b = t.intern_in(2, &[0x40_1000, 0x40_2000]);
        assert_ne!(a, b, "an exec'd image reuses addresses for other code");
        assert_eq!(t.intern_in(1, &[0x40_1000, 0x40_2000]), a);
        assert_eq!((t.space(a), t.space(b)), (1, 2));
        assert_eq!(t.get(b), &[0x40_1000, 0x40_2000]);
    }

    #[test]
    fn symbolic_stacks_share_ids_and_capacity() {
        let mut t = StackTable::new(2);
        let f = vec![Frame { function: "keepJob".into(), ..Frame::default() }];
        let a = t.intern_frames(&f);
        assert_eq!(t.intern_frames(&f), a);
        assert_eq!(t.frames(a).map(|f| f[0].function.as_str()), Some("keepJob"));
        assert!(t.get(a).is_empty(), "no addresses to symbolize");
        t.intern(&[1]);
        assert_eq!(t.intern_frames(&[Frame::default()]), StackId(0), "full");
    }
}
