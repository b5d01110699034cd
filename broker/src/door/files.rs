//! Files over the RPC: the workspace in (`--workspace`, port 1025) and the
//! results out (`--out`, port 1026). See PROTOCOL.md, "File streams".
//!
//! Sending: a depth-first walk of the workspace, streamed file by file in
//! 64 KiB chunks (never the whole tree in memory). Only directories and
//! regular files go; symlinks are skipped (never followed) and counted, and
//! names on the deny list are skipped.
//!
//! Receiving: the guest is hostile. The host decides what lands in `--out`:
//! modes are the host's ([`result_mode`]: no setuid, setgid, sticky or
//! group/world write, whatever the guest says), a directory that was
//! already there is never changed, `--collect` is checked here
//! ([`ResultsPolicy`]; the init's own filtering is a courtesy), and
//! everything the stream can make the host do is bounded: entries, path
//! depth, `file.out` records and stderr lines (the rest counted and hashed
//! in `files.done`), remembered directories, and time (the run's deadline
//! abandons the rest). Every path is checked where it is used:
//! each directory on the way is opened relative to its parent with
//! `O_NOFOLLOW | O_DIRECTORY` (so a symlink in the way is refused, not
//! followed) and created with `mkdirat` if missing; a file is written to a
//! temporary file in its own directory (`O_CREAT | O_EXCL | O_NOFOLLOW`),
//! fsynced, and renamed to its name only if its size and our own sha256
//! match what the guest announced and nothing is at that name yet (results
//! never replace what the stream did not create). A refused file leaves
//! whatever was at its name untouched. Sizes are bounded per file and in total.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use airlock_protocol::limits::{FILE_MODE_MASK, MAX_FILE_CHUNK, MAX_FILE_PATH};
use airlock_protocol::{
    check_file_path, read_frame, write_frame, FileEntry, FileKind, FrameError, Message,
};
use sha2::{Digest, Sha256};

use crate::audit::records::{self, FileIn, FileOut, HostRecord};
use crate::audit::{AuditLog, Durability};

/// Names never sent from a workspace, matched against each path
/// component's name.
pub const DEFAULT_DENY: [&str; 6] = [".env*", ".ssh", ".aws", ".gnupg", "*.pem", "id_*"];

/// Most entries a results stream may hold; beyond, the stream is cut.
pub const MAX_RESULT_ENTRIES: u64 = 100_000;

/// Deepest result path, in components (each level costs an `openat`).
pub const MAX_RESULT_DEPTH: usize = 128;

/// Most `file.out` records one results stream writes (accepted and refused
/// together); the rest are counted, and hashed, in `files.done`.
pub const MAX_FILE_RECORDS: u64 = 10_000;

/// Most bytes of `file.out` fields one results stream writes (paths and
/// reasons come from the guest: a 4 KiB path of control bytes is 24 KiB
/// of JSON); past it, records are counted and hashed like those past
/// [`MAX_FILE_RECORDS`].
pub const MAX_FILE_RECORD_BYTES: u64 = 2 << 20;

/// Most refused result files named on stderr; `files.done` counts the rest.
pub const MAX_REFUSAL_LINES: u64 = 20;

/// Most directories whose mtime a results stream restores at its end.
pub const MAX_DIR_TIMES: usize = 10_000;

/// Most bytes of directory paths remembered for that.
pub const MAX_DIR_TIME_BYTES: usize = 4 << 20;

/// What can go wrong with a whole stream (a single refused file is not an
/// error: it is reported and the stream goes on).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the workspace {}", .0.display())]
    Workspace(PathBuf, #[source] io::Error),
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] io::Error),
    #[error("{} changed size while it was being sent", .0.display())]
    Changed(PathBuf),
    #[error("cannot send the workspace")]
    Send(#[source] FrameError),
    #[error("cannot open the output directory {}", .0.display())]
    OutDir(PathBuf, #[source] io::Error),
    #[error("the results stream is malformed: {0}")]
    Stream(String),
    #[error("the results stream failed")]
    Receive(#[source] FrameError),
    #[error("the run's time was up (--timeout): the rest of the results were abandoned")]
    Abandoned,
}

/// A `*`/`?` glob over one name (bytes): `*` any run, `?` any one byte.
pub fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// The deny list: the defaults plus every `--exclude`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deny {
    patterns: Vec<String>,
}

impl Deny {
    pub fn new(extra: &[String]) -> Deny {
        let mut patterns: Vec<String> = DEFAULT_DENY.iter().map(|p| (*p).to_owned()).collect();
        patterns.extend(extra.iter().cloned());
        Deny { patterns }
    }

    /// Every pattern, the defaults included.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// A deny list of exactly these patterns (as [`Deny::patterns`] gave
    /// them).
    pub fn exactly(patterns: Vec<String>) -> Deny {
        Deny { patterns }
    }

    /// Whether a path component named `name` is kept out.
    pub fn denies(&self, name: &OsStr) -> bool {
        self.patterns
            .iter()
            .any(|p| glob_match(p.as_bytes(), name.as_bytes()))
    }
}

/// Checks, before any VM starts, that the workspace is a readable
/// directory (a symlink to one is fine: the user named it) and that every
/// directory and regular file that would be sent (the deny list applied,
/// symlinks not followed) can be listed or opened: an unreadable file is
/// the user's error, named before boot, not a broken stream mid-run.
pub fn check_workspace(root: &Path, deny: &Deny) -> Result<(), Error> {
    let meta = std::fs::metadata(root).map_err(|e| Error::Workspace(root.into(), e))?;
    if !meta.is_dir() {
        return Err(Error::Workspace(
            root.into(),
            io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
        ));
    }
    std::fs::read_dir(root).map_err(|e| Error::Workspace(root.into(), e))?;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::Read(dir.clone(), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::Read(dir.clone(), e))?;
            if deny.denies(&entry.file_name()) {
                continue;
            }
            let path = entry.path();
            let ft = entry
                .file_type()
                .map_err(|e| Error::Read(path.clone(), e))?;
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&path)
                    .map_err(|e| Error::Read(path.clone(), e))?;
            }
        }
    }
    Ok(())
}

/// What a stream carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    pub entries: u64,
    pub bytes: u64,
    pub denied: u64,
    pub symlinks: u64,
    /// Other file types, and names that are not UTF-8 or too long.
    pub skipped: u64,
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn mtime_of(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
}

