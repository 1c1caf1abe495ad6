//! Tests against the test process itself: its own modules, symbols and real stacks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use super::*;

/// The stack captured by [`capture_stack`]: registers and a copy of the stack from `sp` up.
struct Captured {
    regs: Regs,
    stack: Vec<u8>,
}

/// Captures the caller's registers and up to 16 KiB of its stack, bounded by the end of
/// the stack mapping, the way the eBPF program does for a traced process.
#[inline(never)]
fn capture_stack() -> Captured {
    let (ip, sp, bp): (u64, u64, u64);
    // SAFETY: only copies rsp, rbp and the current rip into registers; touches no memory.
    unsafe {
        core::arch::asm!(
            "lea {ip}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            ip = out(reg) ip,
            sp = out(reg) sp,
            bp = out(reg) bp,
            options(nomem, nostack, preserves_flags),
        );
    }
    let maps = crate::procfs::maps::parse_maps(
        &std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps"),
    );
    let stack_end = maps.iter().find(|m| m.contains(sp)).expect("a mapping holds the stack pointer").end;
    let len = (stack_end - sp).min(16 * 1024);
    let mut stack = vec![0u8; len as usize];
    // Reading through /proc/self/mem copies the bytes as the kernel would, without unsafe.
    File::open("/proc/self/mem")
        .and_then(|mem| mem.read_exact_at(&mut stack, sp))
        .expect("read own stack through /proc/self/mem");
    Captured { regs: Regs { ip, sp, bp }, stack }
}

#[inline(never)]
fn level_three() -> Captured {
    let captured = capture_stack();
    std::hint::black_box(captured)
}

#[inline(never)]
fn level_two() -> Captured {
    let captured = level_three();
    std::hint::black_box(captured)
}

#[inline(never)]
fn level_one() -> Captured {
    let captured = level_two();
    std::hint::black_box(captured)
}

#[inline(never)]
fn some_fn(x: u64) -> u64 {
    std::hint::black_box(x.wrapping_mul(31).rotate_left(7))
}

fn own_symbols() -> ProcessSymbols {
    ProcessSymbols::new(std::process::id()).expect("symbols of the test process")
}

fn names(frames: &[Vec<Frame>]) -> Vec<String> {
    frames.iter().flatten().map(|f| f.function.clone()).collect()
}

/// Index of the first function after `from` whose name contains `needle`.
fn find_after(names: &[String], from: usize, needle: &str) -> Option<usize> {
    names.iter().skip(from).position(|n| n.contains(needle)).map(|p| p + from)
}

#[test]
fn missing_process_is_an_error() {
    // pid_max is at most 2^22, so this pid never exists.
    let err = ProcessSymbols::new(u32::MAX - 1).expect_err("no such process");
    assert!(matches!(err, SymbolizeError::NoSuchProcess { .. }), "{err}");
}

#[test]
fn finds_own_modules() {
    let symbols = own_symbols();
    assert!(symbols.module_count() >= 2, "the test binary and libc at least, got {}", symbols.module_count());
    assert!(symbols.modules.iter().any(|m| m.name.contains("libc.so")));
}

#[test]
fn symbolizes_own_function() {
    let mut symbols = own_symbols();
    let addr = some_fn as *const () as usize as u64;
    let frames = symbols.symbolize(&[addr]);
    assert_eq!(frames.len(), 1);
    let frame = frames[0].last().expect("at least one frame");
    assert!(frame.function.contains("some_fn"), "{frame:?}");
    assert_eq!(frame.kind, FrameKind::Native);
    assert!(frame.file.ends_with("symbolize/tests.rs"), "{frame:?}");
    assert!(frame.line > 0, "{frame:?}");
    let exe = std::fs::read_link("/proc/self/exe").expect("readlink /proc/self/exe");
    assert_eq!(std::path::Path::new(&frame.module), exe, "module is the real path, not /proc/self/fd");

    // Cached: the same answer again.
    assert_eq!(symbols.symbolize(&[addr]), frames);
}

#[test]
fn unknown_ips_get_a_frame_and_return_addresses_that_are_not_code_none() {
    let mut symbols = own_symbols();
    let frames = symbols.symbolize(&[0x10, 0x20]);
    assert_eq!(frames.len(), 2);
    assert_eq!(
        frames[0],
        vec![Frame { function: "0x10".into(), kind: FrameKind::Unknown, ..Frame::default() }]
    );
    assert!(frames[1].is_empty(), "0x20 is in no executable mapping: not a frame, {:?}", frames[1]);
    assert!(symbols.symbolize(&[]).is_empty());
}

