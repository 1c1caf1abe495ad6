use super::*;

const GLIBC_MAPS: &str = "\
55d0c8a00000-55d0c8a01000 r--p 00000000 fe:01 1311 /usr/bin/node
55d0c8a01000-55d0c9f00000 r-xp 00001000 fe:01 1311 /usr/bin/node
55d0ca000000-55d0ca200000 rw-p 00000000 00:00 0          [heap]
7f1c2a000000-7f1c2a0a9000 r--p 00000000 fe:01 2222 /usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30
7f1c2a0a9000-7f1c2a1d2000 r-xp 000a9000 fe:01 2222 /usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30
7f1c2b000000-7f1c2b026000 r--p 00000000 fe:01 3333 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2b026000-7f1c2b17b000 r-xp 00026000 fe:01 3333 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2b17b000-7f1c2b1ce000 r--p 0017b000 fe:01 3333 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2c000000-7f1c2c001000 r-xp 00000000 00:00 0
7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0          [stack]
";

#[test]
fn glibc_target() {
    let maps = parse_maps(GLIBC_MAPS);
    assert_eq!(maps.len(), 7, "only file mappings: {maps:?}");
    let modules = classify(&maps, Some("/usr/bin/node"));
    assert_eq!(modules.libc.as_deref(), Some("/usr/lib/x86_64-linux-gnu/libc.so.6"));
    assert_eq!(modules.cxx.as_deref(), Some("/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30"));
    assert_eq!(modules.exe.as_deref(), Some("/usr/bin/node"));
    assert_eq!(modules.replacement, None);
}

