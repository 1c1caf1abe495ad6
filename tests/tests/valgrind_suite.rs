//! `memtrace run --track malloc` held against Valgrind memcheck on short-lived C and C++
//! programs (`tests/fixtures/vg/`): leak trees and cycles, zero-byte blocks from every
//! allocator entry point, realloc to 0 and back, blocks glibc allocates for the program,
//! threads, dlopen/dlclose, C++ `new` in constructors and exceptions.
//!
//! Each program runs natively under `memtrace run` and under Valgrind with
//! `--run-libc-freeres=no --run-cxx-freeres=no` (what a real process still holds at exit).
//! A loss record is keyed by its allocating function (the outermost allocator entry point
//! from the leaf: Valgrind's `realloc(NULL, n)` shows `malloc` above `realloc`) and its
//! first frame in the program itself; bytes and blocks must be equal per key and in total.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{Memtrace, Report, StartGate, TestProcess, fixtures_dir, require_root};

/// (allocating function, first program frame as `function:line`).
type Key = (String, Option<String>);
/// Bytes and blocks per key.
type Records = BTreeMap<Key, (u64, u64)>;

const ALLOCATORS: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "memalign",
    "posix_memalign",
    "aligned_alloc",
    "valloc",
    "pvalloc",
];

/// The allocator entry point a frame's function is, if it is one (glibc's aliases such as
/// `__GI___libc_malloc` or `__posix_memalign` are the entry point).
fn allocator(function: &str) -> Option<String> {
    if function.starts_with("operator new") {
        return Some(function.to_string());
    }
    let base = ["__GI___libc_", "__libc_", "__GI_", "__"]
        .iter()
        .fold(function, |f, prefix| f.strip_prefix(prefix).unwrap_or(f));
    ALLOCATORS.contains(&base).then(|| base.to_string())
}

/// The name compared for an allocating function. Valgrind (3.19) serves some entry points
/// through others and shows only those: `realloc(NULL, n)` and `reallocarray` appear as
/// `malloc`, `valloc` and `pvalloc` as `memalign`. memtrace names the entry point the
/// program called, so these are compared as the one Valgrind shows.
fn compared_as(allocating: &str) -> &str {
    match allocating {
        "malloc" | "realloc" | "reallocarray" => "malloc or realloc",
        "valloc" | "pvalloc" => "memalign",
        other => other,
    }
}

/// A frame as both tools give it: function, module (Valgrind's `obj`), line.
struct StackFrame<'a> {
    function: &'a str,
    module: &'a str,
    line: u64,
}

fn key_of(frames: &[StackFrame<'_>], exe: &Path) -> Key {
    let allocating = frames.iter().map_while(|f| allocator(f.function)).last().map_or_else(
        || frames.first().map_or_else(|| "?".to_string(), |f| f.function.to_string()),
        |a| compared_as(&a).to_string(),
    );
    let program = frames
        .iter()
        .find(|f| Path::new(f.module) == exe)
        .map(|f| format!("{}:{}", without_parameters(f.function), f.line));
    (allocating, program)
}

/// A function's name without its parameter list: the demanglers disagree on template
/// constructors (`basic_string<std::allocator<char> >(unsigned long, char, ...)` for
/// Valgrind, without the `unsigned long` for `cpp_demangle`), and name and line identify
/// the frame.
fn without_parameters(function: &str) -> &str {
    let mut depth = 0;
    for (i, c) in function.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            '(' if depth == 0 && i > 0 && !function[..i].ends_with("operator") => return &function[..i],
            _ => {}
        }
    }
    function
}

/// Valgrind's XML escapes what C++ names hold.
fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn tag<'a>(block: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = block.find(&open)? + open.len();
    let end = block[start..].find(&format!("</{name}>"))? + start;
    Some(block[start..end].trim())
}

