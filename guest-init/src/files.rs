//! The guest's end of the file streams (PROTOCOL.md, "File streams"): the
//! workspace in from [`FILES_IN_PORT`] before the command, `/workspace/out`
//! out to [`FILES_OUT_PORT`] after it, on a connection opened before the
//! command ([`connect_results`]).
//!
//! The host is trusted more than the guest, but a buggy host must still not
//! make the init write outside `/workspace`: every path is checked with
//! [`check_file_path`], files are created with `O_NOFOLLOW`, and the
//! directories the host names are created here (a symlink in the way fails
//! `create_dir` / is refused). Sending never follows a symlink either: the
//! command may still be changing the tree (or its orphans may), so it is
//! walked through directory descriptors, every directory and file opened
//! with `openat(…, O_NOFOLLOW)` relative to its parent's descriptor, and
//! what is not a directory or a regular file then is skipped
//! ([`send_tree`]). Directory mtimes are set
//! once the stream has ended (creating entries inside a directory changes
//! its mtime).
//!
//! With `airlock run --collect`, the results are the files under
//! `/workspace` that match the host's patterns ([`glob_path`]) rather than
//! `/workspace/out`, sent with their paths relative to `/workspace`.

use std::ffi::{CStr, CString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use libc::c_int;

use airlock_protocol::limits::{FILE_MODE_MASK, MAX_FILE_CHUNK};
use airlock_protocol::{
    check_file_path, read_frame, write_frame, FileEntry, FileKind, FrameError, Message, HOST_CID,
};
use sha2::{Digest, Sha256};

use crate::vsock::VsockStream;

/// Where the workspace goes in the guest.
pub const WORKSPACE: &str = "/workspace";
/// The directory under it whose content goes back as results.
pub const OUT_DIR: &str = "out";
/// How long the init waits for the host to close a results stream.
const CLOSE_PATIENCE: Duration = Duration::from_secs(10);
/// Longest wait for any frame of the workspace stream.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to connect to host port {0}")]
    Connect(u32, #[source] io::Error),
    #[error("failed to read the workspace stream")]
    Receive(#[source] FrameError),
    #[error("failed to send the results stream")]
    Send(#[source] FrameError),
    #[error("the host sent a bad path {0:?}")]
    Path(String),
    #[error("the workspace stream is malformed: {0}")]
    Stream(String),
    #[error("{}", .0.display())]
    Io(PathBuf, #[source] io::Error),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |e| Error::Io(path.to_path_buf(), e)
}

fn set_mtime(file: &File, mtime: i64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: `times` holds two valid timespecs that outlive the call; the
    // descriptor is owned by `file`.
    if unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates `path` as a directory (or checks it is one, not a symlink).
fn ensure_dir(path: &Path, mode: u32) -> Result<(), Error> {
    match fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = fs::symlink_metadata(path).map_err(io_at(path))?;
            if !meta.is_dir() {
                return Err(Error::Path(path.display().to_string()));
            }
        }
        Err(e) => return Err(Error::Io(path.to_path_buf(), e)),
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o700)).map_err(io_at(path))
}

/// Connects to the host's file port and writes the workspace stream under
/// `root`, everything owned by the agent user when `agent`
/// ([`crate::privilege`]). Returns the number of entries.
pub fn receive_workspace(root: &Path, port: u32, agent: bool) -> Result<u64, Error> {
    fs::create_dir_all(root).map_err(io_at(root))?;
    let stream = VsockStream::connect(HOST_CID, port).map_err(|e| Error::Connect(port, e))?;
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| Error::Connect(port, e))?;
    receive(BufReader::with_capacity(256 * 1024, stream), root, agent)
}

struct Open {
    path: PathBuf,
    file: BufWriter<File>,
    size: u64,
    got: u64,
    hasher: Sha256,
    mtime: i64,
}

/// Reads a file stream from `r` into `root` (see the module docs); with
/// `agent`, what it creates belongs to the agent user.
pub fn receive<R: Read>(mut r: R, root: &Path, agent: bool) -> Result<u64, Error> {
    let mut count = 0u64;
    let mut current: Option<Open> = None;
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();
    loop {
        let msg = read_frame(&mut r).map_err(Error::Receive)?;
        match (msg, current.take()) {
            (Message::FileEntry(entry), None) => {
                count += 1;
                if entry.kind == FileKind::Dir {
                    dir_times.push((root.join(&entry.path), entry.mtime));
                }
                current = start(root, entry, agent)?;
            }
            (Message::FileData(data), Some(mut open)) => {
                let n = data.len() as u64;
                if n > open.size - open.got {
                    return Err(Error::Stream(format!(
                        "{}: too much data",
                        open.path.display()
                    )));
                }
                open.got += n;
                open.hasher.update(&data);
                open.file.write_all(&data).map_err(io_at(&open.path))?;
                current = Some(open);
            }
            (Message::FileEnd { sha256 }, Some(open)) => {
                let digest: [u8; 32] = open.hasher.finalize().into();
                if open.got != open.size || digest != sha256 {
                    return Err(Error::Stream(format!(
                        "{}: size or sha256 mismatch",
                        open.path.display()
                    )));
                }
                let file = open
                    .file
                    .into_inner()
                    .map_err(|e| Error::Io(open.path.clone(), e.into_error()))?;
                set_mtime(&file, open.mtime).map_err(io_at(&open.path))?;
            }
            (Message::FilesDone { .. }, None) => {
                // Deepest first: parents come before children in the stream.
                for (path, mtime) in dir_times.iter().rev() {
                    let dir = OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                        .open(path)
                        .map_err(io_at(path))?;
                    set_mtime(&dir, *mtime).map_err(io_at(path))?;
                }
                return Ok(count);
            }
            (msg, _) => return Err(Error::Stream(format!("unexpected {}", msg.kind()))),
        }
    }
}

fn start(root: &Path, entry: FileEntry, agent: bool) -> Result<Option<Open>, Error> {
    check_file_path(&entry.path).map_err(|_| Error::Path(entry.path.clone()))?;
    let path = root.join(&entry.path);
    let mode = entry.mode & FILE_MODE_MASK;
    match entry.kind {
        FileKind::Dir => {
            ensure_dir(&path, mode)?;
            if agent {
                crate::privilege::chown_to_agent(&path).map_err(io_at(&path))?;
            }
            Ok(None)
        }
        FileKind::File => {
            // Parents come first in the stream; a missing one (or a
            // symlink: create_dir fails, symlink_metadata says so) is an error.
            if let Some(parent) = path.parent() {
                let meta = fs::symlink_metadata(parent).map_err(io_at(parent))?;
                if !meta.is_dir() {
                    return Err(Error::Path(entry.path));
                }
            }
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io_at(&path))?;
            if agent {
                crate::privilege::fchown_to_agent(file.as_fd()).map_err(io_at(&path))?;
            }
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(io_at(&path))?;
            Ok(Some(Open {
                path,
                file: BufWriter::with_capacity(256 * 1024, file),
                size: entry.size,
                got: 0,
                hasher: Sha256::new(),
                mtime: entry.mtime,
            }))
        }
    }
}

