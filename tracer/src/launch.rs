//! `memtrace run`: whom the command runs as, and what node leaves behind.
//!
//! memtrace runs as root (it loads eBPF programs), usually through sudo; the command it
//! launches is the user's and runs as the user who ran sudo (`SUDO_UID`/`SUDO_GID`), with
//! that user's groups, home and name, unless `--as-root`. A root-owned process would write
//! root-owned files into the user's directories and see root's environment.

use std::{
    ffi::{CStr, CString},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use log::debug;

/// The user a command runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from the group database, as a login would get).
    pub groups: Vec<u32>,
    pub name: Option<String>,
    pub home: Option<PathBuf>,
}

impl RunAs {
    /// The user who ran `sudo memtrace`, when memtrace runs as root through sudo for
    /// someone else; `None` otherwise (the command then runs as memtrace does).
    #[must_use]
    pub fn invoking_user() -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let uid: u32 = std::env::var("SUDO_UID").ok()?.trim().parse().ok().filter(|&u| u != 0)?;
        let entry = passwd(uid);
        let gid = std::env::var("SUDO_GID")
            .ok()
            .and_then(|g| g.trim().parse().ok())
            .or(entry.as_ref().map(|e| e.gid))
            .unwrap_or(uid);
        let name = entry.as_ref().map(|e| e.name.clone());
        let groups = name.as_deref().map_or_else(|| vec![gid], |n| group_list(n, gid));
        Some(Self { uid, gid, groups, name, home: entry.map(|e| e.home) })
    }

    /// `uid 1000 (alice)`.
    #[must_use]
    pub fn describe(&self) -> String {
        match &self.name {
            Some(name) => format!("uid {} ({name})", self.uid),
            None => format!("uid {}", self.uid),
        }
    }

    /// Makes `cmd` run as this user: groups, gid then uid are set in the child before it
    /// execs, and `HOME`, `USER` and `LOGNAME` name the user.
    pub fn apply(&self, cmd: &mut Command) {
        if let Some(home) = &self.home {
            cmd.env("HOME", home);
        }
        if let Some(name) = &self.name {
            cmd.env("USER", name).env("LOGNAME", name);
        }
        let (uid, gid, groups) = (self.uid, self.gid, self.groups.clone());
        // SAFETY: between fork and exec the hook only makes the setgroups(2), setgid(2) and
        // setuid(2) system calls (async-signal-safe), on memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

struct PasswdEntry {
    name: String,
    gid: u32,
    home: PathBuf,
}

fn passwd(uid: u32) -> Option<PasswdEntry> {
    let mut buf = vec![0_u8; 16 * 1024];
    // SAFETY: a zeroed passwd is a valid out-parameter.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the strings it sets point into `buf`.
    let rc =
        unsafe { libc::getpwuid_r(uid, &raw mut pwd, buf.as_mut_ptr().cast(), buf.len(), &raw mut result) };
    if rc != 0 || result.is_null() {
        debug!("no passwd entry for uid {uid}");
        return None;
    }
    // SAFETY: on success the fields are NUL-terminated strings inside `buf`, alive here.
    let (name, home) = unsafe { (CStr::from_ptr(pwd.pw_name), CStr::from_ptr(pwd.pw_dir)) };
    Some(PasswdEntry {
        name: name.to_string_lossy().into_owned(),
        gid: pwd.pw_gid,
        home: PathBuf::from(home.to_string_lossy().into_owned()),
    })
}

/// The groups `name` belongs to, `gid` first.
fn group_list(name: &str, gid: u32) -> Vec<u32> {
    let Ok(c_name) = CString::new(name) else { return vec![gid] };
    let mut groups = vec![0_u32; 64];
    for _ in 0..2 {
        let mut n = i32::try_from(groups.len()).unwrap_or(i32::MAX);
        // SAFETY: valid NUL-terminated name and a buffer of `n` gids.
        let rc = unsafe { libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &raw mut n) };
        let n = usize::try_from(n).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(n);
            return groups;
        }
        // Too small: `n` says how many there are.
        groups.resize(n.max(groups.len() * 2), 0);
    }
    vec![gid]
}

/// V8 writes `isolate-0x<address>-<pid>-v8.log` into the working directory when node runs
/// with `--perf-basic-prof` (which memtrace's JS names rely on). Removes those that the
/// processes `pids` wrote into `dir` since `since`, unless node was asked for a log
/// (`--prof`, `--log…`, in `cmdline`); returns the files removed.
pub fn remove_v8_logs(dir: &Path, pids: &[u32], since: SystemTime, cmdline: &[String]) -> Vec<PathBuf> {
    if cmdline.iter().any(|a| a == "--prof" || a.starts_with("--log")) {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(v8_log_pid) else { continue };
        let fresh = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t >= since);
        if pids.contains(&pid) && fresh && std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// The pid in `isolate-0x3f1c2d0-4242-v8.log`.
fn v8_log_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("isolate-0x")?.strip_suffix("-v8.log")?;
    let (address, pid) = rest.split_once('-')?;
    (!address.is_empty() && address.bytes().all(|b| b.is_ascii_hexdigit())).then_some(())?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v8_log_names() {
        assert_eq!(v8_log_pid("isolate-0x380b1cd0-31804-v8.log"), Some(31804));
        assert_eq!(v8_log_pid("isolate-0x380b1cd0-v8.log"), None);
        assert_eq!(v8_log_pid("isolate-0xzz-12-v8.log"), None);
        assert_eq!(v8_log_pid("notes-12-v8.log"), None);
    }

    #[test]
    fn only_the_traced_processes_fresh_logs_are_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let since = SystemTime::now() - std::time::Duration::from_secs(1);
        for name in ["isolate-0xab-100-v8.log", "isolate-0xcd-200-v8.log", "notes.txt"] {
            std::fs::write(dir.path().join(name), "x").expect("write");
        }
        let removed = remove_v8_logs(dir.path(), &[100], since, &["node".into(), "app.js".into()]);
        assert_eq!(removed, vec![dir.path().join("isolate-0xab-100-v8.log")]);
        assert!(dir.path().join("isolate-0xcd-200-v8.log").exists(), "another process's log stays");
        let asked = remove_v8_logs(dir.path(), &[200], since, &["node".into(), "--prof".into()]);
        assert!(asked.is_empty(), "a log node was asked for stays");
        let later = SystemTime::now() + std::time::Duration::from_mins(1);
        assert!(remove_v8_logs(dir.path(), &[200], later, &[]).is_empty(), "an older log stays");
    }

    #[test]
    fn without_sudo_the_command_runs_as_memtrace() {
        // The test runs without SUDO_UID, or as a non-root user: either way, no switch.
        if std::env::var_os("SUDO_UID").is_none() {
            assert_eq!(RunAs::invoking_user(), None);
        }
        let root = passwd(0).expect("root has a passwd entry");
        assert_eq!((root.name.as_str(), root.gid), ("root", 0));
        assert_eq!(group_list("root", 0).first(), Some(&0));
    }
}
