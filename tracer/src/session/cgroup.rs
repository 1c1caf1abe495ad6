//! `--cgroup PATH`: every process of a cgroup (v1 or v2, with its descendants), those that
//! join later included.
//!
//! The kernel follows the cgroup itself (see `tracer-ebpf/src/probes/cgroup.rs`): a process
//! is traced from the moment it is moved in (`cgroup:cgroup_attach_task`), a child of a
//! traced process from its fork, and on v2 a process spawned straight into the cgroup from
//! its exec. Userspace seeds the traced set from `cgroup.procs` and rescans the cgroup's
//! tree each second, which adds sub-cgroups made after the start (the kernel side matches
//! cgroup ids, and a new directory has a new id) and catches what the events missed (a
//! process spawned into a v2 cgroup that never execs, an event lost to a full ring buffer).

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::bpf::CgroupFilter;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Where hybrid systems (systemd's default before v2-only) mount the v2 hierarchy.
const UNIFIED_ROOT: &str = "/sys/fs/cgroup/unified";
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// Sub-cgroups followed at most (the kernel table's size).
const MAX_CGROUPS: usize = tracer_common::CGROUPS_MAX as usize;

/// A traced cgroup and the sub-cgroups known so far.
pub(super) struct CgroupWatch {
    /// The cgroup's directory.
    pub(super) path: PathBuf,
    /// 0 for v2, else the v1 hierarchy's id.
    pub(super) hierarchy: u32,
    known: HashSet<u64>,
}

/// What a scan of the cgroup's tree found.
#[derive(Debug, Default)]
pub(super) struct Scan {
    /// Cgroup ids not seen before.
    pub(super) new_ids: Vec<u64>,
    /// Every process in the tree now.
    pub(super) pids: Vec<u32>,
}

impl CgroupWatch {
    /// The cgroup at `path`: a directory of a mounted cgroup file system, or a cgroup path as
    /// `/proc/PID/cgroup` and systemd name it (`/system.slice/app.service`), looked up under
    /// `/sys/fs/cgroup` (and its `unified` v2 mount on hybrid systems).
    pub(super) fn open(path: &Path) -> anyhow::Result<Self> {
        let dir = find_dir(path)?;
        let hierarchy = hierarchy_of(&dir)?;
        Ok(Self { path: dir, hierarchy, known: HashSet::new() })
    }

    /// What the kernel side is seeded with: the cgroup and its sub-cgroups now.
    pub(super) fn filter(&mut self) -> anyhow::Result<(CgroupFilter, Vec<u32>)> {
        let scan = self.scan().with_context(|| format!("read cgroup {}", self.path.display()))?;
        Ok((CgroupFilter { hierarchy: self.hierarchy, ids: scan.new_ids }, scan.pids))
    }

    /// Adds the cgroup's processes to `pids` (after those named); returns what the kernel
    /// side is seeded with. An error when there is no process to start from.
    pub(super) fn add_members(&mut self, pids: &mut Vec<u32>) -> anyhow::Result<CgroupFilter> {
        let (filter, members) = self.filter()?;
        for p in members {
            if !pids.contains(&p) {
                pids.push(p);
            }
        }
        if pids.is_empty() {
            bail!(
                "{} has no processes now: memtrace needs one to start from; start the service (or give a PID too), then attach",
                self.describe()
            );
        }
        Ok(filter)
    }

    /// Walks the cgroup's tree: its new sub-cgroups, and every process in it.
    pub(super) fn scan(&mut self) -> std::io::Result<Scan> {
        let mut scan = Scan::default();
        let mut dirs = vec![self.path.clone()];
        let mut first = true;
        while let Some(dir) = dirs.pop() {
            let meta = match std::fs::metadata(&dir) {
                Ok(meta) => meta,
                // A sub-cgroup removed while walking; the cgroup itself must be there.
                Err(e) if !first && e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            first = false;
            if self.known.len() < MAX_CGROUPS && self.known.insert(meta.ino()) {
                scan.new_ids.push(meta.ino());
            }
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                scan.pids.extend(parse_procs(&text));
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                dirs.extend(
                    entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()),
                );
            }
        }
        scan.pids.sort_unstable();
        scan.pids.dedup();
        Ok(scan)
    }

    /// `v1 memory cgroup /sys/fs/cgroup/memory/app` for messages.
    pub(super) fn describe(&self) -> String {
        let version = if self.hierarchy == 0 { "v2" } else { "v1" };
        format!("{version} cgroup {}", self.path.display())
    }
}

impl super::state::Session {
    /// Each second: sub-cgroups made since the last scan are traced, and processes in the
    /// cgroup that the kernel side did not announce are traced from now on.
    pub(super) fn rescan_cgroup(&mut self) {
        let Some(watch) = self.cgroup.as_mut() else { return };
        let scan = match watch.scan() {
            Ok(scan) => scan,
            Err(e) => {
                log::debug!("rescan {}: {e}", watch.path.display());
                return;
            }
        };
        for id in scan.new_ids {
            if let Err(e) = self.tracer.trace_cgroup(id) {
                log::warn!("{e}");
            }
        }
        for pid in scan.pids {
            if self.procs.is_running(pid) {
                continue;
            }
            // Traced by the kernel already: it joined, and its event is yet to be read.
            let joined = self.tracer.is_traced(pid);
            if !joined && let Err(e) = self.tracer.trace_process(pid) {
                log::warn!("{e}");
                continue;
            }
            let how = if joined { "which joined the cgroup" } else { "found in the cgroup" };
            log::info!("following process {pid} ({}), {how}", crate::procfs::comm(pid));
            self.procs.add_joined(pid);
        }
    }
}

