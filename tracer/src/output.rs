//! Every file memtrace writes (reports, profiles, recordings) goes through here.
//!
//! memtrace runs as root, often with `/tmp` paths, on machines where
//! `fs.protected_symlinks` may be 0. So a destination is never opened by its name:
//! the data goes to a new temporary file in the same directory, created with
//! `O_CREAT | O_EXCL | O_NOFOLLOW`, and is renamed into place. A rename replaces a
//! symbolic link instead of following it, and readers see the old file or the whole new
//! one. Symbolic links are followed only when memtrace's user or root owns them.
//!
//! [`check`] runs before tracing starts, so that a destination that cannot be written
//! is refused before anything is attached, not after a long trace.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, Write},
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

/// Symbolic links followed at most, as the kernel's own limit.
const MAX_LINKS: usize = 40;
/// Temporary names tried before giving up (each taken name is another run's).
const TEMP_ATTEMPTS: u32 = 100;

/// Why a destination cannot be written. Messages start with the path asked for.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{}: the directory {} does not exist; create it or choose another path", path.display(), dir.display())]
    MissingDir { path: PathBuf, dir: PathBuf },
    #[error("{}: {} is not a directory", path.display(), dir.display())]
    NotADir { path: PathBuf, dir: PathBuf },
    #[error("{}: cannot create files in {}: {error}", path.display(), dir.display())]
    Unwritable { path: PathBuf, dir: PathBuf, error: io::Error },
    #[error(
        "{}: {}is a symbolic link owned by uid {owner}, not by memtrace's user (uid {euid}) or root; memtrace does not write through other users' links — remove it or choose another path",
        path.display(), on_the_way(path, link)
    )]
    ForeignSymlink { path: PathBuf, link: PathBuf, owner: u32, euid: u32 },
    #[error("{}: is a directory; give a file name", path.display())]
    IsADir { path: PathBuf },
    #[error(
        "{}: {}is a {kind} owned by uid {owner}; memtrace writes only to regular files, devices, and its own pipes",
        path.display(), on_the_way(path, at)
    )]
    Special { path: PathBuf, at: PathBuf, kind: &'static str, owner: u32 },
    #[error("{}: more than {MAX_LINKS} symbolic links to follow", path.display())]
    TooManyLinks { path: PathBuf },
    #[error("{}: {what}: {error}", path.display())]
    Io { path: PathBuf, what: &'static str, error: io::Error },
}

/// `"LINK "` when the file at fault is not the destination itself, else nothing.
fn on_the_way(path: &Path, at: &Path) -> String {
    if path == at { String::new() } else { format!("{} ", at.display()) }
}

/// Where the bytes for a destination end up.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Resolved {
    /// A regular file (or no file yet) at `file`, in directory `dir`: written through a
    /// temporary file and a rename.
    Replace { dir: PathBuf, file: PathBuf },
    /// A character device or memtrace's own pipe (`/dev/stdout`, `/dev/null`): written
    /// in place, since it cannot be renamed over.
    Stream { at: PathBuf },
}

/// How strict [`resolve`] is about a link at the destination owned by someone else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Foreign {
    /// Before tracing: refuse, so that the user hears of it.
    Refuse,
    /// After tracing: replace the link (never follow it), so the trace is not lost.
    Replace,
}

/// Fails now if `path` could not be written later: its directory must exist and take
/// new files, and no link owned by another user may stand on the way.
pub fn check(path: &Path) -> Result<(), OutputError> {
    check_as(path, euid())
}

/// [`check`] as user `euid`.
fn check_as(path: &Path, euid: u32) -> Result<(), OutputError> {
    match resolve(path, euid, Foreign::Refuse)? {
        Resolved::Replace { dir, .. } => {
            let (tmp, _file) = create_temp(path, &dir)?;
            fs::remove_file(&tmp).map_err(|error| OutputError::Io {
                path: path.to_path_buf(),
                what: "remove the test file",
                error,
            })
        }
        Resolved::Stream { .. } => Ok(()),
    }
}