/// Valgrind's loss records (XML protocol 4), all leak kinds. A definitely lost block's
/// `leakedbytes` includes what it points to, which has records of its own: only the
/// direct bytes are counted.
fn valgrind_records(xml: &str, exe: &Path) -> Records {
    let mut out = Records::new();
    for block in xml.split("<error>").skip(1) {
        let block = block.split("</error>").next().unwrap_or(block);
        if !tag(block, "kind").is_some_and(|k| k.starts_with("Leak_")) {
            continue;
        }
        let number = |s: &str| s.replace(',', "").parse::<u64>().ok();
        let mut bytes = tag(block, "leakedbytes").and_then(number).unwrap_or(0);
        let blocks = tag(block, "leakedblocks").and_then(number).unwrap_or(0);
        let text = tag(block, "text").unwrap_or_default();
        if let Some(direct) = text.split('(').nth(1).and_then(|t| t.split(" direct").next()).and_then(number)
        {
            bytes = direct;
        }
        let names: Vec<String> =
            block.split("<frame>").skip(1).map(|f| unescape(tag(f, "fn").unwrap_or("?"))).collect();
        let frames: Vec<StackFrame<'_>> = block
            .split("<frame>")
            .skip(1)
            .zip(&names)
            .map(|(f, name)| StackFrame {
                function: name,
                module: tag(f, "obj").unwrap_or(""),
                line: tag(f, "line").and_then(number).unwrap_or(0),
            })
            .collect();
        let entry = out.entry(key_of(&frames, exe)).or_default();
        entry.0 += bytes;
        entry.1 += blocks;
    }
    out
}

/// memtrace's allocator view: every stack variant of every suspect.
fn memtrace_records(report: &Report, exe: &Path) -> Records {
    let mut out = Records::new();
    let suspects =
        report.json["leaks"].as_array().into_iter().chain(report.json["other_suspects"].as_array());
    for variant in suspects.flatten().filter_map(|s| s["variants"].as_array()).flatten() {
        if variant["source"] != "malloc" {
            continue;
        }
        let frames: Vec<StackFrame<'_>> = variant["frames"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| StackFrame {
                function: f["function"].as_str().unwrap_or("?"),
                module: f["module"].as_str().unwrap_or(""),
                line: f["line"].as_u64().unwrap_or(0),
            })
            .collect();
        let entry = out.entry(key_of(&frames, exe)).or_default();
        entry.0 += variant["bytes"].as_u64().unwrap_or(0);
        entry.1 += variant["count"].as_u64().unwrap_or(0);
    }
    out
}

fn totals(records: &Records) -> (u64, u64) {
    records.values().fold((0, 0), |(b, n), &(bytes, blocks)| (b + bytes, n + blocks))
}

/// Compiles a fixture of `tests/fixtures/vg/` as a leak checker's tests are built: no
/// optimisation, frame pointers, debug info.
fn build(name: &str, dir: &Path) -> PathBuf {
    let (compiler, src) = if name.ends_with("cxx") {
        ("g++", fixtures_dir().join("vg").join(format!("{name}.cpp")))
    } else {
        ("gcc", fixtures_dir().join("vg").join(format!("{name}.c")))
    };
    let bin = dir.join(name);
    let shared = name.starts_with("lib");
    let mut cmd = Command::new(compiler);
    cmd.args(["-O0", "-g", "-fno-omit-frame-pointer"]);
    if shared {
        cmd.args(["-shared", "-fPIC"]);
    }
    cmd.arg("-o").arg(&bin).arg(&src);
    if !shared {
        cmd.args(["-lpthread", "-ldl"]);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("run {compiler}: {e} (is it installed?)"));
    assert!(out.status.success(), "{compiler} {}: {}", src.display(), String::from_utf8_lossy(&out.stderr));
    std::fs::canonicalize(&bin).unwrap_or_else(|e| panic!("canonicalize {}: {e}", bin.display()))
}

struct Compared {
    valgrind: Records,
    memtrace: Records,
    /// Wall time of `memtrace run`, and of the program alone.
    traced: Duration,
    alone: Duration,
    stderr: String,
}

impl Compared {
    fn table(&self) -> String {
        let keys: std::collections::BTreeSet<&Key> =
            self.valgrind.keys().chain(self.memtrace.keys()).collect();
        let mut out = format!(
            "valgrind total {:?}, memtrace total {:?} (bytes, blocks)\n",
            totals(&self.valgrind),
            totals(&self.memtrace)
        );
        for key in keys {
            let (v, m) = (self.valgrind.get(key), self.memtrace.get(key));
            let mark = if v == m { "ok" } else { "XX" };
            let _ = writeln!(out, "  {mark} {key:?}: valgrind {v:?}, memtrace {m:?}");
        }
        out + &format!(
            "memtrace run took {:.2?} (the program alone {:.2?})\n{}",
            self.traced, self.alone, self.stderr
        )
    }
}

