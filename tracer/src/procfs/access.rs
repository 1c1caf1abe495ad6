//! Whether a process can be traced at all, asked before anything is attached: a
//! kernel thread has no user memory, and a process whose memory map memtrace may not
//! read cannot be symbolized. Each refusal says what was unreadable and why.

use std::{fs, io, io::Read as _};

/// `PF_KTHREAD` in the flags of /proc/PID/stat (include/linux/sched.h).
const PF_KTHREAD: u64 = 0x0020_0000;
const CAP_SYS_PTRACE: u32 = 19;
/// The identity map of the initial user namespace, as `/proc/self/uid_map` shows it.
const INIT_UID_MAP: &str = "0 0 4294967295";

/// Capability names by number (include/uapi/linux/capability.h).
const CAP_NAMES: [&str; 41] = [
    "cap_chown",
    "cap_dac_override",
    "cap_dac_read_search",
    "cap_fowner",
    "cap_fsetid",
    "cap_kill",
    "cap_setgid",
    "cap_setuid",
    "cap_setpcap",
    "cap_linux_immutable",
    "cap_net_bind_service",
    "cap_net_broadcast",
    "cap_net_admin",
    "cap_net_raw",
    "cap_ipc_lock",
    "cap_ipc_owner",
    "cap_sys_module",
    "cap_sys_rawio",
    "cap_sys_chroot",
    "cap_sys_ptrace",
    "cap_sys_pacct",
    "cap_sys_admin",
    "cap_sys_boot",
    "cap_sys_nice",
    "cap_sys_resource",
    "cap_sys_time",
    "cap_sys_tty_config",
    "cap_mknod",
    "cap_lease",
    "cap_audit_write",
    "cap_audit_control",
    "cap_setfcap",
    "cap_mac_override",
    "cap_mac_admin",
    "cap_syslog",
    "cap_wake_alarm",
    "cap_block_suspend",
    "cap_audit_read",
    "cap_perfmon",
    "cap_bpf",
    "cap_checkpoint_restore",
];

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "process {pid} ({comm}) is a kernel thread: it has no user-space memory to trace; give the pid of a user-space process (see `ps -o pid,comm,rss`)"
    )]
    KernelThread { pid: u32, comm: String },
    #[error(
        "process {pid} ({comm}) has exited and not been reaped (a zombie): it has no memory left to trace"
    )]
    Zombie { pid: u32, comm: String },
    #[error("cannot read {path} of process {pid} ({comm}): {error}; {why}")]
    Unreadable { pid: u32, comm: String, path: String, error: io::Error, why: String },
}

/// Refuses a process that cannot be traced, with what to do about it.
pub fn check_traceable(pid: u32) -> Result<(), AccessError> {
    let comm = super::comm(pid);
    if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
        let flags: Option<u64> = super::stat_field(&stat, 9).and_then(|f| f.parse().ok());
        if flags.is_some_and(|f| f & PF_KTHREAD != 0) {
            return Err(AccessError::KernelThread { pid, comm });
        }
        if super::stat_field(&stat, 3) == Some("Z") {
            return Err(AccessError::Zombie { pid, comm });
        }
    }
    let unreadable = |path: String, error: io::Error| {
        let why = if matches!(error.raw_os_error(), Some(libc::EACCES | libc::EPERM)) {
            denied_because(&Facts::read(pid))
        } else {
            "check that the process still runs".to_string()
        };
        AccessError::Unreadable { pid, comm: comm.clone(), path, error, why }
    };
    // The kernel asks the same question (may this process read the other's memory?)
    // for both; the memory map is the one symbolization cannot do without.
    let maps = format!("/proc/{pid}/maps");
    fs::File::open(&maps).and_then(|mut f| f.read(&mut [0u8; 1])).map_err(|e| unreadable(maps.clone(), e))?;
    let exe = format!("/proc/{pid}/exe");
    match fs::read_link(&exe) {
        // A kernel thread has none; one whose file was deleted still reads.
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(unreadable(exe, e)),
        _ => Ok(()),
    }
}

/// What decides whether the kernel lets memtrace read another process's memory map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Facts {
    euid: u32,
    /// The target's real uid, if its status was readable.
    target_uid: Option<u32>,
    /// `/proc/self/uid_map`, whitespace normalized.
    uid_map: String,
    /// memtrace's effective capabilities and the target's permitted ones (bit masks).
    own_caps: u64,
    target_caps: Option<u64>,
    yama_ptrace_scope: Option<u32>,
}

