//! A file mapped executable into the traced process: its handle, kept open so it can be
//! read after the target exits, and what its ELF headers say about unwinding.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use framehop::ExplicitModuleSectionInfo;
use object::{Object, ObjectSection, ObjectSegment, ReadCache, SegmentFlags};

use super::{SymbolizeError, io_error};
use crate::procfs::maps::MapEntry;

/// Section bytes shared between every mapping of the same file.
pub(crate) type Bytes = Arc<[u8]>;

/// A `PT_LOAD` segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LoadSegment {
    pub file_offset: u64,
    pub file_size: u64,
    pub vaddr: u64,
    pub executable: bool,
}

/// Unwind sections, addresses as stated in the file (SVMAs).
#[derive(Clone, Debug, Default)]
pub(crate) struct UnwindSections {
    text: Option<Range<u64>>,
    got: Option<Range<u64>>,
    eh_frame: Option<(Range<u64>, Bytes)>,
    eh_frame_hdr: Option<(Range<u64>, Bytes)>,
    debug_frame: Option<Bytes>,
}

impl UnwindSections {
    /// `.text`, as stated in the file.
    pub fn text(&self) -> Option<Range<u64>> {
        self.text.clone()
    }

    pub fn has_cfi(&self) -> bool {
        self.eh_frame.is_some() || self.debug_frame.is_some()
    }

    pub fn section_info(&self) -> ExplicitModuleSectionInfo<Bytes> {
        ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: self.text.clone(),
            got_svma: self.got.clone(),
            eh_frame_svma: self.eh_frame.as_ref().map(|(range, _)| range.clone()),
            eh_frame: self.eh_frame.as_ref().map(|(_, data)| data.clone()),
            eh_frame_hdr_svma: self.eh_frame_hdr.as_ref().map(|(range, _)| range.clone()),
            eh_frame_hdr: self.eh_frame_hdr.as_ref().map(|(_, data)| data.clone()),
            debug_frame: self.debug_frame.clone(),
            ..ExplicitModuleSectionInfo::default()
        }
    }
}

/// What we could read from the ELF file.
#[derive(Clone, Debug, Default)]
pub(crate) struct ElfInfo {
    pub loads: Vec<LoadSegment>,
    pub unwind: UnwindSections,
}

impl ElfInfo {
    /// The load bias of a mapping of this file: the process address of stated address 0.
    /// Uses the `PT_LOAD` segment whose file range holds the mapping's offset (segment
    /// offsets need not be page-aligned; the mapping's is).
    pub fn bias_for(&self, map: &MapEntry) -> Option<u64> {
        const PAGE: u64 = 4096;
        let segment = self
            .loads
            .iter()
            .filter(|s| {
                let aligned = s.file_offset & !(PAGE - 1);
                aligned <= map.offset && map.offset < s.file_offset.saturating_add(s.file_size.max(1))
            })
            .max_by_key(|s| (s.executable == map.executable, s.file_offset))?;
        // address(offset) = bias + vaddr + (offset - file_offset), at offset = map.offset.
        map.start.wrapping_add(segment.file_offset).wrapping_sub(map.offset).checked_sub(segment.vaddr)
    }
}

/// One executable file of the traced process (deduplicated by device and inode).
#[derive(Debug)]
pub(crate) struct ModuleFile {
    /// The path as written in the target's maps: what reports show.
    pub name: String,
    /// Kept open so the file stays readable after the target exits or the file is deleted.
    file: Option<File>,
    pub elf: Option<ElfInfo>,
}

impl ModuleFile {
    /// Opens the file behind `map` through the target (`map_files`, which also reaches
    /// deleted files but needs privileges, else the target's root) and parses its headers.
    /// Failures are logged: the module then still has a name but no symbols or CFI.
    pub fn open(pid: u32, map: &MapEntry) -> Self {
        let name = map.path.clone();
        let file = match open_mapped_file(pid, map) {
            Ok(file) => Some(file),
            Err(err) => {
                log::warn!("{err}; frames in {name} will have no symbols");
                None
            }
        };
        let elf = file.as_ref().and_then(|file| match read_elf(file) {
            Ok(elf) => Some(elf),
            Err(err) => {
                log::warn!("cannot parse {name} as ELF ({err}); frames in it will have no symbols");
                None
            }
        });
        if let Some(elf) = &elf
            && !elf.unwind.has_cfi()
        {
            log::debug!("{name} has no .eh_frame or .debug_frame; unwinding through it uses frame pointers");
        }
        Self { name, file, elf }
    }

    /// The open file, for reading more of it (V8's metadata).
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// A path that reopens our own handle (`/proc/self/fd/N`), for blazesym.
    pub fn fd_path(&self) -> Option<PathBuf> {
        self.file.as_ref().map(|file| PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())))
    }
}