fn compare(name: &str, args: &[&Path]) -> Compared {
    let dir = tempfile::tempdir().expect("create temp dir");
    let exe = build(name, dir.path());
    let valgrind = which("valgrind").unwrap_or_else(|| {
        panic!("valgrind is not installed (apt-get install valgrind; `cargo xtask setup` does it)")
    });
    let xml = dir.path().join("valgrind.xml");
    let out = Command::new(valgrind)
        .args(["--leak-check=full", "--show-leak-kinds=all", "--run-libc-freeres=no", "--run-cxx-freeres=no"])
        .args(["--num-callers=30", "--xml=yes"])
        .arg(format!("--xml-file={}", xml.display()))
        .arg(&exe)
        .args(args)
        .output()
        .expect("run valgrind");
    assert!(out.status.success(), "valgrind {name}: {}", String::from_utf8_lossy(&out.stderr));
    let valgrind = valgrind_records(&std::fs::read_to_string(&xml).expect("read valgrind's XML"), &exe);

    let started = Instant::now();
    let status = Command::new(&exe).args(args).output().expect("run the program").status;
    let alone = started.elapsed();
    assert!(status.success(), "{name} failed on its own: {status}");

    let json = dir.path().join("report.json");
    let mut cmd: Vec<&std::ffi::OsStr> =
        vec!["run".as_ref(), "--track".as_ref(), "malloc".as_ref(), "--json".as_ref(), json.as_os_str()];
    cmd.push("--".as_ref());
    cmd.push(exe.as_os_str());
    cmd.extend(args.iter().map(|a| a.as_os_str()));
    let started = Instant::now();
    let run = Memtrace::run(cmd, Duration::from_mins(1));
    let traced = started.elapsed();
    assert!(run.status.success(), "memtrace run {name}: {}\n{}", run.status, run.combined());
    let report = Report::read(&json);
    Compared { valgrind, memtrace: memtrace_records(&report, &exe), traced, alone, stderr: run.stderr }
}

/// Programs whose every block is allocated by the program's own code (or by the loader,
/// with no program frame on either side): every loss record must match.
fn check_exact(name: &str, args: &[&Path]) -> Compared {
    let c = compare(name, args);
    let table = c.table();
    eprintln!("{name}:\n{table}");
    assert!(!c.valgrind.is_empty(), "{name}: Valgrind found no loss record\n{table}");
    assert_eq!(totals(&c.memtrace), totals(&c.valgrind), "{name}: totals differ\n{table}");
    assert_eq!(c.memtrace, c.valgrind, "{name}: loss records differ\n{table}");
    c
}