/// Opens the results connection to the host's `port`. The init does this
/// before the command starts, so that the host's one connection on that port
/// is the init's whatever the command does later.
pub fn connect_results(port: u32) -> Result<VsockStream, Error> {
    VsockStream::connect(HOST_CID, port).map_err(|e| Error::Connect(port, e))
}

/// Sends over `stream` (the connection of [`connect_results`]) `root/out`
/// (if it is a directory, and not a symlink), or with `collect` the files
/// under `root` matching those patterns, then waits (bounded) for the host
/// to close the connection. `Ok(false)` when there was nothing to send: the
/// stream then holds only `FilesDone`.
pub fn send_results(
    stream: VsockStream,
    root: &Path,
    collect: Option<&[String]>,
) -> Result<bool, Error> {
    let mut reader = stream
        .try_clone()
        .map_err(|e| Error::Send(FrameError::Io(e)))?;
    let top = open_dir_path(root).map_err(io_at(root))?;
    let (dir, patterns) = match collect {
        Some(patterns) => (Some(top), patterns),
        None => (open_dir_at(top.as_fd(), c"out").ok(), &[][..]),
    };
    let mut w = BufWriter::with_capacity(256 * 1024, stream);
    let sent = match dir {
        Some(dir) => {
            send_tree(&mut w, dir, patterns)?;
            true
        }
        None => {
            let done = Message::FilesDone { count: 0, bytes: 0 };
            write_frame(&mut w, &done).map_err(Error::Send)?;
            w.flush().map_err(|e| Error::Send(FrameError::Io(e)))?;
            false
        }
    };
    let _ = reader.set_read_timeout(Some(CLOSE_PATIENCE));
    let mut buf = [0u8; 64];
    // The host answers nothing: end of file (or an error) means "got it".
    while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    Ok(sent)
}