fn open_mapped_file(pid: u32, map: &MapEntry) -> Result<File, SymbolizeError> {
    let map_files = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", map.start, map.end));
    match File::open(&map_files) {
        Ok(file) => return Ok(file),
        Err(err) => log::trace!("open {}: {err}; trying the path", map_files.display()),
    }
    let path = PathBuf::from(format!("/proc/{pid}/root{}", map.path_on_disk()));
    let file = File::open(&path).map_err(|source| io_error(path.clone(), source))?;
    // The path may now name a different file (a package upgrade replaced it).
    let meta = file.metadata().map_err(|source| io_error(path.clone(), source))?;
    if meta.ino() != map.inode {
        return Err(SymbolizeError::FileReplaced { path, inode: map.inode });
    }
    Ok(file)
}

pub(crate) fn read_elf(file: &File) -> Result<ElfInfo, object::Error> {
    // Reads only the headers and the sections asked for, not the whole (maybe 100 MB) file.
    let cache = ReadCache::new(file);
    let object = object::File::parse(&cache)?;
    let loads = object
        .segments()
        .map(|segment| {
            let (file_offset, file_size) = segment.file_range();
            LoadSegment {
                file_offset,
                file_size,
                vaddr: segment.address(),
                executable: matches!(segment.flags(), SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0),
            }
        })
        .collect();
    let with_data = |name: &str| -> Option<(Range<u64>, Bytes)> {
        let section = object.section_by_name(name)?;
        let data = section.data().ok()?;
        Some((range(&section), Arc::from(data)))
    };
    let unwind = UnwindSections {
        text: object.section_by_name(".text").map(|s| range(&s)),
        got: object.section_by_name(".got").map(|s| range(&s)),
        eh_frame: with_data(".eh_frame"),
        eh_frame_hdr: with_data(".eh_frame_hdr"),
        debug_frame: with_data(".debug_frame").map(|(_, data)| data),
    };
    Ok(ElfInfo { loads, unwind })
}

fn range<'data>(section: &impl ObjectSection<'data>) -> Range<u64> {
    section.address()..section.address().saturating_add(section.size())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(start: u64, offset: u64, executable: bool) -> MapEntry {
        MapEntry {
            start,
            end: start + 0x1000,
            readable: true,
            writable: false,
            executable,
            offset,
            dev: 0,
            inode: 1,
            path: "/bin/x".into(),
        }
    }

    #[test]
    fn load_bias() {
        // The layout of /usr/bin/node (not PIE): text vaddr = offset + 0x400000.
        let node = ElfInfo {
            loads: vec![
                LoadSegment { file_offset: 0, file_size: 0x76_e5d8, vaddr: 0x40_0000, executable: false },
                LoadSegment {
                    file_offset: 0x77_2000,
                    file_size: 0x1a8_bca0,
                    vaddr: 0xb7_2000,
                    executable: true,
                },
            ],
            unwind: UnwindSections::default(),
        };
        assert_eq!(node.bias_for(&map(0xb7_3000, 0x77_3000, true)), Some(0));

        // A PIE shared object whose text segment starts mid-page (lld layout).
        let pie = ElfInfo {
            loads: vec![
                LoadSegment { file_offset: 0, file_size: 0x1234, vaddr: 0, executable: false },
                LoadSegment { file_offset: 0x1234, file_size: 0x5000, vaddr: 0x2234, executable: true },
            ],
            unwind: UnwindSections::default(),
        };
        let bias = 0x7f00_0000_0000;
        // The kernel maps the page holding offset 0x1234 (offset 0x1000) at bias + 0x2000.
        assert_eq!(pie.bias_for(&map(bias + 0x2000, 0x1000, true)), Some(bias));
        assert_eq!(pie.bias_for(&map(bias, 0x9_0000, true)), None, "offset outside every segment");
    }

    #[test]
    fn opens_own_executable() {
        let text = std::fs::read_to_string("/proc/self/maps").expect("read maps");
        let maps = crate::procfs::maps::parse_maps(&text);
        let exe = std::fs::read_link("/proc/self/exe").expect("readlink exe");
        let code = maps
            .iter()
            .find(|m| m.executable && std::path::Path::new(&m.path) == exe)
            .expect("own executable mapping");
        let module = ModuleFile::open(std::process::id(), code);
        let elf = module.elf.as_ref().expect("own executable parses");
        assert!(elf.unwind.has_cfi(), "Rust binaries carry .eh_frame");
        let bias = elf.bias_for(code).expect("bias of own text mapping");
        let probe = opens_own_executable as *const () as usize as u64;
        assert!(probe >= bias, "function address {probe:#x} below bias {bias:#x}");
        assert!(module.fd_path().is_some_and(|p| p.exists()));
    }
}
