//! `--cgroup`: the traced set follows a cgroup in the kernel. A process is traced from the
//! moment it joins one of the traced cgroups (a write to `cgroup.procs`, as systemd, runc
//! and `echo PID >` do), and no longer once it is moved to another cgroup of the same
//! hierarchy. Processes born into the cgroup are followed as children (`FOLLOW_CHILDREN`);
//! a process spawned straight into a v2 cgroup (`clone3(CLONE_INTO_CGROUP)`, which fires no
//! attach event) is caught at its exec by its cgroup id (`common::joins_at_exec`).

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tracer_common::{COMM_LEN, COUNTER_PROBE_FAILED, kind};

use crate::{
    maps::{
        ATTACH_ID_OFFSET, ATTACH_PID_OFFSET, ATTACH_ROOT_OFFSET, CGROUP_HIERARCHY, CGROUP_MODE, TRACED,
        cgroup_traced, global, traced,
    },
    probes::common::{Failure, field, run, send_proc, trace},
};

#[tracepoint]
pub fn tp_cgroup_attach_task(ctx: TracePointContext) -> u32 {
    run(try_cgroup_attach_task(&ctx))
}

#[inline(always)]
fn try_cgroup_attach_task(ctx: &TracePointContext) -> Result<u32, Failure> {
    if global(&CGROUP_MODE) == 0 {
        return Ok(0);
    }
    // Offsets from the tracepoint's format file.
    let root = field::<i32>(ctx, global(&ATTACH_ROOT_OFFSET) as usize, COUNTER_PROBE_FAILED)?;
    if root as u32 != global(&CGROUP_HIERARCHY) {
        return Ok(0);
    }
    let id = field::<u64>(ctx, global(&ATTACH_ID_OFFSET) as usize, COUNTER_PROBE_FAILED)?;
    // The pid is the moved thread group's leader (its tgid).
    let pid = field::<i32>(ctx, global(&ATTACH_PID_OFFSET) as usize, COUNTER_PROBE_FAILED)? as u32;
    if cgroup_traced(id) {
        if !traced(pid) {
            trace(pid)?;
            // The writer's comm is not the process's: userspace reads it from /proc.
            send_proc(kind::JOIN, pid, 0, [0; COMM_LEN])?;
        }
    } else if traced(pid) {
        // Absent already is fine: the entry is gone either way.
        let _ = TRACED.remove(&pid);
        send_proc(kind::LEAVE, pid, 0, [0; COMM_LEN])?;
    }
    Ok(0)
}