/// Opens the directory `path` itself (its last component is not followed
/// if it is a symlink).
fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)?;
    Ok(file.into())
}

/// `openat(dir, name, O_DIRECTORY | O_NOFOLLOW)`: fails (`ELOOP`,
/// `ENOTDIR`) for anything but a directory, a symlink to one included.
fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_DIRECTORY)
}

/// `openat(dir, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | extra)`.
fn open_at(dir: BorrowedFd<'_>, name: &CStr, extra: c_int) -> io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | extra;
    // SAFETY: `name` is a NUL-terminated string that outlives the call;
    // `dir` is an open descriptor borrowed for it.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated and `st` is writable memory of the
    // right type; both outlive the call, which fills `st` on success.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat succeeded, so it initialised the whole struct.
    Ok(unsafe { st.assume_init() })
}

/// The names in the directory `dir` (without `.` and `..`), sorted; read
/// through a duplicate of the descriptor.
fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let dup = dir.try_clone_to_owned()?;
    // SAFETY: fdopendir takes ownership of the duplicate on success (and
    // `into_raw_fd` gives it up); on failure we close it ourselves.
    let stream = unsafe { libc::fdopendir(dup.as_raw_fd()) };
    if stream.is_null() {
        return Err(io::Error::last_os_error());
    }
    let _owned_by_stream = dup.into_raw_fd();
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: `stream` is the open DIR from fdopendir, used by this
        // thread only; errno is cleared first to tell the end from an error.
        let entry = unsafe {
            *libc::__errno_location() = 0;
            libc::readdir64(stream)
        };
        if entry.is_null() {
            let err = io::Error::last_os_error();
            break match err.raw_os_error() {
                Some(0) | None => Ok(()),
                Some(_) => Err(err),
            };
        }
        // SAFETY: a non-null entry from readdir64 is valid until the next
        // call on `stream`; `d_name` is NUL-terminated within it. The name
        // is copied out before that.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: `stream` is open and closed once here (closing the duplicate).
    unsafe { libc::closedir(stream) };
    result?;
    names.sort();
    Ok(names)
}

/// Whether `path` (relative, `/`-separated) matches `pattern`: `*` and `?`
/// within one component, `**` as a whole component for any number of
/// components (none included).
pub fn glob_path(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').collect();
    let n: Vec<&str> = path.split('/').collect();
    match_components(&p, &n)
}

fn match_components(p: &[&str], n: &[&str]) -> bool {
    match p.split_first() {
        None => n.is_empty(),
        Some((&"**", rest)) => (0..=n.len()).any(|skip| match_components(rest, &n[skip..])),
        Some((first, rest)) => n.split_first().is_some_and(|(name, names)| {
            glob_component(first.as_bytes(), name.as_bytes()) && match_components(rest, names)
        }),
    }
}

