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

#[test]
fn long_lines_are_dropped_and_counted() {
    let limits = Limits { line_bytes: 64, ..Limits::default() };
    let mut map = PerfMap::with_limits(limits);
    let long = format!("1000 10 JS:*{} /a.js:1:1\n", "x".repeat(100));
    map.feed(format!("{long}2000 10 JS:*ok /ok.js:1:1\n").as_bytes());
    assert_eq!(frame(&map, 0x1000), None);
    assert_eq!(frame(&map, 0x2000).as_deref(), Some("ok"));
    assert_eq!(map.dropped().long_lines, 1);

    // A line that never ends: memory stays bounded, fed a MiB at a time.
    let endless = vec![b'y'; 1 << 20];
    for _ in 0..64 {
        map.feed(&endless);
        assert!(map.pending.len() <= 64 + endless.len(), "pending grew to {}", map.pending.len());
    }
    assert!(map.pending.is_empty(), "the endless line is not kept");
    assert_eq!(map.dropped().long_lines, 2, "counted once");
    // Its end, then normal lines again.
    map.feed(b"yyy\n3000 10 JS:*after /b.js:2:1\n");
    assert_eq!(frame(&map, 0x3000).as_deref(), Some("after"));
    assert_eq!(map.dropped().long_lines, 2);
}

#[test]
fn entries_are_capped_but_updates_still_land() {
    let mut map = PerfMap::with_limits(Limits { entries: 2, ..Limits::default() });
    map.feed(b"1000 10 JS:*a /a.js:1:1\n2000 10 JS:*b /b.js:1:1\n3000 10 JS:*c /c.js:1:1\n");
    assert_eq!(map.len(), 2);
    assert_eq!(frame(&map, 0x3000), None);
    assert_eq!(map.dropped().entries, 1);
    // Code replacing known code still replaces it.
    map.feed(b"1000 10 JS:*a2 /a.js:1:1\n");
    assert_eq!(frame(&map, 0x1000).as_deref(), Some("a2"));
    assert_eq!(map.dropped().entries, 1);
}

#[test]
fn reader_stops_at_the_size_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("perf-6.map");
    let mut file = File::create(&path).expect("create perf map");
    let limits = Limits { map_bytes: 100, ..Limits::default() };
    let mut reader = PerfMapReader::with_limits(path, vec![file_owner_uid()], limits);
    // 30 bytes a line: three lines fit in 100 bytes, the fourth is cut.
    for i in 0..5 {
        writeln!(file, "{:04x} 10 JS:*f{i} /s.js:{i}:1{}", 0x1000 + i * 0x100, " ".repeat(5)).expect("write");
    }
    reader.refresh();
    assert_eq!(frame(reader.map(), 0x1200).as_deref(), Some("f2"));
    assert_eq!(frame(reader.map(), 0x1300), None, "past the limit");
    assert_eq!(reader.map().dropped().bytes, 150 - 100);
    file.write_all(&[b'z'; 1000]).expect("write");
    reader.refresh();
    assert_eq!(reader.map().dropped().bytes, 1150 - 100);
    assert_eq!(reader.map().len(), 3);
}

/// The uid owning files this test creates.
fn file_owner_uid() -> u32 {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::metadata(dir.path()).expect("stat tempdir").uid()
}
