//! How a process ended, from its wait status.

use crate::report::Exit;

/// Signal names by number (x86-64 Linux, signal(7)).
const SIGNAL_NAMES: [&str; 32] = [
    "",
    "SIGHUP",
    "SIGINT",
    "SIGQUIT",
    "SIGILL",
    "SIGTRAP",
    "SIGABRT",
    "SIGBUS",
    "SIGFPE",
    "SIGKILL",
    "SIGUSR1",
    "SIGSEGV",
    "SIGUSR2",
    "SIGPIPE",
    "SIGALRM",
    "SIGTERM",
    "SIGSTKFLT",
    "SIGCHLD",
    "SIGCONT",
    "SIGSTOP",
    "SIGTSTP",
    "SIGTTIN",
    "SIGTTOU",
    "SIGURG",
    "SIGXCPU",
    "SIGXFSZ",
    "SIGVTALRM",
    "SIGPROF",
    "SIGWINCH",
    "SIGIO",
    "SIGPWR",
    "SIGSYS",
];

/// `SIGSEGV` for 11; real-time signals as `SIGRTMIN+N`.
#[must_use]
pub fn signal_name(signal: i32) -> String {
    match usize::try_from(signal).ok().and_then(|s| SIGNAL_NAMES.get(s)) {
        Some(name) if !name.is_empty() => (*name).to_string(),
        _ if signal >= libc::SIGRTMIN() => format!("SIGRTMIN+{}", signal - libc::SIGRTMIN()),
        _ => format!("signal {signal}"),
    }
}

/// An exit from the terminating signal, if any, else the exit code.
#[must_use]
pub fn exit_from(code: Option<i32>, signal: Option<i32>, core_dumped: bool) -> Exit {
    match signal {
        Some(n) => Exit { code: None, signal: Some(signal_name(n)), signal_number: Some(n), core_dumped },
        None => Exit { code, ..Exit::default() },
    }
}

/// Decodes a status as `waitpid(2)` reports it (and field 52 of /proc/PID/stat).
#[must_use]
pub fn from_wait_status(status: i32) -> Exit {
    if libc::WIFSIGNALED(status) {
        exit_from(None, Some(libc::WTERMSIG(status)), libc::WCOREDUMP(status))
    } else {
        exit_from(Some(libc::WEXITSTATUS(status)), None, false)
    }
}

/// How `pid` ended, read while it is a zombie (its parent has not collected it yet);
/// `None` once it is gone or while it runs.
#[must_use]
pub fn exit_status(pid: u32) -> Option<Exit> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    if super::stat_field(&stat, 3)? != "Z" {
        return None;
    }
    Some(from_wait_status(super::stat_field(&stat, 52)?.parse().ok()?))
}

/// The status a shell gives a command that ended so: its code, or 128 + the signal.
#[must_use]
pub fn shell_status(exit: &Exit) -> u8 {
    match (exit.signal_number, exit.code) {
        (Some(n), _) => u8::try_from(128 + n).unwrap_or(255),
        (None, Some(code)) => (code & 0xff) as u8,
        (None, None) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses() {
        let exited = from_wait_status(3 << 8);
        assert_eq!(exited, Exit { code: Some(3), ..Exit::default() });
        assert_eq!(exited.to_string(), "exited with code 3");
        assert_eq!(shell_status(&exited), 3);

        let segv = from_wait_status(libc::SIGSEGV | 0x80);
        assert_eq!(segv.signal.as_deref(), Some("SIGSEGV"));
        assert!(segv.core_dumped);
        assert_eq!(segv.to_string(), "killed by SIGSEGV (core dumped)");
        assert_eq!(shell_status(&segv), 139);

        let abort = from_wait_status(libc::SIGABRT);
        assert_eq!(abort.to_string(), "killed by SIGABRT");
        assert_eq!(shell_status(&abort), 134);
        assert_eq!(signal_name(libc::SIGRTMIN() + 2), "SIGRTMIN+2");
    }

    #[test]
    fn zombie_status_is_read_from_proc() {
        let mut child = std::process::Command::new("sh").args(["-c", "exit 7"]).spawn().expect("spawn sh");
        let pid = child.id();
        // Not collected yet: a zombie until `wait`.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let exit = loop {
            if let Some(exit) = exit_status(pid) {
                break exit;
            }
            assert!(std::time::Instant::now() < deadline, "sh did not exit");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(exit.code, Some(7));
        assert_eq!(child.wait().expect("wait").code(), Some(7));
        assert_eq!(exit_status(pid), None, "gone once collected");
    }
}
