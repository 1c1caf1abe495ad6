//! The files a command will map before it runs its first instruction: its executable (or
//! a script's interpreter), `LD_PRELOAD`, and the closure of its `DT_NEEDED` libraries,
//! found as the dynamic loader finds them (`DT_RPATH`, `LD_LIBRARY_PATH`, `DT_RUNPATH`,
//! `/etc/ld.so.cache`, the default directories).
//!
//! `memtrace run` probes the allocator from these files before it lets the command go:
//! uprobes belong to a file and an offset, so they fire from the first call even in a
//! program that is gone a millisecond later, before its memory map could be read.

use std::{
    collections::{HashSet, VecDeque},
    path::{Path, PathBuf},
};

use object::{
    Endianness,
    elf::{self, FileHeader64},
    read::elf::{Dyn as _, FileHeader as _},
};

#[derive(Debug, thiserror::Error)]
pub enum NeededError {
    #[error("read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a 64-bit ELF file: {reason}", path.display())]
    NotElf { path: PathBuf, reason: String },
    #[error("{}: `#!` names no interpreter memtrace can find ({line})", path.display())]
    Interpreter { path: PathBuf, line: String },
}

/// What a dynamic loader would load for one program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dependencies {
    /// The ELF executable that runs (a script's interpreter).
    pub exe: PathBuf,
    /// Libraries in load order: `LD_PRELOAD` first, then breadth-first `DT_NEEDED`.
    pub libraries: Vec<PathBuf>,
    /// `DT_NEEDED` names that were not found (the loader will fail on them, or they are
    /// found through a path memtrace does not know).
    pub missing: Vec<String>,
}

/// The loader's environment that matters here.
#[derive(Clone, Debug, Default)]
pub struct LoaderEnv {
    pub library_path: Vec<PathBuf>,
    pub preload: Vec<String>,
}

impl LoaderEnv {
    /// From this process's environment, which `memtrace run`'s command inherits.
    #[must_use]
    pub fn from_env() -> Self {
        let var = |name| std::env::var(name).unwrap_or_default();
        Self {
            library_path: var("LD_LIBRARY_PATH")
                .split([':', ';'])
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect(),
            preload: var("LD_PRELOAD")
                .split([':', ' '])
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect(),
        }
    }
}

/// Directories searched after the cache (glibc's `SYSTEM_DIRS` on x86-64 Debian and
/// elsewhere).
const DEFAULT_DIRS: &[&str] =
    &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

const LD_SO_CACHE: &str = "/etc/ld.so.cache";

/// Follows `#!` lines (at most a few) to the ELF file that will run `program`.
pub fn executable_image(program: &Path) -> Result<PathBuf, NeededError> {
    let mut path = program.to_path_buf();
    for _ in 0..4 {
        let head = read_head(&path, 256)?;
        if !head.starts_with(b"#!") {
            return Ok(path);
        }
        let line = String::from_utf8_lossy(head[2..].split(|&b| b == b'\n').next().unwrap_or_default())
            .trim()
            .to_string();
        let mut words = line.split_whitespace();
        let interpreter = words.next().unwrap_or_default();
        let next = if Path::new(interpreter).file_name().is_some_and(|n| n == "env") {
            // `#!/usr/bin/env [-S] NAME`: NAME on PATH.
            words.find(|w| !w.starts_with('-')).and_then(|name| which::which(name).ok())
        } else {
            Some(PathBuf::from(interpreter)).filter(|p| p.is_file())
        };
        path = next.ok_or_else(|| NeededError::Interpreter { path: path.clone(), line: line.clone() })?;
    }
    Ok(path)
}

fn read_head(path: &Path, len: usize) -> Result<Vec<u8>, NeededError> {
    use std::io::Read as _;
    let mut head = Vec::with_capacity(len);
    std::fs::File::open(path)
        .and_then(|f| f.take(len as u64).read_to_end(&mut head))
        .map_err(|source| NeededError::Read { path: path.to_path_buf(), source })?;
    Ok(head)
}

/// What one ELF file says about loading.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DynamicInfo {
    pub machine: u16,
    pub needed: Vec<String>,
    pub rpath: Vec<String>,
    pub runpath: Vec<String>,
    /// `PT_INTERP`: it is linked dynamically.
    pub interpreter: Option<String>,
}

