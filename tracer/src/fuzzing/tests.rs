use std::path::{Path, PathBuf};

use tracer_common::{
    EventHeader, FP_STACK_DEPTH, MemEvent, MemEventWithStack, ProcEvent, STACK_COPY_MAX, UserStack, kind,
};

use super::*;
use crate::symbolize::v8::heap::{tests::Capture, word};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut seeds: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus of {target} at {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            (path, bytes)
        })
        .collect();
    seeds.sort();
    seeds
}

/// Every seed (and every crash once found, kept in the corpus) through its target.
#[test]
fn corpus_replays_through_every_target() {
    for &(name, target) in TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "target {name} has no seeds in {}", corpus_dir(name).display());
        for (path, bytes) in seeds {
            let result = std::panic::catch_unwind(|| target(&bytes));
            assert!(result.is_ok(), "target {name} panicked on {}", path.display());
        }
    }
}

/// Each target has a fuzz target file, and the other way round.
#[test]
fn every_target_has_a_fuzz_binary() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("fuzz_targets")
        .map(|e| e.expect("entry").path().file_stem().expect("stem").to_string_lossy().into_owned())
        .collect();
    files.sort();
    let names: Vec<&str> = TARGETS.iter().map(|&(name, _)| name).collect();
    assert_eq!(files, names);
    let manifest = std::fs::read_to_string(dir.with_file_name("Cargo.toml")).expect("fuzz/Cargo.toml");
    for name in names {
        assert!(manifest.contains(&format!("name = \"{name}\"")), "{name} missing from fuzz/Cargo.toml");
    }
}

fn as_bytes<T>(v: &T) -> &[u8] {
    // SAFETY: test-only view of a repr(C) POD value (padding written out) as bytes.
    unsafe { core::slice::from_raw_parts(core::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
}

/// `ADDR HEX` lines of a capture, as regions.
fn capture_regions(text: &str) -> Vec<(u64, Vec<u8>)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("expect "))
        .map(|line| {
            let (addr, hex) = line.split_once(' ').expect("ADDR HEX");
            let addr = u64::from_str_radix(addr.trim_start_matches("0x"), 16).expect("hex address");
            let hex = hex.trim();
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            (addr, bytes)
        })
        .collect()
}

fn image_of(tagged: u64, regions: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let borrowed: Vec<(u64, &[u8])> = regions.iter().map(|(a, b)| (*a, b.as_slice())).collect();
    heap_image(tagged, &borrowed)
}

const STRINGS: &str = include_str!("../symbolize/v8/testdata/strings-node20.txt");
const FUNCTIONS: &str = include_str!("../symbolize/v8/testdata/functions-node20.txt");
const POSITIONS: &str = include_str!("../symbolize/v8/testdata/positions-node20.txt");

fn mem_event(kind: u32, has_stack: u32) -> MemEvent {
    MemEvent {
        header: EventHeader { kind, tgid: 4242, tid: 4243, has_stack, ts_ns: 1_000_000 },
        addr: 0x7f00_0000_0000,
        len: 1 << 20,
        prot: 3,
        flags: 0x22,
        fd: -1,
        ..MemEvent::default()
    }
}