impl Facts {
    fn read(pid: u32) -> Self {
        let own = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let target = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |text: &str, key: &str| -> Option<String> {
            text.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string())
        };
        let caps = |text: &str, key: &str| field(text, key).and_then(|v| u64::from_str_radix(&v, 16).ok());
        Self {
            // SAFETY: geteuid has no preconditions and cannot fail.
            euid: unsafe { libc::geteuid() },
            target_uid: field(&target, "Uid:").and_then(|v| v.split_whitespace().next()?.parse().ok()),
            uid_map: fs::read_to_string("/proc/self/uid_map")
                .map(|m| {
                    m.lines()
                        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default(),
            own_caps: caps(&own, "CapEff:").unwrap_or(0),
            target_caps: caps(&target, "CapPrm:"),
            yama_ptrace_scope: fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
                .ok()
                .and_then(|s| s.trim().parse().ok()),
        }
    }
}

/// Names of the capabilities in `mask`.
fn cap_names(mask: u64) -> Vec<String> {
    (0..64u32)
        .filter(|bit| mask & (1 << bit) != 0)
        .map(|bit| CAP_NAMES.get(bit as usize).map_or_else(|| format!("cap_{bit}"), |n| (*n).to_string()))
        .collect()
}

/// Why the kernel refused, from what memtrace can see, most specific first.
fn denied_because(f: &Facts) -> String {
    if f.euid != 0 {
        let owner = f.target_uid.map_or_else(|| "another user".to_string(), |u| format!("uid {u}"));
        return format!(
            "memtrace runs as uid {} and the process belongs to {owner}: run memtrace as root",
            f.euid
        );
    }
    let lacking = f.target_caps.map(|t| t & !f.own_caps).filter(|&m| m != 0);
    let lacking_text = lacking
        .map(|m| format!(" (the process holds capabilities memtrace lacks: {})", cap_names(m).join(", ")))
        .unwrap_or_default();
    if !f.uid_map.is_empty() && f.uid_map != INIT_UID_MAP {
        return format!(
            "memtrace runs as root of a user namespace (uid map {}), which is not the machine's root: run memtrace outside the namespace (on the host, or in the target's container)",
            f.uid_map
        );
    }
    if f.own_caps & (1 << CAP_SYS_PTRACE) == 0 {
        return format!(
            "memtrace runs as root without cap_sys_ptrace (its capabilities were reduced, as in a container): give it cap_sys_ptrace (e.g. `docker run --cap-add SYS_PTRACE`) or run it on the host{lacking_text}"
        );
    }
    if f.yama_ptrace_scope == Some(3) {
        return "kernel.yama.ptrace_scope is 3, which forbids every process to read another's memory until reboot"
            .to_string();
    }
    format!(
        "memtrace runs as root with cap_sys_ptrace, so a security module or sandbox around memtrace refuses it (Landlock, SELinux, AppArmor or a BPF LSM): run memtrace outside that sandbox{lacking_text}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> Facts {
        Facts {
            euid: 0,
            target_uid: Some(0),
            uid_map: INIT_UID_MAP.to_string(),
            own_caps: 0x1ff_ffff_ffff,
            target_caps: Some(0x1ff_ffff_ffff),
            yama_ptrace_scope: None,
        }
    }

    #[test]
    fn kernel_thread_is_refused() {
        // kthreadd is pid 2 outside a pid namespace.
        assert!(
            fs::read_to_string("/proc/2/stat").is_ok_and(|s| s.contains("(kthreadd)")),
            "pid 2 is not kthreadd here: run this test outside a pid namespace"
        );
        let err = check_traceable(2).expect_err("kthreadd");
        assert!(matches!(err, AccessError::KernelThread { pid: 2, .. }), "{err:?}");
        assert!(err.to_string().starts_with("process 2 (kthreadd) is a kernel thread"), "{err}");
    }

    #[test]
    fn own_process_is_traceable() {
        check_traceable(std::process::id()).expect("own process");
    }

    #[test]
    fn not_root_is_told_to_be_root() {
        let f = Facts { euid: 1000, target_uid: Some(0), ..root() };
        assert_eq!(
            denied_because(&f),
            "memtrace runs as uid 1000 and the process belongs to uid 0: run memtrace as root"
        );
    }

    #[test]
    fn root_is_not_told_to_be_root() {
        let sandboxed = Facts { own_caps: 0x1ff_feff_ffff, ..root() };
        let why = denied_because(&sandboxed);
        assert!(!why.contains("run memtrace as root"), "{why}");
        assert!(why.contains("security module or sandbox"), "{why}");
        assert!(why.contains("capabilities memtrace lacks: cap_sys_resource"), "{why}");

        let userns = Facts { uid_map: "0 1000 1".to_string(), ..root() };
        let why = denied_because(&userns);
        assert!(why.contains("user namespace (uid map 0 1000 1)"), "{why}");

        let no_ptrace = Facts { own_caps: 0x1ff_ffff_ffff & !(1 << CAP_SYS_PTRACE), ..root() };
        let why = denied_because(&no_ptrace);
        assert!(why.contains("without cap_sys_ptrace"), "{why}");
        assert!(why.contains("lacks: cap_sys_ptrace"), "{why}");

        let yama = Facts { yama_ptrace_scope: Some(3), ..root() };
        assert!(denied_because(&yama).contains("ptrace_scope is 3"));
    }

    #[test]
    fn capability_names() {
        assert_eq!(cap_names(1 << 24 | 1 << 19 | 1 << 50), ["cap_sys_ptrace", "cap_sys_resource", "cap_50"]);
    }
}
