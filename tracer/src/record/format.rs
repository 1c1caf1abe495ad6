//! The recording container: a header, then sections, then an end marker.
//!
//! All integers are little-endian.
//!
//! ```text
//! header   magic  8 bytes  89 'M' 'T' 'R' 0d 0a 1a 0a
//!          format version  u32   (1)
//!          flags           u32   (none defined in version 1)
//! section  kind            u32   (0 ends the file)
//!          encoding        u32   (0 raw, 1 gzip)
//!          length          u64   bytes stored after this header
//!          crc32           u32   of the stored bytes
//!          data            `length` bytes
//! ```
//!
//! The magic is PNG's trick: a high byte and a CRLF/LF/^Z tail show transfers that
//! mangled the file as text. A reader skips sections whose kind it does not know, so a
//! later version can add sections without a new format version; it bumps the version
//! only when an existing section changes meaning. Of the flags, the low 16 bits are
//! ones a reader must understand (it refuses files with unknown ones) and the high 16
//! bits are hints it may ignore. The end marker tells a complete file from one cut
//! short at a section boundary.

use std::io::{Read as _, Write as _};

use flate2::{Compression, read::GzDecoder, write::GzEncoder};

pub const MAGIC: [u8; 8] = *b"\x89MTR\r\n\x1a\n";
/// The format version this memtrace writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 16;
pub const SECTION_HEADER_LEN: usize = 20;
/// Flags a reader must understand to read the file.
const REQUIRED_FLAGS: u32 = 0xffff;
/// Flags this version knows (none yet).
const KNOWN_FLAGS: u32 = 0;

/// The most a section may decompress to. Reports memtrace writes are far smaller (a
/// few MiB); a file whose section inflates past this is corrupt or a decompression
/// bomb (deflate reaches 1000:1), and is refused before it exhausts memory.
pub const MAX_SECTION_BYTES: u64 = 1 << 30;

/// The kind of the end marker.
pub const SECTION_END: u32 = 0;

/// How a section's data is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Raw,
    Gzip,
    /// From a later version; only fatal if the section's kind is one the reader needs.
    Unknown(u32),
}

impl Encoding {
    fn code(self) -> u32 {
        match self {
            Self::Raw => 0,
            Self::Gzip => 1,
            Self::Unknown(code) => code,
        }
    }

    fn from_code(code: u32) -> Self {
        match code {
            0 => Self::Raw,
            1 => Self::Gzip,
            code => Self::Unknown(code),
        }
    }
}

/// Why a recording could not be read. Offsets are in bytes from the start of the file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a memtrace recording (it does not start with memtrace's magic bytes){hint}")]
    NotARecording { hint: &'static str },
    #[error("truncated at byte {at} (expected {expected}): the recording was cut short")]
    Truncated { at: u64, expected: u64 },
    #[error(
        "recording format version {found} is newer than this memtrace ({FORMAT_VERSION}); read it with a newer memtrace"
    )]
    TooNew { found: u32 },
    #[error("recording format version 0 is invalid: the file is corrupt")]
    VersionZero,
    #[error(
        "recording uses features this memtrace does not know (flags {flags:#x}); read it with a newer memtrace"
    )]
    UnknownFlags { flags: u32 },
    #[error(
        "corrupt section at byte {offset}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    Checksum { offset: u64, stored: u32, computed: u32 },
    #[error("corrupt section at byte {offset}: {what}")]
    Corrupt { offset: u64, what: String },
    #[error(
        "corrupt section at byte {offset}: its {stored} bytes decompress to more than {} MiB, more than any report memtrace writes (a damaged file or a decompression bomb)",
        limit >> 20
    )]
    TooLarge { offset: u64, stored: usize, limit: u64 },
    #[error("incomplete recording: it holds no {0} section")]
    MissingSection(&'static str),
}

/// One section as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section<'a> {
    pub kind: u32,
    pub encoding: Encoding,
    /// Where the section's header starts, for messages.
    pub offset: u64,
    pub stored: &'a [u8],
}

