//! Source positions: V8's position tables (bytecode or machine-code offset → position in
//! the script) and line numbers from a script's line ends.

use super::strings::Chunk;

/// One entry of a source position table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PositionEntry {
    pub code_offset: i64,
    /// The raw `SourcePosition`: bit 0 external, bits 1..31 script offset + 1, then the
    /// inlining id + 1.
    pub position: i64,
}

impl PositionEntry {
    /// Offset into the script, unless the position is external or unknown.
    pub fn script_offset(&self) -> Option<i64> {
        if self.position & 1 == 1 {
            return None;
        }
        let offset = ((self.position >> 1) & ((1 << 30) - 1)) - 1;
        (offset >= 0).then_some(offset)
    }

    /// Whether the position belongs to a function inlined into optimized code.
    #[cfg(test)]
    pub fn is_inlined(&self) -> bool {
        (self.position >> 31) & 0xffff != 0
    }
}

/// One zig-zag VLQ of `source-position-table.cc` (7 bits per byte, high bit: more).
fn read_vlq(bytes: &[u8], at: &mut usize) -> Option<i64> {
    let mut value: u64 = 0;
    let mut shift = 0;
    loop {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
    // Zig-zag: the low bit is the sign. `value >> 1` fits in 63 bits.
    let magnitude = i64::try_from(value >> 1).ok()?;
    Some(if value & 1 == 1 { !magnitude } else { magnitude })
}

/// Decodes a whole table: pairs of (code offset delta, position delta), the sign of the
/// code delta saying whether the entry is a statement. The first entry is relative to
/// code offset -1 (the function-entry stack check) and position 0. `None` when malformed.
pub(crate) fn decode_table(bytes: &[u8]) -> Option<Vec<PositionEntry>> {
    let mut entries = Vec::new();
    let (mut code_offset, mut position) = (-1i64, 0i64);
    let mut at = 0;
    while at < bytes.len() {
        let code_delta = read_vlq(bytes, &mut at)?;
        // Offsets past i64 are no table V8 writes: the bytes are not one.
        code_offset =
            code_offset.checked_add(if code_delta >= 0 { code_delta } else { -(code_delta + 1) })?;
        position = position.checked_add(read_vlq(bytes, &mut at)?)?;
        entries.push(PositionEntry { code_offset, position });
    }
    Some(entries)
}

/// The script offset of the code at `offset`: that of the last non-external entry at or
/// before it (as `AbstractCode::SourcePosition` finds it).
pub(crate) fn script_offset_at(entries: &[PositionEntry], offset: i64) -> Option<i64> {
    entries.iter().take_while(|e| e.code_offset <= offset).filter_map(PositionEntry::script_offset).last()
}

/// Character offsets of the line terminators of a script, as V8 computes them
/// (`String::CalculateLineEnds`): `\n`, `\r` not followed by `\n`, U+2028, U+2029; the
/// script's length ends the last line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LineEnds {
    ends: Vec<u32>,
}

impl LineEnds {
    pub fn from_ends(ends: Vec<u32>) -> Self {
        Self { ends }
    }

    /// Line ends of a source given in chunks.
    pub fn scanner() -> LineScanner {
        LineScanner::default()
    }

    /// The 0-based line holding character `offset`.
    pub fn line(&self, offset: i64) -> Option<u32> {
        let offset = u32::try_from(offset).ok()?;
        if self.ends.last().is_none_or(|&last| offset > last) {
            return None;
        }
        Some(self.ends.partition_point(|&end| end < offset) as u32)
    }

    pub fn bytes(&self) -> usize {
        self.ends.capacity() * 4
    }
}

/// Builds [`LineEnds`] from chunks of a source.
#[derive(Debug, Default)]
pub(crate) struct LineScanner {
    ends: Vec<u32>,
    offset: u32,
    carriage_return: bool,
}

impl LineScanner {
    pub fn feed(&mut self, chunk: &Chunk<'_>) {
        match chunk {
            Chunk::OneByte(bytes) => bytes.iter().for_each(|&b| self.char(u32::from(b))),
            Chunk::TwoByte(units) => units.iter().for_each(|&u| self.char(u32::from(u))),
        }
    }

