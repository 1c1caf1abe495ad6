//! JIT symbols from the perf map a runtime writes (`node --perf-basic-prof` writes
//! `/tmp/perf-<pid>.map`): lines `START SIZE name`, hex without `0x`, append-only, and the
//! newest entry for an address wins.
//!
//! The file lives in an attacker-writable directory and memtrace runs as root, so it is
//! opened without following symlinks, must be a regular file, and must belong to the
//! target's user or to root.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::report::{Frame, FrameKind};

/// Module name given to JavaScript frames.
pub(crate) const JIT_MODULE: &str = "[jit]";
/// Module name given to V8's own generated code (builtins, stubs, handlers).
pub(crate) const V8_MODULE: &str = "[v8]";

/// Prefixes V8 uses for JavaScript code: `JS:` today, `LazyCompile:`/`Function:` in older
/// releases, `Script:`/`Eval:` for top-level code.
const JS_PREFIXES: &[&str] = &["JS:", "LazyCompile:", "Function:", "Script:", "Eval:"];
/// Prefixes V8 uses for code it generates itself.
const V8_PREFIXES: &[&str] = &[
    "Builtin:",
    "BytecodeHandler:",
    "Stub:",
    "RegExp:",
    "Handler:",
    "Callback:",
    "KeyedLoadIC:",
    "KeyedStoreIC:",
    "LoadIC:",
    "StoreIC:",
    "LoadGlobalIC:",
    "StoreGlobalIC:",
    "Wasm:",
];

/// Turns a perf-map symbol name into a frame.
///
/// `JS:*rememberOrder /srv/app.js:9:21` → `rememberOrder` at `/srv/app.js:9`, kind `Js`.
/// The optional marker after the prefix (`*` optimized, `~` interpreted, `^` baseline,
/// `+` maglev) is dropped.
pub(crate) fn parse_symbol(name: &str) -> Frame {
    let name = name.trim();
    if let Some(rest) = JS_PREFIXES.iter().find_map(|prefix| name.strip_prefix(prefix)) {
        let rest = rest.strip_prefix(['*', '~', '^', '+']).unwrap_or(rest);
        let (function, file, line) = split_location(rest);
        let function = function.trim();
        return Frame {
            function: if function.is_empty() { "(anonymous)".to_string() } else { function.to_string() },
            module: JIT_MODULE.to_string(),
            file: file.to_string(),
            line,
            kind: FrameKind::Js,
        };
    }
    if let Some(rest) = V8_PREFIXES.iter().find_map(|prefix| name.strip_prefix(prefix)) {
        return Frame {
            function: rest.trim().to_string(),
            module: V8_MODULE.to_string(),
            kind: FrameKind::Native,
            ..Frame::default()
        };
    }
    // Another runtime's JIT (or a V8 tag we do not know): keep the name as written.
    Frame {
        function: name.to_string(),
        module: JIT_MODULE.to_string(),
        kind: FrameKind::Native,
        ..Frame::default()
    }
}

/// Splits `name file:line[:column]` at the last space. Without a location after that space
/// the whole text is the name.
fn split_location(text: &str) -> (&str, &str, u32) {
    let Some((function, location)) = text.rsplit_once(' ') else {
        return (text, "", 0);
    };
    match parse_location(location) {
        Some((file, line)) => (function, file, line),
        None => (text, "", 0),
    }
}

/// `file:line:column` or `file:line`; the file itself may contain colons (`node:internal/...`).
fn parse_location(location: &str) -> Option<(&str, u32)> {
    let (head, last) = location.rsplit_once(':')?;
    let last: u32 = last.parse().ok()?;
    let (file, line) = match head.rsplit_once(':') {
        Some((file, line)) => match line.parse() {
            Ok(line) => (file, line),
            Err(_) => (head, last),
        },
        None => (head, last),
    };
    (!file.is_empty()).then_some((file, line))
}

#[derive(Clone, Debug)]
struct Entry {
    end: u64,
    frame: Frame,
}

/// The parsed content of a perf map, fed incrementally.
#[derive(Debug, Default)]
pub(crate) struct PerfMap {
    /// Non-overlapping ranges by start address.
    entries: BTreeMap<u64, Entry>,
    /// An incomplete last line, kept until the rest of it is written.
    pending: Vec<u8>,
    lines: u64,
    malformed: u64,
    /// Bumped whenever an entry replaces older ones, so cached lookups can be invalidated.
    generation: u64,
}