impl Section<'_> {
    /// The section's data, decompressed.
    pub fn data(&self) -> Result<Vec<u8>, FormatError> {
        self.data_within(MAX_SECTION_BYTES)
    }

    /// The section's data, decompressed, if it holds at most `limit` bytes.
    fn data_within(&self, limit: u64) -> Result<Vec<u8>, FormatError> {
        match self.encoding {
            Encoding::Raw => Ok(self.stored.to_vec()),
            Encoding::Gzip => {
                let mut data = Vec::new();
                GzDecoder::new(self.stored).take(limit.saturating_add(1)).read_to_end(&mut data).map_err(
                    |e| FormatError::Corrupt {
                        offset: self.offset,
                        what: format!("gzip data does not decompress: {e}"),
                    },
                )?;
                if data.len() as u64 > limit {
                    return Err(FormatError::TooLarge {
                        offset: self.offset,
                        stored: self.stored.len(),
                        limit,
                    });
                }
                Ok(data)
            }
            Encoding::Unknown(code) => Err(FormatError::Corrupt {
                offset: self.offset,
                what: format!(
                    "section kind {} uses encoding {code}, which this memtrace does not know",
                    self.kind
                ),
            }),
        }
    }
}

/// A parsed container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container<'a> {
    pub version: u32,
    pub flags: u32,
    /// In file order, without the end marker.
    pub sections: Vec<Section<'a>>,
    /// Bytes after the end marker, which this version never writes.
    pub trailing: usize,
}

/// Writes a container of `sections` (kind, data), each gzip-compressed.
pub fn encode(flags: u32, sections: &[(u32, &[u8])]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    for &(kind, data) in sections {
        debug_assert_ne!(kind, SECTION_END, "kind 0 is the end marker");
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(data)?;
        push_section(&mut out, kind, Encoding::Gzip, &gz.finish()?);
    }
    push_section(&mut out, SECTION_END, Encoding::Raw, &[]);
    Ok(out)
}

fn push_section(out: &mut Vec<u8>, kind: u32, encoding: Encoding, stored: &[u8]) {
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&encoding.code().to_le_bytes());
    out.extend_from_slice(&(stored.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32(stored).to_le_bytes());
    out.extend_from_slice(stored);
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    crc.sum()
}

/// Reads the fixed-size fields of a container; section data is checked, not decoded.
pub fn decode(bytes: &[u8]) -> Result<Container<'_>, FormatError> {
    let len = bytes.len() as u64;
    let magic_len = MAGIC.len().min(bytes.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(FormatError::NotARecording { hint: not_a_recording_hint(bytes) });
    }
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Truncated { at: len, expected: HEADER_LEN as u64 });
    }
    let version = le_u32(bytes, 8);
    let flags = le_u32(bytes, 12);
    if version == 0 {
        return Err(FormatError::VersionZero);
    }
    if version > FORMAT_VERSION {
        return Err(FormatError::TooNew { found: version });
    }
    if flags & REQUIRED_FLAGS & !KNOWN_FLAGS != 0 {
        return Err(FormatError::UnknownFlags { flags });
    }
    let mut sections = Vec::new();
    let mut at = HEADER_LEN;
    loop {
        let offset = at as u64;
        if bytes.len() - at < SECTION_HEADER_LEN {
            return Err(FormatError::Truncated { at: len, expected: offset + SECTION_HEADER_LEN as u64 });
        }
        let kind = le_u32(bytes, at);
        let encoding = Encoding::from_code(le_u32(bytes, at + 4));
        let stored_len = le_u64(bytes, at + 8);
        let stored_crc = le_u32(bytes, at + 16);
        let start = at + SECTION_HEADER_LEN;
        let end = (start as u64).saturating_add(stored_len);
        if end > len {
            return Err(FormatError::Truncated { at: len, expected: end });
        }
        // `end <= len`, which is a usize.
        let end = end as usize;
        let stored = &bytes[start..end];
        let computed = crc32(stored);
        if computed != stored_crc {
            return Err(FormatError::Checksum { offset, stored: stored_crc, computed });
        }
        at = end;
        if kind == SECTION_END {
            break;
        }
        sections.push(Section { kind, encoding, offset, stored });
    }
    Ok(Container { version, flags, sections, trailing: bytes.len() - at })
}

