//! JavaScript frames named without a perf map, from V8's heap.
//!
//! The fixture (`js_names.js`) keeps a 1 MiB Buffer per call from a chain of functions of
//! every kind: an interval callback, an async function resumed after an await, a class
//! constructor, a method, a closure, an anonymous function and a plain function. It runs
//! once with node's perf map (`--perf-basic-prof --interpreted-frames-native-stack`, the
//! reference) and once with no flag; every JS frame named in both runs must have the same
//! name, file and line. A perf map's line is the line where the function starts (V8 logs
//! the function's start position), and so is the line memtrace gives from the heap: like
//! is compared with like.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use integration_tests::{
    Frame, Leak, MIB, Memtrace, Report, StartGate, TestProcess, fixtures_dir, node_bin, node18_bin,
    perf_map_path, require_root, trace_gated,
};

const CALLS: u64 = 25;
/// Bytes kept per call: one Buffer before `handle`'s await and one after.
const KEPT_PER_CALL: u64 = 2 * MIB;

/// The fixture's functions, leaf first, and the source text of the line each starts on.
const CHAIN: [(&str, &str); 7] = [
    ("keepBuffer", "function keepBuffer() {"),
    ("(anonymous)", "const anonymous = identity(function () {"),
    ("counted", "const counted = () => {"),
    ("add", "add() {"),
    ("Batch", "constructor(target) {"),
    ("handle", "async function handle() {"),
    ("(anonymous)", "const timer = setInterval(() => {"),
];

fn fixture() -> PathBuf {
    fixtures_dir().join("js_names.js")
}

/// (function, line) of the chain, the lines read from the fixture's source.
fn expected_chain() -> Vec<(&'static str, u64)> {
    let source = std::fs::read_to_string(fixture()).expect("read js_names.js");
    CHAIN
        .iter()
        .map(|&(function, text)| {
            let line = source
                .lines()
                .position(|l| l.trim_start().starts_with(text))
                .unwrap_or_else(|| panic!("js_names.js has no line starting with {text:?}"));
            (function, line as u64 + 1)
        })
        .collect()
}

/// Runs the fixture under node with `flags`, traced by `memtrace attach`; returns the report.
fn trace(name: &str, flags: &[&str]) -> Report {
    trace_with(&node_bin(), name, flags)
}

fn trace_with(node: &Path, name: &str, flags: &[&str]) -> Report {
    let dir = tempfile::tempdir().expect("create temp dir");
    let gate = StartGate::new(dir.path());
    let mut cmd = Command::new(node);
    cmd.args(flags).arg(fixture()).arg(CALLS.to_string()).arg(gate.path());
    // The perf-map flags make V8 write isolate-*.log files into the working directory.
    cmd.current_dir(dir.path());
    let mut node = TestProcess::spawn(name, cmd);
    node.remove_on_drop(perf_map_path(node.pid()));
    node.wait_for_stdout("waiting", Duration::from_secs(20));
    let json = dir.path().join("report.json");
    let memtrace = Memtrace::spawn([
        "attach".as_ref(),
        node.pid().to_string().as_ref(),
        "--duration".as_ref(),
        "12s".as_ref(),
        // The native stacks are under test: V8's own profiler names the JS heap view's.
        "--js-heap".as_ref(),
        "off".as_ref(),
        "--json".as_ref(),
        json.as_os_str(),
    ]);
    let out = trace_gated(memtrace, &mut node, &gate, Duration::from_secs(40), Duration::from_mins(1));
    if flags.is_empty() {
        assert!(!perf_map_path(node.pid()).exists(), "node without flags wrote a perf map");
    }
    eprintln!(
        "--- {name} ---\n{}",
        out.stderr.lines().filter(|l| !l.contains('\r')).collect::<Vec<_>>().join("\n")
    );
    Report::read(&json)
}

fn is_fixture(frame: &Frame<'_>) -> bool {
    Path::new(frame.file()).file_name().is_some_and(|f| f == "js_names.js")
}

/// Every JS frame of the report: (function, file) → lines seen.
fn js_frames(report: &Report) -> BTreeMap<(String, String), BTreeSet<u64>> {
    let mut out: BTreeMap<(String, String), BTreeSet<u64>> = BTreeMap::new();
    for leak in report.suspects() {
        for frame in leak.frames().iter().filter(|f| f.kind() == "js") {
            out.entry((frame.function().to_string(), frame.file().to_string()))
                .or_default()
                .insert(frame.line());
        }
    }
    out
}