/// Streams the workspace at `root` to `w` (then `FilesDone`), one `file.in`
/// audit record per file.
pub fn send_workspace<W: Write>(
    mut w: W,
    root: &Path,
    deny: &Deny,
    audit: &AuditLog,
) -> Result<Sent, Error> {
    let mut sent = Sent::default();
    // Depth-first with an explicit stack of directories still to list; a
    // directory's entry is sent before anything inside it.
    let mut stack: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(&dir)
            .map_err(|e| Error::Read(dir.clone(), e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Read(dir.clone(), e))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            if deny.denies(&name) {
                sent.denied += 1;
                continue;
            }
            let path = dir.join(&name);
            let Some(name_str) = name.to_str() else {
                sent.skipped += 1;
                continue;
            };
            let rel_path = if rel.is_empty() {
                name_str.to_owned()
            } else {
                format!("{rel}/{name_str}")
            };
            if rel_path.len() > MAX_FILE_PATH || check_file_path(&rel_path).is_err() {
                sent.skipped += 1;
                continue;
            }
            let meta =
                std::fs::symlink_metadata(&path).map_err(|e| Error::Read(path.clone(), e))?;
            let ft = meta.file_type();
            if ft.is_symlink() {
                sent.symlinks += 1;
            } else if ft.is_dir() {
                let entry = FileEntry {
                    path: rel_path.clone(),
                    kind: FileKind::Dir,
                    mode: meta.permissions().mode() & FILE_MODE_MASK,
                    mtime: mtime_of(&meta),
                    size: 0,
                };
                write_frame(&mut w, &Message::FileEntry(entry)).map_err(Error::Send)?;
                sent.entries += 1;
                subdirs.push((path, rel_path));
            } else if ft.is_file() {
                send_file(&mut w, &path, rel_path, audit, &mut sent)?;
            } else {
                sent.skipped += 1;
            }
        }
        // Reversed so that the stack pops them in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    write_frame(
        &mut w,
        &Message::FilesDone {
            count: sent.entries,
            bytes: sent.bytes,
        },
    )
    .map_err(Error::Send)?;
    w.flush().map_err(|e| Error::Send(FrameError::Io(e)))?;
    Ok(sent)
}

fn send_file<W: Write>(
    w: &mut W,
    path: &Path,
    rel_path: String,
    audit: &AuditLog,
    sent: &mut Sent,
) -> Result<(), Error> {
    let read_err = |e| Error::Read(path.to_path_buf(), e);
    // O_NOFOLLOW: swapped for a symlink since the lstat, it is not followed.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        sent.skipped += 1;
        return Ok(());
    }
    let size = meta.len();
    let entry = FileEntry {
        path: rel_path.clone(),
        kind: FileKind::File,
        mode: meta.permissions().mode() & FILE_MODE_MASK,
        mtime: mtime_of(&meta),
        size,
    };
    write_frame(&mut *w, &Message::FileEntry(entry)).map_err(Error::Send)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; MAX_FILE_CHUNK];
    let mut left = size;
    while left > 0 {
        let want = usize::try_from(left.min(MAX_FILE_CHUNK as u64)).unwrap_or(MAX_FILE_CHUNK);
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => return Err(Error::Changed(path.to_path_buf())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        hasher.update(&buf[..n]);
        write_frame(&mut *w, &Message::FileData(buf[..n].to_vec())).map_err(Error::Send)?;
        left -= n as u64;
    }
    let sha256: [u8; 32] = hasher.finalize().into();
    write_frame(&mut *w, &Message::FileEnd { sha256 }).map_err(Error::Send)?;
    sent.entries += 1;
    sent.bytes += size;
    audit.record(
        &FileIn {
            path: &rel_path,
            size,
            sha256: hex(&sha256),
        },
        Durability::Buffered,
    );
    Ok(())
}

// ---- receiving ----

/// A path component as a C string (a NUL in it is an error).
fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