/// What a file that is not a recording probably is, for the error message.
fn not_a_recording_hint(bytes: &[u8]) -> &'static str {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    match (first, bytes) {
        (Some(b'{'), _) => {
            "; it looks like JSON (a --json report?): `memtrace report` reads files written with --record"
        }
        (_, [0x1f, 0x8b, ..]) => {
            "; it is gzip data (a --pprof profile?): `memtrace report` reads files written with --record"
        }
        (_, [b'<', ..]) => {
            "; it looks like XML (a --flamegraph SVG?): `memtrace report` reads files written with --record"
        }
        _ => "",
    }
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        encode(0, &[(1, b"{\"a\":1}".as_slice()), (7, b"later".as_slice())]).expect("encode in memory")
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let c = decode(&bytes).expect("decode our own container");
        assert_eq!(c.version, FORMAT_VERSION);
        assert_eq!(c.flags, 0);
        assert_eq!(c.trailing, 0);
        let got: Vec<(u32, Vec<u8>)> =
            c.sections.iter().map(|s| (s.kind, s.data().expect("decompress"))).collect();
        assert_eq!(got, vec![(1, b"{\"a\":1}".to_vec()), (7, b"later".to_vec())]);
        assert_eq!(c.sections[0].offset, HEADER_LEN as u64);
    }

    #[test]
    fn every_truncation_is_reported_with_offsets() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            match decode(&bytes[..cut]) {
                Err(FormatError::Truncated { at, expected }) => {
                    assert_eq!(at, cut as u64);
                    assert!(expected > at, "cut at {cut}: expected {expected}");
                    assert!(expected <= bytes.len() as u64, "cut at {cut}: expected {expected}");
                }
                other => panic!("cut at {cut} of {}: {other:?}", bytes.len()),
            }
        }
    }

    #[test]
    fn truncation_inside_a_section_names_its_end() {
        let bytes = sample();
        let first_end = HEADER_LEN + SECTION_HEADER_LEN + le_u64(&bytes, HEADER_LEN + 8) as usize;
        let err = decode(&bytes[..first_end - 3]).expect_err("cut inside the first section");
        assert_eq!(
            err.to_string(),
            format!(
                "truncated at byte {} (expected {first_end}): the recording was cut short",
                first_end - 3
            )
        );
    }

    #[test]
    fn foreign_files_are_not_recordings() {
        for (bytes, hint) in [
            (b"{\"version\": 1}".as_slice(), "looks like JSON"),
            (b"\x1f\x8b\x08\x00".as_slice(), "gzip"),
            (b"<?xml version".as_slice(), "XML"),
            (b"ELF\x7f and more bytes".as_slice(), ""),
        ] {
            let err = decode(bytes).expect_err("not a recording");
            let msg = err.to_string();
            assert!(msg.starts_with("not a memtrace recording"), "{msg}");
            assert!(msg.contains(hint), "{msg}");
        }
    }

    #[test]
    fn newer_version_and_unknown_required_flags_are_refused() {
        let mut bytes = sample();
        bytes[8..12].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(
            decode(&bytes).expect_err("version 9").to_string(),
            "recording format version 9 is newer than this memtrace (1); read it with a newer memtrace"
        );
        let mut bytes = sample();
        bytes[12..16].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(decode(&bytes), Err(FormatError::UnknownFlags { flags: 1 })));
        // Optional flags are ignored.
        let mut bytes = sample();
        bytes[12..16].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        assert_eq!(decode(&bytes).expect("optional flag").flags, 0x0001_0000);
    }

    #[test]
    fn flipped_bytes_fail_the_checksum() {
        let mut bytes = sample();
        let at = HEADER_LEN + SECTION_HEADER_LEN + 5;
        bytes[at] ^= 0x40;
        assert!(matches!(
            decode(&bytes),
            Err(FormatError::Checksum { offset, .. }) if offset == HEADER_LEN as u64
        ));
    }

    #[test]
    fn decompression_is_bounded() {
        // 8 MiB of zeros is 8 KiB of gzip: a small file that inflates a thousandfold.
        let zeros = vec![0u8; 8 << 20];
        let bytes = encode(0, &[(2, zeros.as_slice())]).expect("encode");
        assert!(bytes.len() < 16 << 10, "{} bytes", bytes.len());
        let c = decode(&bytes).expect("well-formed container");
        let err = c.sections[0].data_within(2 << 20).expect_err("past the limit");
        assert!(matches!(err, FormatError::TooLarge { limit, .. } if limit == 2 << 20), "{err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("corrupt section at byte 16: its "), "{msg}");
        assert!(msg.contains("decompress to more than 2 MiB"), "{msg}");
        // Exactly at the limit is fine.
        assert_eq!(c.sections[0].data_within(8 << 20).expect("at the limit").len(), 8 << 20);
    }

    #[test]
    fn unknown_encoding_fails_only_when_read() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        push_section(&mut bytes, 3, Encoding::Unknown(5), b"zstd?");
        push_section(&mut bytes, SECTION_END, Encoding::Raw, &[]);
        let c = decode(&bytes).expect("container is well-formed");
        let err = c.sections[0].data().expect_err("unknown encoding");
        assert!(err.to_string().contains("encoding 5"), "{err}");
    }
}