#[test]
fn frames_without_a_symbol_are_named_by_module_and_offset() {
    let frame = super::unknown_in_module("/usr/lib/libfoo.so.1 (deleted)", 0x1234);
    assert_eq!(frame.function, "libfoo.so.1+0x1234");
    assert_eq!(frame.module, "/usr/lib/libfoo.so.1 (deleted)");
    assert_eq!(frame.kind, FrameKind::Unknown);
}

#[test]
fn unwinds_own_stack() {
    let captured = level_one();
    let mut symbols = own_symbols();
    let addrs = symbols.unwind(captured.regs, &captured.stack, &[]);
    assert_eq!(addrs[0], captured.regs.ip);
    let frames = symbols.symbolize(&addrs);
    let names = names(&frames);
    let three = find_after(&names, 0, "level_three").unwrap_or_else(|| panic!("level_three in {names:#?}"));
    let two = find_after(&names, three, "level_two")
        .unwrap_or_else(|| panic!("level_two after level_three in {names:#?}"));
    let one = find_after(&names, two, "level_one")
        .unwrap_or_else(|| panic!("level_one after level_two in {names:#?}"));
    find_after(&names, one, "unwinds_own_stack")
        .unwrap_or_else(|| panic!("the test after level_one in {names:#?}"));
}

#[test]
fn falls_back_to_kernel_frame_pointers() {
    let mut symbols = own_symbols();
    // No stack bytes: CFI gets only the ip, so the kernel's frame-pointer stack is used.
    let fp = [some_fn as *const () as usize as u64, 0x1234, 0x5678];
    assert_eq!(symbols.unwind(Regs { ip: fp[0], sp: 0x1000, bp: 0 }, &[], &fp), fp.to_vec());
}

/// Frames inside libc's `qsort` (glibc is built without frame pointers), captured from the
/// comparison callback.
static IN_QSORT: Mutex<Option<Captured>> = Mutex::new(None);

extern "C" fn compare_and_capture(a: *const libc::c_void, b: *const libc::c_void) -> libc::c_int {
    let mut slot = IN_QSORT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if slot.is_none() {
        *slot = Some(capture_stack());
    }
    // SAFETY: qsort passes pointers to two elements of the `u64` array being sorted.
    let (a, b) = unsafe { (*a.cast::<u64>(), *b.cast::<u64>()) };
    a.cmp(&b) as libc::c_int
}

#[inline(never)]
fn sort_in_libc() -> Captured {
    let mut values: Vec<u64> = (0..64).rev().collect();
    // SAFETY: `values` is a valid array of `values.len()` elements of the size given, and
    // the comparator reads them as `u64`.
    unsafe {
        libc::qsort(
            values.as_mut_ptr().cast(),
            values.len(),
            std::mem::size_of::<u64>(),
            Some(compare_and_capture),
        );
    }
    assert!(values.is_sorted());
    let captured = IN_QSORT.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    captured.expect("qsort called the comparator")
}

#[test]
fn unwinds_through_libc_without_frame_pointers() {
    let captured = sort_in_libc();
    let mut symbols = own_symbols();
    let addrs = symbols.unwind(captured.regs, &captured.stack, &[]);
    let frames = symbols.symbolize(&addrs);
    let flat: Vec<&Frame> = frames.iter().flatten().collect();
    let names = names(&frames);
    let cmp =
        find_after(&names, 0, "compare_and_capture").unwrap_or_else(|| panic!("comparator in {names:#?}"));
    let libc_frame = flat
        .iter()
        .skip(cmp)
        .position(|f| f.module.contains("libc.so"))
        .unwrap_or_else(|| panic!("a libc frame after the comparator in {flat:#?}"));
    find_after(&names, cmp + libc_frame, "sort_in_libc")
        .unwrap_or_else(|| panic!("the caller of qsort after the libc frames in {names:#?}"));
}