/// `openat(dir, name, flags, mode)`, never following a symlink at `name`.
fn open_at(dir: RawFd, name: &str, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let name = c_name(name)?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the
    // returned descriptor, if any, is new and owned by nobody else.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            libc::c_uint::from(mode),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mkdir_at(dir: RawFd, name: &str, mode: libc::mode_t) -> io::Result<()> {
    let name = c_name(name)?;
    // SAFETY: `name` is NUL-terminated and outlives the call.
    if unsafe { libc::mkdirat(dir, name.as_ptr(), mode) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn unlink_at(dir: RawFd, name: &str) {
    if let Ok(name) = c_name(name) {
        // SAFETY: `name` is NUL-terminated and outlives the call. Best effort.
        unsafe { libc::unlinkat(dir, name.as_ptr(), 0) };
    }
}

/// Renames `from` to `to` in `dir` only if nothing is at `to`
/// (`RENAME_NOREPLACE`; where the file system lacks it, a hard link, which
/// also fails on an existing name, then the unlink of `from`): a result
/// never replaces anything the stream did not create.
fn rename_new_at(dir: RawFd, from: &str, to: &str) -> io::Result<()> {
    let (from_c, to_c) = (c_name(from)?, c_name(to)?);
    // SAFETY: both names are NUL-terminated and outlive the call; the
    // syscall takes two directory descriptors, two names and flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            dir,
            from_c.as_ptr(),
            dir,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    // SAFETY: as above; linkat without AT_SYMLINK_FOLLOW links `from`
    // itself (a regular file we created), failing if `to` exists.
    if unsafe { libc::linkat(dir, from_c.as_ptr(), dir, to_c.as_ptr(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    unlink_at(dir, from);
    Ok(())
}

fn set_mtime(fd: RawFd, mtime: i64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: `times` is two valid timespecs that outlive the call.
    if unsafe { libc::futimens(fd, times.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The components of a path the guest sent, checked here, at the point of
/// use: relative, each non-empty, not `.`/`..`, no NUL.
fn components(path: &str) -> Result<Vec<&str>, String> {
    if path.is_empty() || path.len() > MAX_FILE_PATH {
        return Err("empty or too long path".into());
    }
    if path.starts_with('/') {
        return Err("absolute path".into());
    }
    if path.contains('\0') {
        return Err("NUL in path".into());
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() > MAX_RESULT_DEPTH {
        return Err(format!("deeper than {MAX_RESULT_DEPTH} components"));
    }
    if parts.contains(&"..") {
        return Err("'..' in path".into());
    }
    if parts.iter().any(|c| c.is_empty() || *c == ".") {
        return Err("empty or '.' component".into());
    }
    Ok(parts)
}

/// Opens (creating if missing) each directory of `dirs` below `root`, never
/// following a symlink. A directory it creates gets mode `0755` whatever
/// the umask; one that exists is not touched. The flag says whether the
/// last one was created here.
fn open_dirs(root: &OwnedFd, dirs: &[&str]) -> Result<(OwnedFd, bool), String> {
    let mut cur = root.try_clone().map_err(|e| format!("dup: {e}"))?;
    let mut created = false;
    for name in dirs {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY;
        created = false;
        let next = match open_at(cur.as_raw_fd(), name, flags, 0) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                mkdir_at(cur.as_raw_fd(), name, 0o700)
                    .map_err(|e| format!("cannot create directory {name}: {e}"))?;
                let fd = open_at(cur.as_raw_fd(), name, flags, 0)
                    .map_err(|e| format!("cannot open directory {name}: {e}"))?;
                let mode = result_mode(FileKind::Dir, 0);
                // SAFETY: fchmod on a descriptor we own; no memory is passed.
                if unsafe { libc::fchmod(fd.as_raw_fd(), mode) } < 0 {
                    return Err(format!("chmod {name}: {}", io::Error::last_os_error()));
                }
                created = true;
                fd
            }
            Err(e) => return Err(dir_error(name, &e)),
        };
        cur = next;
    }
    Ok((cur, created))
}

/// Opens each directory of `dirs` below `root` that is already there,
/// never following a symlink, creating nothing.
fn reopen_dirs(root: &OwnedFd, dirs: &[&str]) -> Result<OwnedFd, String> {
    let mut cur = root.try_clone().map_err(|e| format!("dup: {e}"))?;
    for name in dirs {
        cur = open_at(cur.as_raw_fd(), name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| dir_error(name, &e))?;
    }
    Ok(cur)
}

fn dir_error(name: &str, e: &io::Error) -> String {
    if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) {
        format!("{name} is a symlink or not a directory")
    } else {
        format!("cannot open directory {name}: {e}")
    }
}

/// The file being received.
struct Current {
    path: String,
    size: u64,
    got: u64,
    hasher: Sha256,
    /// `None` once refused: the data is read and dropped.
    target: Option<Target>,
    refusal: Option<String>,
    mode: u32,
    mtime: i64,
}

struct Target {
    dir: OwnedFd,
    name: String,
    tmp: String,
    file: File,
}

impl Target {
    fn discard(self) {
        drop(self.file);
        unlink_at(self.dir.as_raw_fd(), &self.tmp);
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn create_temp(dir: &OwnedFd, name: &str) -> Result<(String, File), String> {
    for _ in 0..16 {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = format!(".airlock-part-{}-{n}", std::process::id());
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        match open_at(dir.as_raw_fd(), &tmp, flags, 0o600) {
            Ok(fd) => return Ok((tmp, File::from(fd))),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot create a temporary file for {name}: {e}")),
        }
    }
    Err(format!("cannot create a temporary file for {name}"))
}

/// The results receiver's view of the run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Received {
    pub accepted: u64,
    pub refused: u64,
    pub bytes: u64,
    /// Refused files not named on stderr (past [`MAX_REFUSAL_LINES`]).
    pub unnamed: u64,
    /// `file.out` records not written (past [`MAX_FILE_RECORDS`]): how many
    /// accepted and refused, and the sha256 of the records they would have
    /// been (one JSON object a line), so the log still pins them.
    pub unrecorded_accepted: u64,
    pub unrecorded_refused: u64,
    pub unrecorded_sha256: Option<String>,
    /// Directories whose mtime was not restored (past [`MAX_DIR_TIMES`]).
    pub dir_times_dropped: u64,
}

/// What the host allows of a results stream. The guest's own filtering
/// (`--collect` in the init) is a courtesy; this is the check.
#[derive(Debug, Clone, Copy)]
pub struct ResultsPolicy<'a> {
    /// The user's `--out`.
    pub out: &'a Path,
    /// `--max-out-bytes`: per file and in total.
    pub max_bytes: u64,
    /// `--collect` patterns; empty: everything under `/workspace/out`.
    pub collect: &'a [String],
    /// When the run's time is up: past it the rest of the stream is
    /// abandoned ([`Error::Abandoned`]), however much is left.
    pub deadline: Option<Instant>,
}

/// The permission bits the host gives a result, whatever the guest said:
/// directories `0755`; files `0755` if the guest's owner-execute bit is
/// set, else `0644`. Never setuid, setgid, sticky, or group/world writable.
pub fn result_mode(kind: FileKind, guest_mode: u32) -> u32 {
    match kind {
        FileKind::Dir => 0o755,
        FileKind::File if guest_mode & 0o100 != 0 => 0o755,
        FileKind::File => 0o644,
    }
}

/// Whether `--collect` lets the results stream carry `path` (a relative
/// path already split into components). A file must match a pattern, or lie
/// under a directory that does; a directory may also be on the way to
/// something a pattern could match (the init sends a matched file's
/// directories before it).
fn collect_allows(collect: &[String], parts: &[&str], kind: FileKind) -> bool {
    if collect.is_empty() {
        return true;
    }
    collect.iter().any(|pattern| {
        let scan = glob_scan(pattern, parts);
        scan.matched || (kind == FileKind::Dir && scan.alive)
    })
}

/// How a `/`-separated glob pattern (`*` and `?` within a component, `**`
/// as a whole component for any number of components) meets a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GlobScan {
    /// The pattern matches the path or one of its ancestors.
    matched: bool,
    /// The pattern could still match the path or something below it.
    alive: bool,
}

/// Runs `pattern` over `names` as an automaton over components: time
/// `O(pattern components × names)`, whatever the `**`s, so a hostile path
/// costs no more than its length.
fn glob_scan(pattern: &str, names: &[&str]) -> GlobScan {
    let p: Vec<&str> = pattern.split('/').collect();
    // states[i]: pattern position i reached after the names consumed.
    let mut states = vec![false; p.len() + 1];
    let close = |states: &mut Vec<bool>| {
        for i in 0..p.len() {
            if states[i] && p[i] == "**" {
                states[i + 1] = true;
            }
        }
    };
    states[0] = true;
    close(&mut states);
    let mut matched = false;
    for name in names {
        let mut next = vec![false; p.len() + 1];
        for i in 0..p.len() {
            if !states[i] {
                continue;
            }
            if p[i] == "**" {
                next[i] = true;
            } else if glob_match(p[i].as_bytes(), name.as_bytes()) {
                next[i + 1] = true;
            }
        }
        close(&mut next);
        states = next;
        matched |= states[p.len()];
        if !states.iter().any(|&s| s) {
            break;
        }
    }
    GlobScan {
        matched,
        alive: states.iter().any(|&s| s),
    }
}

/// Reads through to `inner`, which has a short read timeout, until
/// `deadline`: then every read fails with `TimedOut`, so that no stream
/// keeps airlock past the run's time.
struct DeadlineReader<R> {
    inner: R,
    deadline: Option<Instant>,
}

impl<R: Read> Read for DeadlineReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the run's time is up",
                ));
            }
            match self.inner.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                other => return other,
            }
        }
    }
}

