//! Interning of unwound stacks, bounded so that a long trace cannot grow without limit.

use std::collections::HashMap;

use super::StackId;

/// Stacks by id. Id 0 is the unknown stack (no capture, or the table was full).
#[derive(Debug)]
pub struct StackTable {
    ids: HashMap<Box<[u64]>, StackId>,
    stacks: Vec<Box<[u64]>>,
    capacity: usize,
    overflowed: u64,
}

impl StackTable {
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self { ids: HashMap::new(), stacks: vec![Box::new([])], capacity, overflowed: 0 }
    }

    /// The id of `frames` (leaf first), adding it if new. When the table is full, new
    /// stacks get the unknown id and are counted.
    pub fn intern(&mut self, frames: &[u64]) -> StackId {
        if frames.is_empty() {
            return StackId(0);
        }
        if let Some(id) = self.ids.get(frames) {
            return *id;
        }
        if self.stacks.len() > self.capacity {
            self.overflowed += 1;
            return StackId(0);
        }
        let id = StackId(self.stacks.len() as u32);
        self.stacks.push(frames.into());
        self.ids.insert(frames.into(), id);
        id
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
}