impl PerfMap {
    /// Parses every complete line of `bytes` (after what was left pending by the previous call).
    pub fn feed(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        let Some(last_newline) = self.pending.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.pending.drain(..=last_newline).collect();
        for line in complete[..last_newline].split(|&b| b == b'\n') {
            self.lines += 1;
            let line = String::from_utf8_lossy(line);
            if line.trim().is_empty() {
                continue;
            }
            if let Some((start, size, name)) = parse_line(&line) {
                self.insert(start, size, parse_symbol(name));
                continue;
            }
            self.malformed += 1;
            if self.malformed == 1 {
                log::warn!(
                    "perf map line {} is malformed and was skipped: {:?} (later malformed lines are counted, not logged)",
                    self.lines,
                    truncate(&line, 120)
                );
            }
        }
    }

    /// Adds `[start, start + size)`, dropping the older entries it overlaps: the newest wins.
    pub fn insert(&mut self, start: u64, size: u64, frame: Frame) {
        if size == 0 {
            return;
        }
        let end = start.saturating_add(size);
        let overlapped: Vec<u64> = self
            .entries
            .range(..end)
            .rev()
            .take_while(|(_, entry)| entry.end > start)
            .map(|(&s, _)| s)
            .collect();
        if !overlapped.is_empty() {
            // Addresses that had a name may now have another: cached answers are stale.
            self.generation += 1;
        }
        for s in overlapped {
            self.entries.remove(&s);
        }
        self.entries.insert(start, Entry { end, frame });
    }

    pub fn lookup(&self, addr: u64) -> Option<&Frame> {
        let (_, entry) = self.entries.range(..=addr).next_back()?;
        (addr < entry.end).then_some(&entry.frame)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn malformed_lines(&self) -> u64 {
        self.malformed
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// `START SIZE name` with hex numbers (a `0x` prefix is tolerated).
fn parse_line(line: &str) -> Option<(u64, u64, &str)> {
    let line = line.trim_end_matches('\r');
    let (start, rest) = line.trim_start().split_once(' ')?;
    let (size, name) = rest.trim_start().split_once(' ').unwrap_or((rest.trim_start(), ""));
    let hex = |s: &str| u64::from_str_radix(s.strip_prefix("0x").unwrap_or(s), 16).ok();
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    Some((hex(start)?, hex(size)?, name))
}

/// Why an existing perf map was not read.
#[derive(Debug)]
enum Refusal {
    Symlink,
    NotRegular,
    Owner(u32),
    Io(std::io::Error),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Symlink => write!(f, "it is a symbolic link"),
            Self::NotRegular => write!(f, "it is not a regular file"),
            Self::Owner(uid) => write!(f, "it is owned by uid {uid}, neither the target's user nor root"),
            Self::Io(err) => write!(f, "{err}"),
        }
    }
}

/// Reads a perf map file incrementally and keeps the parsed entries.
pub(crate) struct PerfMapReader {
    path: PathBuf,
    /// Owners accepted besides root: the target's real and effective uid.
    allowed_uids: Vec<u32>,
    file: Option<File>,
    offset: u64,
    warned: bool,
    map: PerfMap,
}

impl std::fmt::Debug for PerfMapReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerfMapReader")
            .field("path", &self.path)
            .field("open", &self.file.is_some())
            .field("offset", &self.offset)
            .field("entries", &self.map.entries.len())
            .field("malformed_lines", &self.map.malformed)
            .finish_non_exhaustive()
    }
}