/// Reads `DT_NEEDED`, `DT_RPATH`, `DT_RUNPATH` and `PT_INTERP` of a 64-bit ELF image.
pub fn dynamic_info(data: &[u8]) -> Result<DynamicInfo, String> {
    let header = FileHeader64::<Endianness>::parse(data).map_err(|e| e.to_string())?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    let mut info = DynamicInfo { machine: header.e_machine(endian), ..DynamicInfo::default() };
    if let Ok(segments) = header.program_headers(endian, data) {
        for segment in segments {
            if let Ok(Some(interp)) = object::read::elf::ProgramHeader::interpreter(segment, endian, data) {
                info.interpreter = Some(String::from_utf8_lossy(interp).into_owned());
            }
        }
    }
    let sections = header.sections(endian, data).map_err(|e| e.to_string())?;
    let Some((entries, link)) = sections.dynamic(endian, data).map_err(|e| e.to_string())? else {
        return Ok(info);
    };
    let strings = sections.strings(endian, data, link).map_err(|e| e.to_string())?;
    for entry in entries {
        let tag = entry.d_tag(endian);
        if tag == u64::from(elf::DT_NULL) {
            break;
        }
        let Ok(offset) = u32::try_from(entry.d_val(endian)) else { continue };
        let text = || strings.get(offset).map(|s| String::from_utf8_lossy(s).into_owned());
        let split = |s: String| s.split(':').filter(|p| !p.is_empty()).map(String::from).collect::<Vec<_>>();
        match u32::try_from(tag) {
            Ok(elf::DT_NEEDED) => info.needed.extend(text()),
            Ok(elf::DT_RPATH) => info.rpath.extend(text().map(split).unwrap_or_default()),
            Ok(elf::DT_RUNPATH) => info.runpath.extend(text().map(split).unwrap_or_default()),
            _ => {}
        }
    }
    Ok(info)
}

/// The libraries of `/etc/ld.so.cache` for one architecture: soname → path, in the
/// cache's order (the loader takes the first match).
#[derive(Clone, Debug, Default)]
pub struct LdCache {
    entries: Vec<(String, PathBuf)>,
}

impl LdCache {
    #[must_use]
    pub fn load(machine: u16) -> Self {
        std::fs::read(LD_SO_CACHE).map(|data| Self::parse(&data, machine)).unwrap_or_default()
    }

    /// Parses glibc's cache format `glibc-ld.so.cache1.1` (alone, or after the old
    /// `ld.so-1.7.0` table): a header, entries of (flags, key, value, osversion, hwcap)
    /// whose strings are offsets from the header.
    #[must_use]
    pub fn parse(data: &[u8], machine: u16) -> Self {
        const MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
        const HEADER: usize = 48;
        const ENTRY: usize = 24;
        let Some(base) = data.windows(MAGIC.len()).position(|w| w == MAGIC) else {
            return Self::default();
        };
        let u32_at = |at: usize| {
            data.get(at..at + 4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes) as usize
        };
        let string = |offset: usize| {
            let bytes = data.get(base + offset..)?;
            let end = bytes.iter().position(|&b| b == 0)?;
            Some(String::from_utf8_lossy(&bytes[..end]).into_owned())
        };
        // glibc's FLAG_ELF_LIBC6 and the architecture's library flag.
        let wanted = match machine {
            elf::EM_X86_64 => 0x0303,
            elf::EM_AARCH64 => 0x0a03,
            _ => return Self::default(),
        };
        let count = u32_at(base + 20);
        let mut entries = Vec::new();
        for i in 0..count {
            let at = base + HEADER + i * ENTRY;
            if at + ENTRY > data.len() {
                break;
            }
            if u32_at(at) & 0xffff != wanted {
                continue;
            }
            if let (Some(key), Some(value)) = (string(u32_at(at + 4)), string(u32_at(at + 8))) {
                entries.push((key, PathBuf::from(value)));
            }
        }
        Self { entries }
    }

    #[must_use]
    pub fn find(&self, soname: &str) -> Option<&Path> {
        self.entries.iter().find(|(k, _)| k == soname).map(|(_, v)| v.as_path())
    }
}

/// Substitutes `$ORIGIN` (the loading object's directory) in a search path entry.
fn expand_origin(entry: &str, origin: &Path) -> PathBuf {
    let origin = origin.to_string_lossy();
    PathBuf::from(entry.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin))
}

/// The ELF machine of the file at `path`, if it is a 64-bit ELF file.
fn machine_of(path: &Path) -> Option<u16> {
    let head = read_head(path, 64).ok()?;
    FileHeader64::<Endianness>::parse(&*head).ok().and_then(|h| Some(h.e_machine(h.endian().ok()?)))
}