/// Where every file's fate goes: the `file.out` records (at most
/// [`MAX_FILE_RECORDS`]), the stderr callback (at most
/// [`MAX_REFUSAL_LINES`]), and the counts.
struct Tally<'a> {
    audit: &'a AuditLog,
    refused: &'a mut dyn FnMut(&str, &str),
    got: Received,
    records: u64,
    record_bytes: u64,
    lines: u64,
    unrecorded: Sha256,
}

impl Tally<'_> {
    fn record(&mut self, record: &FileOut<'_>) {
        let accepted = record.accepted;
        // Encoded once: measured against the caps, then written or hashed.
        let fields = records::fields(record);
        let text = fields.to_string();
        let size = text.len() as u64;
        if self.records < MAX_FILE_RECORDS && self.record_bytes + size <= MAX_FILE_RECORD_BYTES {
            self.records += 1;
            self.record_bytes += size;
            self.audit.host(FileOut::KIND, fields, Durability::Buffered);
            return;
        }
        if accepted {
            self.got.unrecorded_accepted += 1;
        } else {
            self.got.unrecorded_refused += 1;
        }
        self.unrecorded.update(text.as_bytes());
        self.unrecorded.update(b"\n");
    }

    /// `size`: what the guest claimed; `sha`: ours, of what it sent.
    fn refuse(&mut self, path: &str, why: &str, size: Option<u64>, sha: Option<String>) {
        self.got.refused += 1;
        if self.lines < MAX_REFUSAL_LINES {
            self.lines += 1;
            (self.refused)(path, why);
        } else {
            self.got.unnamed += 1;
        }
        self.record(&FileOut {
            path,
            size,
            sha256: sha,
            accepted: false,
            reason: Some(why),
        });
    }

    fn accept(&mut self, path: &str, size: u64, sha: String) {
        self.got.accepted += 1;
        self.got.bytes += size;
        self.record(&FileOut {
            path,
            size: Some(size),
            sha256: Some(sha),
            accepted: true,
            reason: None,
        });
    }

    fn finish(mut self) -> Received {
        if self.got.unrecorded_accepted + self.got.unrecorded_refused > 0 {
            self.got.unrecorded_sha256 = Some(hex(&self.unrecorded.finalize()));
        }
        self.got
    }
}

/// Directories this stream made, whose mtimes are set at the end (writing
/// inside a directory changes its mtime); bounded in count and bytes.
#[derive(Default)]
struct DirTimes {
    dirs: Vec<(String, i64)>,
    bytes: usize,
    dropped: u64,
}

impl DirTimes {
    fn remember(&mut self, path: &str, mtime: i64) {
        if self.dirs.len() >= MAX_DIR_TIMES || self.bytes + path.len() > MAX_DIR_TIME_BYTES {
            self.dropped += 1;
            return;
        }
        self.bytes += path.len();
        self.dirs.push((path.to_owned(), mtime));
    }
}

/// Receives a results stream from `r` into `policy.out` within its limits.
/// Each refused file is reported to `refused` (path, reason; the first
/// [`MAX_REFUSAL_LINES`]), audited as `file.out` with `accepted: false`,
/// and skipped; a malformed stream ends it with an error (the file in
/// progress refused), and so does the run's deadline.
pub fn receive_results<R: Read>(
    r: R,
    policy: &ResultsPolicy<'_>,
    audit: &AuditLog,
    refused: &mut dyn FnMut(&str, &str),
) -> Result<Received, Error> {
    let out = policy.out;
    let mut r = DeadlineReader {
        inner: r,
        deadline: policy.deadline,
    };
    // The user's own --out (a symlink there is the user's choice), opened
    // once: everything below is reached relative to this descriptor.
    let root: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(out)
        .map_err(|e| Error::OutDir(out.into(), e))?
        .into();
    let mut tally = Tally {
        audit,
        refused,
        got: Received::default(),
        records: 0,
        record_bytes: 0,
        lines: 0,
        unrecorded: Sha256::new(),
    };
    let mut budget = policy.max_bytes;
    let mut entries = 0u64;
    let mut current: Option<Current> = None;
    let mut dir_times = DirTimes::default();
    let late = || policy.deadline.is_some_and(|d| Instant::now() >= d);
    let result = loop {
        if late() {
            break Err(Error::Abandoned);
        }
        let msg = match read_frame(&mut r) {
            Ok(msg) => msg,
            Err(_) if late() => break Err(Error::Abandoned),
            Err(e) => break Err(Error::Receive(e)),
        };
        match (msg, current.take()) {
            (Message::FileEntry(entry), None) => {
                entries += 1;
                if entries > MAX_RESULT_ENTRIES {
                    break Err(Error::Stream(format!(
                        "more than {MAX_RESULT_ENTRIES} entries"
                    )));
                }
                match entry.kind {
                    FileKind::Dir => match make_dir(&root, &entry, policy.collect) {
                        Ok(true) => dir_times.remember(&entry.path, entry.mtime),
                        Ok(false) => {}
                        Err(why) => tally.refuse(&entry.path, &why, None, None),
                    },
                    FileKind::File => {
                        current = Some(start_file(&root, entry, budget, policy.collect));
                    }
                }
            }
            (Message::FileData(data), Some(mut cur)) => {
                let n = data.len() as u64;
                if n > cur.size - cur.got {
                    let path = cur.path.clone();
                    if let Some(t) = cur.target.take() {
                        t.discard();
                    }
                    tally.refuse(&path, "more data than its size", Some(cur.size), None);
                    break Err(Error::Stream(format!("{path}: more data than its size")));
                }
                cur.got += n;
                cur.hasher.update(&data);
                if let Some(t) = cur.target.as_mut() {
                    if let Err(e) = t.file.write_all(&data) {
                        if let Some(t) = cur.target.take() {
                            t.discard();
                        }
                        cur.refusal = Some(format!("write failed: {e}"));
                    }
                }
                current = Some(cur);
            }
            (Message::FileEnd { sha256 }, Some(cur)) => {
                let reserved = cur.size;
                match finish_file(cur, &sha256) {
                    Ok((path, size, digest)) => {
                        budget = budget.saturating_sub(size);
                        tally.accept(&path, size, hex(&digest));
                    }
                    Err((path, why, digest)) => {
                        tally.refuse(&path, &why, Some(reserved), Some(hex(&digest)));
                    }
                }
            }
            (Message::FilesDone { .. }, None) => break Ok(()),
            (msg, cur) => {
                let what = msg.kind();
                if let Some(mut cur) = cur {
                    if let Some(t) = cur.target.take() {
                        t.discard();
                    }
                    tally.refuse(
                        &cur.path,
                        "incomplete (the stream broke)",
                        Some(cur.size),
                        None,
                    );
                }
                break Err(Error::Stream(format!("unexpected {what}")));
            }
        }
    };
    if let Some(mut cur) = current.take() {
        if let Some(t) = cur.target.take() {
            t.discard();
        }
        let why = if matches!(result, Err(Error::Abandoned)) {
            "incomplete (the run's time was up)"
        } else {
            "incomplete (the stream ended)"
        };
        tally.refuse(&cur.path, why, Some(cur.size), None);
    }
    // Deepest first (parents come before children in the stream), each
    // directory reached again without following a symlink; not past the
    // deadline.
    for (path, mtime) in dir_times.dirs.iter().rev() {
        if late() {
            break;
        }
        if let Ok(parts) = components(path) {
            if let Ok(dir) = reopen_dirs(&root, &parts) {
                let _ = set_mtime(dir.as_raw_fd(), *mtime);
            }
        }
    }
    let mut got = tally.finish();
    got.dir_times_dropped = dir_times.dropped;
    result.map(|()| got)
}

