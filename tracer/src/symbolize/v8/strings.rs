//! V8 strings read from another process: sequential (one- and two-byte), cons, thin,
//! sliced and cached external strings, with a cap on what is read.

use super::heap::{Heap, HeapError, word};

/// A run of characters: Latin-1 bytes or UTF-16 units.
pub(crate) enum Chunk<'a> {
    OneByte(&'a [u8]),
    TwoByte(&'a [u16]),
}

/// Pieces a string is made of, visited at most this many (cons trees can be deep).
const MAX_PIECES: usize = 4096;

/// Calls `visit` with the characters of the string `tagged` points to, in order. Fails
/// when the string is longer than `max_len` characters or is not a string.
pub(crate) fn visit_string(
    heap: &mut Heap<'_>,
    tagged: u64,
    max_len: usize,
    visit: &mut dyn FnMut(Chunk<'_>),
) -> Result<usize, HeapError> {
    let total = string_length(heap, tagged)?;
    if total > max_len {
        return Err(HeapError::TooLong(total));
    }
    // Segments still to visit: (string, first character, characters), last one next.
    let mut todo = vec![(tagged, 0usize, total)];
    let mut pieces = 0;
    while let Some((string, start, len)) = todo.pop() {
        pieces += 1;
        if pieces > MAX_PIECES {
            return Err(HeapError::Malformed("string of too many pieces"));
        }
        if len == 0 {
            continue;
        }
        let layout = heap.layout;
        let tags = layout.strings;
        let (addr, instance_type) = heap.object(string)?;
        if !layout.is_string(instance_type) {
            return Err(HeapError::WrongType { expected: "String", found: instance_type });
        }
        let length = string_length(heap, string)?;
        if start.checked_add(len).is_none_or(|end| end > length) {
            return Err(HeapError::Malformed("string piece out of bounds"));
        }
        let one_byte = instance_type & tags.encoding_mask == tags.one_byte;
        let representation = instance_type & tags.representation_mask;
        if representation == tags.seq {
            let chars = if one_byte { layout.seq_one_byte_chars } else { layout.seq_two_byte_chars };
            read_chars(heap, addr + chars, start, len, one_byte, visit)?;
        } else if representation == tags.cons {
            let header = heap.read(addr, layout.cons_second as usize + 8)?;
            let first = word(&header, layout.cons_first);
            let second = word(&header, layout.cons_second);
            let first_len = string_length(heap, first)?;
            if start + len > first_len {
                let from = start.saturating_sub(first_len);
                todo.push((second, from, start + len - first_len.max(start)));
            }
            if start < first_len {
                todo.push((first, start, len.min(first_len - start)));
            }
        } else if representation == tags.sliced {
            let header = heap.read(addr, layout.sliced_offset as usize + 8)?;
            let parent = word(&header, layout.sliced_parent);
            let offset = smi(word(&header, layout.sliced_offset))?;
            todo.push((parent, start + offset, len));
        } else if representation == tags.thin {
            let actual = word(&heap.read(addr, layout.thin_actual as usize + 8)?, layout.thin_actual);
            todo.push((actual, start, len));
        } else if representation == tags.external {
            if instance_type & tags.uncached_external != 0 {
                return Err(HeapError::Malformed("uncached external string"));
            }
            let data = word(&heap.read(addr, layout.external_data as usize + 8)?, layout.external_data);
            read_chars(heap, data, start, len, one_byte, visit)?;
        } else {
            return Err(HeapError::Malformed("unknown string representation"));
        }
    }
    Ok(total)
}

/// The string as Rust text (Latin-1 and UTF-16 decoded; lone surrogates replaced).
pub(crate) fn read_string(heap: &mut Heap<'_>, tagged: u64, max_len: usize) -> Result<String, HeapError> {
    let mut out = String::new();
    visit_string(heap, tagged, max_len, &mut |chunk| match chunk {
        Chunk::OneByte(bytes) => out.extend(bytes.iter().map(|&b| char::from(b))),
        Chunk::TwoByte(units) => {
            out.extend(char::decode_utf16(units.iter().copied()).map(|c| c.unwrap_or('\u{fffd}')));
        }
    })?;
    Ok(out)
}

fn string_length(heap: &mut Heap<'_>, tagged: u64) -> Result<usize, HeapError> {
    let layout = heap.layout;
    let (addr, instance_type) = heap.object(tagged)?;
    if !layout.is_string(instance_type) {
        return Err(HeapError::WrongType { expected: "String", found: instance_type });
    }
    let bytes = heap.read(addr + layout.string_length, 4)?;
    let length = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    usize::try_from(length).map_err(|_| HeapError::Malformed("negative string length"))
}

fn smi(value: u64) -> Result<usize, HeapError> {
    super::heap::smi(value)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or(HeapError::Malformed("expected a small integer"))
}

/// Reads `len` characters from `start` of the character array at `addr`, in pieces.
fn read_chars(
    heap: &mut Heap<'_>,
    addr: u64,
    start: usize,
    len: usize,
    one_byte: bool,
    visit: &mut dyn FnMut(Chunk<'_>),
) -> Result<(), HeapError> {
    const PIECE: usize = 64 * 1024;
    let width = if one_byte { 1 } else { 2 };
    let mut done = 0;
    while done < len {
        let n = (len - done).min(PIECE);
        let bytes = heap.read(addr + ((start + done) * width) as u64, n * width)?;
        if one_byte {
            visit(Chunk::OneByte(&bytes));
        } else {
            let units: Vec<u16> = bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
            visit(Chunk::TwoByte(&units));
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::heap::tests::Capture;
    use super::*;

    /// Strings captured from node 20 (V8 11.3) with `%DebugPrint` addresses: see
    /// testdata/strings-node20.txt for the script that made them.
    #[test]
    fn decodes_captured_strings() {
        let mut capture = Capture::node20(include_str!("testdata/strings-node20.txt"));
        let cases = capture.expected.clone();
        assert!(cases.len() >= 6, "captures for every representation");
        let mut heap = capture.heap();
        for (tagged, expected) in cases {
            let got = read_string(&mut heap, tagged, 1 << 20).unwrap_or_else(|e| panic!("{tagged:#x}: {e}"));
            assert_eq!(got, expected, "string at {tagged:#x}");
        }
    }

    #[test]
    fn caps_the_length() {
        let mut capture = Capture::node20(include_str!("testdata/strings-node20.txt"));
        let (tagged, expected) =
            capture.expected.iter().max_by_key(|(_, s)| s.len()).cloned().expect("cases");
        let mut heap = capture.heap();
        let err = read_string(&mut heap, tagged, expected.chars().count() - 1).expect_err("over the cap");
        assert!(matches!(err, HeapError::TooLong(_)), "{err}");
    }

    #[test]
    fn rejects_non_strings() {
        let mut capture = Capture::node20(include_str!("testdata/strings-node20.txt"));
        let mut heap = capture.heap();
        let smi = 5 << 32;
        assert!(read_string(&mut heap, smi, 100).is_err(), "a small integer is not a string");
        assert!(read_string(&mut heap, 0x1234_5679, 100).is_err(), "unreadable memory");
    }
}
