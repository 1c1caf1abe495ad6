//! Parsing of `/proc/PID/maps` and the few `/proc/PID/status` fields the symbolizer and
//! the uprobe attacher need.

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    /// File offset of `start`.
    pub offset: u64,
    /// `major:minor` as written by the kernel, packed as `major << 32 | minor`.
    pub dev: u64,
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`, `[vdso]`, `[anon:...]`); empty for plain anonymous memory.
    pub path: String,
}

impl MapEntry {
    /// Backed by a file on disk (not anonymous memory nor a pseudo-mapping like `[vdso]`).
    #[must_use]
    pub fn is_file_backed(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }

    #[cfg(test)]
    #[must_use]
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// The path without the ` (deleted)` marker the kernel appends to unlinked files.
    #[must_use]
    pub fn path_on_disk(&self) -> &str {
        self.path.strip_suffix(" (deleted)").unwrap_or(&self.path)
    }
}

/// Parses the whole text of a maps file. Lines that do not parse are skipped (the format
/// is the kernel's, so a bad line means a format we do not know rather than bad input).
pub(crate) fn parse_maps(text: &str) -> Vec<MapEntry> {
    text.lines()
        .filter_map(|line| {
            let entry = parse_maps_line(line);
            if entry.is_none() && !line.trim().is_empty() {
                log::debug!("skipping unparsable maps line {line:?}");
            }
            entry
        })
        .collect()
}

/// `start-end perms offset dev inode   path`; the path may contain spaces.
fn parse_maps_line(line: &str) -> Option<MapEntry> {
    let mut rest = line;
    let mut field = || {
        let trimmed = rest.trim_start();
        let end = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
        let (head, tail) = trimmed.split_at(end);
        rest = tail;
        (!head.is_empty()).then_some(head)
    };
    let range = field()?;
    let perms = field()?.as_bytes();
    let offset = field()?;
    let dev = field()?;
    let inode = field()?;
    let path = rest.trim_start().to_string();

    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if perms.len() < 4 || end < start {
        return None;
    }
    let (major, minor) = dev.split_once(':')?;
    let dev = (u64::from_str_radix(major, 16).ok()? << 32) | u64::from_str_radix(minor, 16).ok()?;
    Some(MapEntry {
        start,
        end,
        readable: perms[0] == b'r',
        writable: perms[1] == b'w',
        executable: perms[2] == b'x',
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev,
        inode: inode.parse().ok()?,
        path,
    })
}

/// What the symbolizer needs from `/proc/PID/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ProcStatus {
    /// Real and effective uid.
    pub uids: Vec<u32>,
    /// The pid as seen in the process's own (innermost) pid namespace: the last `NSpid` value.
    pub ns_pid: Option<u32>,
}

pub(crate) fn parse_status(text: &str) -> ProcStatus {
    let mut status = ProcStatus::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Uid:") {
            status.uids = rest.split_whitespace().take(2).filter_map(|uid| uid.parse().ok()).collect();
        } else if let Some(rest) = line.strip_prefix("NSpid:") {
            status.ns_pid = rest.split_whitespace().last().and_then(|pid| pid.parse().ok());
        }
    }
    status
}

/// The start time (in clock ticks since boot) from the text of `/proc/PID/stat`: with the
/// pid, it identifies a process across pid reuse.
pub(crate) fn parse_start_time(stat: &str) -> Option<u64> {
    crate::procfs::stat_field(stat, 22)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
00400000-00b6f000 r--p 00000000 fe:01 1048602                            /usr/bin/node
00b6f000-00b71000 r-xp 0076f000 fe:01 1048602                            /usr/bin/node
2a6e8d440000-2a6e8d480000 rwxp 00000000 00:00 0 
55d4c7a2e000-55d4c7b4f000 rw-p 00000000 00:00 0                          [heap]
7f1c2e228000-7f1c2e37d000 r-xp 00028000 fe:01 1316177                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2e400000-7f1c2e401000 r-xp 00001000 08:10 42                         /tmp/my lib.so (deleted)
7ffd5a1f0000-7ffd5a211000 rw-p 00000000 00:00 0                          [stack]
7ffd5a3c4000-7ffd5a3c6000 r-xp 00000000 00:00 0                          [vdso]
this line is garbage
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_sample_maps() {
        let maps = parse_maps(SAMPLE);
        assert_eq!(maps.len(), 9, "garbage line must be skipped: {maps:#?}");

        let text = &maps[1];
        assert_eq!((text.start, text.end, text.offset), (0xb6_f000, 0xb7_1000, 0x76_f000));
        assert!(text.readable && text.executable && !text.writable);
        assert_eq!(text.dev, (0xfe << 32) | 1);
        assert_eq!(text.inode, 1_048_602);
        assert_eq!(text.path, "/usr/bin/node");
        assert!(text.is_file_backed());

        let jit = &maps[2];
        assert!(jit.executable && jit.writable);
        assert_eq!(jit.path, "");
        assert!(!jit.is_file_backed());

        assert_eq!(maps[3].path, "[heap]");
        assert!(!maps[3].is_file_backed());

        let deleted = &maps[5];
        assert_eq!(deleted.path, "/tmp/my lib.so (deleted)");
        assert_eq!(deleted.path_on_disk(), "/tmp/my lib.so");
        assert_eq!(deleted.dev, (8 << 32) | 0x10);

        let vdso = &maps[7];
        assert!(vdso.executable && !vdso.is_file_backed());
        assert!(vdso.contains(0x7ffd_5a3c_4000) && !vdso.contains(0x7ffd_5a3c_6000));
        assert_eq!(maps[8].end, 0xffff_ffff_ff60_1000);
    }

    #[test]
    fn parses_own_maps() {
        let text = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
        let maps = parse_maps(&text);
        assert_eq!(maps.len(), text.lines().count(), "every line of a real maps file parses");
        assert!(maps.iter().any(|m| m.executable && m.is_file_backed()));
    }

    #[test]
    fn parses_start_time() {
        let stat =
            "4242 (node (worker) x) S 1 4242 4242 0 -1 4194560 9 0 0 0 1 2 0 0 20 0 11 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("garbage"), None);
        let own = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
        assert!(parse_start_time(&own).is_some_and(|t| t > 0));
    }

    #[test]
    fn parses_status() {
        let text = "Name:\tnode\nUid:\t1000\t1001\t1000\t1000\nGid:\t0\t0\t0\t0\nNSpid:\t4242\t7\n";
        let status = parse_status(text);
        assert_eq!(status.uids, vec![1000, 1001]);
        assert_eq!(status.ns_pid, Some(7));

        let no_ns = parse_status("Uid:\t0\t0\t0\t0\nNSpid:\t12\n");
        assert_eq!(no_ns.ns_pid, Some(12));
        assert_eq!(parse_status("garbage"), ProcStatus::default());
    }
}