impl PerfMapReader {
    pub fn new(path: PathBuf, allowed_uids: Vec<u32>) -> Self {
        Self { path, allowed_uids, file: None, offset: 0, warned: false, map: PerfMap::default() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn map(&self) -> &PerfMap {
        &self.map
    }

    /// Reads what was appended since the last call. Cheap when nothing changed (one
    /// `fstat`), or when there is no map (one failed `open`).
    pub fn refresh(&mut self) {
        if self.file.is_none() {
            match open_checked(&self.path, &self.allowed_uids) {
                Ok(Some(file)) => {
                    log::debug!("reading JIT symbols from {}", self.path.display());
                    self.file = Some(file);
                }
                Ok(None) => return,
                Err(refusal) => {
                    if !self.warned {
                        self.warned = true;
                        log::warn!("ignoring perf map {}: {refusal}", self.path.display());
                    }
                    return;
                }
            }
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let size = match file.metadata() {
            Ok(meta) => meta.len(),
            Err(err) => {
                log::debug!("fstat {}: {err}", self.path.display());
                return;
            }
        };
        if size == self.offset {
            return;
        }
        if size < self.offset {
            log::info!("perf map {} shrank; reading it again from the start", self.path.display());
            // Keep generations increasing so answers cached from the old content go stale.
            self.map = PerfMap { generation: self.map.generation + 1, ..PerfMap::default() };
            self.file = None;
            self.offset = 0;
            self.refresh();
            return;
        }
        let mut buf = Vec::new();
        match file.read_to_end(&mut buf) {
            Ok(n) => {
                self.offset += n as u64;
                self.map.feed(&buf);
            }
            Err(err) => log::debug!("read {}: {err}", self.path.display()),
        }
    }
}

/// Opens `path` if it exists and is safe to read; `Ok(None)` when it does not exist.
fn open_checked(path: &Path, allowed_uids: &[u32]) -> Result<Option<File>, Refusal> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => return Err(Refusal::Symlink),
        Err(err) => return Err(Refusal::Io(err)),
    };
    let meta = file.metadata().map_err(Refusal::Io)?;
    if !meta.file_type().is_file() {
        return Err(Refusal::NotRegular);
    }
    if meta.uid() != 0 && !allowed_uids.contains(&meta.uid()) {
        return Err(Refusal::Owner(meta.uid()));
    }
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::symlink;

    use super::*;

    fn frame(map: &PerfMap, addr: u64) -> Option<String> {
        map.lookup(addr).map(|f| f.function.clone())
    }

    #[test]
    fn parses_js_names() {
        let f = parse_symbol("JS:*rememberOrder /srv/app.js:9:21");
        assert_eq!(
            f,
            Frame {
                function: "rememberOrder".into(),
                module: "[jit]".into(),
                file: "/srv/app.js".into(),
                line: 9,
                kind: FrameKind::Js,
            }
        );
        let f = parse_symbol("JS:~handler /srv/app.js:30:5");
        assert_eq!((f.function.as_str(), f.file.as_str(), f.line), ("handler", "/srv/app.js", 30));

        let f = parse_symbol("JS:~ /srv/app.js:30:5");
        assert_eq!((f.function.as_str(), f.line, f.kind), ("(anonymous)", 30, FrameKind::Js));

        let f = parse_symbol("LazyCompile:*processTicksAndRejections node:internal/process/task_queues:67");
        assert_eq!(f.function, "processTicksAndRejections");
        assert_eq!((f.file.as_str(), f.line), ("node:internal/process/task_queues", 67));

        let f = parse_symbol("Function:^get size node:internal/url:12:3");
        assert_eq!((f.function.as_str(), f.file.as_str(), f.line), ("get size", "node:internal/url", 12));

        let f = parse_symbol("JS:+run file:///srv/app.mjs:1:1");
        assert_eq!((f.function.as_str(), f.file.as_str(), f.line), ("run", "file:///srv/app.mjs", 1));

        let f = parse_symbol("JS:*noLocation");
        assert_eq!((f.function.as_str(), f.file.as_str(), f.line), ("noLocation", "", 0));
    }

    #[test]
    fn parses_v8_names() {
        for (name, function) in [
            ("Builtin:ArrayPrototypePush", "ArrayPrototypePush"),
            ("Stub:CEntry_Return1", "CEntry_Return1"),
            ("BytecodeHandler:LdaZero", "LdaZero"),
            ("RegExp:(\\d+) x", "(\\d+) x"),
        ] {
            let f = parse_symbol(name);
            assert_eq!(
                (f.function.as_str(), f.module.as_str(), f.kind),
                (function, "[v8]", FrameKind::Native),
                "{name}"
            );
        }
        let other = parse_symbol("Lcom/example/Foo;::bar");
        assert_eq!((other.function.as_str(), other.module.as_str()), ("Lcom/example/Foo;::bar", "[jit]"));
    }

    #[test]
    fn newest_entry_wins_and_replaces_overlaps() {
        let mut map = PerfMap::default();
        map.feed(b"1000 100 JS:*a /a.js:1:1\n1100 100 JS:*b /b.js:2:1\n1200 100 JS:*c /c.js:3:1\n");
        assert_eq!(frame(&map, 0x1000).as_deref(), Some("a"));
        assert_eq!(frame(&map, 0x10ff).as_deref(), Some("a"));
        assert_eq!(frame(&map, 0x1150).as_deref(), Some("b"));
        assert_eq!(frame(&map, 0x1300), None);
        assert_eq!(frame(&map, 0xfff), None);
        let generation = map.generation();
        map.feed(b"5000 10 JS:*fresh /f.js:1:1\n");
        assert_eq!(map.generation(), generation, "new code elsewhere keeps cached names valid");

        // New code over the tail of `a` and the head of `b`: both old entries go.
        let generation = map.generation();
        map.feed(b"10f0 20 JS:*d /d.js:4:1\n");
        assert_ne!(map.generation(), generation, "replacing entries invalidates caches");
        assert_eq!(frame(&map, 0x10f0).as_deref(), Some("d"));
        assert_eq!(frame(&map, 0x1000), None, "overlapped older entry dropped");
        assert_eq!(frame(&map, 0x1150), None, "overlapped older entry dropped");
        assert_eq!(frame(&map, 0x1250).as_deref(), Some("c"));
        assert_eq!(map.len(), 3);

        // Same start, newer wins.
        map.feed(b"1200 100 JS:*e /e.js:5:1\n");
        assert_eq!(frame(&map, 0x1250).as_deref(), Some("e"));
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn skips_malformed_lines_and_keeps_partial_tail() {
        let mut map = PerfMap::default();
        map.feed(b"zzz 10 JS:*bad /x.js:1:1\n2000 10\n\n2100 10 JS:*ok /ok.js:7:1\n2200 1");
        assert_eq!(map.malformed_lines(), 2);
        assert_eq!(frame(&map, 0x2105).as_deref(), Some("ok"));
        assert_eq!(frame(&map, 0x2200), None, "partial line not parsed yet");

        map.feed(b"0 JS:*late /late.js:1:1\n");
        assert_eq!(frame(&map, 0x2200).as_deref(), Some("late"), "partial line completed");
        assert_eq!(frame(&map, 0x2300).as_deref(), None);
        assert_eq!(map.malformed_lines(), 2);
    }

    #[test]
    fn reader_reads_appended_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("perf-1.map");
        let mut file = File::create(&path).expect("create perf map");
        let mut reader = PerfMapReader::new(path.clone(), vec![file_owner_uid()]);
        file.write_all(b"3000 10 JS:*first /a.js:1:1\n3010 10 Builtin:Ar").expect("write");
        reader.refresh();
        assert_eq!(frame(reader.map(), 0x3000).as_deref(), Some("first"));
        assert_eq!(frame(reader.map(), 0x3010), None);
        reader.refresh();
        file.write_all(b"rayPrototypePush\n").expect("write");
        reader.refresh();
        assert_eq!(frame(reader.map(), 0x3015).as_deref(), Some("ArrayPrototypePush"));
    }

    #[test]
    fn missing_map_is_fine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reader = PerfMapReader::new(dir.path().join("perf-2.map"), vec![]);
        reader.refresh();
        assert_eq!(reader.map().len(), 0);
    }

