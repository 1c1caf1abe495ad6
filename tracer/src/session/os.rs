//! The traced process as the operating system shows it: its pid, its exit, its exec.

use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    time::Duration,
};

use anyhow::{Context as _, bail};
use log::warn;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{Signal, SignalKind, signal},
};
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

/// The signals that stop tracing with a report: Ctrl-C, SIGTERM, and SIGHUP (a closed
/// terminal or ssh session) unless memtrace was started with SIGHUP ignored (`nohup`),
/// which keeps its meaning. Installed once, before anything is attached; signals that come
/// before [`Self::recv`] is awaited are kept, not lost.
pub struct StopSignals {
    term: Signal,
    int: Signal,
    hup: Option<Signal>,
}

impl StopSignals {
    pub fn install() -> anyhow::Result<Self> {
        let install = |kind, name: &str| signal(kind).with_context(|| format!("install the {name} handler"));
        let hup = if hangup_ignored() { None } else { Some(install(SignalKind::hangup(), "SIGHUP")?) };
        Ok(Self {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            hup,
        })
    }

    /// Waits for any of them.
    pub async fn recv(&mut self) {
        let hup = async {
            match self.hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
            () = hup => {}
        }
    }
}

/// Whether SIGHUP is ignored in this process (as `nohup` leaves it).
fn hangup_ignored() -> bool {
    // SAFETY: a zeroed sigaction is a valid out-parameter; a null new action only queries.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a local sigaction; SIGHUP is a valid signal.
    let rc = unsafe { libc::sigaction(libc::SIGHUP, std::ptr::null(), &raw mut old) };
    rc == 0 && old.sa_sigaction == libc::SIG_IGN
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
            wait_for_loader(pid).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    warn!("process {pid} did not exec within 5s; its symbols may be missing");
}

/// Right after the exec the dynamic loader is still mapping the libraries: a memory map
/// read then lacks libc, and the first stacks through it lose frames. Waits until the
/// executable mappings stop changing (a few milliseconds; at most half a second).
async fn wait_for_loader(pid: u32) {
    let executable = || {
        std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_or(0, |maps| crate::procfs::maps::parse_maps(&maps).iter().filter(|m| m.executable).count())
    };
    let (mut last, mut same) = (executable(), 0);
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = executable();
        same = if now == last { same + 1 } else { 0 };
        if same >= 2 {
            return;
        }
        last = now;
    }
}

/// Right after an exec the C library is mapped a moment after the executable: waits, up
/// to half a second and without blocking the runtime, until `pid`'s allocator is found.
pub(super) async fn wait_for_allocator(pid: u32, node_buffers: bool) {
    for _ in 0..25 {
        match crate::bpf::uprobe::resolve(pid, node_buffers) {
            Err(crate::bpf::uprobe::UprobeError::NoAllocator { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => return,
        }
    }
}

/// Lets a process that `uprobe_exit` stopped go on (`SIGCONT`).
pub(super) fn resume(pid: u32) {
    // SAFETY: kill has no memory preconditions; the pid is the traced command's.
    if unsafe { libc::kill(pid.cast_signed(), libc::SIGCONT) } != 0 {
        log::debug!("resume process {pid}: {}", std::io::Error::last_os_error());
    }
}
