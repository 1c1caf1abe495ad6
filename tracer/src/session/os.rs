//! The traced process as the operating system shows it: its pid, its exit, its exec.

use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    time::Duration,
};

use anyhow::{Context as _, bail};
use log::warn;
use tokio::io::unix::AsyncFd;
use tracer_common::{TRACK_BRK, TRACK_FAULTS, TRACK_MALLOC, TRACK_MMAP, TRACK_OOM};

use crate::{cli::Track, procfs};

/// `CLOCK_MONOTONIC` in ns, the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Registers `inner` for read readiness with the runtime.
pub fn readable_fd<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: every `T` used here (the ring buffer's map, an `OwnedFd`) owns its fd for
    // its whole lifetime and always returns the same one.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Opens a pidfd, which becomes readable when the process exits.
pub(super) fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.cast_signed(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Resolves the process to trace: its tgid, with a clear error when it does not exist.
pub fn resolve_target(pid: u32) -> anyhow::Result<u32> {
    match procfs::status(pid) {
        Ok(s) if s.tgid != 0 && s.tgid != pid => {
            log::info!("{pid} is a thread of process {}; tracing the whole process", s.tgid);
            Ok(s.tgid)
        }
        Ok(_) => Ok(pid),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no such process: {pid} (is it running? check with `ps -p {pid}`)")
        }
        Err(e) => Err(e).with_context(|| format!("read /proc/{pid}/status")),
    }
}

/// The `TRACK_*` bits of the sources asked for.
#[must_use]
pub fn track_bits(track: &[Track]) -> u32 {
    track
        .iter()
        .map(|t| match t {
            Track::Mmap => TRACK_MMAP,
            Track::Brk => TRACK_BRK,
            Track::Oom => TRACK_OOM,
            Track::Faults => TRACK_FAULTS,
            Track::Malloc => TRACK_MALLOC,
        })
        .fold(0, |bits, bit| bits | bit)
}

/// `memtrace run`: once released, the waiting shell execs the command; its memory map
/// is only worth reading after that.
pub(super) async fn wait_for_exec(pid: u32, before: Option<std::path::PathBuf>) {
    for _ in 0..500 {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        if exe.is_none() || exe != before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    warn!("process {pid} did not exec within 5s; its symbols may be missing");
}
