//! `oom:mark_victim`, machine-wide: the raw record goes to userspace, which decodes it
//! with the offsets of the tracepoint's `format` file. It travels on its own ring
//! buffer, so that a storm of stack events cannot make it the one that is dropped.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_buf},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    COMM_LEN, COUNTER_EVENTS_SENT, COUNTER_OOM_LOST, COUNTER_PROBE_FAILED, EventHeader, OOM_RECORD_MAX,
    OomEvent, TRACK_OOM, kind,
};

use crate::{
    maps::{OOM_EVENTS, count, oom_record_len, track_flags},
    probes::common::{Failure, run},
};

#[tracepoint]
pub fn tp_oom_mark_victim(ctx: TracePointContext) -> u32 {
    run(try_oom_mark_victim(&ctx))
}

#[inline(always)]
fn try_oom_mark_victim(ctx: &TracePointContext) -> Result<u32, Failure> {
    if track_flags() & TRACK_OOM == 0 {
        return Ok(0);
    }
    let mut entry = OOM_EVENTS.reserve::<OomEvent>(0).ok_or(COUNTER_OOM_LOST)?;
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
    let comm = bpf_get_current_comm();
    event.current_comm = *comm.as_ref().unwrap_or(&[0; COMM_LEN]);
    let record = ctx.as_ptr() as *const u8;
    // Exactly the record's size (userspace computed it from the format file): bytes
    // beyond it belong to other events.
    let len = core::cmp::min(oom_record_len() as usize, OOM_RECORD_MAX);
    // SAFETY: reads kernel memory through the checked helper into our buffer.
    let read = unsafe { bpf_probe_read_kernel_buf(record, &mut event.record[..len]) };
    event.record_len = if read.is_ok() { len as u32 } else { 0 };
    // Sent even when incomplete (an OOM kill happened; userspace says what it lacks),
    // and counted. The reader is woken at once: an OOM kill is rare and is what the user
    // waits for.
    entry.submit(u64::from(BPF_RB_FORCE_WAKEUP));
    count(COUNTER_EVENTS_SENT);
    if read.is_err() || comm.is_err() {
        return Err(COUNTER_PROBE_FAILED);
    }
    Ok(0)
}
