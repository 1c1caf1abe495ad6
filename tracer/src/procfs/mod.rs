//! What memtrace reads about a process from /proc.

pub mod access;
pub mod exit;
pub mod maps;
pub mod smaps;

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// Memory figures from /proc/PID/status, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStatus {
    pub rss: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
    pub rss_shmem: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub tgid: u32,
    pub mem: MemStatus,
}

/// Parses /proc/PID/status text.
#[must_use]
pub fn parse_status(text: &str) -> Status {
    let mut s = Status::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let mut words = value.split_whitespace();
        let num: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
        let bytes = if words.next() == Some("kB") { num.saturating_mul(1024) } else { num };
        match key {
            "Tgid" => s.tgid = num as u32,
            "VmRSS" => s.mem.rss = bytes,
            "RssAnon" => s.mem.rss_anon = bytes,
            "RssFile" => s.mem.rss_file = bytes,
            "RssShmem" => s.mem.rss_shmem = bytes,
            _ => {}
        }
    }
    s
}

pub fn status(pid: u32) -> io::Result<Status> {
    fs::read_to_string(format!("/proc/{pid}/status")).map(|t| parse_status(&t))
}

#[must_use]
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim_end().to_string()).unwrap_or_default()
}

#[must_use]
pub fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(String::from_utf8_lossy)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// End of the `[heap]` mapping (the program break), if the process has a heap yet;
/// otherwise `start_brk` from /proc/PID/stat.
#[must_use]
pub fn program_break(pid: u32) -> Option<u64> {
    if let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps"))
        && let Some(line) = maps.lines().find(|l| l.ends_with("[heap]"))
    {
        let range = line.split_whitespace().next()?;
        let (_, end) = range.split_once('-')?;
        return u64::from_str_radix(end, 16).ok();
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_field(&stat, 47)?.parse().ok()
}

/// Field `n` (1-based, as numbered in proc(5): 22 is `starttime`, 47 `start_brk`) of the
/// text of `/proc/PID/stat`.
#[must_use]
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    // The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name.
    after_comm.split_whitespace().nth(n.checked_sub(3)?)
}

/// Memory cgroup of a process and its limit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Memcg {
    /// Path inside the cgroup hierarchy, e.g. `/memtrace-test`.
    pub path: String,
    /// Limit in bytes; 0 when unlimited or unknown.
    pub limit_bytes: u64,
    /// The cgroup's directory (v1 memory controller or v2 unified hierarchy).
    pub dir: PathBuf,
    pub v1: bool,
}

impl Memcg {
    fn read(&self, v1_file: &str, v2_file: &str) -> Option<String> {
        fs::read_to_string(self.dir.join(if self.v1 { v1_file } else { v2_file })).ok()
    }

    /// Memory charged to the cgroup now.
    #[must_use]
    pub fn usage_bytes(&self) -> Option<u64> {
        self.read("memory.usage_in_bytes", "memory.current")?.trim().parse().ok()
    }

    /// OOM kills the kernel made in this cgroup (`oom_kill` of `memory.oom_control` on v1,
    /// of `memory.events` on v2).
    #[must_use]
    pub fn oom_kills(&self) -> Option<u64> {
        let text = self.read("memory.oom_control", "memory.events")?;
        parse_keyed(&text, "oom_kill")
    }

    /// How often usage hit the limit (`memory.failcnt` on v1, `max` of `memory.events`
    /// on v2). Unlike `oom_kills`, it has already moved when `oom:mark_victim` fires.
    #[must_use]
    pub fn limit_hits(&self) -> Option<u64> {
        if self.v1 {
            self.read("memory.failcnt", "")?.trim().parse().ok()
        } else {
            parse_keyed(&self.read("", "memory.events")?, "max")
        }
    }
}

/// The value of `key` in a `key value` per line file.
#[must_use]
pub fn parse_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Parses /proc/PID/cgroup: the v1 `memory` controller line wins, else the v2 `0::` line.
#[must_use]
pub fn parse_cgroup(text: &str) -> Option<(bool, String)> {
    let mut v2 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            return Some((true, path.to_string()));
        }
        if controllers.is_empty() {
            v2 = Some((false, path.to_string()));
        }
    }
    v2
}

/// Parses a limit file (`memory.limit_in_bytes` or `memory.max`); `max` and the v1
/// "unlimited" value (near `u64::MAX`, page-rounded) become 0.
#[must_use]
pub fn parse_limit(text: &str) -> u64 {
    let t = text.trim();
    if t == "max" {
        return 0;
    }
    match t.parse::<u64>() {
        Ok(v) if v >= (1 << 62) => 0,
        Ok(v) => v,
        Err(_) => 0,
    }
}

