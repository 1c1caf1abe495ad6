//! Records sent from the kernel through the ring buffer.
//!
//! Event kinds are numbered in ranges per family: 1..=31 address-space changes,
//! 32..=47 OOM, 48..=63 process lifecycle.

/// Bytes of user stack copied at most per event (the copy is then unwound in userspace
/// with the modules' CFI, because glibc is built without frame pointers).
pub const STACK_COPY_MAX: usize = 16384;
/// Frames of the frame-pointer stack taken by `bpf_get_stack`, kept as a fallback.
pub const FP_STACK_DEPTH: usize = 32;
/// Bytes of the raw `oom:mark_victim` record copied for userspace to decode with the
/// offsets of the tracepoint's `format` file.
pub const OOM_RECORD_MAX: usize = 256;
/// Bytes of a task's `comm`.
pub const COMM_LEN: usize = 16;

/// Kind of an [`EventHeader`].
pub mod kind {
    pub const MMAP: u32 = 1;
    pub const MUNMAP: u32 = 2;
    pub const MREMAP: u32 = 3;
    pub const BRK: u32 = 4;
    pub const MADVISE: u32 = 5;
    pub const MPROTECT: u32 = 6;
    /// A sampled first touch of a page: `addr` is the faulting address, `len` the bytes
    /// this sample stands for (page size times the sampling period).
    pub const FAULT: u32 = 7;
    pub const OOM_MARK_VICTIM: u32 = 32;
    /// A traced process forked a process that is now traced too (`tgid` is the child's).
    pub const FORK: u32 = 48;
    /// A traced process exec'd: its address space is a new image.
    pub const EXEC: u32 = 49;
    /// A traced process ended (its last thread exited); it is no longer traced.
    pub const EXIT: u32 = 50;
    /// A process joined a traced cgroup and is traced from now on (`tgid` is its pid).
    pub const JOIN: u32 = 51;
    /// A traced process was moved out of the traced cgroups; it is no longer traced.
    pub const LEAVE: u32 = 52;
    /// A `memtrace run` command called `_exit`: it is stopped (`SIGSTOP`) until userspace
    /// has read its memory map and sent `SIGCONT`. `parent_tgid` holds the exit status.
    pub const EXITING: u32 = 53;
}

/// Leads every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    /// 1 when a [`UserStack`] follows the fixed part of the record.
    pub has_stack: u32,
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`).
    pub ts_ns: u64,
}

/// An address-space change of the traced process, taken at syscall exit (so only
/// successful calls are sent).
///
/// Field use per kind: `MMAP` addr/len/prot/flags/fd; `MUNMAP` addr/len; `MREMAP`
/// `old_addr`/`old_len` → addr/len, flags; `BRK` addr = new break, `old_addr` = requested;
/// `MADVISE` addr/len, `advice`; `MPROTECT` addr/len/prot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemEvent {
    pub header: EventHeader,
    pub addr: u64,
    pub len: u64,
    pub old_addr: u64,
    pub old_len: u64,
    pub prot: u32,
    pub flags: u32,
    pub fd: i32,
    pub advice: u32,
}

/// The user registers at the syscall and a copy of the top of the user stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UserStack {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Number of valid entries in `fp_frames` (frame-pointer walk by the kernel).
    pub fp_depth: u32,
    /// Number of valid bytes in `data`, copied from `sp` upwards.
    pub stack_len: u32,
    pub fp_frames: [u64; FP_STACK_DEPTH],
    pub data: [u8; STACK_COPY_MAX],
}

/// A [`MemEvent`] followed by its stack. Only the first
/// `size_of::<MemEvent>() + UserStack::DATA_OFFSET + stack_len` bytes are sent.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemEventWithStack {
    pub event: MemEvent,
    pub stack: UserStack,
}

impl UserStack {
    /// Offset of `data` within the struct: the record is cut there plus `stack_len`.
    pub const DATA_OFFSET: usize = 8 * 3 + 4 * 2 + 8 * FP_STACK_DEPTH;
}

/// `oom:mark_victim` fired (machine-wide): the raw record plus who was running.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct OomEvent {
    pub header: EventHeader,
    /// Bytes of `record` that were read.
    pub record_len: u32,
    #[allow(
        clippy::pub_underscore_fields,
        reason = "explicit padding, zeroed by the writer; carries no data"
    )]
    pub _pad: u32,
    /// `comm` of the task that was running when the victim was marked (the allocating
    /// task for a memory-cgroup OOM).
    pub current_comm: [u8; COMM_LEN],
    pub record: [u8; OOM_RECORD_MAX],
}

/// A process of the traced set appeared, exec'd or ended (`kind::FORK`, `EXEC`, `EXIT`).
/// `header.tgid` is the process; `header.tid` the thread that made the change.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcEvent {
    pub header: EventHeader,
    /// `FORK`: the parent's tgid; `EXITING`: the status passed to `_exit`; 0 otherwise.
    pub parent_tgid: u32,
    #[allow(
        clippy::pub_underscore_fields,
        reason = "explicit padding, zeroed by the writer; carries no data"
    )]
    pub _pad: u32,
    /// `FORK`: the child's comm (the parent's at fork time); `EXEC`: the new image's;
    /// `EXIT`: the process's last.
    pub comm: [u8; COMM_LEN],
}

const _: () = assert!(core::mem::size_of::<EventHeader>() == 24);
const _: () = assert!(core::mem::size_of::<ProcEvent>() == 24 + 8 + COMM_LEN);
const _: () = assert!(core::mem::size_of::<MemEvent>() == 24 + 32 + 16);
const _: () = assert!(core::mem::size_of::<UserStack>() == UserStack::DATA_OFFSET + STACK_COPY_MAX);
const _: () = assert!(
    core::mem::size_of::<MemEventWithStack>()
        == core::mem::size_of::<MemEvent>() + core::mem::size_of::<UserStack>()
);
const _: () = assert!(core::mem::size_of::<OomEvent>() == 24 + 8 + COMM_LEN + OOM_RECORD_MAX);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `repr(C)`, `Copy`, made of integers and integer arrays,
    // with no implicit padding (sizes asserted above), so every bit pattern is valid.
    unsafe impl aya::Pod for super::EventHeader {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::MemEvent {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::OomEvent {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ProcEvent {}
}