/// `*` and `?` within one name (a leading `.` is matched like any byte).
fn glob_component(p: &[u8], n: &[u8]) -> bool {
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Writes the file stream of the tree under `root` to `w` (no symlink
/// followed), then `FilesDone`.
#[cfg(test)]
pub fn send<W: Write>(w: W, root: &Path) -> Result<(), Error> {
    send_matching(w, root, &[])
}

/// Like `send`, but with `patterns` only the files whose path matches one
/// of them, or lies under a directory that does (none: everything).
#[cfg(test)]
pub fn send_matching<W: Write>(w: W, root: &Path, patterns: &[String]) -> Result<(), Error> {
    send_tree(w, open_dir_path(root).map_err(io_at(root))?, patterns)
}

/// Writes the file stream of the directory `root` to `w`: with `patterns`
/// only the files whose path matches one of them, or lies under a
/// directory that does (none: everything); a selected file's directories
/// are sent before it. Then `FilesDone`.
///
/// Walked through directory descriptors, never by path: each directory is
/// opened with `openat(parent, name, O_DIRECTORY | O_NOFOLLOW)` and each
/// file with `openat(parent, name, O_NOFOLLOW | O_NONBLOCK)` then `fstat`,
/// so a directory swapped for a symlink while the walk runs is skipped, not
/// followed, and nothing outside `root` is ever read.
fn send_tree<W: Write>(w: W, root: OwnedFd, patterns: &[String]) -> Result<(), Error> {
    walk_and_send(w, root, patterns, &mut |_| {})
}

/// [`send_tree`], calling `before_open` with a directory's relative path
/// just before it is opened (tests swap it there).
fn walk_and_send<W: Write>(
    mut w: W,
    root: OwnedFd,
    patterns: &[String],
    before_open: &mut dyn FnMut(&str),
) -> Result<(), Error> {
    let selected = |rel: &str| patterns.is_empty() || patterns.iter().any(|p| glob_path(p, rel));
    // Directories not sent yet, in walk order: sent when a file under them is.
    let mut pending: Vec<FileEntry> = Vec::new();
    let (mut count, mut bytes) = (0u64, 0u64);
    // A directory to walk: its parent's descriptor and its name there (the
    // root: already open), its relative path, whether it or a parent was
    // selected. Opened only when its turn comes, so that the descriptors
    // held are those of its ancestors, not of all its pending siblings.
    struct Todo {
        at: Result<OwnedFd, (Rc<OwnedFd>, CString)>,
        rel: String,
        selected: bool,
    }
    let mut stack = vec![Todo {
        at: Ok(root),
        rel: String::new(),
        selected: patterns.is_empty(),
    }];
    let mut buf = vec![0u8; MAX_FILE_CHUNK];
    while let Some(todo) = stack.pop() {
        let dir = match todo.at {
            Ok(fd) => fd,
            // Swapped for a symlink or anything else since it was seen:
            // skipped.
            Err((parent, name)) => {
                before_open(&todo.rel);
                match open_dir_at(parent.as_fd(), &name) {
                    Ok(fd) => fd,
                    Err(_) => continue,
                }
            }
        };
        let Ok(names) = list_dir(dir.as_fd()) else {
            continue;
        };
        let dir = Rc::new(dir);
        let (rel, dir_selected) = (todo.rel, todo.selected);
        let mut subdirs = Vec::new();
        for name in names {
            let Ok(text) = name.to_str() else { continue };
            let rel_path = if rel.is_empty() {
                text.to_owned()
            } else {
                format!("{rel}/{text}")
            };
            if check_file_path(&rel_path).is_err() {
                continue;
            }
            let Ok(st) = stat_at(dir.as_fd(), &name) else {
                continue;
            };
            let mode = st.st_mode & FILE_MODE_MASK;
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => {
                    let entry = FileEntry {
                        path: rel_path.clone(),
                        kind: FileKind::Dir,
                        mode,
                        mtime: st.st_mtime,
                        size: 0,
                    };
                    let take = dir_selected || selected(&rel_path);
                    if take {
                        flush_pending(&mut w, &mut pending, &rel_path, &mut count)?;
                        write_frame(&mut w, &Message::FileEntry(entry)).map_err(Error::Send)?;
                        count += 1;
                    } else {
                        pending.push(entry);
                    }
                    subdirs.push(Todo {
                        at: Err((Rc::clone(&dir), name)),
                        rel: rel_path,
                        selected: take,
                    });
                }
                libc::S_IFREG => {
                    if !(dir_selected || selected(&rel_path)) {
                        continue;
                    }
                    // O_NONBLOCK: a FIFO swapped in does not hang the open
                    // (fstat then finds it is no regular file).
                    let Ok(fd) = open_at(dir.as_fd(), &name, libc::O_NONBLOCK) else {
                        continue;
                    };
                    let mut file = File::from(fd);
                    let Ok(meta) = file.metadata() else { continue };
                    if !meta.is_file() {
                        continue;
                    }
                    flush_pending(&mut w, &mut pending, &rel_path, &mut count)?;
                    let size = meta.len();
                    let entry = FileEntry {
                        path: rel_path,
                        kind: FileKind::File,
                        mode: meta.permissions().mode() & FILE_MODE_MASK,
                        mtime: meta.mtime(),
                        size,
                    };
                    write_frame(&mut w, &Message::FileEntry(entry)).map_err(Error::Send)?;
                    let mut hasher = Sha256::new();
                    let mut left = size;
                    while left > 0 {
                        let want = usize::try_from(left.min(MAX_FILE_CHUNK as u64))
                            .unwrap_or(MAX_FILE_CHUNK);
                        let n = match file.read(&mut buf[..want]) {
                            Ok(0) => {
                                // Shrunk while being sent: what is sent is
                                // short, and the host refuses it.
                                break;
                            }
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(_) => break,
                        };
                        hasher.update(&buf[..n]);
                        write_frame(&mut w, &Message::FileData(buf[..n].to_vec()))
                            .map_err(Error::Send)?;
                        left -= n as u64;
                    }
                    let sha256: [u8; 32] = hasher.finalize().into();
                    write_frame(&mut w, &Message::FileEnd { sha256 }).map_err(Error::Send)?;
                    count += 1;
                    bytes += size - left;
                }
                // Symlinks and every other type: never sent.
                _ => {}
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    // Drop the pending directories nothing was sent from.
    pending.clear();
    write_frame(&mut w, &Message::FilesDone { count, bytes }).map_err(Error::Send)?;
    w.flush().map_err(|e| Error::Send(FrameError::Io(e)))
}

/// Sends the pending directories that are ancestors of `rel` (parents
/// first, as they were found) and forgets them; the others stay pending.
fn flush_pending<W: Write>(
    w: &mut W,
    pending: &mut Vec<FileEntry>,
    rel: &str,
    count: &mut u64,
) -> Result<(), Error> {
    let is_ancestor = |e: &FileEntry| {
        rel.strip_prefix(e.path.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
    };
    for entry in pending.iter().filter(|e| is_ancestor(e)) {
        write_frame(&mut *w, &Message::FileEntry(entry.clone())).map_err(Error::Send)?;
        *count += 1;
    }
    pending.retain(|e| !is_ancestor(e));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("airlock-init-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn a_tree_round_trips_and_symlinks_stay_behind() {
        let src = tmp("src");
        let dst = tmp("dst");
        fs::create_dir(src.join("d")).expect("mkdir");
        fs::write(src.join("d/x.sh"), b"#!/bin/sh\n").expect("write");
        fs::set_permissions(src.join("d/x.sh"), fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::write(src.join("big"), vec![3u8; 150_000]).expect("write");
        std::os::unix::fs::symlink("/etc/passwd", src.join("l")).expect("symlink");
        let mut buf = Vec::new();
        send(&mut buf, &src).expect("send");
        assert_eq!(receive(&buf[..], &dst, false).expect("receive"), 3);
        assert_eq!(fs::read(dst.join("big")).expect("read"), vec![3u8; 150_000]);
        let meta = fs::metadata(dst.join("d/x.sh")).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        assert!(fs::symlink_metadata(dst.join("l")).is_err());
        let dir = File::open(src.join("d")).expect("open");
        set_mtime(&dir, 1_500_000_000).expect("mtime");
        let dst2 = tmp("dst2");
        let mut buf = Vec::new();
        send(&mut buf, &src).expect("send");
        receive(&buf[..], &dst2, false).expect("receive");
        let meta = fs::metadata(dst2.join("d")).expect("meta");
        assert_eq!(meta.mtime(), 1_500_000_000, "directory mtimes survive");
        let _ = fs::remove_dir_all(&src);
        let _ = fs::remove_dir_all(&dst);
        let _ = fs::remove_dir_all(&dst2);
    }

    /// The names `receive` wrote under `dst`, relative and sorted.
    fn tree(dst: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dst.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).expect("ls") {
                let path = e.expect("entry").path();
                let rel = path.strip_prefix(dst).expect("under dst");
                out.push(rel.display().to_string());
                if fs::symlink_metadata(&path).expect("stat").is_dir() {
                    stack.push(path);
                }
            }
        }
        out.sort();
        out
    }

    /// A directory swapped for a symlink to a place outside the root after
    /// the walk saw it (and before it went in) is skipped, not followed.
    #[test]
    fn a_directory_swapped_for_a_symlink_mid_walk_is_not_followed() {
        let src = tmp("swap-src");
        let outside = tmp("swap-outside");
        let dst = tmp("swap-dst");
        fs::write(outside.join("secret"), b"vm file").expect("write");
        fs::create_dir(src.join("d")).expect("mkdir");
        fs::write(src.join("d/mine"), b"result").expect("write");
        fs::write(src.join("top"), b"top").expect("write");
        let mut swapped = 0;
        let mut buf = Vec::new();
        let root = open_dir_path(&src).expect("open");
        walk_and_send(&mut buf, root, &[], &mut |rel| {
            if rel == "d" {
                fs::remove_dir_all(src.join("d")).expect("rm");
                std::os::unix::fs::symlink(&outside, src.join("d")).expect("symlink");
                swapped += 1;
            }
        })
        .expect("send");
        assert_eq!(swapped, 1, "the walk went for d");
        receive(&buf[..], &dst, false).expect("receive");
        // d was a directory when listed (so it is there, empty); nothing of
        // what the symlink points to came along.
        assert_eq!(tree(&dst), ["d", "top"]);
        assert!(!buf.windows(7).any(|w| w == b"vm file"));
        // Sent again, d is the symlink now: skipped whole.
        let dst2 = tmp("swap-dst2");
        let mut buf = Vec::new();
        send(&mut buf, &src).expect("send");
        receive(&buf[..], &dst2, false).expect("receive");
        assert_eq!(tree(&dst2), ["top"]);
        for d in [&src, &outside, &dst, &dst2] {
            let _ = fs::remove_dir_all(d);
        }
    }

    /// `out` itself a symlink: nothing is sent from where it points; the
    /// stream holds only `FilesDone`.
    #[test]
    fn an_out_symlink_is_not_followed() {
        let root = tmp("out-link");
        let outside = tmp("out-link-outside");
        fs::write(outside.join("secret"), b"vm file").expect("write");
        std::os::unix::fs::symlink(&outside, root.join("out")).expect("symlink");
        let top = open_dir_path(&root).expect("open");
        assert!(open_dir_at(top.as_fd(), c"out").is_err());
        // With a FIFO and a file beside it, only the file goes; opening
        // the FIFO (were it swapped in for a file) would not block.
        fs::write(root.join("file"), b"f").expect("write");
        let fifo = CString::new(root.join("fifo").as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: `fifo` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert!(open_at(top.as_fd(), c"fifo", libc::O_NONBLOCK).is_ok());
        let dst = tmp("out-link-dst");
        let mut buf = Vec::new();
        send(&mut buf, &root).expect("send");
        receive(&buf[..], &dst, false).expect("receive");
        assert_eq!(tree(&dst), ["file"]);
        let _ = fs::remove_dir_all(&dst);
        for d in [&root, &outside] {
            let _ = fs::remove_dir_all(d);
        }
    }

    #[test]
    fn globs_match_paths_by_component() {
        for (p, n, want) in [
            ("*.txt", "a.txt", true),
            ("*.txt", "d/a.txt", false),
            ("**/*.txt", "d/a.txt", true),
            ("**/*.txt", "a.txt", true),
            ("d/**", "d/e/f", true),
            ("d/**", "d", true),
            ("d/*/f", "d/e/f", true),
            ("d/*/f", "d/e/g/f", false),
            ("?.rs", "ab.rs", false),
            ("a*b*c", "aXbYbZc", true),
            ("report", "report", true),
        ] {
            assert_eq!(glob_path(p, n), want, "{p} {n}");
        }
    }

    #[test]
    fn collect_sends_only_matches_with_their_directories() {
        let src = tmp("collect");
        let dst = tmp("collect-dst");
        fs::create_dir_all(src.join("build/logs")).expect("mkdir");
        fs::create_dir_all(src.join("src")).expect("mkdir");
        fs::write(src.join("build/logs/a.log"), b"log").expect("write");
        fs::write(src.join("build/app"), b"bin").expect("write");
        fs::write(src.join("src/main.rs"), b"fn main() {}").expect("write");
        fs::write(src.join("notes.txt"), b"n").expect("write");
        let mut buf = Vec::new();
        send_matching(&mut buf, &src, &["**/*.log".into(), "notes.txt".into()]).expect("send");
        // build, build/logs, build/logs/a.log, notes.txt
        assert_eq!(receive(&buf[..], &dst, false).expect("receive"), 4);
        assert_eq!(
            fs::read(dst.join("build/logs/a.log")).expect("read"),
            b"log"
        );
        assert_eq!(fs::read(dst.join("notes.txt")).expect("read"), b"n");
        assert!(!dst.join("build/app").exists());
        assert!(
            !dst.join("src").exists(),
            "no empty directories for nothing"
        );
        let dst2 = tmp("collect-dst2");
        let mut buf = Vec::new();
        send_matching(&mut buf, &src, &["build".into()]).expect("send");
        receive(&buf[..], &dst2, false).expect("receive");
        assert!(
            dst2.join("build/app").exists(),
            "a matched directory brings its tree"
        );
        assert!(dst2.join("build/logs/a.log").exists());
        assert!(!dst2.join("notes.txt").exists());
        for d in [&src, &dst, &dst2] {
            let _ = fs::remove_dir_all(d);
        }
    }

    #[test]
    fn bad_paths_from_the_host_are_refused() {
        let dst = tmp("bad");
        for path in ["../x", "/etc/x", "a/../../x"] {
            let mut buf = Vec::new();
            write_frame(
                &mut buf,
                &Message::FileEntry(FileEntry {
                    path: path.into(),
                    kind: FileKind::File,
                    mode: 0o644,
                    mtime: 0,
                    size: 0,
                }),
            )
            .expect("encode");
            assert!(
                matches!(receive(&buf[..], &dst, false), Err(Error::Path(_))),
                "{path}"
            );
        }
        let _ = fs::remove_dir_all(&dst);
    }
}