/// An output file being written; [`OutputFile::commit`] puts it in place. Dropped
/// without a commit, it leaves the destination as it was.
pub struct OutputFile {
    path: PathBuf,
    writer: BufWriter<File>,
    /// The temporary file and the name it takes on commit (none for a stream).
    rename: Option<(PathBuf, PathBuf)>,
}

impl OutputFile {
    /// Starts writing `path`.
    pub fn create(path: &Path) -> Result<Self, OutputError> {
        Self::create_as(path, euid())
    }

    /// [`OutputFile::create`] as user `euid`.
    fn create_as(path: &Path, euid: u32) -> Result<Self, OutputError> {
        let io_err = |what, error| OutputError::Io { path: path.to_path_buf(), what, error };
        match resolve(path, euid, Foreign::Replace)? {
            Resolved::Replace { dir, file } => {
                let (tmp, handle) = create_temp(path, &dir)?;
                Ok(Self {
                    path: path.to_path_buf(),
                    writer: BufWriter::new(handle),
                    rename: Some((tmp, file)),
                })
            }
            Resolved::Stream { at } => {
                // No O_CREAT and no O_TRUNC: if the device was swapped for a regular
                // file since it was resolved, nothing is created or cut; fstat tells.
                let handle = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
                    .open(&at)
                    .map_err(|e| io_err("open", e))?;
                let meta = handle.metadata().map_err(|e| io_err("stat", e))?;
                let ft = meta.file_type();
                if !(ft.is_char_device() || ft.is_fifo()) {
                    return Err(io_err(
                        "open",
                        io::Error::other(format!(
                            "{} changed into another kind of file; not written",
                            at.display()
                        )),
                    ));
                }
                Ok(Self { path: path.to_path_buf(), writer: BufWriter::new(handle), rename: None })
            }
        }
    }

