//! `--cgroup`: the traced set follows a cgroup in the kernel. A process is traced from the
//! moment it joins one of the traced cgroups (a write to `cgroup.procs`, as systemd, runc
//! and `echo PID >` do), and no longer once it is moved to another cgroup of the same
//! hierarchy. Processes born into the cgroup are followed as children (`FOLLOW_CHILDREN`);
//! a process spawned straight into a v2 cgroup (`clone3(CLONE_INTO_CGROUP)`, which fires no
//! attach event) is caught at its exec by its cgroup id (see `probes::process`).

use aya_ebpf::{
    bindings::BPF_ANY, helpers::generated::bpf_get_current_cgroup_id, macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{COMM_LEN, COUNTER_PROBE_FAILED, COUNTER_TRACED_FULL, kind};

use crate::{
    maps::{
        ATTACH_ID_OFFSET, ATTACH_PID_OFFSET, ATTACH_ROOT_OFFSET, CGROUP_HIERARCHY, CGROUP_MODE, TRACED,
        cgroup_traced, count, global, traced,
    },
    probes::process::send,
};

#[tracepoint]
pub fn tp_cgroup_attach_task(ctx: TracePointContext) -> u32 {
    try_cgroup_attach_task(&ctx).unwrap_or_else(|_| {
        count(COUNTER_PROBE_FAILED);
        0
    })
}

fn try_cgroup_attach_task(ctx: &TracePointContext) -> Result<u32, i64> {
    if global(&CGROUP_MODE) == 0 {
        return Ok(0);
    }
    // SAFETY: offsets from the tracepoint's format file, read through the checked helper.
    let root = unsafe { ctx.read_at::<i32>(global(&ATTACH_ROOT_OFFSET) as usize) }?;
    if root as u32 != global(&CGROUP_HIERARCHY) {
        return Ok(0);
    }
    // SAFETY: as above.
    let id = unsafe { ctx.read_at::<u64>(global(&ATTACH_ID_OFFSET) as usize) }?;
    // SAFETY: as above. The pid is the moved thread group's leader (its tgid).
    let pid = unsafe { ctx.read_at::<i32>(global(&ATTACH_PID_OFFSET) as usize) }? as u32;
    if cgroup_traced(id) {
        if !traced(pid) {
            if TRACED.insert(&pid, &1, u64::from(BPF_ANY)).is_err() {
                count(COUNTER_TRACED_FULL);
                return Ok(0);
            }
            // The writer's comm is not the process's: userspace reads it from /proc.
            send(kind::JOIN, pid, 0, [0; COMM_LEN]);
        }
    } else if traced(pid) {
        // Absent already is fine: the entry is gone either way.
        let _ = TRACED.remove(&pid);
        send(kind::LEAVE, pid, 0, [0; COMM_LEN]);
    }
    Ok(0)
}

/// At the exec of an untraced process: whether it runs in a traced v2 cgroup (it was
/// spawned into it), in which case it is traced from now on.
#[inline(always)]
pub fn joins_at_exec(tgid: u32) -> bool {
    if global(&CGROUP_MODE) == 0 || global(&CGROUP_HIERARCHY) != 0 {
        return false;
    }
    // SAFETY: no preconditions; the current task's cgroup id on the v2 hierarchy.
    let id = unsafe { bpf_get_current_cgroup_id() };
    if !cgroup_traced(id) {
        return false;
    }
    if TRACED.insert(&tgid, &1, u64::from(BPF_ANY)).is_err() {
        count(COUNTER_TRACED_FULL);
        return false;
    }
    true
}