    fn char(&mut self, c: u32) {
        if self.carriage_return && c != u32::from(b'\n') {
            self.ends.push(self.offset - 1);
        }
        self.carriage_return = c == u32::from(b'\r');
        if matches!(c, 0x0a | 0x2028 | 0x2029) {
            self.ends.push(self.offset);
        }
        self.offset += 1;
    }

    pub fn finish(mut self) -> LineEnds {
        if self.carriage_return {
            self.ends.push(self.offset - 1);
        }
        self.ends.push(self.offset);
        LineEnds { ends: self.ends }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table of a function read from node 20, against `--print-bytecode`'s listing.
    #[test]
    fn decodes_captured_bytecode_positions() {
        let text = include_str!("testdata/positions-node20.txt");
        let hex = text.lines().find_map(|l| l.strip_prefix("table ")).expect("table line");
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect();
        let entries = decode_table(&bytes).expect("well-formed table");
        let expected: Vec<(i64, i64)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("entry "))
            .map(|l| {
                let (offset, position) = l.split_once(' ').expect("entry OFFSET POSITION");
                (offset.parse().expect("offset"), position.parse().expect("position"))
            })
            .collect();
        assert_eq!(expected.len(), 8);
        // The listing omits the function-entry check at offset -1.
        assert_eq!(entries[0].code_offset, -1);
        let listed: Vec<(i64, i64)> = entries[1..]
            .iter()
            .map(|e| (e.code_offset, e.script_offset().expect("script position")))
            .collect();
        assert_eq!(listed, expected);
        // A call at offset 10 (Construct) and anything up to the next entry map to 302.
        assert_eq!(script_offset_at(&entries, 10), Some(302));
        assert_eq!(script_offset_at(&entries, 15), Some(302));
        assert_eq!(script_offset_at(&entries, 16), Some(314));
        assert_eq!(script_offset_at(&entries, 1000), Some(331));
        assert!(entries.iter().all(|e| !e.is_inlined()));
    }

    #[test]
    fn malformed_tables() {
        assert_eq!(decode_table(&[]), Some(vec![]));
        assert_eq!(decode_table(&[0x80]), None, "a VLQ cut short");
        assert_eq!(decode_table(&[0x02]), None, "a code delta without its position");
        assert_eq!(decode_table(&[0xff; 12]), None, "more than 64 bits");
        // Found by `cargo fuzz run v8_positions`: deltas that add past i64::MAX.
        let overflowing = [
            0x0d, 0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x61, 0x64, 0x0d, 0xff, 0xff,
            0xff, 0x0a,
        ];
        assert_eq!(decode_table(&overflowing), None, "offsets past i64");
    }

    #[test]
    fn external_and_inlined_positions() {
        let external = PositionEntry { code_offset: 0, position: (5 << 1) | 1 };
        assert_eq!(external.script_offset(), None);
        let inlined = PositionEntry { code_offset: 4, position: (2 << 31) | (43 << 1) };
        assert_eq!(inlined.script_offset(), Some(42));
        assert!(inlined.is_inlined());
        assert_eq!(script_offset_at(&[external, inlined], 3), None);
    }

    #[test]
    fn line_ends_like_v8() {
        let mut scanner = LineEnds::scanner();
        scanner.feed(&Chunk::OneByte(b"ab\ncd\r\nef\r"));
        scanner.feed(&Chunk::TwoByte(&[u16::from(b'g'), 0x2028, u16::from(b'h')]));
        let ends = scanner.finish();
        assert_eq!(ends.ends, vec![2, 6, 9, 11, 13]);
        assert_eq!(ends.line(0), Some(0));
        assert_eq!(ends.line(2), Some(0), "the terminator belongs to its line");
        assert_eq!(ends.line(3), Some(1));
        assert_eq!(ends.line(5), Some(1), "\\r of \\r\\n ends no line");
        assert_eq!(ends.line(7), Some(2));
        assert_eq!(ends.line(10), Some(3));
        assert_eq!(ends.line(12), Some(4));
        assert_eq!(ends.line(13), Some(4), "one past the end: the implicit return");
        assert_eq!(ends.line(14), None);
        assert_eq!(ends.line(-1), None);
    }
}
