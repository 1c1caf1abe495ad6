//! V8's post-mortem metadata in the node executable (or libnode): the `v8dbg_*`
//! constants, the V8 version and where the embedded builtins are, read from the file at
//! attach. The constants are `int`s stored at their symbol's address in `.data` or
//! `.rodata`, so they are read from the file, not from the process.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;

use object::{Object, ObjectSection, ReadCache, SectionKind};

use super::constants::Refusal;

/// What the ELF file says: the raw constants (without the `v8dbg_` prefix), the version
/// and, when `.symtab` is there, where the embedded builtins are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ElfMetadata {
    pub constants: HashMap<String, i64>,
    pub version: Option<(u32, u32, u32)>,
    /// File (stated) addresses of V8's embedded builtins: the interpreter lives there.
    pub builtins: Option<Range<u64>>,
}

const VERSION_SYMBOLS: [&str; 3] =
    ["_ZN2v88internal7Version6major_E", "_ZN2v88internal7Version6minor_E", "_ZN2v88internal7Version6build_E"];
const BLOB_START: &str = "v8_Default_embedded_blob_code_";
const BLOB_SIZE: &str = "v8_Default_embedded_blob_code_size_";

/// Reads the `v8dbg_*` constants (`.dynsym`, then `.symtab`), the version and the builtins
/// range from `file`, reading only the symbol tables and the few words they point at.
pub(crate) fn read_elf(file: &File, name: &str) -> Result<ElfMetadata, Refusal> {
    let unreadable = |why: String| Refusal::Unreadable { file: name.to_string(), why };
    let cache = ReadCache::new(file);
    let object = object::File::parse(&cache).map_err(|e| unreadable(e.to_string()))?;
    let sections = Sections::of(&object);
    let mut meta = ElfMetadata::default();
    // (address, size) of the symbols wanted besides the constants.
    let mut wanted: HashMap<&str, (u64, u64)> = HashMap::new();
    for (table, strings) in [(".dynsym", ".dynstr"), (".symtab", ".strtab")] {
        let from_this_table = meta.constants.is_empty();
        let symbols = symbol_table(file, &object, table, strings).map_err(|e| unreadable(e.to_string()))?;
        let prefixes: [&[u8]; 3] = [b"v8dbg_", b"_ZN2v88internal7Version", b"v8_Default_embedded_blob_code_"];
        for (sym_name, addr, size) in symbols.matching(&prefixes) {
            if let Some(constant) = sym_name.strip_prefix(b"v8dbg_") {
                if from_this_table
                    && let Ok(constant) = std::str::from_utf8(constant)
                    && let Some(value) = sections.read_int(file, addr, size.clamp(1, 8))
                {
                    meta.constants.insert(constant.to_string(), value);
                }
            } else if let Some(&known) =
                VERSION_SYMBOLS.iter().chain(&[BLOB_START, BLOB_SIZE]).find(|s| s.as_bytes() == sym_name)
            {
                wanted.entry(known).or_insert((addr, size));
            }
        }
    }
    if meta.constants.is_empty() {
        return Err(Refusal::NoMetadata(name.to_string()));
    }
    let word =
        |sym: &str, size: u64| wanted.get(sym).and_then(|&(addr, _)| sections.read_int(file, addr, size));
    if let [Some(major), Some(minor), Some(build)] = VERSION_SYMBOLS.map(|s| word(s, 4)) {
        meta.version = Some((major as u32, minor as u32, build as u32));
    } else {
        // Without `.symtab` (node 20 exports no version symbol) the version string node
        // embeds, `11.3.244.8-node.38`, is in `.rodata`.
        meta.version =
            object.section_by_name(".rodata").and_then(|s| s.data().ok()).and_then(find_version_string);
    }
    if let (Some(&(start, _)), Some(size)) = (wanted.get(BLOB_START), word(BLOB_SIZE, 4))
        && size > 0
    {
        meta.builtins = Some(start..start.saturating_add(size as u64));
    }
    Ok(meta)
}

/// A symbol table and its strings, read whole (`.symtab` has ~100k entries: one read
/// each for their names would take seconds).
struct SymbolTable {
    entries: Vec<u8>,
    strings: Vec<u8>,
}

impl SymbolTable {
    /// (name, value, size) of the entries whose name starts with one of `prefixes`
    /// (`Elf64_Sym`: name u32, info u8, other u8, shndx u16, value u64, size u64).
    fn matching<'a>(&'a self, prefixes: &'a [&[u8]]) -> impl Iterator<Item = (&'a [u8], u64, u64)> + 'a {
        self.entries.chunks_exact(24).filter_map(move |sym| {
            let at = |range: std::ops::Range<usize>| sym.get(range);
            let name = u32::from_le_bytes(at(0..4)?.try_into().ok()?) as usize;
            let rest = self.strings.get(name..)?;
            // Most names are long C++ ones: look at their start only.
            if !prefixes.iter().any(|p| rest.starts_with(p)) {
                return None;
            }
            let end = rest.iter().position(|&b| b == 0)?;
            let value = u64::from_le_bytes(at(8..16)?.try_into().ok()?);
            let size = u64::from_le_bytes(at(16..24)?.try_into().ok()?);
            Some((&rest[..end], value, size))
        })
    }
}

