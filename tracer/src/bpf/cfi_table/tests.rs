use std::sync::Arc;

use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use super::*;

/// The C library the allocator view tables first; these machines and CI run Debian.
const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

fn libc() -> Vec<u8> {
    std::fs::read(LIBC).unwrap_or_else(|e| panic!("read {LIBC}: {e} (the tests expect a Debian glibc)"))
}

fn symbol(data: &[u8], name: &str) -> u64 {
    let file = object::File::parse(data).expect("parse libc");
    file.dynamic_symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("libc has no {name}"))
        .address()
}

#[test]
fn libc_table_is_sorted_and_covers_its_text() {
    let data = libc();
    let table = build(&data).expect("build libc's table");
    assert!(table.rows.len() > 1000, "only {} rows", table.rows.len());
    assert!(
        table.rows.len() < CFI_ROWS_MAX as usize / 2,
        "{} rows leave no room for libstdc++",
        table.rows.len()
    );
    assert!(table.rows.windows(2).all(|w| w[0].pc < w[1].pc), "rows are not strictly sorted");
    let malloc = symbol(&data, "malloc");
    assert!(table.text_lo <= malloc && malloc < table.text_hi, "malloc outside the text range");
    assert!(table.rows.iter().any(|r| r.cfa_reg == cfa::END), "no outermost frame (clone3, start_thread)");
    // Unsupported rows are mostly the padding between functions: count bytes, not rows.
    let supported: u64 = table
        .rows
        .windows(2)
        .filter(|w| w[0].cfa_reg != cfa::UNSUPPORTED)
        .map(|w| u64::from(w[1].pc - w[0].pc))
        .sum();
    let text = table.text_hi - table.text_lo;
    assert!(supported * 100 > text * 95, "rows cover {supported} of {text} bytes of text");
}

#[test]
fn function_entries_have_the_return_address_on_top() {
    let data = libc();
    let table = build(&data).expect("build libc's table");
    for name in ["malloc", "free", "calloc", "realloc", "strdup", "fopen"] {
        let row = table.lookup(symbol(&data, name)).unwrap_or_else(|| panic!("no row at {name}"));
        assert_eq!(
            (row.cfa_reg, row.cfa_offset, row.rbp_offset),
            (cfa::RSP, 8, 0),
            "{name}'s entry: CFA = rsp + 8, rbp untouched"
        );
    }
}

/// A stack where every word is derived from its address, so that a wrong offset shows.
fn word(addr: u64) -> u64 {
    addr ^ 0x5a5a_0000_0000_1234
}

