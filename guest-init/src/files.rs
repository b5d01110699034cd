//! The guest's end of the file streams (PROTOCOL.md, "File streams"): the
//! workspace in from [`FILES_IN_PORT`] before the command, `/workspace/out`
//! out to [`FILES_OUT_PORT`] after it.
//!
//! The host is trusted more than the guest, but a buggy host must still not
//! make the init write outside `/workspace`: every path is checked with
//! [`check_file_path`], files are created with `O_NOFOLLOW`, and the
//! directories the host names are created here (a symlink in the way fails
//! `create_dir` / is refused). Sending never follows a symlink either
//! (`lstat`; symlinks and other types are skipped). Directory mtimes are set
//! once the stream has ended (creating entries inside a directory changes
//! its mtime).
//!
//! With `airlock run --collect`, the results are the files under
//! `/workspace` that match the host's patterns ([`glob_path`]) rather than
//! `/workspace/out`, sent with their paths relative to `/workspace`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

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
/// `root`. Returns the number of entries.
pub fn receive_workspace(root: &Path, port: u32) -> Result<u64, Error> {
    fs::create_dir_all(root).map_err(io_at(root))?;
    let stream = VsockStream::connect(HOST_CID, port).map_err(|e| Error::Connect(port, e))?;
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| Error::Connect(port, e))?;
    receive(BufReader::with_capacity(256 * 1024, stream), root)
}

struct Open {
    path: PathBuf,
    file: BufWriter<File>,
    size: u64,
    got: u64,
    hasher: Sha256,
    mtime: i64,
}

/// Reads a file stream from `r` into `root` (see the module docs).
pub fn receive<R: Read>(mut r: R, root: &Path) -> Result<u64, Error> {
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
                current = start(root, entry)?;
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

fn start(root: &Path, entry: FileEntry) -> Result<Option<Open>, Error> {
    check_file_path(&entry.path).map_err(|_| Error::Path(entry.path.clone()))?;
    let path = root.join(&entry.path);
    let mode = entry.mode & FILE_MODE_MASK;
    match entry.kind {
        FileKind::Dir => {
            ensure_dir(&path, mode)?;
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

/// Sends `root/out` (if it is a directory), or with `collect` the files
/// under `root` matching those patterns, to the host's results port, then
/// waits (bounded) for the host to close the connection. `Ok(false)` when
/// there was nothing to send.
pub fn send_results(root: &Path, collect: Option<&[String]>, port: u32) -> Result<bool, Error> {
    let (dir, patterns) = match collect {
        Some(patterns) => (root.to_path_buf(), patterns),
        None => (root.join(OUT_DIR), &[][..]),
    };
    match fs::symlink_metadata(&dir) {
        Ok(meta) if meta.is_dir() => {}
        _ => return Ok(false),
    }
    let stream = VsockStream::connect(HOST_CID, port).map_err(|e| Error::Connect(port, e))?;
    let mut reader = stream.try_clone().map_err(|e| Error::Connect(port, e))?;
    send_matching(BufWriter::with_capacity(256 * 1024, stream), &dir, patterns)?;
    let _ = reader.set_read_timeout(Some(CLOSE_PATIENCE));
    let mut buf = [0u8; 64];
    // The host answers nothing: end of file (or an error) means "got it".
    while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    Ok(true)
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
/// of them, or lies under a directory that does (none: everything). A
/// selected file's directories are sent before it.
pub fn send_matching<W: Write>(mut w: W, root: &Path, patterns: &[String]) -> Result<(), Error> {
    let selected = |rel: &str| patterns.is_empty() || patterns.iter().any(|p| glob_path(p, rel));
    // Directories not sent yet, in walk order: sent when a file under them is.
    let mut pending: Vec<FileEntry> = Vec::new();
    let (mut count, mut bytes) = (0u64, 0u64);
    // (directory, its relative path, whether it or a parent was selected)
    let mut stack: Vec<(PathBuf, String, bool)> =
        vec![(root.to_path_buf(), String::new(), patterns.is_empty())];
    let mut buf = vec![0u8; MAX_FILE_CHUNK];
    while let Some((dir, rel, dir_selected)) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(io_at(&dir))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let Some(name) = name.to_str() else { continue };
            let rel_path = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            if check_file_path(&rel_path).is_err() {
                continue;
            }
            let path = dir.join(name);
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let mode = meta.permissions().mode() & FILE_MODE_MASK;
            if meta.is_dir() {
                let entry = FileEntry {
                    path: rel_path.clone(),
                    kind: FileKind::Dir,
                    mode,
                    mtime: meta.mtime(),
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
                subdirs.push((path, rel_path, take));
            } else if meta.is_file() {
                if !(dir_selected || selected(&rel_path)) {
                    continue;
                }
                flush_pending(&mut w, &mut pending, &rel_path, &mut count)?;
                let Ok(mut file) = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                else {
                    continue;
                };
                let Ok(meta) = file.metadata() else { continue };
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
                    let want =
                        usize::try_from(left.min(MAX_FILE_CHUNK as u64)).unwrap_or(MAX_FILE_CHUNK);
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
        assert_eq!(receive(&buf[..], &dst).expect("receive"), 3);
        assert_eq!(fs::read(dst.join("big")).expect("read"), vec![3u8; 150_000]);
        let meta = fs::metadata(dst.join("d/x.sh")).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        assert!(fs::symlink_metadata(dst.join("l")).is_err());
        let dir = File::open(src.join("d")).expect("open");
        set_mtime(&dir, 1_500_000_000).expect("mtime");
        let dst2 = tmp("dst2");
        let mut buf = Vec::new();
        send(&mut buf, &src).expect("send");
        receive(&buf[..], &dst2).expect("receive");
        let meta = fs::metadata(dst2.join("d")).expect("meta");
        assert_eq!(meta.mtime(), 1_500_000_000, "directory mtimes survive");
        let _ = fs::remove_dir_all(&src);
        let _ = fs::remove_dir_all(&dst);
        let _ = fs::remove_dir_all(&dst2);
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
        assert_eq!(receive(&buf[..], &dst).expect("receive"), 4);
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
        receive(&buf[..], &dst2).expect("receive");
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
                matches!(receive(&buf[..], &dst), Err(Error::Path(_))),
                "{path}"
            );
        }
        let _ = fs::remove_dir_all(&dst);
    }
}