    /// Flushes the data to disk and renames the file into place.
    pub fn commit(mut self) -> Result<(), OutputError> {
        let path = self.path.clone();
        let io_err = |what, error| OutputError::Io { path: path.clone(), what, error };
        self.writer.flush().map_err(|e| io_err("write", e))?;
        let Some((tmp, file)) = self.rename.take() else {
            return Ok(());
        };
        let result = (|| {
            self.writer.get_ref().sync_all().map_err(|e| io_err("sync", e))?;
            fs::rename(&tmp, &file).map_err(|e| io_err("rename the temporary file into place", e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
            return result;
        }
        // Makes the rename itself durable; a failure here loses nothing written.
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(dir) = File::open(dir)
        {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

impl Write for OutputFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if let Some((tmp, _)) = self.rename.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Writes `bytes` to `path` (see the module's notes).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    let mut file = OutputFile::create(path)?;
    file.write_all(bytes).map_err(|error| OutputError::Io {
        path: path.to_path_buf(),
        what: "write",
        error,
    })?;
    file.commit()
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A link may be followed if memtrace's own user or root made it: nobody else can
/// change where it points.
fn trusted(owner: u32, euid: u32) -> bool {
    owner == euid || owner == 0
}

/// The directory `path` is in (`.` for a bare name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Follows `path` to where its bytes would go, as user `euid`.
fn resolve(path: &Path, euid: u32, foreign: Foreign) -> Result<Resolved, OutputError> {
    let io_err = |what, error| OutputError::Io { path: path.to_path_buf(), what, error };
    let mut at = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        let dir = parent_of(&at);
        check_dir(path, &dir, euid)?;
        let meta = match fs::symlink_metadata(&at) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Resolved::Replace { dir, file: at }),
            Err(e) => return Err(io_err("stat", e)),
            Ok(meta) => meta,
        };
        let ft = meta.file_type();
        if ft.is_file() {
            return Ok(Resolved::Replace { dir, file: at });
        }
        if ft.is_dir() {
            return Err(OutputError::IsADir { path: path.to_path_buf() });
        }
        if !ft.is_symlink() {
            return special(path, &at, &meta, euid);
        }
        if !trusted(meta.uid(), euid) {
            return match foreign {
                Foreign::Refuse => Err(OutputError::ForeignSymlink {
                    path: path.to_path_buf(),
                    link: at,
                    owner: meta.uid(),
                    euid,
                }),
                Foreign::Replace => {
                    log::warn!(
                        "{}: a symbolic link owned by uid {} appeared while tracing; replaced it without following it",
                        at.display(),
                        meta.uid()
                    );
                    Ok(Resolved::Replace { dir, file: at })
                }
            };
        }
        // `/dev/stdout` leads to `/proc/self/fd/1`, whose target (`pipe:[…]`) is no
        // path: ask the kernel what is at the end before reading the link.
        if let Ok(end) = fs::metadata(&at)
            && !end.is_file()
            && !end.is_dir()
        {
            return special(path, &at, &end, euid);
        }
        let target = fs::read_link(&at).map_err(|e| io_err("read the symbolic link", e))?;
        at = dir.join(target);
    }
    Err(OutputError::TooManyLinks { path: path.to_path_buf() })
}

/// A destination that is neither a regular file nor a directory: a character device
/// (only root makes them) or memtrace's own pipe can be written in place.
fn special(path: &Path, at: &Path, meta: &fs::Metadata, euid: u32) -> Result<Resolved, OutputError> {
    let ft = meta.file_type();
    if ft.is_char_device() || (ft.is_fifo() && trusted(meta.uid(), euid)) {
        return Ok(Resolved::Stream { at: at.to_path_buf() });
    }
    let kind = if ft.is_fifo() {
        "named pipe"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() {
        "block device"
    } else {
        "special file"
    };
    Err(OutputError::Special { path: path.to_path_buf(), at: at.to_path_buf(), kind, owner: meta.uid() })
}

/// `dir` must exist and be a directory, and no link owned by another user may lead to it.
fn check_dir(path: &Path, dir: &Path, euid: u32) -> Result<(), OutputError> {
    let mut prefix = PathBuf::new();
    for component in dir.components() {
        prefix.push(component);
        match fs::symlink_metadata(&prefix) {
            Ok(meta) if meta.file_type().is_symlink() && !trusted(meta.uid(), euid) => {
                return Err(OutputError::ForeignSymlink {
                    path: path.to_path_buf(),
                    link: prefix,
                    owner: meta.uid(),
                    euid,
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(OutputError::MissingDir { path: path.to_path_buf(), dir: dir.to_path_buf() });
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(OutputError::NotADir { path: path.to_path_buf(), dir: dir.to_path_buf() });
            }
            Err(error) => return Err(OutputError::Io { path: path.to_path_buf(), what: "stat", error }),
        }
    }
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(OutputError::NotADir { path: path.to_path_buf(), dir: dir.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(OutputError::MissingDir { path: path.to_path_buf(), dir: dir.to_path_buf() })
        }
        Err(error) => Err(OutputError::Io { path: path.to_path_buf(), what: "stat", error }),
    }
}

/// A new file in `dir` that nobody else can have prepared: `O_EXCL` fails on any
/// existing name, link or not, and `O_NOFOLLOW` says so twice.
fn create_temp(path: &Path, dir: &Path) -> Result<(PathBuf, File), OutputError> {
    let name = path.file_name().map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
    let pid = std::process::id();
    for attempt in 0..TEMP_ATTEMPTS {
        let tmp = dir.join(format!(".{name}.memtrace-{pid}-{attempt}.tmp"));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => {
                return Err(OutputError::Unwritable {
                    path: path.to_path_buf(),
                    dir: dir.to_path_buf(),
                    error,
                });
            }
        }
    }
    Err(OutputError::Unwritable {
        path: path.to_path_buf(),
        dir: dir.to_path_buf(),
        error: io::Error::new(io::ErrorKind::AlreadyExists, "every temporary file name is taken"),
    })
}

#[cfg(test)]
mod tests;