/// Bytes of mapped memory (`mmap` view) held by stacks that name `keepBuffer`.
fn kept_by_keep_buffer(report: &Report) -> u64 {
    report
        .suspects()
        .iter()
        .filter(|leak| leak.sources().contains(&"mmap"))
        .filter(|leak| {
            leak.frames().iter().any(|f| f.kind() == "js" && is_fixture(f) && f.function() == "keepBuffer")
        })
        .map(Leak::bytes)
        .sum()
}

/// JS frames named and V8 frames left unnamed (the interpreter's trampoline, or a bare
/// address in JIT code) in the stacks of mapped memory that reach JavaScript.
fn named_and_unnamed(report: &Report) -> (usize, usize) {
    let (mut named, mut unnamed) = (0, 0);
    for leak in report.suspects().iter().filter(|l| l.sources().contains(&"mmap")) {
        let frames = leak.frames();
        if !frames.iter().any(|f| f.kind() == "js") {
            continue;
        }
        named += frames.iter().filter(|f| f.kind() == "js").count();
        let left: Vec<String> = frames
            .iter()
            .filter(|f| {
                f.function().starts_with("Builtins_InterpreterEntryTrampoline")
                    || (f.function().starts_with("0x") && !f.module().starts_with('/'))
            })
            .map(Frame::label)
            .collect();
        unnamed += left.len();
    }
    (named, unnamed)
}

const PERF_MAP_FLAGS: [&str; 2] = ["--perf-basic-prof", "--interpreted-frames-native-stack"];

/// Whether line `line` (1-based) of the fixture defines an anonymous function (an arrow
/// or a `function (` expression).
fn starts_anonymous_function(line: u64) -> bool {
    let text = std::fs::read_to_string(fixture()).expect("read the fixture");
    let Some(source) = usize::try_from(line).ok().and_then(|l| text.lines().nth(l.checked_sub(1)?)) else {
        return false;
    };
    source.contains("=>") || source.contains("function (") || source.contains("function(")
}

/// Runs the fixture with a perf map and without, checks that the run without names the
/// whole chain and that both name alike; returns the report of the run without.
fn compare_with_perf_map(node: &Path, version: &str) -> Report {
    let expected = expected_chain();
    let flagged = trace_with(node, &format!("js_names.js on {version} with a perf map"), &PERF_MAP_FLAGS);
    let plain = trace_with(node, &format!("js_names.js on {version} without flags"), &[]);
    let (with_map, without) = (js_frames(&flagged), js_frames(&plain));
    let summary = format!("with a perf map:\n{}\nwithout:\n{}", flagged.summary(), plain.summary());

    // Every function of the chain is named from the heap, at its line.
    let fixture_path = fixture().to_string_lossy().into_owned();
    for &(function, line) in &expected {
        let lines = without.get(&(function.to_string(), fixture_path.clone()));
        assert!(
            lines.is_some_and(|l| l.contains(&line)),
            "{version} without a perf map: {function} at js_names.js:{line} is not named (lines seen: {lines:?})\n{summary}"
        );
    }
    // Whatever both runs name, they name alike (node's own modules have many anonymous
    // functions, which the two runs need not meet alike: those are left out).
    let mut compared = 0;
    for (key, lines) in &without {
        if key.0 == "(anonymous)" && key.1 != fixture_path {
            continue;
        }
        let Some(reference) = with_map.get(key) else { continue };
        if key.0 == "(anonymous)" {
            // One name for several functions: a run may meet one the other did not. Each
            // line either run names must start an anonymous function of the fixture.
            for line in lines.symmetric_difference(reference) {
                assert!(
                    starts_anonymous_function(*line),
                    "{version}: {key:?}: line {line} (heap {lines:?}, perf map {reference:?}) starts no anonymous function\n{summary}"
                );
            }
        } else {
            assert_eq!(
                lines, reference,
                "{version}: {key:?}: lines from the heap vs the perf map\n{summary}"
            );
        }
        compared += 1;
    }
    assert!(compared >= 6, "{version}: only {compared} functions named in both runs\n{summary}");
    plain
}

