//! Tagged values and heap objects of a V8 without pointer compression: a heap object
//! pointer ends in `01`, a small integer (Smi) is `value << 32`.

use super::constants::Layout;
use super::remote::Memory;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum HeapError {
    #[error("{0:#x} is not a heap object")]
    NotObject(u64),
    #[error("cannot read {len} bytes at {addr:#x}")]
    Unreadable { addr: u64, len: usize },
    #[error("expected a {expected}, found instance type {found}")]
    WrongType { expected: &'static str, found: u16 },
    #[error("string of {0} characters is over the cap")]
    TooLong(usize),
    #[error("malformed object: {0}")]
    Malformed(&'static str),
}

/// The untagged address of a heap object pointer.
pub(crate) fn object_address(tagged: u64) -> Option<u64> {
    (tagged & 3 == 1).then_some(tagged & !3)
}

/// The value of a small integer.
pub(crate) fn smi(value: u64) -> Option<i64> {
    (value & 1 == 0).then_some((value.cast_signed()) >> 32)
}

/// The little-endian word at `offset` of `bytes` (0 past the end).
pub(crate) fn word(bytes: &[u8], offset: u64) -> u64 {
    let offset = offset as usize;
    bytes
        .get(offset..offset + 8)
        .map_or(0, |b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
}

/// The little-endian u16 at `offset` of `bytes`.
pub(crate) fn half(bytes: &[u8], offset: u64) -> Option<u16> {
    let offset = offset as usize;
    bytes.get(offset..offset + 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
}

/// The little-endian u32 at `offset` of `bytes`.
pub(crate) fn dword(bytes: &[u8], offset: u64) -> Option<u32> {
    let offset = offset as usize;
    bytes.get(offset..offset + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Heap objects of one process, read one at a time: the slow path, taken when something
/// is not cached yet. The per-event path batches its reads instead (`frames.rs`).
pub(crate) struct Heap<'a> {
    pub layout: &'a Layout,
    memory: &'a mut dyn Memory,
}

impl<'a> Heap<'a> {
    pub fn new(layout: &'a Layout, memory: &'a mut dyn Memory) -> Self {
        Self { layout, memory }
    }

    pub fn read(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, HeapError> {
        self.memory.read(addr, len).ok_or(HeapError::Unreadable { addr, len })
    }

    /// The address and instance type of the object `tagged` points to.
    pub fn object(&mut self, tagged: u64) -> Result<(u64, u16), HeapError> {
        let addr = object_address(tagged).ok_or(HeapError::NotObject(tagged))?;
        let map = word(&self.read(addr + self.layout.map, 8)?, 0);
        let map = object_address(map).ok_or(HeapError::NotObject(map))?;
        let bytes = self.read(map + self.layout.map_instance_type, 2)?;
        Ok((addr, u16::from_le_bytes([bytes[0], bytes[1]])))
    }

    /// The object `tagged` points to, which must be of `instance_type`.
    pub fn typed(&mut self, tagged: u64, instance_type: u16, name: &'static str) -> Result<u64, HeapError> {
        let (addr, found) = self.object(tagged)?;
        if found == instance_type { Ok(addr) } else { Err(HeapError::WrongType { expected: name, found }) }
    }

    /// The first `len` words (or bytes, `item` = 1) of a `FixedArray`/`ByteArray`'s data, which
    /// must be of `instance_type`; at most `max` items.
    pub fn array(
        &mut self,
        tagged: u64,
        instance_type: u16,
        item: usize,
        max: usize,
    ) -> Result<Vec<u8>, HeapError> {
        let addr = self.typed(tagged, instance_type, "array")?;
        let length = smi(word(&self.read(addr + self.layout.array_length, 8)?, 0))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or(HeapError::Malformed("array length"))?;
        if length > max {
            return Err(HeapError::TooLong(length));
        }
        self.read(addr + self.layout.fixed_array_data, length * item)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::constants::tests::metadata;
    use super::super::remote::FakeMemory;
    use super::*;

    /// Heap objects captured from a live node, with what the test expects of them:
    /// `ADDR HEX` lines of memory, and `expect TAGGED text` lines.
    pub(crate) struct Capture {
        pub layout: Layout,
        pub memory: FakeMemory,
        pub expected: Vec<(u64, String)>,
    }

    impl Capture {
        pub fn node20(text: &str) -> Self {
            let meta = metadata(include_str!("testdata/v8dbg-node20.txt"), (11, 3, 244));
            let layout = Layout::new(&meta).expect("node 20 layout");
            let mut expected = Vec::new();
            let mut memory_lines = String::new();
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("expect ") {
                    let (addr, value) = rest.split_once(' ').expect("expect ADDR VALUE");
                    let addr = u64::from_str_radix(addr.trim_start_matches("0x"), 16).expect("hex address");
                    expected.push((addr, unescape(value)));
                } else {
                    memory_lines.push_str(line);
                    memory_lines.push('\n');
                }
            }
            Self { layout, memory: FakeMemory::parse(&memory_lines), expected }
        }

        pub fn heap(&mut self) -> Heap<'_> {
            Heap::new(&self.layout, &mut self.memory)
        }
    }

    /// `\n`, `\\` and `\uXXXX` escapes, so expectations fit on one line.
    fn unescape(text: &str) -> String {
        let mut out = String::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('u') => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let unit = u32::from_str_radix(&hex, 16).expect("\\uXXXX");
                    out.push(char::from_u32(unit).unwrap_or('\u{fffd}'));
                }
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        }
        out
    }

    #[test]
    fn tagged_values() {
        assert_eq!(object_address(0x1000_0001), Some(0x1000_0000));
        assert_eq!(object_address(0x1000_0000), None, "a Smi");
        assert_eq!(object_address(0x1000_0003), None, "a weak reference");
        assert_eq!(smi(42 << 32), Some(42));
        assert_eq!(smi(0xffff_ffff_0000_0000), Some(-1));
        assert_eq!(smi(0x1000_0001), None);
        assert_eq!(word(&[1, 0, 0, 0, 0, 0, 0, 0, 2], 0), 1);
        assert_eq!(word(&[1, 2, 3], 0), 0, "short reads give 0, which is no object");
    }
}
