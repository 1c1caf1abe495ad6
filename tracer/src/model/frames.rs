//! Interned frames: each distinct frame, and each distinct string in one, is stored once.
//!
//! A symbolized stack of a Node service is 30–60 frames, most of them shared with other
//! stacks (libuv, V8 builtins, `main`), each with a function name, a module path and a
//! file path. Kept as owned [`Frame`]s per stack that was about 12 KiB a stack; interned,
//! a stack costs 4 bytes a frame.

use std::{collections::HashMap, mem::size_of, sync::Arc};

use crate::report::{Frame, FrameKind};

/// A frame in a [`FrameTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrameId(pub u32);

/// A frame as string ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Packed {
    function: u32,
    module: u32,
    file: u32,
    line: u32,
    kind: FrameKind,
}

/// What one heap block costs besides its bytes (glibc's header, rounded to 16).
pub(crate) const BLOCK_OVERHEAD: usize = 16;
/// A hash map slot costs its entry plus a control byte, at a load of about 7/8.
pub(crate) fn map_slot_bytes(entry: usize) -> usize {
    (entry + 1) * 8 / 7
}

#[derive(Debug, Default)]
pub struct FrameTable {
    strings: Vec<Arc<str>>,
    string_ids: HashMap<Arc<str>, u32>,
    string_bytes: usize,
    frames: Vec<Packed>,
    frame_ids: HashMap<Packed, FrameId>,
}

impl FrameTable {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn intern_str(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = self.strings.len() as u32;
        let shared: Arc<str> = Arc::from(s);
        self.string_bytes += s.len();
        self.strings.push(Arc::clone(&shared));
        self.string_ids.insert(shared, id);
        id
    }

    /// The id of `frame`, adding it if new.
    pub fn intern(&mut self, frame: &Frame) -> FrameId {
        let packed = Packed {
            function: self.intern_str(&frame.function),
            module: self.intern_str(&frame.module),
            file: self.intern_str(&frame.file),
            line: frame.line,
            kind: frame.kind,
        };
        if let Some(&id) = self.frame_ids.get(&packed) {
            return id;
        }
        let id = FrameId(self.frames.len() as u32);
        self.frames.push(packed);
        self.frame_ids.insert(packed, id);
        id
    }

    fn str(&self, id: u32) -> &str {
        self.strings.get(id as usize).map_or("", |s| s)
    }

    /// The frame `id` stands for (a default frame for an id this table never gave).
    #[must_use]
    pub fn get(&self, id: FrameId) -> Frame {
        let Some(p) = self.frames.get(id.0 as usize) else {
            return Frame::default();
        };
        Frame {
            function: self.str(p.function).to_string(),
            module: self.str(p.module).to_string(),
            file: self.str(p.file).to_string(),
            line: p.line,
            kind: p.kind,
        }
    }

    /// The kind of frame `id`, without building the frame.
    #[must_use]
    pub fn kind(&self, id: FrameId) -> FrameKind {
        self.frames.get(id.0 as usize).map_or(FrameKind::Unknown, |p| p.kind)
    }

    /// Distinct frames held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// What the table costs on the heap, estimated from its contents (see the
    /// `stack_memory` test, which checks it against what the allocator gave).
    #[must_use]
    pub fn heap_bytes(&self) -> usize {
        let arc_header = 2 * size_of::<usize>();
        let strings = self.string_bytes
            + self.strings.len() * (arc_header + BLOCK_OVERHEAD / 2)
            + self.strings.capacity() * size_of::<Arc<str>>()
            + self.string_ids.capacity() * map_slot_bytes(size_of::<(Arc<str>, u32)>());
        let frames = self.frames.capacity() * size_of::<Packed>()
            + self.frame_ids.capacity() * map_slot_bytes(size_of::<(Packed, FrameId)>());
        strings + frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, line: u32) -> Frame {
        Frame {
            function: function.into(),
            module: "/usr/bin/node".into(),
            file: "/srv/app.js".into(),
            line,
            kind: FrameKind::Js,
        }
    }

    #[test]
    fn a_frame_is_stored_once_and_comes_back_whole() {
        let mut t = FrameTable::new();
        let a = t.intern(&frame("rememberOrder", 9));
        assert_eq!(t.intern(&frame("rememberOrder", 9)), a);
        let b = t.intern(&frame("rememberOrder", 10));
        assert_ne!(a, b, "another line is another frame");
        assert_eq!(t.get(a), frame("rememberOrder", 9));
        assert_eq!(t.get(b).line, 10);
        assert_eq!(t.len(), 2);
        assert_eq!(t.strings.len(), 3, "function, module and file shared by both frames");
        assert_eq!(t.get(FrameId(99)), Frame::default());
    }
}