#[test]
fn js_frames_match_the_perf_map() {
    if !require_root("js_frames_match_the_perf_map") {
        return;
    }
    let plain = compare_with_perf_map(&node_bin(), "the system's node");
    let summary = plain.summary();
    // The keeping function is named in the mapped view of the unflagged node.
    let kept = kept_by_keep_buffer(&plain);
    assert!(
        kept >= CALLS * KEPT_PER_CALL / 2,
        "without a perf map, stacks naming keepBuffer hold {kept} bytes of the {} kept\n{summary}",
        CALLS * KEPT_PER_CALL
    );
    let (named, unnamed) = named_and_unnamed(&plain);
    eprintln!(
        "without a perf map: {named} JS frames named, {unnamed} V8 frames unnamed ({:.1}%), keepBuffer holds {kept} B",
        unnamed as f64 * 100.0 / (named + unnamed).max(1) as f64
    );
}

/// Another major version: Debian's node 18 keeps V8 in libnode.so, stripped of `.symtab`
/// (the interpreter's builtins are found by the frames' shape instead).
#[test]
fn js_frames_of_node18_match_its_perf_map() {
    if !require_root("js_frames_of_node18_match_its_perf_map") {
        return;
    }
    compare_with_perf_map(&node18_bin(), "node 18");
}

/// Whether a frame named `function` at `line` of the fixture names the function that
/// starts there: the line holds the name (a class constructor, its `constructor(`), or,
/// for "(anonymous)", a function without one (line 1: node's module wrapper).
fn starts_there(source: &[&str], function: &str, line: u64) -> bool {
    let Some(text) = line.checked_sub(1).and_then(|i| source.get(i as usize)) else { return false };
    match function {
        "(anonymous)" => line == 1 || text.contains("function (") || text.contains("=>"),
        "Batch" => text.contains("constructor("),
        name => text.contains(&format!("{name}(")) || text.contains(&format!("{name} = ")),
    }
}

#[test]
fn no_wrong_js_names_under_gc_stress() {
    if !require_root("no_wrong_js_names_under_gc_stress") {
        return;
    }
    // Every GC is a full one that compacts (moves old objects), and a 1 MiB young
    // generation makes the fixture's churn run one per call or so: objects move between
    // the capture of a stack and its reading.
    let flags = ["--gc-global", "--stress-compaction", "--max-semi-space-size=1"];
    let report = trace("js_names.js under GC stress", &flags);
    let summary = report.summary();
    let frames = js_frames(&report);
    let text = std::fs::read_to_string(fixture()).expect("read js_names.js");
    let source: Vec<&str> = text.lines().collect();

    let fixture_path = fixture().to_string_lossy().into_owned();
    let mut wrong = Vec::new();
    for ((function, file), lines) in &frames {
        for &line in lines {
            if file == &fixture_path && !starts_there(&source, function, line) {
                wrong.push(format!("{function} {file}:{line}"));
            }
        }
        // Elsewhere (node's own modules) a named function has one start line.
        if file != &fixture_path && function != "(anonymous)" && lines.len() > 1 {
            wrong.push(format!("{function} {file} at lines {lines:?}"));
        }
    }
    assert!(wrong.is_empty(), "wrong names under GC stress: {wrong:#?}\n{summary}");
    for (function, line) in expected_chain() {
        assert!(
            frames.get(&(function.to_string(), fixture_path.clone())).is_some_and(|l| l.contains(&line)),
            "{function} at js_names.js:{line} is not named under GC stress\n{summary}"
        );
    }

    // Here every Buffer allocation runs a compacting GC, so the objects a stack points to
    // have often moved again microseconds after its capture (the next allocation), before
    // any reader could look: those frames stay unnamed. Measured: 30-41% of the frames of
    // these stacks here, 60.5% once in CI (a slower machine, a debug build); the bound
    // leaves room for that. What the user depends on is checked above (no wrong name, the
    // whole chain named) and below (keepBuffer named for its bytes).
    let (named, unnamed) = named_and_unnamed(&report);
    let share = unnamed as f64 / (named + unnamed).max(1) as f64;
    let kept = kept_by_keep_buffer(&report);
    eprintln!(
        "under GC stress: {named} JS frames named, {unnamed} V8 frames unnamed ({:.1}%); keepBuffer named for {kept} of {} B",
        share * 100.0,
        CALLS * KEPT_PER_CALL
    );
    assert!(share <= 0.75, "{:.1}% of V8 frames unnamed under GC stress\n{summary}", share * 100.0);
    assert!(
        kept >= CALLS * KEPT_PER_CALL / 4,
        "keepBuffer named for only {kept} B under GC stress\n{summary}"
    );
}