/// The seeds made from the repository's own test data (the others are files of this
/// machine, copied once): name and bytes, per target.
fn derived_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();

    let strings = capture_regions(STRINGS);
    for (i, (tagged, _)) in Capture::node20(STRINGS).expected.iter().enumerate() {
        out.push(("v8_string", format!("node20-string-{i}"), image_of(*tagged, &strings)));
    }
    let functions = capture_regions(FUNCTIONS);
    let capture = Capture::node20(FUNCTIONS);
    for (i, (sfi, _)) in capture.expected.iter().enumerate() {
        out.push(("v8_function_info", format!("node20-sfi-{i}"), image_of(*sfi, &functions)));
    }
    // The ScopeInfos of those functions, as the words after their maps.
    let mut memory = capture.memory.clone();
    let layout = node20();
    let mut heap = Heap::new(layout, &mut memory);
    for (i, (sfi, _)) in capture.expected.iter().enumerate().take(4) {
        let header = heap.read(sfi & !3, 56).expect("SFI captured");
        let scope = word(&header, layout.sfi_name_or_scope_info);
        let Ok((addr, _)) = heap.object(scope) else { continue };
        let words = (1..=40).rev().find_map(|n| heap.read(addr + 8, n * 8).ok()).expect("ScopeInfo captured");
        out.push(("v8_scope_slots", format!("node20-scopeinfo-{i}"), words));
    }

    let hex = POSITIONS.lines().find_map(|l| l.strip_prefix("table ")).expect("table line");
    let table: Vec<u8> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect();
    out.push(("v8_positions", "node20-interp-table".into(), table));
    out.push(("v8_positions", "source-line-ends".into(), "a\nb\r\nc\rd\u{2028}e".as_bytes().to_vec()));

    for (name, text, version) in [
        ("node20", include_str!("../symbolize/v8/testdata/v8dbg-node20.txt"), "11.3.244"),
        ("node18", include_str!("../symbolize/v8/testdata/v8dbg-node18.txt"), "10.2.154"),
    ] {
        out.push(("v8_layout", format!("v8dbg-{name}"), format!("version {version}\n{text}").into_bytes()));
    }

    out.push(("event", "munmap".into(), as_bytes(&mem_event(kind::MUNMAP, 0)).to_vec()));
    let mut with_stack = Box::new(MemEventWithStack {
        event: mem_event(kind::MMAP, 1),
        stack: UserStack {
            ip: 0x55d0_c000_1234,
            sp: 0x7ffd_0000_1000,
            bp: 0x7ffd_0000_1040,
            fp_depth: 3,
            stack_len: 64,
            fp_frames: [0; FP_STACK_DEPTH],
            data: [0; STACK_COPY_MAX],
        },
    });
    with_stack.stack.fp_frames[..3].copy_from_slice(&[0x55d0_c000_1234, 0x55d0_c000_2000, 0x7f1c_2e22_9d90]);
    with_stack.stack.data[..64].copy_from_slice(&[0x5a; 64]);
    let used = size_of::<MemEvent>() + UserStack::DATA_OFFSET + 64;
    out.push(("event", "mmap-with-stack".into(), as_bytes(&*with_stack)[..used].to_vec()));
    out.push(("event", "fault".into(), as_bytes(&mem_event(kind::FAULT, 0)).to_vec()));
    let mut fork = ProcEvent {
        header: EventHeader { kind: kind::FORK, tgid: 43, tid: 43, has_stack: 0, ts_ns: 2 },
        parent_tgid: 42,
        ..ProcEvent::default()
    };
    fork.comm[..6].copy_from_slice(b"worker");
    out.push(("event", "fork".into(), as_bytes(&fork).to_vec()));
    out.push((
        "event",
        "oom-mark-victim".into(),
        as_bytes(&crate::events::oom::sample_mark_victim()).to_vec(),
    ));

    let mut oom = MARK_VICTIM_FORMAT.as_bytes().to_vec();
    oom.push(0);
    oom.extend_from_slice(as_bytes(&crate::events::oom::sample_mark_victim()));
    out.push(("oom_format", "mark_victim-6.18-with-record".into(), oom));

    let report = crate::export::fixture::sample_report();
    let meta =
        record::Meta { memtrace_version: "0.1.0".into(), hostname: "fuzz".into(), ..record::Meta::default() };
    out.push(("recording", "sample-report.mtr".into(), record::encode(&meta, &report).expect("encode")));
    out.push(("recording_report", "sample-report.json".into(), serde_json::to_vec(&report).expect("json")));
    out
}

/// The derived seeds in the repository are what the test data makes today. Run with
/// `MEMTRACE_WRITE_SEEDS=1` to write them after the test data changed.
#[test]
fn derived_seeds_are_current() {
    let write = std::env::var_os("MEMTRACE_WRITE_SEEDS").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for (target, name, bytes) in derived_seeds() {
        let path = corpus_dir(target).join(&name);
        if write {
            std::fs::create_dir_all(corpus_dir(target)).expect("create the corpus directory");
            std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        } else if std::fs::read(&path).ok().as_deref() != Some(bytes.as_slice()) {
            stale.push(path.display().to_string());
        }
    }
    assert!(stale.is_empty(), "stale or missing seeds (MEMTRACE_WRITE_SEEDS=1 rewrites them): {stale:#?}");
}

