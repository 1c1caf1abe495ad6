//! Decoding `oom:mark_victim` with the field offsets of the tracepoint's `format` file.

use std::collections::HashMap;

use tracer_common::{COMM_LEN, OOM_RECORD_MAX, OomEvent};

use super::{DecodeError, read_pod};

/// Where the tracepoint puts the format description.
pub const MARK_VICTIM_FORMAT: &str = "/sys/kernel/tracing/events/oom/mark_victim/format";

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("read {MARK_VICTIM_FORMAT}: {0}")]
    Read(#[from] std::io::Error),
    #[error("{MARK_VICTIM_FORMAT} has no field {0}")]
    MissingField(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Field {
    offset: usize,
    size: usize,
    data_loc: bool,
}

/// Offsets of the fields memtrace reads from `oom:mark_victim`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OomFormat {
    pid: Field,
    comm: Field,
    total_vm: Field,
    anon_rss: Field,
    file_rss: Field,
    shmem_rss: Field,
    uid: Option<Field>,
    pgtables: Option<Field>,
    oom_score_adj: Option<Field>,
    /// Bytes of a record: the fixed fields, then room for each `__data_loc` string.
    record_len: usize,
}

/// Bytes a `__data_loc` string of the record takes at most (`TASK_COMM_LEN`).
const DATA_LOC_MAX: usize = 16;

/// A decoded OOM kill.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OomRecord {
    pub ts_ns: u64,
    pub pid: u32,
    pub comm: String,
    pub total_vm_bytes: u64,
    pub anon_rss_bytes: u64,
    pub file_rss_bytes: u64,
    pub shmem_rss_bytes: u64,
    pub uid: Option<u32>,
    pub pgtables_bytes: Option<u64>,
    pub oom_score_adj: i64,
    /// The task running when the victim was marked (the allocating one for a memcg OOM).
    pub trigger_pid: u32,
    pub trigger_comm: String,
}

/// The fields of a tracepoint `format` file by name.
fn fields(text: &str) -> HashMap<String, Field> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut parts = rest.split(';').map(str::trim);
        let decl = parts.next().unwrap_or_default();
        let mut offset = None;
        let mut size = None;
        for p in parts {
            if let Some(v) = p.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = p.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        let name = decl.rsplit(' ').next().unwrap_or_default();
        let name = name.split('[').next().unwrap_or(name);
        if let (Some(offset), Some(size)) = (offset, size) {
            fields.insert(name.to_string(), Field { offset, size, data_loc: decl.contains("__data_loc") });
        }
    }
    fields
}

/// The offset of field `name` in a tracepoint's record, from its `format` file's text.
#[must_use]
pub fn field_offset(format: &str, name: &str) -> Option<usize> {
    fields(format).get(name).map(|f| f.offset)
}

impl OomFormat {
    pub fn load() -> Result<Self, FormatError> {
        Self::parse(&std::fs::read_to_string(MARK_VICTIM_FORMAT)?)
    }

    /// Parses the text of a tracepoint `format` file.
    pub fn parse(text: &str) -> Result<Self, FormatError> {
        let fields = fields(text);
        let get = |n: &'static str| fields.get(n).copied().ok_or(FormatError::MissingField(n));
        // The fixed part ends at the last field, padded to the record's 8-byte
        // alignment; `__data_loc` payloads follow it.
        // Saturating: the text is the kernel's, but a nonsense offset must not panic.
        let fixed_end = fields
            .values()
            .map(|f| f.offset.saturating_add(f.size))
            .max()
            .unwrap_or(0)
            .min(OOM_RECORD_MAX)
            .next_multiple_of(8);
        let strings = fields.values().filter(|f| f.data_loc).count() * DATA_LOC_MAX;
        let record_len = (fixed_end + strings).min(OOM_RECORD_MAX);
        Ok(Self {
            pid: get("pid")?,
            comm: get("comm")?,
            total_vm: get("total_vm")?,
            anon_rss: get("anon_rss")?,
            file_rss: get("file_rss")?,
            shmem_rss: get("shmem_rss")?,
            uid: get("uid").ok(),
            pgtables: get("pgtables").ok(),
            oom_score_adj: get("oom_score_adj").ok(),
            record_len,
        })
    }

    /// Bytes of a record, which the probe copies (at most [`OOM_RECORD_MAX`]).
    #[must_use]
    pub fn record_len(&self) -> u32 {
        self.record_len as u32
    }