/// Makes (or finds) the directory `entry` names. `Ok(true)` when this
/// stream created it (then it gets the host's mode and, later, the guest's
/// mtime); a directory that was already there is left exactly as it is.
fn make_dir(root: &OwnedFd, entry: &FileEntry, collect: &[String]) -> Result<bool, String> {
    let parts = components(&entry.path)?;
    if !collect_allows(collect, &parts, FileKind::Dir) {
        return Err(NOT_COLLECTED.into());
    }
    let (_, created) = open_dirs(root, &parts)?;
    Ok(created)
}

/// The refusal of a path no `--collect` pattern asked for.
const NOT_COLLECTED: &str = "not matched by any --collect pattern";

fn start_file(root: &OwnedFd, entry: FileEntry, budget: u64, collect: &[String]) -> Current {
    let mut cur = Current {
        path: entry.path.clone(),
        size: entry.size,
        got: 0,
        hasher: Sha256::new(),
        target: None,
        refusal: None,
        mode: result_mode(FileKind::File, entry.mode),
        mtime: entry.mtime,
    };
    let open = || -> Result<Target, String> {
        let parts = components(&entry.path)?;
        if !collect_allows(collect, &parts, FileKind::File) {
            return Err(NOT_COLLECTED.into());
        }
        if entry.size > budget {
            return Err(format!(
                "{} bytes is over the limit ({budget} bytes left of --max-out-bytes)",
                entry.size
            ));
        }
        let (name, dirs) = parts.split_last().ok_or("empty path")?;
        let (dir, _) = open_dirs(root, dirs)?;
        let (tmp, file) = create_temp(&dir, name)?;
        Ok(Target {
            dir,
            name: (*name).to_owned(),
            tmp,
            file,
        })
    };
    match open() {
        Ok(t) => cur.target = Some(t),
        Err(why) => cur.refusal = Some(why),
    }
    cur
}

/// Accepted: path, size, sha256; refused: path, reason, our sha256.
type Finished = Result<(String, u64, [u8; 32]), (String, String, [u8; 32])>;

