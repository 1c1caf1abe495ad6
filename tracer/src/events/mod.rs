//! Decoding of ring buffer records into typed events.

pub mod oom;

use tracer_common::{EventHeader, FP_STACK_DEPTH, MemEvent, OomEvent, ProcEvent, UserStack, kind};

pub use oom::{OomFormat, OomRecord, field_offset};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {what} ({need} bytes)")]
    Short { what: &'static str, len: usize, need: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
}

/// A stack captured by the kernel, borrowed from the ring buffer record.
#[derive(Debug, Clone, Copy)]
pub struct StackCapture<'a> {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Frame-pointer walk by the kernel, leaf first (raw little-endian u64s).
    fp_frames: &'a [u8],
    /// Copy of the user stack from `sp` upwards.
    pub data: &'a [u8],
}

impl StackCapture<'_> {
    #[must_use]
    pub fn fp_frames(&self) -> Vec<u64> {
        self.fp_frames.chunks_exact(8).map(read_u64).collect()
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    Mem {
        event: MemEvent,
        stack: Option<StackCapture<'a>>,
    },
    Oom {
        event: &'a [u8],
    },
    /// A traced process forked (`kind::FORK`, the child traced from now on), exec'd, or ended.
    Proc {
        event: ProcEvent,
    },
}

/// A task's `comm` (NUL-padded) as text.
#[must_use]
pub fn comm_of(comm: &[u8]) -> String {
    oom::c_string(comm)
}

fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn read_u32(b: &[u8]) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn need(what: &'static str, bytes: &[u8], need: usize) -> Result<(), DecodeError> {
    if bytes.len() < need { Err(DecodeError::Short { what, len: bytes.len(), need }) } else { Ok(()) }
}

/// Reads a `repr(C)` POD value from the front of `bytes` (length checked by the caller).
fn read_pod<T: aya::Pod>(bytes: &[u8]) -> T {
    // SAFETY: `T: Pod` is valid for any bit pattern and `bytes` holds at least
    // `size_of::<T>()` bytes (checked by callers); read_unaligned copes with alignment.
    unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    need("header", bytes, size_of::<EventHeader>())?;
    let header: EventHeader = read_pod(bytes);
    match header.kind {
        kind::MMAP
        | kind::MUNMAP
        | kind::MREMAP
        | kind::BRK
        | kind::MADVISE
        | kind::MPROTECT
        | kind::FAULT => {
            let fixed = size_of::<MemEvent>();
            need("memory event", bytes, fixed)?;
            let event: MemEvent = read_pod(bytes);
            let stack = if header.has_stack == 0 {
                None
            } else {
                let rest = &bytes[fixed..];
                need("stack header", rest, UserStack::DATA_OFFSET)?;
                let ip = read_u64(&rest[0..]);
                let sp = read_u64(&rest[8..]);
                let bp = read_u64(&rest[16..]);
                let fp_depth = (read_u32(&rest[24..]) as usize).min(FP_STACK_DEPTH);
                let stack_len = read_u32(&rest[28..]) as usize;
                let data = &rest[UserStack::DATA_OFFSET..];
                let data = &data[..stack_len.min(data.len())];
                Some(StackCapture { ip, sp, bp, fp_frames: &rest[32..32 + fp_depth * 8], data })
            };
            Ok(Event::Mem { event, stack })
        }
        kind::OOM_MARK_VICTIM => {
            need("OOM event", bytes, size_of::<OomEvent>())?;
            Ok(Event::Oom { event: bytes })
        }
        kind::FORK | kind::EXEC | kind::EXIT | kind::JOIN | kind::LEAVE | kind::EXITING => {
            need("process event", bytes, size_of::<ProcEvent>())?;
            Ok(Event::Proc { event: read_pod(bytes) })
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_bytes<T>(v: &T) -> &[u8] {
        // SAFETY: test-only view of a repr(C) POD value as bytes.
        unsafe { core::slice::from_raw_parts(core::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
    }

    #[test]
    fn decodes_event_without_stack() {
        let ev = MemEvent {
            header: EventHeader { kind: kind::MUNMAP, tgid: 7, tid: 8, has_stack: 0, ts_ns: 99 },
            addr: 0x1000,
            len: 0x2000,
            ..MemEvent::default()
        };
        let Ok(Event::Mem { event, stack }) = decode(as_bytes(&ev)) else { panic!("not a mem event") };
        assert_eq!(event, ev);
        assert!(stack.is_none());
    }

    #[test]
    fn decodes_truncated_stack_record() {
        let mut rec = Box::new(tracer_common::MemEventWithStack {
            event: MemEvent {
                header: EventHeader { kind: kind::MMAP, tgid: 1, tid: 1, has_stack: 1, ts_ns: 5 },
                addr: 0x7000_0000,
                len: 4096,
                ..MemEvent::default()
            },
            stack: UserStack {
                ip: 0x1111,
                sp: 0x2222,
                bp: 0x3333,
                fp_depth: 2,
                stack_len: 16,
                fp_frames: [0; FP_STACK_DEPTH],
                data: [0; tracer_common::STACK_COPY_MAX],
            },
        });
        rec.stack.fp_frames[0] = 0xaaaa;
        rec.stack.fp_frames[1] = 0xbbbb;
        rec.stack.data[..16].copy_from_slice(&[7; 16]);
        // The kernel sends only the used part of the stack copy.
        let used = size_of::<MemEvent>() + UserStack::DATA_OFFSET + 16;
        let bytes = &as_bytes(&*rec)[..used];
        let Ok(Event::Mem { event, stack: Some(stack) }) = decode(bytes) else { panic!("no stack") };
        assert_eq!(event.addr, 0x7000_0000);
        assert_eq!((stack.ip, stack.sp, stack.bp), (0x1111, 0x2222, 0x3333));
        assert_eq!(stack.fp_frames(), vec![0xaaaa, 0xbbbb]);
        assert_eq!(stack.data, &[7; 16]);
    }

    #[test]
    fn decodes_process_events() {
        let mut ev = ProcEvent {
            header: EventHeader { kind: kind::FORK, tgid: 42, tid: 7, has_stack: 0, ts_ns: 3 },
            parent_tgid: 7,
            ..ProcEvent::default()
        };
        ev.comm[..6].copy_from_slice(b"worker");
        let Ok(Event::Proc { event }) = decode(as_bytes(&ev)) else { panic!("not a process event") };
        assert_eq!(event, ev);
        assert!(matches!(decode(&as_bytes(&ev)[..30]), Err(DecodeError::Short { .. })));
    }

    #[test]
    fn finds_group_dead_in_the_exit_format() {
        let format = "name: sched_process_exit\nformat:\n\
            \tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
            \tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\
            \tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n";
        assert_eq!(field_offset(format, "group_dead"), Some(32));
        assert_eq!(field_offset(format, "comm"), Some(8));
        assert_eq!(field_offset("format:\n", "group_dead"), None, "older kernels lack it");
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert!(matches!(decode(&[0; 4]), Err(DecodeError::Short { .. })));
        let h = EventHeader { kind: 999, ..EventHeader::default() };
        assert_eq!(decode(as_bytes(&h)).err(), Some(DecodeError::UnknownKind(999)));
        let h = EventHeader { kind: kind::MMAP, has_stack: 1, ..EventHeader::default() };
        assert!(matches!(decode(as_bytes(&h)), Err(DecodeError::Short { .. })));
    }
}