fn symbol_table<'data, R: object::ReadRef<'data>>(
    file: &File,
    object: &object::File<'data, R>,
    table: &str,
    strings: &str,
) -> std::io::Result<SymbolTable> {
    use std::os::unix::fs::FileExt;
    let read = |section: &str| -> std::io::Result<Vec<u8>> {
        let Some((offset, size)) = object.section_by_name(section).and_then(|s| s.file_range()) else {
            return Ok(Vec::new());
        };
        // The header's size is the file's to state: past the file's end it is refused
        // before anything is allocated for it.
        let len = file.metadata()?.len();
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{section} ({size} bytes at {offset:#x}) runs past the end of the file ({len} bytes)"
                ),
            ));
        }
        let mut bytes = vec![0u8; usize::try_from(size).map_err(std::io::Error::other)?];
        file.read_exact_at(&mut bytes, offset)?;
        Ok(bytes)
    };
    Ok(SymbolTable { entries: read(table)?, strings: read(strings)? })
}

/// The first `MAJOR.MINOR.BUILD[.PATCH]-node.N` string in `data`.
fn find_version_string(data: &[u8]) -> Option<(u32, u32, u32)> {
    const MARK: &[u8] = b"-node.";
    let mut from = 0;
    while let Some(pos) = data[from..].windows(MARK.len()).position(|w| w == MARK) {
        let at = from + pos;
        from = at + MARK.len();
        let start = data[..at].iter().rposition(|b| !(b.is_ascii_digit() || *b == b'.')).map_or(0, |p| p + 1);
        let Ok(text) = std::str::from_utf8(&data[start..at]) else { continue };
        let parts: Vec<u32> = text.split('.').map_while(|p| p.parse().ok()).collect();
        if (3..=4).contains(&parts.len()) && text.split('.').count() == parts.len() {
            return Some((parts[0], parts[1], parts[2]));
        }
    }
    None
}

/// The loaded sections: stated address range and file offset (`None`: `.bss`).
struct Sections(Vec<(Range<u64>, Option<u64>)>);

impl Sections {
    fn of<'data, R: object::ReadRef<'data>>(object: &object::File<'data, R>) -> Self {
        Self(
            object
                .sections()
                .filter(|s| s.address() != 0)
                .map(|s| {
                    let range = s.address()..s.address().saturating_add(s.size());
                    let offset = (s.kind() != SectionKind::UninitializedData)
                        .then(|| s.file_range().map(|(offset, _)| offset))
                        .flatten();
                    (range, offset)
                })
                .collect(),
        )
    }

    /// The little-endian, sign-extended integer of `size` bytes at stated address `addr`,
    /// read from the file (one small read: sections are tens of megabytes).
    fn read_int(&self, file: &File, addr: u64, size: u64) -> Option<i64> {
        use std::os::unix::fs::FileExt;
        let (range, offset) = self
            .0
            .iter()
            .find(|(r, _)| r.start <= addr && addr.checked_add(size).is_some_and(|end| end <= r.end))?;
        let Some(offset) = offset else { return Some(0) };
        let mut buf = [0u8; 8];
        let len = usize::try_from(size).ok().filter(|&n| n <= 8)?;
        file.read_exact_at(&mut buf[..len], offset.checked_add(addr - range.start)?).ok()?;
        let value = i64::from_le_bytes(buf);
        let shift = 64 - 8 * len as u32;
        Some((value << shift) >> shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_node_binary() {
        let Ok(file) = File::open("/usr/bin/node") else {
            eprintln!("SKIPPED reads_the_node_binary: no /usr/bin/node");
            return;
        };
        let meta = read_elf(&file, "/usr/bin/node").expect("node exports v8dbg_* symbols");
        assert_eq!(meta.constants.get("TaggedSize"), Some(&8));
        assert_eq!(meta.constants.get("off_fp_function"), Some(&-16), "negative values are sign-extended");
        let (major, ..) = meta.version.expect("version symbols");
        assert!(major >= 10, "{:?}", meta.version);
        if let Some(builtins) = &meta.builtins {
            assert!(builtins.end - builtins.start > 1 << 20, "the embedded blob is megabytes: {builtins:x?}");
        }
    }
    #[test]
    fn version_string_in_rodata() {
        let rodata = b"\x00x-node.1\x00v20.20.2\x0011.3.244.8-node.38\x00";
        assert_eq!(find_version_string(rodata), Some((11, 3, 244)));
        assert_eq!(find_version_string(b"\x0010.2.154-node.37"), Some((10, 2, 154)));
        assert_eq!(find_version_string(b"abc-node.1"), None);
    }

    /// Found by `cargo fuzz run elf`: a `.symtab` whose header states more bytes than the
    /// file holds made memtrace allocate them (and abort when they could not be had).
    #[test]
    fn a_symbol_table_past_the_end_of_the_file_is_refused() {
        let seed = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/elf/crash-a4c3dbc9d63b"))
            .expect("the crash input");
        let mut file = tempfile::tempfile().expect("a temp file");
        std::io::Write::write_all(&mut file, &seed).expect("write it");
        match read_elf(&file, "crash") {
            Err(Refusal::Unreadable { why, .. }) => assert!(why.contains("past the end"), "{why}"),
            other => panic!("a clear refusal, not {other:?}"),
        }
    }

    #[test]
    fn refuses_files_without_metadata() {
        let exe = std::env::current_exe().expect("own executable");
        let file = File::open(&exe).expect("open own executable");
        assert!(matches!(read_elf(&file, "self"), Err(Refusal::NoMetadata(_))));
    }
}