/// The heap seeds reach what they are made for: the strings and names of the captures.
#[test]
fn heap_seeds_decode_like_the_captures() {
    let expected = Capture::node20(STRINGS).expected;
    for (i, (_, text)) in expected.iter().enumerate() {
        let bytes = std::fs::read(corpus_dir("v8_string").join(format!("node20-string-{i}"))).expect("seed");
        let (tagged, mut memory) = parse_heap_image(&bytes);
        let mut heap = Heap::new(node20(), &mut memory);
        assert_eq!(read_string(&mut heap, tagged, 4096).as_ref(), Ok(text), "seed {i}");
    }
    let expected = Capture::node20(FUNCTIONS).expected;
    for (i, (_, want)) in expected.iter().enumerate() {
        let bytes =
            std::fs::read(corpus_dir("v8_function_info").join(format!("node20-sfi-{i}"))).expect("seed");
        let (tagged, mut memory) = parse_heap_image(&bytes);
        let mut heap = Heap::new(node20(), &mut memory);
        let header = heap.read(tagged & !3, 56).expect("header");
        let info = function_info(&mut heap, &header).expect("function info");
        assert_eq!(want.rsplit_once(' ').map(|(name, _)| name), Some(info.name.as_str()), "seed {i}");
    }
}

/// The seeds of this machine's files parse into something: the fuzzer starts from
/// inputs that reach deep into each parser.
#[test]
fn machine_seeds_parse() {
    for (path, bytes) in seeds("proc_maps") {
        assert!(!maps::parse_maps(&String::from_utf8_lossy(&bytes)).is_empty(), "{}", path.display());
    }
    for (path, bytes) in seeds("smaps") {
        let parts = smaps::parse_smaps(&String::from_utf8_lossy(&bytes), true);
        assert!(parts.file_bytes > 0, "{}: {parts:?}", path.display());
    }
    for (path, bytes) in seeds("perf_map") {
        let mut map = PerfMap::default();
        map.feed(&bytes[1..]);
        assert!(map.len() > 10 && map.malformed_lines() == 0, "{}", path.display());
    }
    for (path, bytes) in seeds("recording") {
        assert!(record::decode(&bytes).is_ok(), "{}", path.display());
    }
    for (path, bytes) in seeds("event") {
        assert!(events::decode(&bytes).is_ok(), "{}", path.display());
    }
    let format = OomFormat::parse(MARK_VICTIM_FORMAT).expect("this machine's format");
    let rec = format.decode(as_bytes(&crate::events::oom::sample_mark_victim())).expect("decodes");
    assert_eq!((rec.pid, rec.comm.as_str()), (1234, "leak"));
}

/// The ELF seeds reach the readers the target is for: an allocator's functions, V8's
/// `v8dbg_*` constants, CFI to unwind with.
#[test]
fn elf_seeds_reach_the_readers() {
    let so = std::fs::read(corpus_dir("elf").join("allocator.so")).expect("the allocator seed");
    let found = crate::bpf::uprobe::resolve_functions(&so, &["malloc", "free", "calloc", "realloc"])
        .expect("the seed parses");
    assert_eq!(found.len(), 4, "{found:?}");
    let file = memfd(&so).expect("a memfd");
    let meta = crate::symbolize::v8::elf::read_elf(&file, "allocator.so").expect("its v8dbg constants");
    assert_eq!(meta.constants.get("TaggedSize"), Some(&8));
    let info = crate::symbolize::module::read_elf(&file).expect("its headers");
    assert!(info.unwind.has_cfi(), "the seed has .eh_frame");
}

/// The cgroup seeds name a cgroup the way `/proc` gives it.
#[test]
fn cgroup_seeds_name_the_cgroup() {
    let seed = std::fs::read(corpus_dir("cgroup_files").join("v2")).expect("the v2 seed");
    let text = String::from_utf8_lossy(&seed);
    let proc_cgroup = text.split('\0').nth(2).expect("three parts");
    assert_eq!(procfs::parse_cgroup(proc_cgroup), Some((false, "/system.slice/app.service".into())));
    assert_eq!(
        crate::session::cgroup::parse_procs(text.split('\0').next().unwrap_or("")).collect::<Vec<_>>(),
        vec![4242]
    );
}