/// The memory cgroup of `pid`, found under `root` (normally `/sys/fs/cgroup`).
#[must_use]
pub fn memcg_under(root: &Path, cgroup_file: &str) -> Option<Memcg> {
    let (v1, path) = parse_cgroup(cgroup_file)?;
    let rel = path.trim_start_matches('/');
    let candidates: Vec<(PathBuf, &str)> = if v1 {
        vec![(root.join("memory").join(rel), "memory.limit_in_bytes")]
    } else {
        vec![(root.join(rel), "memory.max"), (root.join("unified").join(rel), "memory.max")]
    };
    let (dir, limit_bytes) = candidates
        .iter()
        .find_map(|(dir, file)| {
            fs::read_to_string(dir.join(file)).ok().map(|t| (dir.clone(), parse_limit(&t)))
        })
        .unwrap_or_else(|| (candidates[0].0.clone(), 0));
    Some(Memcg { path, limit_bytes, dir, v1 })
}

#[must_use]
pub fn memcg(pid: u32) -> Option<Memcg> {
    memcg_under(Path::new("/sys/fs/cgroup"), &fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let s = parse_status(
            "Name:\tnode\nTgid:\t412\nVmRSS:\t  2048 kB\nRssAnon:\t 1024 kB\nRssFile:\t 1000 kB\nRssShmem:\t 24 kB\n",
        );
        assert_eq!(s.tgid, 412);
        assert_eq!(
            s.mem,
            MemStatus {
                rss: 2048 * 1024,
                rss_anon: 1024 * 1024,
                rss_file: 1000 * 1024,
                rss_shmem: 24 * 1024
            }
        );
    }

    /// Found by `cargo fuzz run proc_status`: a kB count past `u64::MAX / 1024` overflowed.
    #[test]
    fn huge_kb_counts_saturate() {
        let s = parse_status("VmRSS:\t18446744073709551 kB\n");
        assert_eq!(s.mem.rss, u64::MAX);
    }

    #[test]
    fn cgroup_v1_and_v2() {
        let v1 = "12:pids:/\n4:memory:/memtrace-test\n0::/\n";
        assert_eq!(parse_cgroup(v1), Some((true, "/memtrace-test".into())));
        let v2 = "0::/system.slice/app.service\n";
        assert_eq!(parse_cgroup(v2), Some((false, "/system.slice/app.service".into())));
        assert_eq!(parse_limit("max\n"), 0);
        assert_eq!(parse_limit("9223372036854771712\n"), 0);
        assert_eq!(parse_limit("209715200\n"), 200 << 20);
    }

    #[test]
    fn memcg_files_on_v1_and_v2_layouts() {
        let root = tempfile::tempdir().expect("tempdir");
        let v1 = root.path().join("memory/app");
        fs::create_dir_all(&v1).expect("mkdir");
        fs::write(v1.join("memory.limit_in_bytes"), "209715200\n").expect("write");
        fs::write(v1.join("memory.usage_in_bytes"), "104857600\n").expect("write");
        fs::write(v1.join("memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
            .expect("write");
        fs::write(v1.join("memory.failcnt"), "17\n").expect("write");
        let m = memcg_under(root.path(), "4:memory:/app\n0::/\n").expect("v1 memcg");
        assert_eq!(m.limit_hits(), Some(17));
        assert!(m.v1);
        assert_eq!((m.limit_bytes, m.usage_bytes(), m.oom_kills()), (200 << 20, Some(100 << 20), Some(2)));

        let v2 = root.path().join("svc");
        fs::create_dir_all(&v2).expect("mkdir");
        fs::write(v2.join("memory.max"), "max\n").expect("write");
        fs::write(v2.join("memory.current"), "4096\n").expect("write");
        fs::write(v2.join("memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").expect("write");
        let m = memcg_under(root.path(), "0::/svc\n").expect("v2 memcg");
        assert_eq!(m.limit_hits(), Some(3));
        assert!(!m.v1);
        assert_eq!((m.limit_bytes, m.usage_bytes(), m.oom_kills()), (0, Some(4096), Some(1)));
        assert_eq!(m.path, "/svc");
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert_eq!(status(me).expect("own status").tgid, me);
        assert!(!comm(me).is_empty());
        assert!(program_break(me).is_some());
    }
}
