//! First touches of pages by the target (`exceptions:page_fault_user`), sampled.
//!
//! Every not-present fault is counted; one in `FAULT_SAMPLE_PERIOD` (chosen at random,
//! so the sample is unbiased) is sent with its stack and stands for that many pages.
//! At ~25k faults/s for a service growing 100 MB/s, this keeps the ring buffer traffic
//! to a few hundred stack copies per second.

use aya_ebpf::{helpers::bpf_get_prandom_u32, macros::tracepoint, programs::TracePointContext};
use tracer_common::{COUNTER_FAULTS, COUNTER_PROBE_FAILED, MemEvent, TRACK_FAULTS, kind};

use crate::{
    maps::{count, fault_sample_period},
    probes::common::{Failure, field, header, run, send_with_stack, target_tid},
};

/// Offsets in the record (see the tracepoint's `format` file).
const ADDRESS_OFFSET: usize = 8;
const ERROR_CODE_OFFSET: usize = 24;
/// x86 page-fault error code bit 0: the page was present (a protection fault).
const PF_PROT: u64 = 1;
const PAGE_SIZE: u64 = 4096;

#[tracepoint]
pub fn tp_page_fault_user(ctx: TracePointContext) -> u32 {
    run(try_page_fault_user(&ctx))
}

#[inline(always)]
fn try_page_fault_user(ctx: &TracePointContext) -> Result<u32, Failure> {
    let Some(tid) = target_tid(TRACK_FAULTS) else { return Ok(0) };
    let error_code = field::<u64>(ctx, ERROR_CODE_OFFSET, COUNTER_PROBE_FAILED)?;
    if error_code & PF_PROT != 0 {
        return Ok(0);
    }
    count(COUNTER_FAULTS);
    let period = fault_sample_period();
    // SAFETY: no preconditions.
    if period > 1 && unsafe { bpf_get_prandom_u32() } % period != 0 {
        return Ok(0);
    }
    let address = field::<u64>(ctx, ADDRESS_OFFSET, COUNTER_PROBE_FAILED)?;
    let event = MemEvent {
        header: header(kind::FAULT, tid, 1),
        addr: address & !(PAGE_SIZE - 1),
        len: PAGE_SIZE * u64::from(period.max(1)),
        old_addr: 0,
        old_len: 0,
        prot: 0,
        flags: error_code as u32,
        fd: -1,
        advice: 0,
    };
    send_with_stack(ctx, event)
}