    #[test]
    fn refuses_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("real.map");
        std::fs::write(&target, b"4000 10 JS:*secret /s.js:1:1\n").expect("write target");
        let link = dir.path().join("perf-3.map");
        symlink(&target, &link).expect("symlink");

        let mut reader = PerfMapReader::new(link.clone(), vec![file_owner_uid()]);
        reader.refresh();
        assert_eq!(reader.map().len(), 0, "a symlinked perf map must not be followed");
        assert!(matches!(open_checked(&link, &[file_owner_uid()]), Err(Refusal::Symlink)));
        assert!(open_checked(&target, &[file_owner_uid()]).expect("regular file opens").is_some());
    }

    #[test]
    fn refuses_fifo_and_foreign_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("perf-4.map");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: c_path is a valid NUL-terminated path for the duration of the call.
        let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo");
        assert!(matches!(open_checked(&fifo, &[file_owner_uid()]), Err(Refusal::NotRegular)));

        let file = dir.path().join("perf-5.map");
        std::fs::write(&file, b"").expect("write");
        let me = file_owner_uid();
        if me != 0 {
            // Owned by us, but we are neither root nor the (pretend) target's user.
            assert!(matches!(open_checked(&file, &[me + 1]), Err(Refusal::Owner(_))));
        }
        assert!(open_checked(&file, &[me]).expect("own file").is_some());
    }

    /// The uid owning files this test creates.
    fn file_owner_uid() -> u32 {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::metadata(dir.path()).expect("stat tempdir").uid()
    }
}