    /// Decodes an [`OomEvent`] record. Page counts in the tracepoint are in KiB.
    pub fn decode(&self, bytes: &[u8]) -> Result<OomRecord, DecodeError> {
        super::need("OOM event", bytes, size_of::<OomEvent>())?;
        let event: OomEvent = read_pod(bytes);
        let len = (event.record_len as usize).min(OOM_RECORD_MAX);
        let record = &event.record[..len];
        let int = |f: Field| -> i64 {
            let Some(b) = record.get(f.offset..f.offset.saturating_add(f.size)) else {
                return 0;
            };
            match f.size {
                1 => i64::from(b[0].cast_signed()),
                2 => i64::from(i16::from_le_bytes([b[0], b[1]])),
                4 => i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                8 => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
                _ => 0,
            }
        };
        // Sizes other than 1, 2, 4 and 8 read as 0 (`int`); only the narrow ones are masked.
        let unsigned = |f: Field| -> u64 {
            match f.size {
                1 | 2 | 4 => (int(f) as u64) & ((1u64 << (f.size * 8)) - 1),
                _ => int(f) as u64,
            }
        };
        let kib = |f: Field| unsigned(f).saturating_mul(1024);
        let comm = if self.comm.data_loc {
            // __data_loc: low 16 bits offset, high 16 bits length, from the record start.
            let loc = unsigned(self.comm) as u32;
            let (off, n) = ((loc & 0xffff) as usize, (loc >> 16) as usize);
            record.get(off..off + n).map(c_string).unwrap_or_default()
        } else {
            record
                .get(self.comm.offset..self.comm.offset.saturating_add(self.comm.size))
                .map(c_string)
                .unwrap_or_default()
        };
        Ok(OomRecord {
            ts_ns: event.header.ts_ns,
            pid: unsigned(self.pid) as u32,
            comm,
            total_vm_bytes: kib(self.total_vm),
            anon_rss_bytes: kib(self.anon_rss),
            file_rss_bytes: kib(self.file_rss),
            shmem_rss_bytes: kib(self.shmem_rss),
            uid: self.uid.map(|f| unsigned(f) as u32),
            pgtables_bytes: self.pgtables.map(kib),
            oom_score_adj: self.oom_score_adj.map_or(0, int),
            trigger_pid: event.header.tgid,
            trigger_comm: c_string(&event.current_comm[..COMM_LEN]),
        })
    }
}

pub(crate) fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A `mark_victim` record in kernel 6.18's layout: pid 1234 (`leak`) chosen by pid 42
/// (`node`), 300,000 KiB of VM, 200,000 KiB anonymous and 1,000 KiB file RSS, uid 1000,
/// `oom_score_adj` -17, the comm string at offset 72 (0x48). Shared by the decoder's
/// tests and the fuzz seeds.
#[cfg(test)]
pub(crate) fn sample_mark_victim() -> OomEvent {
    use tracer_common::{EventHeader, kind};
    let mut event = OomEvent {
        header: EventHeader { kind: kind::OOM_MARK_VICTIM, tgid: 42, tid: 43, has_stack: 0, ts_ns: 1 },
        record_len: 88,
        _pad: 0,
        current_comm: [0; 16],
        record: [0; OOM_RECORD_MAX],
    };
    event.current_comm[..4].copy_from_slice(b"node");
    let r = &mut event.record;
    r[8..12].copy_from_slice(&1234i32.to_le_bytes());
    // __data_loc: length in the high half, offset in the low half.
    r[12..16].copy_from_slice(&((5u32 << 16) | 0x48).to_le_bytes());
    r[16..24].copy_from_slice(&300_000u64.to_le_bytes());
    r[24..32].copy_from_slice(&200_000u64.to_le_bytes());
    r[32..40].copy_from_slice(&1_000u64.to_le_bytes());
    r[48..52].copy_from_slice(&1000u32.to_le_bytes());
    r[64..66].copy_from_slice(&(-17i16).to_le_bytes());
    r[72..77].copy_from_slice(b"leak\0");
    event
}

#[cfg(test)]
mod tests {
    use tracer_common::{EventHeader, kind};

    use super::*;

    const FORMAT: &str = "name: mark_victim
ID: 609
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;
\tfield:unsigned long total_vm;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long anon_rss;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned long file_rss;\toffset:32;\tsize:8;\tsigned:0;
\tfield:unsigned long shmem_rss;\toffset:40;\tsize:8;\tsigned:0;
\tfield:uid_t uid;\toffset:48;\tsize:4;\tsigned:0;
\tfield:unsigned long pgtables;\toffset:56;\tsize:8;\tsigned:0;
\tfield:short oom_score_adj;\toffset:64;\tsize:2;\tsigned:1;
";