/// Finds the dependencies of the executable `exe` as the loader would.
pub fn dependencies(exe: &Path, env: &LoaderEnv) -> Result<Dependencies, NeededError> {
    let data = std::fs::read(exe).map_err(|source| NeededError::Read { path: exe.to_path_buf(), source })?;
    let info =
        dynamic_info(&data).map_err(|reason| NeededError::NotElf { path: exe.to_path_buf(), reason })?;
    let mut deps = Dependencies { exe: exe.to_path_buf(), ..Dependencies::default() };
    if info.interpreter.is_none() && info.needed.is_empty() {
        // Statically linked: nothing else is loaded.
        return Ok(deps);
    }
    let cache = LdCache::load(info.machine);
    let exe_rpath: Vec<PathBuf> = if info.runpath.is_empty() {
        info.rpath.iter().map(|r| expand_origin(r, exe.parent().unwrap_or(Path::new("/")))).collect()
    } else {
        Vec::new()
    };
    let mut seen_names: HashSet<String> = HashSet::new();
    let mut seen_files: HashSet<PathBuf> = HashSet::new();
    let find = |name: &str, origin: &Path, loader: &DynamicInfo| -> Option<PathBuf> {
        if name.contains('/') {
            return Some(PathBuf::from(name)).filter(|p| p.is_file());
        }
        let mut dirs: Vec<PathBuf> = Vec::new();
        if loader.runpath.is_empty() {
            dirs.extend(loader.rpath.iter().map(|r| expand_origin(r, origin)));
            dirs.extend(exe_rpath.iter().cloned());
        }
        dirs.extend(env.library_path.iter().cloned());
        dirs.extend(loader.runpath.iter().map(|r| expand_origin(r, origin)));
        let searched = dirs.iter().map(|d| d.join(name)).find(|p| machine_of(p) == Some(info.machine));
        searched.or_else(|| cache.find(name).map(Path::to_path_buf).filter(|p| p.is_file())).or_else(|| {
            DEFAULT_DIRS.iter().map(|d| Path::new(d).join(name)).find(|p| machine_of(p) == Some(info.machine))
        })
    };
    let exe_dir = exe.parent().unwrap_or(Path::new("/")).to_path_buf();
    let names: Vec<String> = env.preload.iter().cloned().chain(info.needed.iter().cloned()).collect();
    let mut pending: VecDeque<(String, PathBuf, DynamicInfo)> =
        names.into_iter().map(|n| (n, exe_dir.clone(), info.clone())).collect();
    while let Some((name, origin, loader)) = pending.pop_front() {
        if !seen_names.insert(name.clone()) {
            continue;
        }
        let Some(path) = find(&name, &origin, &loader) else {
            deps.missing.push(name);
            continue;
        };
        let canonical = std::fs::canonicalize(&path).unwrap_or(path);
        if !seen_files.insert(canonical.clone()) {
            continue;
        }
        let lib_info = std::fs::read(&canonical).ok().and_then(|d| dynamic_info(&d).ok()).unwrap_or_default();
        let lib_dir = canonical.parent().unwrap_or(Path::new("/")).to_path_buf();
        pending.extend(lib_info.needed.iter().map(|n| (n.clone(), lib_dir.clone(), lib_info.clone())));
        deps.libraries.push(canonical);
    }
    Ok(deps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_needs_the_c_library() {
        let exe = std::fs::read_link("/proc/self/exe").expect("read /proc/self/exe");
        let deps = dependencies(&exe, &LoaderEnv::default()).expect("read the test binary");
        assert_eq!(deps.exe, exe);
        assert!(deps.missing.is_empty(), "unresolved: {:?}", deps.missing);
        // The same libc file as the one this process has mapped.
        let maps = std::fs::read_to_string("/proc/self/maps").expect("read maps");
        let mapped_libc = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| p.ends_with("/libc.so.6"))
            .map(|p| std::fs::canonicalize(p).expect("canonicalize libc"))
            .expect("libc is mapped");
        assert!(
            deps.libraries.contains(&mapped_libc),
            "{:?} lacks {}",
            deps.libraries,
            mapped_libc.display()
        );
    }

    #[test]
    fn scripts_run_their_interpreter() {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("s");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").expect("write script");
        assert_eq!(executable_image(&script).expect("resolve"), PathBuf::from("/bin/sh"));
        let env_script = dir.path().join("e");
        std::fs::write(&env_script, "#!/usr/bin/env -S sh -e\necho hi\n").expect("write script");
        let sh = executable_image(&env_script).expect("resolve");
        assert_eq!(sh.file_name().and_then(|n| n.to_str()), Some("sh"));
        let broken = dir.path().join("b");
        std::fs::write(&broken, "#!/no/such/interpreter\n").expect("write script");
        assert!(executable_image(&broken).is_err());
    }

    #[test]
    fn the_cache_format_is_read() {
        // A cache with one x86-64 entry and one 32-bit entry (flags 0x0003).
        let mut data = b"glibc-ld.so.cache1.1".to_vec();
        data.extend_from_slice(&2u32.to_le_bytes());
        data.resize(48, 0);
        let strings = 48 + 2 * 24;
        let entry = |flags: u32, key: u32, value: u32| {
            let mut e = Vec::new();
            for v in [flags, key, value, 0] {
                e.extend_from_slice(&v.to_le_bytes());
            }
            e.extend_from_slice(&0u64.to_le_bytes());
            e
        };
        let key = strings as u32;
        let value = key + 10;
        let value32 = value + 20;
        data.extend(entry(0x0003, key, value32));
        data.extend(entry(0x0303, key, value));
        data.extend_from_slice(b"libc.so.6\0/lib64/libc\0\0\0\0\0\0\0\0\0/lib32/libc\0");
        let cache = LdCache::parse(&data, elf::EM_X86_64);
        assert_eq!(cache.find("libc.so.6"), Some(Path::new("/lib64/libc")));
        assert_eq!(cache.find("libm.so.6"), None);
        // The machine's real cache names its C library.
        let real = LdCache::load(elf::EM_X86_64);
        assert!(real.find("libc.so.6").is_some_and(Path::is_file), "no libc.so.6 in {LD_SO_CACHE}");
    }
}