/// Programs whose blocks glibc or libstdc++ allocates for them: bytes, blocks and
/// allocating functions must match; the program's frame under a runtime function without
/// frame pointers is checked by `stacks_through_the_runtime_reach_the_program`.
fn check_totals_and_allocators(name: &str, args: &[&Path]) {
    let c = compare(name, args);
    let table = c.table();
    eprintln!("{name}:\n{table}");
    assert_eq!(totals(&c.memtrace), totals(&c.valgrind), "{name}: totals differ\n{table}");
    let by_allocator = |records: &Records| {
        let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for ((allocating, _), &(bytes, blocks)) in records {
            let e = out.entry(allocating.clone()).or_default();
            e.0 += bytes;
            e.1 += blocks;
        }
        out
    };
    assert_eq!(by_allocator(&c.memtrace), by_allocator(&c.valgrind), "{name}: allocators differ\n{table}");
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

#[test]
fn leak_trees_and_cycles() {
    if !require_root("leak_trees_and_cycles") {
        return;
    }
    let c = check_exact("tree", &[]);
    // The program lives about a millisecond: memtrace still names where it leaked.
    assert!(
        c.memtrace.contains_key(&("malloc or realloc".to_string(), Some("make_tree:11".to_string()))),
        "make_tree's leak is not named\n{}",
        c.table()
    );
}

#[test]
fn zero_byte_blocks_are_blocks() {
    if !require_root("zero_byte_blocks_are_blocks") {
        return;
    }
    let c = check_exact("zero", &[]);
    assert_eq!(totals(&c.memtrace), (0, 8), "eight zero-byte blocks are kept\n{}", c.table());
}

#[test]
fn realloc_to_zero_and_back() {
    if !require_root("realloc_to_zero_and_back") {
        return;
    }
    check_exact("realloc", &[]);
}

#[test]
fn dlopen_and_dlclose() {
    if !require_root("dlopen_and_dlclose") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let plugin = build("libplugin", dir.path());
    // dlopen's own blocks are made under dlopen, in ld.so.
    check_totals_and_allocators("dl", &[&plugin]);
}

#[test]
fn blocks_glibc_allocates_for_the_program() {
    if !require_root("blocks_glibc_allocates_for_the_program") {
        return;
    }
    check_totals_and_allocators("glibc", &[]);
}

#[test]
fn threads() {
    if !require_root("threads") {
        return;
    }
    check_totals_and_allocators("threads", &[]);
}

#[test]
fn cxx_new_in_constructors_and_exceptions() {
    if !require_root("cxx_new_in_constructors_and_exceptions") {
        return;
    }
    check_totals_and_allocators("cxx", &[]);
}

/// Issue 16, item 2: glibc, ld.so and libstdc++ keep no frame pointers, so under
/// `strdup`, `fopen`, printf's buffer, `pthread_create`, `dlopen` or `std::string` a
/// frame-pointer walk skips the program's own frame. The allocator view unwinds those
/// modules' frames by their CFI in the kernel: Valgrind's first program frame must be
/// memtrace's, record for record.
#[test]
fn stacks_through_the_runtime_reach_the_program() {
    if !require_root("stacks_through_the_runtime_reach_the_program") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let plugin = build("libplugin", dir.path());
    for (name, args) in
        [("glibc", vec![]), ("threads", vec![]), ("cxx", vec![]), ("dl", vec![plugin.as_path()])]
    {
        let c = check_exact(name, &args);
        // Every walk through the runtime's unwind tables reached the stack's end here.
        assert!(!c.stderr.contains("stop early"), "{name}: a CFI walk stopped early\n{}", c.table());
    }
}

/// The same through `memtrace attach` to a process that is already running: ld.so's and
/// libc's load addresses come from its memory map (ld.so's probe hit long ago), so
/// `strdup` and `pthread_create`'s TLS (ld.so's `calloc`) still reach `main`.
#[test]
fn attached_stacks_through_the_runtime_reach_the_program() {
    if !require_root("attached_stacks_through_the_runtime_reach_the_program") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let exe = build("late", dir.path());
    let gate = StartGate::new(dir.path());
    let mut cmd = Command::new(&exe);
    cmd.arg(gate.path());
    let mut target = TestProcess::spawn("late", cmd);
    target.wait_for_stdout("waiting", Duration::from_secs(10));
    let json = dir.path().join("report.json");
    let pid = target.pid().to_string();
    let mut memtrace =
        Memtrace::spawn(["attach", &pid, "--track", "malloc", "--json", &json.display().to_string()]);
    memtrace.wait_for_stderr("attached to", Duration::from_secs(30));
    gate.open();
    let run = memtrace.wait(Duration::from_mins(1));
    assert!(run.status.success(), "memtrace attach: {}\n{}", run.status, run.combined());
    let records = memtrace_records(&Report::read(&json), &exe);
    let table = format!("{records:#?}\n{}", run.stderr);
    assert_eq!(
        records.get(&("malloc or realloc".to_string(), Some("main:18".to_string()))),
        Some(&(64 * 22, 64)),
        "strdup's blocks are not at main:18\n{table}"
    );
    assert!(
        records.contains_key(&("calloc".to_string(), Some("main:20".to_string()))),
        "pthread_create's TLS is not at main:20\n{table}"
    );
    assert!(!run.stderr.contains("stop early"), "a CFI walk stopped early\n{table}");
}
