//! Removing the session's probes without making the user wait for it.
//!
//! Removing a uprobe waits for an RCU grace period under a kernel-wide mutex
//! (`event_mutex`): about 110 ms per probe here, one after another whatever the number of
//! threads that ask (measured: 18 probes took 2.0 s on one thread and on 18 threads). The
//! malloc family has 20-odd probes, so a 20 ms program took seconds longer under `memtrace
//! run` than alone. Once everything is read, the last references to the probes go to a
//! child process that exits at once: the kernel removes them while it exits, and memtrace
//! ends without waiting. The probes are pid-filtered, so meanwhile they cost nothing to
//! other processes, and an ended target pays nothing either.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use log::debug;

/// Whether an open file of this process is a BPF object or a perf event (what the
/// probes are made of).
fn is_probe_fd(target: &str) -> bool {
    target.starts_with("anon_inode:[perf_event]") || target.starts_with("anon_inode:bpf")
}

/// The open fds of this process, split into probe objects and everything else.
fn open_fds() -> std::io::Result<(Vec<RawFd>, Vec<RawFd>)> {
    let (mut probes, mut others) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else { continue };
        match std::fs::read_link(entry.path()) {
            Ok(target) if is_probe_fd(&target.to_string_lossy()) => probes.push(fd),
            // Includes the directory's own fd, closed by the time the child runs (and not
            // reused before the fork: nothing else opens files meanwhile).
            _ => others.push(fd),
        }
    }
    Ok((probes, others))
}

/// The write end of the pipe the child waits on: dropped once this process has closed
/// its own copies of the probe objects, so that the child's are the last ones.
pub struct HandOff {
    _release: Option<OwnedFd>,
}

/// Gives copies of every probe object to a child process, so that the caller can drop its
/// own (closing a copy is instant) and end; the child waits for the returned [`HandOff`]
/// to be dropped, then exits, and the kernel removes the probes as it does. If no child
/// could be made, dropping the probes is slow but correct.
#[must_use]
pub fn hand_off_probes() -> HandOff {
    let none = HandOff { _release: None };
    let mut fds = [0; 2];
    // SAFETY: valid pointer to two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        debug!("create a pipe: {}; removing the probes in this process", std::io::Error::last_os_error());
        return none;
    }
    // SAFETY: the kernel just gave us these fds; each is owned once.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Listed after the pipe exists, so that its fds are not taken for others.
    let (probes, mut others) = match open_fds() {
        Ok(fds) => fds,
        Err(e) => {
            debug!("list open files: {e}; removing the probes in this process");
            return none;
        }
    };
    if probes.is_empty() {
        return none;
    }
    others.retain(|&fd| fd != fds[0]);
    let wait_fd = read_end.as_raw_fd();
    // SAFETY: the child runs only async-signal-safe calls (close, read, _exit) on memory
    // allocated before the fork, so the state of other threads' locks does not matter.
    match unsafe { libc::fork() } {
        0 => {
            // The child: keep nothing else (stdout pipes, sockets, report files) open, so
            // that nobody waits on it.
            for &fd in others.iter().chain(&[fds[1]]) {
                // SAFETY: closing an fd the child inherited; async-signal-safe.
                unsafe { libc::close(fd) };
            }
            let mut byte = 0u8;
            // SAFETY: reads into a local byte; returns at EOF, when the parent's write end
            // is closed (dropped, or at the parent's exit).
            while unsafe { libc::read(wait_fd, (&raw mut byte).cast(), 1) } > 0 {}
            // SAFETY: ends the child without running atexit handlers or destructors.
            unsafe { libc::_exit(0) }
        }
        -1 => {
            debug!("fork a process to remove the probes: {}", std::io::Error::last_os_error());
            none
        }
        child => {
            drop(read_end);
            debug!(
                "{} probe objects handed to process {child}, which removes them as it exits",
                probes.len()
            );
            HandOff { _release: Some(write_end) }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    #[test]
    fn probe_objects_are_recognized_by_their_inode_name() {
        assert!(is_probe_fd("anon_inode:[perf_event]"));
        assert!(is_probe_fd("anon_inode:bpf-link"));
        assert!(is_probe_fd("anon_inode:bpf-prog"));
        assert!(is_probe_fd("anon_inode:bpf-map"));
        assert!(!is_probe_fd("pipe:[1234]"));
        assert!(!is_probe_fd("/tmp/report.json"));
        assert!(!is_probe_fd("socket:[99]"));
    }

    #[test]
    fn open_files_are_listed() {
        let file = tempfile::tempfile().expect("temp file");
        let (probes, others) = open_fds().expect("list fds");
        assert!(probes.is_empty(), "a test process has no BPF objects: {probes:?}");
        assert!(others.contains(&file.as_raw_fd()), "{others:?}");
    }
}