#[test]
fn perf_map_names_addresses_outside_modules() {
    let mut symbols = own_symbols();
    // Point the reader at a map we write, as node would.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("perf-test.map");
    std::fs::write(&path, b"1000 100 JS:*rememberOrder /srv/app.js:9:21\n").expect("write perf map");
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&path).expect("stat"));
    symbols.perf_map = PerfMapReader::new(path.clone(), vec![owner]);

    // A return address just past the entry still belongs to it (looked up at addr - 1).
    let frames = symbols.symbolize(&[0x1010, 0x1100]);
    let js = &frames[0][0];
    assert_eq!(
        (js.function.as_str(), js.file.as_str(), js.line, js.kind, js.module.as_str()),
        ("rememberOrder", "/srv/app.js", 9, FrameKind::Js, "[jit]")
    );
    assert_eq!(frames[1][0].function, "rememberOrder");

    // Newer code at the same address: the cached answer is replaced.
    let mut file = std::fs::OpenOptions::new().append(true).open(&path).expect("open for append");
    std::io::Write::write_all(&mut file, b"1000 80 Builtin:ArrayPrototypePush\n").expect("append");
    symbols.refresh_perf_map();
    let frames = symbols.symbolize(&[0x1010]);
    assert_eq!(
        (frames[0][0].function.as_str(), frames[0][0].module.as_str()),
        ("ArrayPrototypePush", "[v8]")
    );

    // Addresses in a file-backed module never come from the perf map.
    let own = some_fn as *const () as usize as u64;
    std::io::Write::write_all(&mut file, format!("{own:x} 10 JS:*impostor /x.js:1:1\n").as_bytes())
        .expect("append");
    symbols.refresh_perf_map();
    assert!(symbols.symbolize(&[own])[0].iter().all(|f| f.function.contains("some_fn")));
}

#[test]
fn elf_symbols_without_dwarf() {
    let symbols = own_symbols();
    let addr = libc::qsort as *const () as usize as u64;
    let Some(Region { start, kind: RegionKind::File { module, offset }, .. }) = symbols.region_at(addr)
    else {
        panic!("qsort at {addr:#x} is in no file-backed module");
    };
    let file = &symbols.modules[*module];
    let path = file.fd_path().expect("libc is open");
    let frames = symbols
        .native
        .symbolize_with(&path, false, &file.name, &[addr - start + offset])
        .expect("symbolize with ELF symbols only");
    let frames = frames[0].as_ref().expect("qsort is in libc's dynamic symbol table");
    assert!(frames[0].function.contains("qsort"), "{frames:?}");
    assert_eq!((frames[0].file.as_str(), frames[0].line), ("", 0), "no DWARF asked for");
}

/// Kills and reaps the child on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn symbols_survive_target_exit() {
    let mut child = Child(std::process::Command::new("sleep").arg("30").spawn().expect("start sleep"));
    let pid = child.0.id();
    // Wait for the exec and the dynamic loader to map libc.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut symbols = loop {
        let symbols = ProcessSymbols::new(pid).expect("symbols of the child");
        if symbols.modules.iter().any(|m| m.name.contains("libc.so")) {
            break symbols;
        }
        assert!(std::time::Instant::now() < deadline, "sleep never mapped libc");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };

    // qsort in the child: the same file offset as in our libc, at the child's mapping.
    let ours = own_symbols();
    let addr = libc::qsort as *const () as usize as u64;
    let Some(Region { start, kind: RegionKind::File { offset, .. }, .. }) = ours.region_at(addr) else {
        panic!("qsort is in no module of ours");
    };
    let file_offset = addr - start + offset;
    let child_addr = symbols
        .regions
        .iter()
        .find_map(|r| match &r.kind {
            RegionKind::File { module, offset }
                if symbols.modules[*module].name.contains("libc.so")
                    && (*offset..*offset + (r.end - r.start)).contains(&file_offset) =>
            {
                Some(r.start + file_offset - offset)
            }
            _ => None,
        })
        .expect("libc text mapped in the child");

    child.0.kill().expect("kill the child");
    child.0.wait().expect("reap the child");
    assert!(matches!(symbols.refresh_maps(), Err(SymbolizeError::NoSuchProcess { .. })), "the child is gone");
    let frames = symbols.symbolize(&[child_addr]);
    assert!(frames[0].iter().any(|f| f.function.contains("qsort")), "after exit: {frames:?}");
}

#[test]
fn process_symbols_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<ProcessSymbols>();
}
