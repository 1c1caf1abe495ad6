use std::{fs, io::Write as _, os::unix::fs::symlink, path::Path};

use super::*;

const NOBODY: u32 = 65534;

/// Makes `path` (a link or a file already made) belong to another user and returns
/// the user to act as: as root, the file goes to `nobody` and memtrace acts as root;
/// otherwise the file stays ours and memtrace acts as a made-up other user.
fn owned_by_another_user(path: &Path) -> u32 {
    let me = euid();
    if me == 0 {
        std::os::unix::fs::lchown(path, Some(NOBODY), Some(NOBODY)).expect("lchown to nobody");
        0
    } else {
        me + 1
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list dir")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn write(path: &Path, euid: u32, text: &str) -> Result<(), OutputError> {
    let mut file = OutputFile::create_as(path, euid)?;
    file.write_all(text.as_bytes()).expect("write to the output");
    file.commit()
}

#[test]
fn new_file_is_written_and_no_temporary_file_stays() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("r.json");
    check(&path).expect("a new file in a temp dir can be written");
    assert!(names_in(dir.path()).is_empty(), "check leaves nothing behind: {:?}", names_in(dir.path()));
    write(&path, euid(), "{}\n").expect("write");
    assert_eq!(fs::read_to_string(&path).expect("read"), "{}\n");
    assert_eq!(names_in(dir.path()), ["r.json"]);
}

#[test]
fn existing_file_is_replaced_whole() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("r.json");
    fs::write(&path, "x".repeat(10_000)).expect("old file");
    write_bytes(&path, b"new").expect("write");
    assert_eq!(fs::read_to_string(&path).expect("read"), "new");
}

#[test]
fn uncommitted_file_leaves_the_old_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("r.json");
    fs::write(&path, "old").expect("old file");
    let mut file = OutputFile::create(&path).expect("create");
    file.write_all(b"half a repo").expect("write");
    drop(file);
    assert_eq!(fs::read_to_string(&path).expect("read"), "old");
    assert_eq!(names_in(dir.path()), ["r.json"]);
}

#[test]
fn missing_directory_is_refused_up_front() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("missing-dir/r.json");
    let err = check(&path).expect_err("missing directory");
    assert!(matches!(err, OutputError::MissingDir { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("{}: the directory ", path.display())), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(OutputFile::create(&path).is_err(), "and later too");
}

#[test]
fn a_file_as_directory_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::write(dir.path().join("file"), "").expect("file");
    let err = check(&dir.path().join("file/r.json")).expect_err("parent is a file");
    assert!(matches!(err, OutputError::NotADir { .. }), "{err:?}");
}

#[test]
fn a_directory_is_not_a_file_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = check(dir.path()).expect_err("a directory");
    assert!(matches!(err, OutputError::IsADir { .. }), "{err:?}");
}

#[test]
fn unwritable_directory_is_refused_up_front() {
    // Root writes anywhere permissions allow; sysfs refuses new files even to root.
    let keep;
    let dir = if euid() == 0 {
        Path::new("/sys/kernel").to_path_buf()
    } else {
        keep = tempfile::tempdir().expect("temp dir");
        let mut perms = fs::metadata(keep.path()).expect("stat").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o555);
        fs::set_permissions(keep.path(), perms).expect("chmod 555");
        keep.path().to_path_buf()
    };
    let path = dir.join("r.json");
    let err = check(&path).expect_err("unwritable directory");
    assert!(matches!(err, OutputError::Unwritable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("cannot create files in {}", dir.display())), "{msg}");
    assert!(msg.to_lowercase().contains("permission denied"), "{msg}");
}

#[test]
fn link_planted_by_another_user_is_never_written_through() {
    let dir = tempfile::tempdir().expect("temp dir");
    let victim = dir.path().join("victim");
    fs::write(&victim, "precious").expect("victim file");
    let link = dir.path().join("x.json");
    symlink(&victim, &link).expect("plant link");
    let me = owned_by_another_user(&link);

    let err = check_as(&link, me).expect_err("a foreign link is refused before tracing");
    let msg = err.to_string();
    assert!(matches!(err, OutputError::ForeignSymlink { .. }), "{err:?}");
    assert!(msg.contains("is a symbolic link owned by uid"), "{msg}");
    assert!(msg.contains("does not write through other users' links"), "{msg}");

    // One planted while tracing is replaced, not followed: the trace is kept.
    write(&link, me, "report").expect("write over the link");
    assert_eq!(fs::read_to_string(&victim).expect("read victim"), "precious");
    let meta = fs::symlink_metadata(&link).expect("stat");
    assert!(meta.is_file(), "the link was replaced by a regular file");
    assert_eq!(fs::read_to_string(&link).expect("read"), "report");
}

#[test]
fn directory_link_planted_by_another_user_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).expect("mkdir");
    let link = dir.path().join("reports");
    symlink(&elsewhere, &link).expect("plant link");
    let me = owned_by_another_user(&link);
    let path = link.join("r.json");
    assert!(matches!(check_as(&path, me), Err(OutputError::ForeignSymlink { .. })));
    assert!(matches!(OutputFile::create_as(&path, me), Err(OutputError::ForeignSymlink { .. })));
    assert!(names_in(&elsewhere).is_empty());
}

#[test]
fn own_link_is_followed() {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::create_dir(dir.path().join("reports")).expect("mkdir");
    let real = dir.path().join("reports/today.json");
    fs::write(&real, "old").expect("old");
    let link = dir.path().join("r.json");
    symlink("reports/today.json", &link).expect("link");
    check(&link).expect("own link");
    write(&link, euid(), "new").expect("write");
    assert!(fs::symlink_metadata(&link).expect("stat").file_type().is_symlink(), "the link stays");
    assert_eq!(fs::read_to_string(&real).expect("read"), "new");
    assert_eq!(names_in(&dir.path().join("reports")), ["today.json"]);

    // A dangling own link creates its target.
    let dangling = dir.path().join("later.json");
    symlink("reports/later.json", &dangling).expect("link");
    write(&dangling, euid(), "made").expect("write");
    assert_eq!(fs::read_to_string(dir.path().join("reports/later.json")).expect("read"), "made");
}

#[test]
fn link_loop_is_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    symlink("b", dir.path().join("a")).expect("link");
    symlink("a", dir.path().join("b")).expect("link");
    let err = check(&dir.path().join("a")).expect_err("loop");
    assert!(matches!(err, OutputError::TooManyLinks { .. }), "{err:?}");
}

#[test]
fn devices_are_written_in_place() {
    check(Path::new("/dev/null")).expect("/dev/null");
    write(Path::new("/dev/null"), euid(), "gone").expect("write /dev/null");
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("null");
    symlink("/dev/null", &link).expect("link");
    write(&link, euid(), "gone").expect("write through own link to a device");
    assert!(fs::symlink_metadata(&link).expect("stat").file_type().is_symlink());
}

#[test]
fn pipe_of_another_user_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fifo = dir.path().join("x.json");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0, "mkfifo");
    let me = owned_by_another_user(&fifo);
    let err = check_as(&fifo, me).expect_err("a foreign pipe");
    assert!(matches!(err, OutputError::Special { kind: "named pipe", .. }), "{err:?}");
}