fn finish_file(mut cur: Current, sha256: &[u8; 32]) -> Finished {
    let digest: [u8; 32] = cur.hasher.clone().finalize().into();
    let why = if let Some(why) = cur.refusal.take() {
        Some(why)
    } else if cur.got != cur.size {
        Some(format!("short file: {} of {} bytes", cur.got, cur.size))
    } else if &digest != sha256 {
        Some("sha256 mismatch".to_owned())
    } else {
        None
    };
    let Some(t) = cur.target.take() else {
        return Err((cur.path, why.unwrap_or_else(|| "refused".into()), digest));
    };
    if let Some(why) = why {
        t.discard();
        return Err((cur.path, why, digest));
    }
    let commit = || -> io::Result<()> {
        t.file
            .set_permissions(std::fs::Permissions::from_mode(cur.mode))?;
        set_mtime(t.file.as_raw_fd(), cur.mtime)?;
        t.file.sync_all()?;
        rename_new_at(t.dir.as_raw_fd(), &t.tmp, &t.name).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                io::Error::new(
                    e.kind(),
                    "something is already at that name in --out (results never replace \
                     what they did not create)",
                )
            } else {
                e
            }
        })?;
        // SAFETY: fsync on a directory descriptor we own.
        unsafe { libc::fsync(t.dir.as_raw_fd()) };
        Ok(())
    };
    match commit() {
        Ok(()) => Ok((cur.path, cur.size, digest)),
        Err(e) => {
            t.discard();
            Err((cur.path, format!("cannot write it: {e}"), digest))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::kind;
    use crate::audit::log::TEST_LIMITS;
    use crate::paths::TestDir;
    use airlock_protocol::encode;

    #[test]
    fn globs() {
        for (p, n, want) in [
            (".env*", ".env", true),
            (".env*", ".env.local", true),
            (".env*", "x.env", false),
            ("*.pem", "key.pem", true),
            ("*.pem", "key.pem.txt", false),
            ("id_*", "id_rsa", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*", "", true),
            ("**x", "yx", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
        ] {
            assert_eq!(glob_match(p.as_bytes(), n.as_bytes()), want, "{p} {n}");
        }
        let deny = Deny::new(&["*.log".into()]);
        assert!(deny.denies(OsStr::new(".ssh")));
        assert!(deny.denies(OsStr::new("x.log")));
        assert!(!deny.denies(OsStr::new("main.rs")));
    }

    /// Drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from this thread's
    /// effective set (capabilities are per thread), so that even root
    /// honours file modes in it.
    fn without_dac_override() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let mut header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget/capset read and write exactly a v3 header and two
        // data structs, which live across the calls.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
                0
            );
            // CAP_DAC_OVERRIDE = 1, CAP_DAC_READ_SEARCH = 2.
            data[0].effective &= !((1 << 1) | (1 << 2));
            assert_eq!(libc::syscall(libc::SYS_capset, &header, data.as_ptr()), 0);
        }
    }

    #[test]
    fn an_unreadable_workspace_file_is_named_before_boot() {
        let ws = TestDir::new("files-unreadable");
        let w = ws.path().to_path_buf();
        std::fs::create_dir_all(w.join("sub")).expect("mkdir");
        std::fs::write(w.join("sub/ok.txt"), b"fine").expect("write");
        std::fs::write(w.join("sub/locked.txt"), b"secret").expect("write");
        std::fs::set_permissions(
            w.join("sub/locked.txt"),
            std::fs::Permissions::from_mode(0o000),
        )
        .expect("chmod");
        std::fs::write(w.join("denied.pem"), b"x").expect("write");
        std::fs::set_permissions(w.join("denied.pem"), std::fs::Permissions::from_mode(0o000))
            .expect("chmod");
        let checked = std::thread::spawn(move || {
            without_dac_override();
            (
                check_workspace(&w, &Deny::new(&[])).map_err(|e| e.to_string()),
                check_workspace(&w, &Deny::new(&["locked.txt".into()])).map_err(|e| e.to_string()),
            )
        })
        .join()
        .expect("thread");
        let err = checked.0.expect_err("locked.txt cannot be read");
        assert!(err.contains("sub/locked.txt"), "{err}");
        assert_eq!(checked.1, Ok(()), "denied files are not opened");
    }

    #[test]
    fn paths_are_checked_at_the_point_of_use() {
        assert!(components("a/b").is_ok());
        for bad in ["", "/etc", "../x", "a/../b", "a//b", "./a", "a\0b"] {
            assert!(components(bad).is_err(), "{bad:?}");
        }
    }

    fn policy(out: &Path, max_bytes: u64) -> ResultsPolicy<'_> {
        ResultsPolicy {
            out,
            max_bytes,
            collect: &[],
            deadline: None,
        }
    }

    fn frames(msgs: &[Message]) -> Vec<u8> {
        msgs.iter()
            .flat_map(|m| encode(m).expect("valid"))
            .collect()
    }

    fn entry(path: &str, kind: FileKind, size: u64) -> Message {
        Message::FileEntry(FileEntry {
            path: path.into(),
            kind,
            mode: 0o755,
            mtime: 1_000_000,
            size,
        })
    }

    fn file(path: &str, data: &[u8]) -> Vec<Message> {
        let sha256: [u8; 32] = Sha256::digest(data).into();
        let mut v = vec![entry(path, FileKind::File, data.len() as u64)];
        if !data.is_empty() {
            v.push(Message::FileData(data.to_vec()));
        }
        v.push(Message::FileEnd { sha256 });
        v
    }

    #[test]
    fn workspace_round_trips_through_the_receiver() {
        let src = TestDir::new("files-src");
        let dst = TestDir::new("files-dst");
        let s = src.path();
        std::fs::create_dir(s.join("sub")).expect("mkdir");
        std::fs::write(s.join("a.txt"), b"hello").expect("write");
        std::fs::write(s.join("sub/run.sh"), b"#!/bin/sh\necho hi\n").expect("write");
        std::fs::set_permissions(s.join("sub/run.sh"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::write(s.join(".env"), b"SECRET=1").expect("write");
        std::fs::write(s.join("big"), vec![7u8; 200_000]).expect("write");
        std::os::unix::fs::symlink("/etc/passwd", s.join("link")).expect("symlink");
        let old = std::fs::File::open(s.join("sub")).expect("open sub");
        set_mtime(old.as_raw_fd(), 1_234_567).expect("set dir mtime");
        let (audit, _mem) = AuditLog::memory(TEST_LIMITS, None);
        let mut buf = Vec::new();
        let sent = send_workspace(&mut buf, s, &Deny::new(&[]), &audit).expect("send");
        assert_eq!(sent.denied, 1);
        assert_eq!(sent.symlinks, 1);
        assert_eq!(sent.entries, 4);
        let mut refusals = Vec::new();
        let got = receive_results(
            &buf[..],
            &policy(dst.path(), 1 << 30),
            &audit,
            &mut |p, w| refusals.push((p.to_owned(), w.to_owned())),
        )
        .expect("receive");
        assert!(refusals.is_empty(), "{refusals:?}");
        assert_eq!(got.accepted, 3);
        let d = dst.path();
        assert_eq!(std::fs::read(d.join("a.txt")).expect("read"), b"hello");
        assert_eq!(
            std::fs::read(d.join("big")).expect("read"),
            vec![7u8; 200_000]
        );
        let meta = std::fs::metadata(d.join("sub/run.sh")).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        let src_meta = std::fs::metadata(s.join("sub/run.sh")).expect("meta");
        assert_eq!(meta.mtime(), src_meta.mtime());
        let dir_meta = std::fs::metadata(d.join("sub")).expect("meta");
        assert_eq!(dir_meta.mtime(), 1_234_567, "directory mtimes survive");
        assert!(!d.join(".env").exists());
        assert!(!d.join("link").exists());
    }

    #[test]
    fn hostile_results_are_refused() {
        let dst = TestDir::new("files-hostile");
        let outside = TestDir::new("files-outside");
        let d = dst.path();
        std::os::unix::fs::symlink(outside.path(), d.join("out-link")).expect("symlink");
        std::fs::write(d.join("keep"), b"original").expect("write");
        let mut msgs = Vec::new();
        msgs.extend(file("ok", b"fine"));
        msgs.extend(file("out-link/x", b"escape"));
        msgs.push(entry("big", FileKind::File, 10 << 30));
        msgs.push(Message::FileEnd { sha256: [0; 32] });
        msgs.extend(file("over", &[1u8; 100]));
        let mut bad = file("badsum", b"data");
        if let Some(Message::FileEnd { sha256 }) = bad.last_mut() {
            sha256[0] ^= 1;
        }
        msgs.extend(bad);
        msgs.push(entry("keep", FileKind::File, 20));
        msgs.push(Message::FileData(vec![0; 10]));
        msgs.push(Message::FileEnd { sha256: [0; 32] });
        msgs.extend(file("../../etc/passwd", b"root"));
        msgs.extend(file("/etc/passwd", b"root"));
        msgs.push(entry("a/./b", FileKind::Dir, 0));
        msgs.push(Message::FilesDone { count: 0, bytes: 0 });
        let input = frames(&msgs);
        let (audit, _mem) = AuditLog::memory(TEST_LIMITS, None);
        let mut refusals = Vec::new();
        let got = receive_results(&input[..], &policy(d, 50), &audit, &mut |p, w| {
            refusals.push((p.to_owned(), w.to_owned()))
        })
        .expect("receive");
        assert_eq!(got.accepted, 1, "{refusals:?}");
        let paths: Vec<_> = refusals.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "out-link/x",
                "big",
                "over",
                "badsum",
                "keep",
                "../../etc/passwd",
                "/etc/passwd",
                "a/./b"
            ]
        );
        assert_eq!(std::fs::read(d.join("ok")).expect("read"), b"fine");
        assert_eq!(std::fs::read(d.join("keep")).expect("read"), b"original");
        assert_eq!(std::fs::read_dir(outside.path()).expect("ls").count(), 0);
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(d)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(names
            .iter()
            .all(|n| !n.to_string_lossy().starts_with(".airlock-part")));
        // A stream that ends in the middle of a file: refused, not written.
        let input = frames(&[
            entry("keep", FileKind::File, 8),
            Message::FileData(b"partial".to_vec()),
        ]);
        let mut n = 0;
        assert!(receive_results(&input[..], &policy(d, 50), &audit, &mut |_, _| n += 1).is_err());
        assert_eq!(n, 1);
        assert_eq!(std::fs::read(d.join("keep")).expect("read"), b"original");
    }

    fn entry_mode(path: &str, kind: FileKind, size: u64, mode: u32) -> Message {
        Message::FileEntry(FileEntry {
            path: path.into(),
            kind,
            mode,
            mtime: 1_000_000,
            size,
        })
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .expect("meta")
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn the_host_decides_result_modes_and_leaves_existing_directories_alone() {
        let dst = TestDir::new("files-modes");
        let d = dst.path();
        std::fs::create_dir(d.join("old")).expect("mkdir");
        std::fs::set_permissions(d.join("old"), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let old_mtime = std::fs::metadata(d.join("old")).expect("meta").mtime();
        let data = b"#!/bin/sh\n";
        let sha256: [u8; 32] = Sha256::digest(data).into();
        let mut msgs = Vec::new();
        // setuid + world-writable executable, setgid + sticky plain file.
        for (path, mode) in [("tool", 0o4777), ("plain", 0o3666), ("old/inner", 0o6755)] {
            msgs.push(entry_mode(path, FileKind::File, data.len() as u64, mode));
            msgs.push(Message::FileData(data.to_vec()));
            msgs.push(Message::FileEnd { sha256 });
        }
        // A new directory asking for setgid, sticky and world-write; the
        // existing one asking to be opened up.
        msgs.push(entry_mode("new", FileKind::Dir, 0, 0o3777));
        msgs.push(entry_mode("old", FileKind::Dir, 0, 0o7777));
        msgs.push(Message::FilesDone { count: 0, bytes: 0 });
        let (audit, _mem) = AuditLog::memory(TEST_LIMITS, None);
        let got = receive_results(
            &frames(&msgs)[..],
            &policy(d, 1 << 20),
            &audit,
            &mut |p, w| panic!("refused {p}: {w}"),
        )
        .expect("receive");
        assert_eq!(got.accepted, 3);
        assert_eq!(mode_of(&d.join("tool")), 0o755);
        assert_eq!(mode_of(&d.join("plain")), 0o644);
        assert_eq!(mode_of(&d.join("old/inner")), 0o755);
        assert_eq!(mode_of(&d.join("new")), 0o755);
        assert_eq!(
            mode_of(&d.join("old")),
            0o700,
            "an existing directory keeps its mode"
        );
        assert_ne!(
            std::fs::metadata(d.join("old")).expect("meta").mtime(),
            1_000_000,
            "an existing directory does not get the guest's mtime (it was {old_mtime})"
        );
        assert_eq!(
            std::fs::metadata(d.join("new")).expect("meta").mtime(),
            1_000_000
        );
    }

    #[test]
    fn collect_patterns_are_checked_on_the_host() {
        let dst = TestDir::new("files-collect");
        let d = dst.path();
        let mut msgs = vec![entry("dist", FileKind::Dir, 0)];
        msgs.extend(file("dist/app.js", b"ok"));
        msgs.push(entry("dist/sub", FileKind::Dir, 0));
        msgs.extend(file("dist/sub/deep.css", b"ok"));
        msgs.push(entry(".git", FileKind::Dir, 0));
        msgs.push(entry(".git/hooks", FileKind::Dir, 0));
        msgs.extend(file(".git/hooks/pre-commit", b"evil"));
        msgs.extend(file(".github/workflows/ci.yml", b"evil"));
        msgs.extend(file("distx/a", b"evil"));
        msgs.extend(file("logs/x.log", b"ok"));
        msgs.extend(file("logs/x.txt", b"evil"));
        msgs.push(Message::FilesDone { count: 0, bytes: 0 });
        let collect = ["dist".to_owned(), "**/*.log".to_owned()];
        let pol = ResultsPolicy {
            collect: &collect,
            ..policy(d, 1 << 20)
        };
        let (audit, _mem) = AuditLog::memory(TEST_LIMITS, None);
        let mut refusals = Vec::new();
        let got = receive_results(&frames(&msgs)[..], &pol, &audit, &mut |p, w| {
            refusals.push((p.to_owned(), w.to_owned()))
        })
        .expect("receive");
        assert_eq!(got.accepted, 3, "{refusals:?}");
        let paths: Vec<_> = refusals.iter().map(|(p, _)| p.as_str()).collect();
        // `.git` and `.git/hooks` could hold a `*.log`: directories on the
        // way are made; files that match nothing are not.
        assert_eq!(
            paths,
            [
                ".git/hooks/pre-commit",
                ".github/workflows/ci.yml",
                "distx/a",
                "logs/x.txt"
            ]
        );
        assert!(refusals.iter().all(|(_, w)| w == NOT_COLLECTED));
        assert!(d.join("dist/sub/deep.css").is_file());
        assert!(d.join("logs/x.log").is_file());
        assert!(!d.join(".git/hooks/pre-commit").exists());
        assert!(
            !d.join(".github").exists(),
            "nothing made for a refused file"
        );
        // With only `dist`, a directory that cannot lead to it is refused.
        let only = ["dist/**".to_owned()];
        let parts = |p: &'static str| p.split('/').collect::<Vec<_>>();
        assert!(!collect_allows(&only, &parts(".git"), FileKind::Dir));
        assert!(collect_allows(&only, &parts("dist"), FileKind::Dir));
        assert!(collect_allows(&only, &parts("dist/a/b"), FileKind::File));
        // `**` matches no component too, as in the init.
        assert!(collect_allows(&only, &parts("dist"), FileKind::File));
        assert!(!collect_allows(&only, &parts("distx"), FileKind::File));
    }

    #[test]
    fn glob_scan_is_linear_and_agrees_with_the_guest() {
        let parts = |p: &'static str| p.split('/').collect::<Vec<_>>();
        for (pattern, path, matched) in [
            ("dist", "dist", true),
            ("dist", "dist/a/b", true),
            ("dist", "distx", false),
            ("**/*.log", "a/b/c.log", true),
            ("**/*.log", "c.log", true),
            ("**", "x", true),
            ("a/**/b", "a/b", true),
            ("a/**/b", "a/x/y/b", true),
            ("a/**/b", "a/x/y/c", false),
            ("*/x", "a/x", true),
            ("?", "ab", false),
        ] {
            assert_eq!(
                glob_scan(pattern, &parts(path)).matched,
                matched,
                "{pattern} {path}"
            );
        }
        // Many `**` over a deep hostile path: answered at once.
        let deep: Vec<&str> = std::iter::repeat_n("a", MAX_RESULT_DEPTH).collect();
        let start = std::time::Instant::now();
        assert!(!glob_scan("**/**/**/**/**/**/**/**/b", &deep).matched);
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn hostile_result_floods_are_bounded() {
        let dst = TestDir::new("files-flood");
        let d = dst.path();
        let mut msgs = Vec::new();
        let long = "x".repeat(200);
        // Refused names (absolute), then directories with long names, then
        // a path deeper than allowed.
        for i in 0..(MAX_FILE_RECORDS + 500) {
            msgs.push(entry(&format!("/abs/{i}"), FileKind::Dir, 0));
        }
        for i in 0..(MAX_DIR_TIMES + 100) {
            msgs.push(entry(&format!("{long}{i}"), FileKind::Dir, 0));
        }
        let deep = vec!["d"; MAX_RESULT_DEPTH + 1].join("/");
        msgs.push(entry(&deep, FileKind::Dir, 0));
        msgs.push(Message::FilesDone { count: 0, bytes: 0 });
        let (audit, mem) = AuditLog::memory(TEST_LIMITS, None);
        let mut lines = 0u64;
        let got = receive_results(
            &frames(&msgs)[..],
            &policy(d, 1 << 20),
            &audit,
            &mut |_, _| lines += 1,
        )
        .expect("receive");
        assert_eq!(lines, MAX_REFUSAL_LINES);
        assert_eq!(got.refused, MAX_FILE_RECORDS + 501);
        assert_eq!(got.unnamed, got.refused - MAX_REFUSAL_LINES);
        assert_eq!(got.unrecorded_refused, 501);
        assert!(got.unrecorded_sha256.is_some());
        assert_eq!(got.dir_times_dropped, 100);
        let bytes = mem.bytes();
        let file_out = bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice::<crate::audit::record::Record>(l).expect("record"))
            .filter(|r| r.kind == kind::FILE_OUT)
            .count() as u64;
        assert_eq!(file_out, MAX_FILE_RECORDS);
        assert!(!d.join(&deep).exists());
    }

    #[test]
    fn results_never_replace_what_was_in_out() {
        let dst = TestDir::new("files-no-replace");
        let d = dst.path();
        std::fs::write(d.join("mine.txt"), b"the user's").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", d.join("link")).expect("symlink");
        let mut msgs = Vec::new();
        msgs.extend(file("mine.txt", b"the agent's"));
        msgs.extend(file("link", b"the agent's"));
        msgs.extend(file("new.txt", b"fresh"));
        // The same name twice in one stream: the second is refused too.
        msgs.extend(file("new.txt", b"again"));
        msgs.push(Message::FilesDone { count: 0, bytes: 0 });
        let (audit, _mem) = AuditLog::memory(TEST_LIMITS, None);
        let mut refusals = Vec::new();
        let got = receive_results(
            &frames(&msgs)[..],
            &policy(d, 1 << 20),
            &audit,
            &mut |p, w| refusals.push((p.to_owned(), w.to_owned())),
        )
        .expect("receive");
        assert_eq!(got.accepted, 1, "{refusals:?}");
        let paths: Vec<_> = refusals.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["mine.txt", "link", "new.txt"]);
        assert!(
            refusals[0].1.contains("already at that name"),
            "{refusals:?}"
        );
        assert_eq!(
            std::fs::read(d.join("mine.txt")).expect("read"),
            b"the user's"
        );
        assert!(std::fs::symlink_metadata(d.join("link"))
            .expect("meta")
            .is_symlink());
        assert_eq!(std::fs::read(d.join("new.txt")).expect("read"), b"fresh");
        let names = std::fs::read_dir(d).expect("ls").count();
        assert_eq!(names, 3, "no temporary file left");
    }

    #[test]
    fn long_hostile_names_cannot_grow_the_log_past_its_byte_cap() {
        let dst = TestDir::new("files-long-names");
        let d = dst.path();
        // 4 KiB paths of control bytes (24 KiB of JSON each), refused as
        // absolute paths.
        let ctl = "\u{1}".repeat(250);
        let mut msgs = Vec::new();
        for i in 0..400u32 {
            let mut path = format!("/{i}");
            while path.len() + ctl.len() + 1 < MAX_FILE_PATH {
                path.push('/');
                path.push_str(&ctl);
            }
            msgs.push(entry(&path, FileKind::Dir, 0));
        }
        msgs.push(Message::FilesDone { count: 0, bytes: 0 });
        let (audit, mem) = AuditLog::memory(TEST_LIMITS, None);
        let got = receive_results(&frames(&msgs)[..], &policy(d, 1), &audit, &mut |_, _| {})
            .expect("receive");
        assert_eq!(got.refused, 400);
        assert!(got.unrecorded_refused > 0, "{got:?}");
        let size = mem.bytes().len() as u64;
        assert!(
            size < MAX_FILE_RECORD_BYTES + (64 << 10),
            "{size} bytes of audit log"
        );
    }

    /// A reader that never has anything: like a guest that stops sending.
    struct Silent;
    impl Read for Silent {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            std::thread::sleep(std::time::Duration::from_millis(20));
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    /// A reader that sends directory entries for ever, as fast as asked.
    struct Endless(u64, Vec<u8>);
    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.1.is_empty() {
                self.0 += 1;
                let deep = format!(
                    "{}/{}",
                    vec!["d"; MAX_RESULT_DEPTH - 1].join("/"),
                    self.0 % 1000
                );
                self.1 = frames(&[entry(&deep, FileKind::Dir, 0)]);
            }
            let n = buf.len().min(self.1.len());
            buf[..n].copy_from_slice(&self.1[..n]);
            self.1.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn the_deadline_abandons_a_stalled_or_endless_stream() {
        let dst = TestDir::new("files-deadline");
        let (audit, _mem) = AuditLog::memory(TEST_LIMITS, None);
        for reader in [
            Box::new(Silent) as Box<dyn Read>,
            Box::new(Endless(0, Vec::new())),
        ] {
            let pol = ResultsPolicy {
                deadline: Some(Instant::now() + std::time::Duration::from_millis(300)),
                ..policy(dst.path(), 1 << 20)
            };
            let start = Instant::now();
            let err = receive_results(reader, &pol, &audit, &mut |_, _| {}).expect_err("abandoned");
            assert!(matches!(err, Error::Abandoned), "{err}");
            assert!(start.elapsed() < std::time::Duration::from_secs(3));
        }
    }
}
