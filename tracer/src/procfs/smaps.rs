//! Where a process's resident memory is: /proc/PID/smaps, each mapping's `Rss` put in
//! one part (V8 heap, malloc arenas, thread stacks, JIT code, ...).
//!
//! The kernel does not label anonymous memory, so the parts are read from the layout
//! that glibc and V8 give it:
//! - `[heap]` and 64 MiB-aligned anonymous regions are glibc's arenas (the main arena
//!   grows the break; other threads' arenas are heaps aligned to `HEAP_MAX_SIZE`);
//! - `[stack]` and anonymous regions right above a one-page `---p` guard are thread stacks;
//! - anonymous executable regions are JIT code;
//! - in a Node process, anonymous `rw` regions aligned to and sized in V8's 256 KiB pages
//!   are V8's heap.
//!
//! Anything else anonymous is "anonymous mappings" (large malloc blocks, Buffers'
//! backing stores, other mmaps); file mappings are "file-backed".

use crate::report::MemoryParts;

const ARENA_ALIGN: u64 = 64 << 20;
const V8_PAGE: u64 = 256 << 10;
const PAGE: u64 = 4096;

struct Mapping<'a> {
    start: u64,
    end: u64,
    perms: &'a str,
    inode: u64,
    path: &'a str,
    rss: u64,
}

/// Parses smaps text into parts. `node`: the process runs V8.
#[must_use]
pub fn parse_smaps(text: &str, node: bool) -> MemoryParts {
    let mut parts = MemoryParts::default();
    let mut maps: Vec<Mapping<'_>> = Vec::new();
    for line in text.lines() {
        if let Some(m) = header(line) {
            maps.push(m);
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            let kb: u64 = rest.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
            if let Some(m) = maps.last_mut() {
                m.rss = kb.saturating_mul(1024);
            }
        }
    }
    for (i, m) in maps.iter().enumerate() {
        let prev = i.checked_sub(1).and_then(|p| maps.get(p));
        let part = classify(m, prev, node);
        let bytes = part_of(&mut parts, part);
        *bytes = bytes.saturating_add(m.rss);
    }
    parts
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    V8Heap,
    Arena,
    Anon,
    Stack,
    Jit,
    File,
    Other,
}

fn part_of(parts: &mut MemoryParts, part: Part) -> &mut u64 {
    match part {
        Part::V8Heap => &mut parts.v8_heap_bytes,
        Part::Arena => &mut parts.malloc_arena_bytes,
        Part::Anon => &mut parts.anon_mapping_bytes,
        Part::Stack => &mut parts.thread_stack_bytes,
        Part::Jit => &mut parts.jit_code_bytes,
        Part::File => &mut parts.file_bytes,
        Part::Other => &mut parts.other_bytes,
    }
}

fn classify(m: &Mapping<'_>, prev: Option<&Mapping<'_>>, node: bool) -> Part {
    match m.path {
        "[heap]" => return Part::Arena,
        "[stack]" => return Part::Stack,
        p if p.starts_with('[') && !p.starts_with("[anon") => return Part::Other,
        p if !p.is_empty() && m.inode != 0 => return Part::File,
        _ => {}
    }
    let len = m.end - m.start;
    if m.perms.contains('x') {
        return Part::Jit;
    }
    let guarded =
        prev.is_some_and(|p| p.end == m.start && p.perms.starts_with("---") && p.end - p.start == PAGE);
    if guarded && m.perms.starts_with("rw") {
        return Part::Stack;
    }
    if m.start.is_multiple_of(ARENA_ALIGN) && len <= ARENA_ALIGN && m.perms.starts_with("rw") {
        return Part::Arena;
    }
    if node && m.perms.starts_with("rw") && m.start.is_multiple_of(V8_PAGE) && len.is_multiple_of(V8_PAGE) {
        return Part::V8Heap;
    }
    if m.path.is_empty() || m.path.starts_with("[anon") { Part::Anon } else { Part::Other }
}