    /// A record of `len` bytes, every one `fill`.
    fn filled(fill: u8, len: u32) -> OomEvent {
        OomEvent {
            header: EventHeader { kind: kind::OOM_MARK_VICTIM, tgid: 1, tid: 1, has_stack: 0, ts_ns: 1 },
            record_len: len,
            _pad: 0,
            current_comm: [0; 16],
            record: [fill; OOM_RECORD_MAX],
        }
    }

    /// The event as the ring buffer hands it over.
    fn bytes_of(event: &OomEvent) -> &[u8] {
        // SAFETY: test-only byte view of a POD struct.
        unsafe { core::slice::from_raw_parts(core::ptr::from_ref(event).cast::<u8>(), size_of::<OomEvent>()) }
    }

    #[test]
    fn decodes_mark_victim_record_of_kernel_6_18() {
        let format = OomFormat::parse(FORMAT).expect("format parses");
        let mut event = sample_mark_victim();
        // With the fields the sample leaves zero, up to the comm string's end.
        event.record_len = 96;
        event.record[40..48].copy_from_slice(&8u64.to_le_bytes());
        event.record[56..64].copy_from_slice(&400u64.to_le_bytes());
        let bytes = bytes_of(&event);
        let rec = format.decode(bytes).expect("decodes");
        assert_eq!(rec.pid, 1234);
        assert_eq!(rec.comm, "leak");
        assert_eq!(rec.total_vm_bytes, 300_000 * 1024);
        assert_eq!(rec.anon_rss_bytes, 200_000 * 1024);
        assert_eq!(rec.file_rss_bytes, 1_000 * 1024);
        assert_eq!(rec.shmem_rss_bytes, 8 * 1024);
        assert_eq!(rec.uid, Some(1000));
        assert_eq!(rec.pgtables_bytes, Some(400 * 1024));
        assert_eq!(rec.oom_score_adj, -17);
        assert_eq!((rec.trigger_pid, rec.trigger_comm.as_str()), (42, "node"));
    }

    #[test]
    fn record_length_is_the_format_s() {
        // Fixed fields end at 66 (72 aligned); the comm string follows.
        assert_eq!(OomFormat::parse(FORMAT).expect("format parses").record_len(), 72 + 16);
        let no_strings = FORMAT.replace("__data_loc char[] comm", "char comm[4]");
        assert_eq!(OomFormat::parse(&no_strings).expect("format parses").record_len(), 72);
    }

    #[test]
    fn bytes_past_the_record_are_not_read() {
        let format = OomFormat::parse(FORMAT).expect("format parses");
        let mut event = filled(0xaa, 72);
        // The comm's location points past the copied bytes: it is not read.
        event.record[12..16].copy_from_slice(&((5u32 << 16) | 0x48).to_le_bytes());
        let bytes = bytes_of(&event);
        assert_eq!(format.decode(bytes).expect("decodes").comm, "");
    }

    /// Found by `cargo fuzz run oom_format`: a field of 9 bytes shifted a u64 by 72 bits
    /// (a panic in debug builds); an offset near `usize::MAX` overflowed the same way.
    #[test]
    fn odd_field_sizes_and_offsets_read_as_zero() {
        let odd = FORMAT
            .replace("anon_rss;\toffset:24;\tsize:8", "anon_rss;\toffset:24;\tsize:9")
            .replace("pgtables;\toffset:56;\tsize:8", &format!("pgtables;\toffset:{};\tsize:8", usize::MAX));
        assert_ne!(odd, FORMAT, "the format was changed");
        let format = OomFormat::parse(&odd).expect("format parses");
        assert!(format.record_len() as usize <= OOM_RECORD_MAX);
        let event = filled(0xff, OOM_RECORD_MAX as u32);
        let bytes = bytes_of(&event);
        let rec = format.decode(bytes).expect("decodes");
        assert_eq!(rec.anon_rss_bytes, 0, "a 9-byte field is not a number");
        assert_eq!(rec.pgtables_bytes, Some(0), "a field past the record reads as 0");
        assert_eq!(rec.pid, u32::MAX, "the other fields still decode");
    }

    #[test]
    fn missing_field_is_named() {
        let err = OomFormat::parse("format:\n\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n")
            .expect_err("a format without comm is refused");
        assert!(err.to_string().contains("comm"), "{err}");
    }
}