pub(crate) fn parse_procs(text: &str) -> impl Iterator<Item = u32> + '_ {
    text.lines().filter_map(|l| l.trim().parse().ok()).filter(|&p| p != 0)
}

/// The cgroup directory `path` names.
fn find_dir(path: &Path) -> anyhow::Result<PathBuf> {
    let mut tried = vec![path.to_path_buf()];
    if !path.exists() && path.is_absolute() {
        let relative = path.strip_prefix("/").unwrap_or(path);
        tried.extend([Path::new(CGROUP_ROOT).join(relative), Path::new(UNIFIED_ROOT).join(relative)]);
    }
    let Some(dir) = tried.iter().find(|p| p.join("cgroup.procs").is_file()) else {
        bail!(
            "{} is not a cgroup: no cgroup.procs in {} (give a directory under {CGROUP_ROOT}, e.g. \
             {CGROUP_ROOT}/system.slice/app.service, or the path /proc/PID/cgroup shows)",
            path.display(),
            tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" or ")
        );
    };
    dir.canonicalize().with_context(|| format!("resolve {}", dir.display()))
}

/// The hierarchy id of the cgroup file system holding `dir`.
fn hierarchy_of(dir: &Path) -> anyhow::Result<u32> {
    match fs_type(dir)? {
        CGROUP2_SUPER_MAGIC => Ok(0),
        CGROUP_SUPER_MAGIC => {
            let mountinfo =
                std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
            let options = v1_mount_options(&mountinfo, dir).with_context(|| {
                format!("no cgroup mount holds {} in /proc/self/mountinfo", dir.display())
            })?;
            let own = std::fs::read_to_string("/proc/self/cgroup").context("read /proc/self/cgroup")?;
            v1_hierarchy(&own, &options).with_context(|| {
                format!(
                    "no hierarchy in /proc/self/cgroup matches the mount options {options:?} of {}",
                    dir.display()
                )
            })
        }
        other => bail!("{} is not on a cgroup file system (file system type {other:#x})", dir.display()),
    }
}

fn fs_type(dir: &Path) -> anyhow::Result<i64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).context("path with a NUL byte")?;
    // SAFETY: a zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and pointer to a local statfs.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statfs {}", dir.display()));
    }
    Ok(st.f_type)
}

/// The super options (`rw,memory`, `rw,name=systemd`) of the v1 cgroup mount holding `dir`:
/// the longest mount point that contains it.
pub(crate) fn v1_mount_options(mountinfo: &str, dir: &Path) -> Option<Vec<String>> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            let mut right = right.split_whitespace();
            let (fstype, _source, options) = (right.next()?, right.next()?, right.next()?);
            (fstype == "cgroup" && dir.starts_with(mount_point))
                .then(|| (mount_point.len(), options.split(',').map(str::to_string).collect()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, options)| options)
}

/// The id of the v1 hierarchy whose controllers (`memory`, `cpu,cpuacct`, `name=systemd`)
/// are all among a mount's `options`, from `/proc/self/cgroup` (`4:memory:/`).
pub(crate) fn v1_hierarchy(proc_cgroup: &str, options: &[String]) -> Option<u32> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let id: u32 = parts.next()?.parse().ok()?;
        let controllers = parts.next()?;
        (id != 0 && !controllers.is_empty() && controllers.split(',').all(|c| options.iter().any(|o| o == c)))
            .then_some(id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 30 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
39 30 0:35 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
40 30 0:36 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PROC_CGROUP: &str = "9:name=systemd:/\n7:cpu,cpuacct:/\n4:memory:/app\n1:cpu:/\n0::/\n";

    fn hierarchy(dir: &str) -> Option<u32> {
        let options = v1_mount_options(MOUNTINFO, Path::new(dir))?;
        v1_hierarchy(PROC_CGROUP, &options)
    }

    #[test]
    fn a_v1_cgroup_is_found_in_its_hierarchy() {
        assert_eq!(hierarchy("/sys/fs/cgroup/memory/app/worker"), Some(4));
        assert_eq!(hierarchy("/sys/fs/cgroup/systemd/system.slice/app.service"), Some(9));
        assert_eq!(hierarchy("/sys/fs/cgroup/cpu,cpuacct/app"), Some(7), "a mount of two controllers");
        assert_eq!(hierarchy("/sys/fs/cgroup/unified/app"), None, "v2 is told by its file system type");
    }

    #[test]
    fn cgroup_procs_lists_processes() {
        assert_eq!(parse_procs("12\n4242\n\n0\n").collect::<Vec<_>>(), vec![12, 4242]);
    }

    #[test]
    fn a_path_that_is_no_cgroup_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = CgroupWatch::open(dir.path()).err().expect("a temp dir is not a cgroup");
        assert!(err.to_string().contains("is not a cgroup"), "{err:#}");
        let err = CgroupWatch::open(Path::new("/no/such/unit.service")).err().expect("missing");
        let text = err.to_string();
        assert!(text.contains("/sys/fs/cgroup/no/such/unit.service"), "the paths tried are named: {text}");
    }
}
