//! JIT symbols from the perf map a runtime writes (`node --perf-basic-prof` writes
//! `/tmp/perf-<pid>.map`): lines `START SIZE name`, hex without `0x`, append-only, and the
//! newest entry for an address wins.
//!
//! The file lives in an attacker-writable directory and memtrace runs as root, so it is
//! opened without following symlinks, must be a regular file, and must belong to the
//! target's user or to root. Its content is the target's to choose: lines, entries and
//! bytes read are capped, and what is dropped is counted.

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

/// Longest line kept (V8 names, paths included, stay far below); longer ones are skipped.
const MAX_LINE_BYTES: usize = 64 * 1024;
/// Entries kept at most (a busy Node service has tens of thousands).
const MAX_ENTRIES: usize = 1 << 20;
/// Bytes of a perf map read at most: a target appending forever would otherwise grow
/// memtrace without bound.
const MAX_MAP_BYTES: u64 = 256 << 20;
/// Bytes read per `read` call.
const READ_CHUNK: usize = 64 * 1024;

/// Bounds on what a perf map may cost memtrace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Limits {
    line_bytes: usize,
    entries: usize,
    map_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { line_bytes: MAX_LINE_BYTES, entries: MAX_ENTRIES, map_bytes: MAX_MAP_BYTES }
    }
}

/// What the limits dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Dropped {
    /// Lines longer than the line limit.
    pub long_lines: u64,
    /// New entries past the entry limit.
    pub entries: u64,
    /// Bytes of the file past the size limit, as of the last refresh.
    pub bytes: u64,
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
    limits: Limits,
    /// Inside a line that grew past the limit: bytes are dropped up to its newline.
    skipping: bool,
    dropped: Dropped,
}

impl PerfMap {
    fn with_limits(limits: Limits) -> Self {
        Self { limits, ..Self::default() }
    }

    /// Parses every complete line of `bytes` (after what was left pending by the previous call).
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut bytes = bytes;
        if self.skipping {
            let Some(newline) = bytes.iter().position(|&b| b == b'\n') else {
                return;
            };
            self.skipping = false;
            self.lines += 1;
            bytes = &bytes[newline + 1..];
        }
        self.pending.extend_from_slice(bytes);
        let Some(last_newline) = self.pending.iter().rposition(|&b| b == b'\n') else {
            self.cap_pending();
            return;
        };
        let complete: Vec<u8> = self.pending.drain(..=last_newline).collect();
        self.cap_pending();
        for line in complete[..last_newline].split(|&b| b == b'\n') {
            self.lines += 1;
            if line.len() > self.limits.line_bytes {
                self.long_line();
                continue;
            }
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

    /// An unfinished line past the limit is dropped, and the rest of it when it comes.
    fn cap_pending(&mut self) {
        if self.pending.len() > self.limits.line_bytes {
            self.pending = Vec::new();
            self.skipping = true;
            self.long_line();
        }
    }

    fn long_line(&mut self) {
        self.dropped.long_lines += 1;
        if self.dropped.long_lines == 1 {
            log::warn!(
                "perf map line {} is longer than {} bytes and was skipped (later ones are counted, not logged)",
                self.lines + 1,
                self.limits.line_bytes
            );
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
        if overlapped.is_empty() && self.entries.len() >= self.limits.entries {
            self.dropped.entries += 1;
            if self.dropped.entries == 1 {
                log::warn!(
                    "perf map holds {} entries, the most memtrace keeps: later JIT code is not named",
                    self.limits.entries
                );
            }
            return;
        }
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

    #[cfg(test)]
    pub fn dropped(&self) -> Dropped {
        self.dropped
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
        Self::with_limits(path, allowed_uids, Limits::default())
    }

    fn with_limits(path: PathBuf, allowed_uids: Vec<u32>, limits: Limits) -> Self {
        Self { path, allowed_uids, file: None, offset: 0, warned: false, map: PerfMap::with_limits(limits) }
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
            let (generation, limits, dropped) = (self.map.generation + 1, self.map.limits, self.map.dropped);
            self.map = PerfMap { generation, limits, dropped, ..PerfMap::default() };
            self.file = None;
            self.offset = 0;
            self.refresh();
            return;
        }
        let budget = self.map.limits.map_bytes.saturating_sub(self.offset);
        let past_limit = (size - self.offset).saturating_sub(budget);
        if past_limit > 0 && self.map.dropped.bytes == 0 {
            log::warn!(
                "perf map {} is larger than {} MiB, the most memtrace reads: later JIT code is not named",
                self.path.display(),
                self.map.limits.map_bytes >> 20
            );
        }
        self.map.dropped.bytes = past_limit;
        let mut left = (size - self.offset).min(budget);
        let mut buf = vec![0u8; READ_CHUNK];
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            match file.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => {
                    self.offset += n as u64;
                    left = left.saturating_sub(n as u64);
                    self.map.feed(&buf[..n]);
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => {
                    log::debug!("read {}: {err}", self.path.display());
                    break;
                }
            }
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
mod tests;
