//! What `memtrace doctor` checks: can this kernel and user run memtrace, and why not.

use std::path::Path;

use aya::{maps::MapType, programs::ProgramType};

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works without it, with less.
    Warn,
    /// memtrace cannot run (or cannot run that mode).
    Fail,
}

#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

fn check(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
    Check { name, status, detail: detail.into() }
}

fn tracepoint_exists(category: &str, name: &str) -> bool {
    Path::new("/sys/kernel/tracing/events").join(category).join(name).join("id").exists()
}

/// Runs every check. Mounting tracefs is attempted (as `attach` would) when root.
#[must_use]
pub fn run_checks() -> Vec<Check> {
    let mut checks = Vec::new();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    checks.push(if root {
        check("root", Status::Ok, "running as root")
    } else {
        check("root", Status::Fail, "not root: loading eBPF programs needs root (sudo memtrace ...)")
    });
    checks.push(if Path::new("/sys/kernel/btf/vmlinux").exists() {
        check("BTF", Status::Ok, "/sys/kernel/btf/vmlinux present (kernel type information)")
    } else {
        check(
            "BTF",
            Status::Fail,
            "/sys/kernel/btf/vmlinux missing: the kernel needs CONFIG_DEBUG_INFO_BTF=y (used to read user registers at syscalls)",
        )
    });
    let tracefs = if root { super::ensure_tracefs().map_err(|e| e.to_string()) } else { Ok(()) };
    let events = Path::new("/sys/kernel/tracing/events").is_dir();
    checks.push(match (events, tracefs) {
        (true, _) => check("tracefs", Status::Ok, "mounted at /sys/kernel/tracing"),
        (false, Err(e)) => check("tracefs", Status::Fail, e),
        (false, Ok(())) => check(
            "tracefs",
            Status::Fail,
            "not mounted; memtrace mounts it when run as root (mount -t tracefs tracefs /sys/kernel/tracing)",
        ),
    });
    for (category, name, what, required) in [
        ("syscalls", "sys_enter_mmap", "mapped-memory tracing (mmap, munmap, mremap, brk)", true),
        ("oom", "mark_victim", "OOM kill records", true),
        ("exceptions", "page_fault_user", "page-fault attribution of RSS", false),
    ] {
        let status = match (tracepoint_exists(category, name), events, required) {
            (true, _, _) => Status::Ok,
            (false, true, true) => Status::Fail,
            (false, false, _) | (false, true, false) => Status::Warn,
        };
        let detail = match status {
            Status::Ok => format!("tracepoint {category}:{name} available: {what}"),
            _ if !events => {
                format!("tracepoint {category}:{name} not checked (tracefs not mounted): {what}")
            }
            _ => format!("tracepoint {category}:{name} missing: no {what}"),
        };
        checks.push(check("tracepoints", status, detail));
    }
    if root {
        let ringbuf = aya::sys::is_map_supported(MapType::RingBuf).unwrap_or(false);
        checks.push(if ringbuf {
            check("ring buffer", Status::Ok, "BPF ring buffer maps supported")
        } else {
            check("ring buffer", Status::Fail, "BPF ring buffer maps unsupported (needs kernel >= 5.8)")
        });
        let tracepoint = aya::sys::is_program_supported(ProgramType::TracePoint).unwrap_or(false);
        checks.push(if tracepoint {
            check("tracepoint programs", Status::Ok, "BPF tracepoint programs load")
        } else {
            check("tracepoint programs", Status::Fail, "BPF tracepoint programs cannot be loaded")
        });
    }
    checks.push(if Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        check("uprobes", Status::Ok, "available (needed only for --track malloc)")
    } else {
        check("uprobes", Status::Warn, "unavailable: --track malloc will not work (CONFIG_UPROBE_EVENTS)")
    });
    checks.push(if Path::new("/sys/bus/event_source/devices/kprobe").exists() {
        check("kprobes", Status::Ok, "available (memtrace does not need them)")
    } else {
        check(
            "kprobes",
            Status::Ok,
            "absent (CONFIG_KPROBES off); memtrace uses tracepoints and uprobes only",
        )
    });
    let object = !super::OBJECT.is_empty();
    checks.push(if object {
        check("eBPF object", Status::Ok, format!("built in ({} bytes)", super::OBJECT.len()))
    } else {
        check("eBPF object", Status::Fail, "this binary was built with AYA_BUILD_SKIP; rebuild it")
    });
    checks
}
