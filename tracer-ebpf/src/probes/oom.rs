//! `oom:mark_victim`, machine-wide: the raw record goes to userspace, which decodes it
//! with the offsets of the tracepoint's `format` file.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_buf},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    COUNTER_EVENTS_SENT, COUNTER_RINGBUF_FULL, EventHeader, OOM_RECORD_MAX, OomEvent, TRACK_OOM, kind,
};

use crate::maps::{EVENTS, count, track_flags};

#[tracepoint]
pub fn tp_oom_mark_victim(ctx: TracePointContext) -> u32 {
    if track_flags() & TRACK_OOM == 0 {
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<OomEvent>(0) else {
        count(COUNTER_RINGBUF_FULL);
        return 0;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the reservation is exclusively ours until submitted; every field is
    // written before submit.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    event.header = EventHeader {
        kind: kind::OOM_MARK_VICTIM,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        has_stack: 0,
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    };
    event._pad = 0;
    event.current_comm = bpf_get_current_comm().unwrap_or([0; 16]);
    let record = ctx.as_ptr() as *const u8;
    // The record is shorter than OOM_RECORD_MAX; fall back to its fixed part if the
    // longer read crosses into unmapped memory.
    // SAFETY: reads kernel memory through the checked helper into our buffer.
    let full = unsafe { bpf_probe_read_kernel_buf(record, &mut event.record) };
    event.record_len = if full.is_ok() {
        OOM_RECORD_MAX as u32
    } else {
        // SAFETY: as above, with a shorter length.
        let short = unsafe { bpf_probe_read_kernel_buf(record, &mut event.record[..96]) };
        if short.is_ok() { 96 } else { 0 }
    };
    entry.submit(0);
    count(COUNTER_EVENTS_SENT);
    0
}
