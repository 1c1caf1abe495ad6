//! What the kernel-side counters (`tracer_common::COUNTER_*`) tell a user: how many events
//! were lost, and a warning naming each kind of loss or degradation that happened.

use tracer_common::{
    COUNTER_COUNT, COUNTER_MALLOC_EXITED_INSIDE, COUNTER_OOM_LOST, COUNTER_PENDING_FULL,
    COUNTER_PENDING_STALE, COUNTER_PROBE_FAILED, COUNTER_RINGBUF_FULL, COUNTER_SCRATCH_BUSY,
    COUNTER_STACK_READ_FAILED, COUNTER_SYSCALL_UNREADABLE, COUNTER_TRACED_FULL,
};

/// The counters summed over CPUs, indexed by `COUNTER_*`.
pub type Counters = [u64; COUNTER_COUNT as usize];

/// Counters of events that never reached userspace.
const LOST: [u32; 6] = [
    COUNTER_RINGBUF_FULL,
    COUNTER_OOM_LOST,
    COUNTER_PENDING_FULL,
    COUNTER_SYSCALL_UNREADABLE,
    COUNTER_PENDING_STALE,
    COUNTER_PROBE_FAILED,
];

/// Events lost in the kernel: the sum of the counters in [`LOST`].
#[must_use]
pub fn lost(c: &Counters) -> u64 {
    LOST.iter().map(|&i| c[i as usize]).sum()
}

/// One line per counter that is not zero, saying what was lost or degraded and, where
/// there is one, what to do about it.
#[must_use]
pub fn warnings(c: &Counters) -> Vec<String> {
    let lines: [(u32, &str); 10] = [
        (
            COUNTER_RINGBUF_FULL,
            "events were dropped because the ring buffer was full (raise --ring-buffer-mib)",
        ),
        (COUNTER_OOM_LOST, "OOM records were dropped because their ring buffer was full"),
        (
            COUNTER_PENDING_FULL,
            "mmap-family calls were lost: too many threads were inside such a call at once (table of 16384 full)",
        ),
        (
            COUNTER_SYSCALL_UNREADABLE,
            "mmap-family calls were lost: their arguments or result could not be read from the tracepoint",
        ),
        (
            COUNTER_PENDING_STALE,
            "mmap-family calls were lost: their exit was never seen (tracing began inside them)",
        ),
        (
            COUNTER_PROBE_FAILED,
            "kernel events were lost or incomplete: a probe could not read its tracepoint record (forks, execs, exits, page faults or OOM details)",
        ),
        (COUNTER_TRACED_FULL, "new processes were not followed: the table of traced processes was full"),
        (COUNTER_STACK_READ_FAILED, "stack copies failed; those events have partial stacks"),
        (
            COUNTER_SCRATCH_BUSY,
            "events have no stack: the per-CPU stack buffer was held by a probe preempted on the same CPU",
        ),
        (
            COUNTER_MALLOC_EXITED_INSIDE,
            "allocator calls never returned: their thread exited inside them; nothing was recorded for them",
        ),
    ];
    lines
        .iter()
        .filter_map(|&(i, what)| {
            let n = c[i as usize];
            (n > 0).then(|| format!("kernel: {n} {what}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_but_the_totals_has_a_named_warning() {
        // Events sent and faults seen are totals, not losses.
        let totals = [tracer_common::COUNTER_EVENTS_SENT, tracer_common::COUNTER_FAULTS];
        for i in 0..COUNTER_COUNT {
            let mut c = [0; COUNTER_COUNT as usize];
            c[i as usize] = 3;
            let w = warnings(&c);
            if totals.contains(&i) {
                assert!(w.is_empty(), "counter {i}: {w:?}");
            } else {
                assert_eq!(w.len(), 1, "counter {i} has no warning");
                assert!(w[0].starts_with("kernel: 3 "), "{w:?}");
            }
        }
    }

    #[test]
    fn lost_sums_the_events_that_never_reached_userspace() {
        let mut c = [0; COUNTER_COUNT as usize];
        c[COUNTER_RINGBUF_FULL as usize] = 1;
        c[COUNTER_PENDING_STALE as usize] = 2;
        c[COUNTER_SYSCALL_UNREADABLE as usize] = 4;
        // Degraded, not lost: the event arrived without its stack.
        c[COUNTER_SCRATCH_BUSY as usize] = 8;
        c[COUNTER_MALLOC_EXITED_INSIDE as usize] = 16;
        assert_eq!(lost(&c), 7);
        assert_eq!(warnings(&c).len(), 5);
        assert!(warnings(&c).iter().any(|w| w == "kernel: 16 allocator calls never returned: their thread exited inside them; nothing was recorded for them"));
    }
}