#[test]
fn replacement_allocators_are_recognized() {
    let text = format!(
        "{GLIBC_MAPS}7f1c2d000000-7f1c2d100000 r-xp 00010000 fe:01 4444 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    );
    let modules = classify(&parse_maps(&text), Some("/usr/bin/node"));
    assert_eq!(
        modules.replacement,
        Some(("jemalloc", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2".to_string()))
    );
    let err = UprobeError::ReplacementAllocator {
        pid: 42,
        name: "jemalloc",
        path: "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2".into(),
    };
    let message = err.to_string();
    assert!(message.contains("jemalloc") && message.contains("--track mmap,brk"), "{message}");
    let preload = "7f00-7f10 r-xp 00000000 fe:01 5 /opt/lib/libtcmalloc_minimal.so.4.5.9 (deleted)\n";
    assert_eq!(classify(&parse_maps(preload), None).replacement.map(|r| r.0), Some("tcmalloc"));
}

#[test]
fn static_and_musl_targets() {
    let text = "\
00400000-00401000 r--p 00000000 fe:01 77 /opt/static-app
00401000-00480000 r-xp 00001000 fe:01 77 /opt/static-app
";
    let modules = classify(&parse_maps(text), None);
    assert_eq!(modules.libc, None, "no C library mapped: the executable must define malloc");
    assert_eq!(modules.exe.as_deref(), Some("/opt/static-app"), "first mapping is the executable");
    let musl = "7f00-7f10 r-xp 00000000 fe:01 5 /lib/ld-musl-x86_64.so.1\n";
    assert_eq!(classify(&parse_maps(musl), None).libc.as_deref(), Some("/lib/ld-musl-x86_64.so.1"));
}

#[test]
fn paths_with_spaces_and_deleted_files() {
    let text = "7f00-7f10 r-xp 00001000 fe:01 5 /opt/my app/libc.so.6 (deleted)\n";
    let maps = parse_maps(text);
    assert_eq!(maps[0].path, "/opt/my app/libc.so.6 (deleted)");
    assert_eq!(maps[0].file_name(), "libc.so.6");
    assert!(maps[0].executable);
    assert_eq!(maps[0].offset, 0x1000);
}

#[test]
fn runtime_addresses_follow_the_mapping() {
    let maps = parse_maps(GLIBC_MAPS);
    let libc = maps.iter().find(|m| m.path.ends_with("libc.so.6")).expect("libc mapped");
    // malloc at file offset 0x98930 lies in the r-xp mapping of offset 0x26000.
    assert_eq!(runtime_address(&maps, libc, 0x98930), Some(0x7f1c_2b02_6000 + 0x98930 - 0x26000));
    assert_eq!(runtime_address(&maps, libc, 0x10_0000_0000), None);
}

/// A function of this test binary for the ELF resolver to find.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn memtrace_uprobe_test_target(x: u64) -> u64 {
    std::hint::black_box(x.wrapping_mul(3))
}

#[test]
fn resolves_functions_of_this_test_binary() {
    let exe = std::fs::read_link("/proc/self/exe").expect("read /proc/self/exe");
    let data = std::fs::read(&exe).expect("read the test binary");
    let found = resolve_functions(&data, &["memtrace_uprobe_test_target", "no_such_function_here"])
        .expect("parse the test binary");
    assert!(!found.contains_key("no_such_function_here"));
    let location = found["memtrace_uprobe_test_target"];
    assert!(location.size > 0);
    // The file offset maps back to the function's address in this very process.
    let maps = parse_maps(&std::fs::read_to_string("/proc/self/maps").expect("read maps"));
    let exe = exe.to_string_lossy();
    let module = maps.iter().find(|m| m.path == exe).expect("the test binary is mapped");
    let address = runtime_address(&maps, module, location.file_offset).expect("offset is mapped");
    assert_eq!(address, memtrace_uprobe_test_target as *const () as usize as u64);
    assert_eq!(memtrace_uprobe_test_target(2), 6);
}

#[test]
fn locked_first_instructions_are_skipped() {
    // Node 20: NodeArrayBufferAllocator::Free begins with `lock sub %rdx,0x10(%rdi)`.
    assert_eq!(locked_instruction_len(&[0xf0, 0x48, 0x29, 0x57, 0x10, 0x48, 0x8b]), Some(5));
    // lock addl $1,(%rax): opcode 0x83, imm8.
    assert_eq!(locked_instruction_len(&[0xf0, 0x83, 0x00, 0x01]), Some(4));
    // lock incq 0x100(%rbx): REX.W, 0xff /0, disp32.
    assert_eq!(locked_instruction_len(&[0xf0, 0x48, 0xff, 0x83, 0, 1, 0, 0, 0x90]), Some(8));
    // lock subq $1,(%rsp,%rax,8): SIB byte.
    assert_eq!(locked_instruction_len(&[0xf0, 0x48, 0x83, 0x2c, 0xc4, 0x01]), Some(6));
    // lock xadd writes a register: not skipped.
    assert_eq!(locked_instruction_len(&[0xf0, 0x48, 0x0f, 0xc1, 0x07]), None);
    // Not locked, or cut short.
    assert_eq!(locked_instruction_len(&[0x55, 0x48, 0x89, 0xe5]), None);
    assert_eq!(locked_instruction_len(&[0xf0, 0x48, 0x29]), None);
    // Prefixes the old hand-written decoder did not know: a segment override before LOCK
    // (lock addl $1,%fs:(%rax)) and an operand-size prefix (lock incw (%rdi)).
    assert_eq!(locked_instruction_len(&[0x64, 0xf0, 0x83, 0x00, 0x01, 0x90]), Some(5));
    assert_eq!(locked_instruction_len(&[0x66, 0xf0, 0xff, 0x07, 0x90]), Some(4));
    // RIP-relative memory with an imm32: lock addl $0x10000,0x1234(%rip).
    assert_eq!(locked_instruction_len(&[0xf0, 0x81, 0x05, 0x34, 0x12, 0, 0, 0, 0, 1, 0, 0x90]), Some(11));
    // lock cmpxchg writes rax: not skipped; lock with a register operand is invalid.
    assert_eq!(locked_instruction_len(&[0xf0, 0x48, 0x0f, 0xb1, 0x17]), None);
    assert_eq!(locked_instruction_len(&[0xf0, 0x48, 0x29, 0xd0]), None);
}