fn header(line: &str) -> Option<Mapping<'_>> {
    let mut words = line.split_whitespace();
    let range = words.next()?;
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    // The kernel never writes an end below the start; such a line is not a mapping.
    if end < start {
        return None;
    }
    let perms = words.next()?;
    if perms.len() != 4 {
        return None;
    }
    let _offset = words.next()?;
    let _dev = words.next()?;
    let inode = words.next()?.parse().ok()?;
    let path = words.next().unwrap_or("");
    Some(Mapping { start, end, perms, inode, path, rss: 0 })
}

/// The parts of `pid`'s resident memory, or `None` when smaps cannot be read.
#[must_use]
pub fn memory_parts(pid: u32, node: bool) -> Option<MemoryParts> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok().map(|t| parse_smaps(&t, node))
}

/// Whether `pid` runs V8: the executable is node, or libnode is mapped.
#[must_use]
pub fn is_node(pid: u32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let exe_is_node = exe
        .as_ref()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == "node" || n == "nodejs" || n.starts_with("node-"));
    exe_is_node
        || std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.contains("/libnode.so"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c2000000 r-xp 00000000 fe:01 1234 /usr/bin/node
Rss:                8192 kB
55d0c4000000-55d0c4800000 rw-p 00000000 00:00 0 [heap]
Rss:                4096 kB
7f0000000000-7f0001000000 rw-p 00000000 00:00 0
Rss:                2048 kB
7f0001000000-7f0004000000 ---p 00000000 00:00 0
Rss:                   0 kB
7f1000040000-7f1000140000 rw-p 00000000 00:00 0
Rss:                1024 kB
7f2000000000-7f2000001000 ---p 00000000 00:00 0
Rss:                   0 kB
7f2000001000-7f2000800000 rw-p 00000000 00:00 0
Rss:                  64 kB
7f3000000000-7f3000100000 rwxp 00000000 00:00 0
Rss:                 512 kB
7f4000001000-7f4000102000 rw-p 00000000 00:00 0
Rss:                1028 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Rss:                 132 kB
7ffd00100000-7ffd00102000 r-xp 00000000 00:00 0 [vdso]
Rss:                   8 kB
";

    #[test]
    fn parts_by_layout() {
        let p = parse_smaps(SMAPS, true);
        assert_eq!(p.file_bytes, 8192 << 10);
        assert_eq!(p.malloc_arena_bytes, (4096 + 2048) << 10, "[heap] and a 64 MiB-aligned arena heap");
        assert_eq!(p.v8_heap_bytes, 1024 << 10, "256 KiB-aligned, 256 KiB-sized");
        assert_eq!(p.thread_stack_bytes, (64 + 132) << 10);
        assert_eq!(p.jit_code_bytes, 512 << 10);
        assert_eq!(p.anon_mapping_bytes, 1028 << 10, "a 1 MiB malloc block (page-aligned, not V8's)");
        assert_eq!(p.other_bytes, 8 << 10);
        let not_node = parse_smaps(SMAPS, false);
        assert_eq!(not_node.v8_heap_bytes, 0);
        assert_eq!(not_node.anon_mapping_bytes, (1028 + 1024) << 10);
    }

    /// Found by `cargo fuzz run smaps`: a range ending below its start underflowed the
    /// mapping's length; huge `Rss` values overflowed.
    #[test]
    fn nonsense_ranges_and_sizes() {
        let text = "7f0000001000-7f0000000000 rw-p 00000000 00:00 0\nRss: 4 kB\n\
                    7f1000001000-7f1000002000 rw-p 00000000 00:00 0\nRss: 18446744073709551 kB\n\
                    7f2000001000-7f2000002000 rw-p 00000000 00:00 0\nRss: 18446744073709551 kB\n";
        let p = parse_smaps(text, true);
        assert_eq!(p.anon_mapping_bytes, u64::MAX, "saturated, and the backwards range skipped");
    }
}