/// framehop (samply's unwinder, used by the syscall views) and the table agree on the
/// caller's return address, stack pointer and rbp at every sampled address of libc that
/// the table covers.
#[test]
fn rows_agree_with_framehop_over_libc() {
    let data = libc();
    let table = build(&data).expect("build libc's table");
    let file = object::File::parse(&*data).expect("parse libc");
    let section = |name: &str| {
        file.section_by_name(name)
            .map(|s| (s.address()..s.address() + s.size(), Arc::<[u8]>::from(s.data().unwrap_or_default())))
    };
    let eh_frame = section(".eh_frame").expect(".eh_frame");
    let eh_frame_hdr = section(".eh_frame_hdr").expect(".eh_frame_hdr");
    let info = ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma: section(".text").map(|(r, _)| r),
        got_svma: section(".got").map(|(r, _)| r),
        eh_frame_svma: Some(eh_frame.0.clone()),
        eh_frame: Some(eh_frame.1),
        eh_frame_hdr_svma: Some(eh_frame_hdr.0.clone()),
        eh_frame_hdr: Some(eh_frame_hdr.1),
        ..ExplicitModuleSectionInfo::default()
    };
    // Loaded at 0x7f00_0000_0000: the table's module addresses plus that bias.
    let bias = 0x7f00_0000_0000;
    let mut unwinder = UnwinderX86_64::new();
    unwinder.add_module(Module::new("libc".into(), bias + table.text_lo..bias + table.text_hi, bias, info));
    let mut cache = CacheX86_64::new();
    let (sp, bp) = (0x7ffc_0000_1000u64, 0x7ffc_0000_8000u64);
    let (mut compared, mut skipped) = (0, 0);
    for pc in (table.text_lo..table.text_hi).step_by(61) {
        let Some(row) = table.lookup(pc).filter(|r| matches!(r.cfa_reg, cfa::RSP | cfa::RBP)) else {
            skipped += 1;
            continue;
        };
        let base = if row.cfa_reg == cfa::RSP { sp } else { bp };
        let cfa = base + u64::from(row.cfa_offset);
        let ours = (
            word(cfa - 8),
            cfa,
            if row.rbp_offset == 0 {
                bp
            } else {
                word(cfa.wrapping_add((i64::from(row.rbp_offset) * 8) as u64))
            },
        );
        let mut regs = UnwindRegsX86_64::new(bias + pc, sp, bp);
        let mut read = |addr: u64| Ok(word(addr));
        let theirs = unwinder.unwind_frame(
            FrameAddress::InstructionPointer(bias + pc),
            &mut regs,
            &mut cache,
            &mut read,
        );
        match theirs {
            Ok(Some(ra)) => {
                assert_eq!(ours, (ra, regs.sp(), regs.bp()), "at libc+{pc:#x} (row {row:?})");
                compared += 1;
            }
            other => panic!("at libc+{pc:#x} the table has {row:?}, framehop says {other:?}"),
        }
    }
    assert!(compared > 10 * skipped, "compared {compared}, skipped {skipped}");
}

#[test]
fn rows_merge_and_gaps_stop_the_walk() {
    let mut rows = Vec::new();
    let rsp8 = CfiRow { pc: 0x10, cfa_offset: 8, cfa_reg: cfa::RSP, rbp_offset: 0 };
    push(&mut rows, rsp8);
    push(&mut rows, CfiRow { pc: 0x20, ..rsp8 });
    push(&mut rows, CfiRow { pc: 0x30, cfa_offset: 16, ..rsp8 });
    assert_eq!(rows.len(), 2, "an unchanged rule is one row");
    let table = ModuleTable { text_lo: 0, text_hi: 0x100, rows };
    assert_eq!(table.lookup(0x0f), None, "before the first row");
    assert_eq!(table.lookup(0x2f).map(|r| r.cfa_offset), Some(8));
    assert_eq!(table.lookup(0x30).map(|r| r.cfa_offset), Some(16));
}

#[test]
fn cookies_round_trip() {
    use tracer_common::cfi::cookie;
    for slot in 0..CFI_MODULES_MAX {
        assert_eq!(cookie::decode(cookie::encode(slot, 0x9_a0f0)), Some((slot, 0x9_a0f0)));
    }
    assert_eq!(cookie::decode(0), None, "a probe without a cookie is in no tabled module");
}

/// ld.so's entry code has no FDE and is below every library constructor: the end of the
/// stack, not a table miss (which would be counted and reported).
#[test]
fn the_loaders_entry_is_the_outermost_frame() {
    const LOADER: &str = "/lib64/ld-linux-x86-64.so.2";
    let data = std::fs::read(LOADER).unwrap_or_else(|e| panic!("read {LOADER}: {e}"));
    let table = build(&data).expect("build ld.so's table");
    let entry = object::File::parse(&*data).expect("parse ld.so").entry();
    for pc in [entry, entry + 8] {
        assert_eq!(table.lookup(pc).map(|r| r.cfa_reg), Some(cfa::END), "at ld.so+{pc:#x}");
    }
    let debug_state = symbol(&data, "_dl_debug_state");
    assert_eq!(table.lookup(debug_state).map(|r| (r.cfa_reg, r.cfa_offset)), Some((cfa::RSP, 8)));
}
