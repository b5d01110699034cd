//! Applies an image's layers (tar streams, in order) to a fresh directory
//! on the host, as the OCI image spec says: later layers replace earlier
//! entries, `.wh.NAME` removes NAME of the layers below, `.wh..wh..opq`
//! empties its directory of what the layers below put there.
//!
//! The layers are the image author's, so hostile: every entry is placed by
//! walking its path one component at a time from the root's descriptor
//! (`openat` with `O_NOFOLLOW`), never by a path string, so that nothing is
//! ever written through a symlink, whatever earlier entries made; an entry
//! whose path has a `..` component, or whose parent is a symlink or not a
//! directory, is left out (counted, never followed). Absolute paths are
//! taken relative to the root (`/etc/x` is `etc/x`). Device nodes are
//! dropped; hard links must name an earlier non-directory entry inside the
//! root. Modes (setuid included: they matter only in the guest) and owners
//! are kept when running as root; extended attributes are not. Entry
//! counts, path lengths and depths, and the bytes written are bounded.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Bounds on what one image may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Entries, all layers together.
    pub max_entries: u64,
    /// Bytes of regular file data written, all layers together.
    pub max_bytes: u64,
    /// Bytes of one entry's path (or link target).
    pub max_path: usize,
    /// Components of one entry's path.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 1_000_000,
            max_bytes: 32 << 30,
            max_path: 4096,
            max_depth: 256,
        }
    }
}

/// What unpacking left out or did, for the user and the store's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
    /// Device nodes dropped.
    pub devices_dropped: u64,
    /// Entries refused: a `..` component, a parent that is a symlink or
    /// not a directory, a bad hard link, an unsupported kind.
    pub refused: u64,
    /// The first few refused paths, with the reason.
    pub refused_examples: Vec<String>,
    /// Whiteouts applied.
    pub whiteouts: u64,
}

/// How many refused paths are kept as examples.
const MAX_EXAMPLES: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("layer {layer}: {source}")]
    Io {
        layer: usize,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: more than {max} entries in the image")]
    TooManyEntries { layer: usize, max: u64 },
    #[error("layer {layer}: more than {max} bytes of files in the image")]
    TooLarge { layer: usize, max: u64 },
}

/// Unpacks layers into one root directory.
#[derive(Debug)]
pub struct Unpacker {
    root: OwnedFd,
    limits: Limits,
    stats: Stats,
    /// Keep owners (only root can give files away).
    owners: bool,
    layer: usize,
    /// Paths made by the current layer: its whiteouts do not remove them.
    this_layer: HashSet<Vec<u8>>,
}

/// Why one entry is left out.
enum Skip {
    Refused(String),
    Device,
    Ignored,
}

impl Unpacker {
    /// Unpacks into `root`, an existing directory (it should be new and
    /// empty, and in a place only we can write).
    pub fn new(root: &Path, limits: Limits) -> io::Result<Unpacker> {
        let path = CString::new(root.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
        // SAFETY: `path` is NUL-terminated and outlives the call.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: geteuid(2) takes no arguments and cannot fail.
        let owners = unsafe { libc::geteuid() } == 0;
        Ok(Unpacker {
            root,
            limits,
            stats: Stats::default(),
            owners,
            layer: 0,
            this_layer: HashSet::new(),
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Applies one layer, an uncompressed tar stream, over what is there.
    pub fn apply_layer<R: Read>(&mut self, layer: R) -> Result<(), Error> {
        self.layer += 1;
        self.this_layer.clear();
        let n = self.layer;
        let io_err = move |source| Error::Io { layer: n, source };
        let mut archive = tar::Archive::new(layer);
        for entry in archive.entries().map_err(io_err)? {
            let mut entry = entry.map_err(io_err)?;
            self.stats.entries += 1;
            if self.stats.entries > self.limits.max_entries {
                return Err(Error::TooManyEntries {
                    layer: n,
                    max: self.limits.max_entries,
                });
            }
            let path = entry.path_bytes().into_owned();
            match self.entry(&mut entry, &path) {
                Ok(()) => {}
                Err(EntryError::Skip(Skip::Device)) => self.stats.devices_dropped += 1,
                Err(EntryError::Skip(Skip::Ignored)) => {}
                Err(EntryError::Skip(Skip::Refused(why))) => {
                    self.stats.refused += 1;
                    if self.stats.refused_examples.len() < MAX_EXAMPLES {
                        self.stats
                            .refused_examples
                            .push(format!("{}: {why}", String::from_utf8_lossy(&path)));
                    }
                }
                Err(EntryError::Io(source)) => return Err(Error::Io { layer: n, source }),
                Err(EntryError::TooLarge) => {
                    return Err(Error::TooLarge {
                        layer: n,
                        max: self.limits.max_bytes,
                    })
                }
            }
        }
        Ok(())
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &[u8],
    ) -> Result<(), EntryError> {
        let kind = entry.header().entry_type();
        let comps = components(path, &self.limits)?;
        let Some((name, parents)) = comps.split_last() else {
            // The root itself ("./"): its mode and owner.
            if kind.is_dir() {
                let fd = dup(&self.root)?;
                self.set_dir_meta(&fd, entry.header())?;
            }
            return Ok(());
        };
        let name: &[u8] = name;
        // Whiteouts.
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            // Nothing to hide when the parent is not there (or is not a
            // directory of the root: a whiteout never goes through a symlink).
            let Ok(parent) = self.walk(parents, false) else {
                return Ok(());
            };
            self.stats.whiteouts += 1;
            let parent_path = parents.join(&b'/');
            if hidden == b".wh..opq" {
                for child in list_dir(&parent)? {
                    let child_path = join(&parent_path, &child);
                    if !self.this_layer.contains(&child_path) {
                        remove_tree(&parent, &child)?;
                    }
                }
            } else if !hidden.is_empty()
                && hidden != b"."
                && hidden != b".."
                && !self.this_layer.contains(&join(&parent_path, hidden))
            {
                remove_tree(&parent, hidden)?;
            }
            return Ok(());
        }
        use tar::EntryType as T;
        match kind {
            T::Char | T::Block => return Err(EntryError::Skip(Skip::Device)),
            T::Regular | T::Continuous | T::Directory | T::Symlink | T::Link | T::Fifo => {}
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => {
                return Err(EntryError::Skip(Skip::Ignored))
            }
            other => {
                return Err(EntryError::Skip(Skip::Refused(format!(
                    "unsupported entry kind {:?}",
                    other.as_byte() as char
                ))))
            }
        }
        let parent = self.walk(parents, true)?;
        let cname = cstring(name)?;
        let existing = lstat_at(&parent, &cname)?;
        let header = entry.header().clone();
        let full = comps.join(&b'/');
        if kind == T::Directory {
            match existing {
                Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {}
                Some(_) => {
                    remove_tree(&parent, name)?;
                    mkdir_at(&parent, &cname)?;
                }
                None => mkdir_at(&parent, &cname)?,
            }
            let dir = open_at(&parent, &cname, libc::O_PATH | libc::O_DIRECTORY)?;
            self.set_dir_meta(&dir, &header)?;
            self.this_layer.insert(full);
            return Ok(());
        }
        if existing.is_some() {
            remove_tree(&parent, name)?;
        }
        match kind {
            T::Regular | T::Continuous => {
                let size = entry.header().entry_size().map_err(EntryError::Io)?;
                if self.stats.bytes.saturating_add(size) > self.limits.max_bytes {
                    return Err(EntryError::TooLarge);
                }
                // SAFETY: `cname` is NUL-terminated and outlives the call;
                // the dirfd is open.
                let fd = unsafe {
                    libc::openat(
                        parent.as_raw_fd(),
                        cname.as_ptr(),
                        libc::O_WRONLY
                            | libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o600,
                    )
                };
                if fd < 0 {
                    return Err(EntryError::Io(io::Error::last_os_error()));
                }
                // SAFETY: `fd` was just opened and is owned by nothing else.
                let mut file = unsafe { File::from_raw_fd(fd) };
                let copied = io::copy(&mut entry.take(size), &mut file).map_err(EntryError::Io)?;
                if copied != size {
                    return Err(EntryError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "a file ends early",
                    )));
                }
                self.stats.bytes += size;
                if self.owners {
                    let (uid, gid) = owner(&header);
                    // SAFETY: plain syscall on an open descriptor.
                    check(unsafe { libc::fchown(file.as_raw_fd(), uid, gid) })?;
                }
                // After the chown, which clears setuid bits.
                // SAFETY: plain syscall on an open descriptor.
                check(unsafe { libc::fchmod(file.as_raw_fd(), mode(&header)) })?;
                let mtime = header.mtime().unwrap_or(0);
                let t = libc::timespec {
                    tv_sec: libc::time_t::try_from(mtime).unwrap_or(0),
                    tv_nsec: 0,
                };
                let times = [t, t];
                // SAFETY: `times` is a valid array of two timespecs.
                check(unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) })?;
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refused("a symlink without a target"))?;
                if target.is_empty() || target.len() > self.limits.max_path {
                    return Err(refused("a symlink target that is empty or too long"));
                }
                let target = cstring(&target)?;
                // SAFETY: both strings are NUL-terminated and outlive the call.
                check(unsafe {
                    libc::symlinkat(target.as_ptr(), parent.as_raw_fd(), cname.as_ptr())
                })?;
                if self.owners {
                    let (uid, gid) = owner(&header);
                    // SAFETY: as above; AT_SYMLINK_NOFOLLOW changes the link itself.
                    check(unsafe {
                        libc::fchownat(
                            parent.as_raw_fd(),
                            cname.as_ptr(),
                            uid,
                            gid,
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    })?;
                }
            }
            T::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refused("a hard link without a target"))?;
                let tcomps = components(&target, &self.limits)?;
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(refused("a hard link to the root"));
                };
                let tparent = self.walk(tparents, false)?;
                let tcname = cstring(tname)?;
                match lstat_at(&tparent, &tcname)? {
                    Some(st) if st.st_mode & libc::S_IFMT != libc::S_IFDIR => {}
                    Some(_) => return Err(refused("a hard link to a directory")),
                    None => return Err(refused("a hard link to nothing")),
                }
                // SAFETY: NUL-terminated names relative to open dirfds;
                // flags 0: a symlink target is linked, never followed.
                check(unsafe {
                    libc::linkat(
                        tparent.as_raw_fd(),
                        tcname.as_ptr(),
                        parent.as_raw_fd(),
                        cname.as_ptr(),
                        0,
                    )
                })?;
            }
            T::Fifo => {
                // SAFETY: NUL-terminated name relative to an open dirfd.
                check(unsafe {
                    libc::mknodat(
                        parent.as_raw_fd(),
                        cname.as_ptr(),
                        libc::S_IFIFO | mode(&header),
                        0,
                    )
                })?;
                if self.owners {
                    let (uid, gid) = owner(&header);
                    // SAFETY: as above.
                    check(unsafe {
                        libc::fchownat(
                            parent.as_raw_fd(),
                            cname.as_ptr(),
                            uid,
                            gid,
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    })?;
                }
            }
            _ => return Err(EntryError::Skip(Skip::Ignored)),
        }
        self.this_layer.insert(full);
        Ok(())
    }

    /// The directory `comps` below the root, walked one component at a
    /// time without following symlinks; missing directories are made
    /// (mode 0755) when `create`. A component that is a symlink or not a
    /// directory refuses the entry.
    fn walk(&self, comps: &[&[u8]], create: bool) -> Result<OwnedFd, EntryError> {
        let mut dir = dup(&self.root)?;
        for comp in comps {
            let c = cstring(comp)?;
            let next = match open_at(&dir, &c, libc::O_PATH | libc::O_DIRECTORY) {
                Ok(fd) => fd,
                Err(EntryError::Io(e)) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                    mkdir_at(&dir, &c)?;
                    // SAFETY: NUL-terminated name relative to an open dirfd.
                    check(unsafe { libc::fchmodat(dir.as_raw_fd(), c.as_ptr(), 0o755, 0) })?;
                    open_at(&dir, &c, libc::O_PATH | libc::O_DIRECTORY)?
                }
                Err(EntryError::Io(e))
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOTDIR | libc::ELOOP | libc::ENOENT)
                    ) =>
                {
                    return Err(refused(
                        "a parent is a symlink, not a directory, or missing",
                    ))
                }
                Err(e) => return Err(e),
            };
            dir = next;
        }
        Ok(dir)
    }

    fn set_dir_meta(&self, dir: &OwnedFd, header: &tar::Header) -> Result<(), EntryError> {
        let path = proc_path(dir);
        let mut m = mode(header);
        if self.owners {
            let (uid, gid) = owner(header);
            // SAFETY: `path` names the open directory through /proc; the
            // magic link is the directory itself, not a symlink of the image.
            check(unsafe { libc::chown(path.as_ptr(), uid, gid) })?;
        } else {
            m |= 0o700;
        }
        // SAFETY: as above.
        check(unsafe { libc::chmod(path.as_ptr(), m) })?;
        Ok(())
    }
}

enum EntryError {
    Skip(Skip),
    Io(io::Error),
    TooLarge,
}

impl From<io::Error> for EntryError {
    fn from(e: io::Error) -> Self {
        EntryError::Io(e)
    }
}

fn refused(why: &str) -> EntryError {
    EntryError::Skip(Skip::Refused(why.to_owned()))
}

/// The normal components of an entry path: a leading `/` and `.`
/// components dropped; a `..` refuses the entry.
fn components<'p>(path: &'p [u8], limits: &Limits) -> Result<Vec<&'p [u8]>, EntryError> {
    if path.len() > limits.max_path {
        return Err(refused("the path is too long"));
    }
    if path.contains(&0) {
        return Err(refused("a NUL in the path"));
    }
    let comps: Vec<&[u8]> = path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect();
    if comps.iter().any(|c| *c == b"..") {
        return Err(refused("a .. component"));
    }
    if comps.len() > limits.max_depth {
        return Err(refused("the path is too deep"));
    }
    Ok(comps)
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        [parent, b"/", name].concat()
    }
}

fn mode(header: &tar::Header) -> libc::mode_t {
    libc::mode_t::try_from(header.mode().unwrap_or(0o644) & 0o7777).unwrap_or(0o644)
}

fn owner(header: &tar::Header) -> (libc::uid_t, libc::gid_t) {
    (
        libc::uid_t::try_from(header.uid().unwrap_or(0)).unwrap_or(0),
        libc::gid_t::try_from(header.gid().unwrap_or(0)).unwrap_or(0),
    )
}

fn cstring(bytes: &[u8]) -> Result<CString, EntryError> {
    CString::new(bytes).map_err(|_| refused("a NUL in a name"))
}

fn check(rc: libc::c_int) -> Result<(), EntryError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(EntryError::Io(io::Error::last_os_error()))
    }
}

fn dup(fd: &OwnedFd) -> io::Result<OwnedFd> {
    fd.try_clone()
}

/// `/proc/self/fd/N` of an open descriptor.
fn proc_path(fd: &OwnedFd) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC)`.
fn open_at(dir: &OwnedFd, name: &CString, flags: libc::c_int) -> Result<OwnedFd, EntryError> {
    // SAFETY: NUL-terminated name relative to an open dirfd.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(EntryError::Io(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mkdir_at(dir: &OwnedFd, name: &CString) -> Result<(), EntryError> {
    // SAFETY: NUL-terminated name relative to an open dirfd.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; `None` if there is nothing.
fn lstat_at(dir: &OwnedFd, name: &CString) -> Result<Option<libc::stat>, EntryError> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated name relative to an open dirfd; `st` is
    // writable and outlives the call.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        return Ok(Some(st));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(EntryError::Io(e))
    }
}

/// The names in an open directory.
fn list_dir(dir: &OwnedFd) -> Result<Vec<Vec<u8>>, EntryError> {
    let path = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let mut names = Vec::new();
    for e in std::fs::read_dir(path)? {
        names.push(e?.file_name().into_encoded_bytes());
    }
    Ok(names)
}

/// Removes `name` in `dir` and, for a directory, everything below it;
/// never follows a symlink. Nothing there: nothing to do.
fn remove_tree(dir: &OwnedFd, name: &[u8]) -> Result<(), EntryError> {
    let c = cstring(name)?;
    let Some(st) = lstat_at(dir, &c)? else {
        return Ok(());
    };
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        let sub = open_at(dir, &c, libc::O_RDONLY | libc::O_DIRECTORY)?;
        for child in list_dir(&sub)? {
            remove_tree(&sub, &child)?;
        }
        // SAFETY: NUL-terminated name relative to an open dirfd.
        check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) })
    } else {
        // SAFETY: as above.
        check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) })
    }
}

/// Removes the directory tree at `path` (an unpacked root), never
/// following a symlink inside it.
pub fn remove_all(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::other("not a removable path"));
    };
    let parent = std::fs::File::open(parent)?;
    let parent = OwnedFd::from(parent);
    match remove_tree(&parent, name.as_encoded_bytes()) {
        Ok(()) => Ok(()),
        Err(EntryError::Io(e)) => Err(e),
        Err(_) => Err(io::Error::other("cannot remove a tree")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    /// One tar entry, written by hand (so that hostile paths can be made).
    pub(crate) struct E<'a> {
        pub name: &'a str,
        pub kind: u8,
        pub data: &'a [u8],
        pub link: &'a str,
        pub mode: u32,
        pub uid: u32,
    }

    pub(crate) fn file<'a>(name: &'a str, data: &'a [u8]) -> E<'a> {
        E {
            name,
            kind: b'0',
            data,
            link: "",
            mode: 0o644,
            uid: 0,
        }
    }
    pub(crate) fn dir(name: &str) -> E<'_> {
        E {
            name,
            kind: b'5',
            data: b"",
            link: "",
            mode: 0o755,
            uid: 0,
        }
    }
    pub(crate) fn link<'a>(name: &'a str, kind: u8, target: &'a str) -> E<'a> {
        E {
            name,
            kind,
            data: b"",
            link: target,
            mode: 0o777,
            uid: 0,
        }
    }

    pub(crate) fn tar(entries: &[E<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in entries {
            let mut h = [0u8; 512];
            h[..e.name.len()].copy_from_slice(e.name.as_bytes());
            h[100..108].copy_from_slice(format!("{:07o}\0", e.mode).as_bytes());
            h[108..116].copy_from_slice(format!("{:07o}\0", e.uid).as_bytes());
            h[116..124].copy_from_slice(format!("{:07o}\0", e.uid).as_bytes());
            h[124..136].copy_from_slice(format!("{:011o}\0", e.data.len()).as_bytes());
            h[136..148].copy_from_slice(b"00000000000\0");
            h[156] = e.kind;
            h[157..157 + e.link.len()].copy_from_slice(e.link.as_bytes());
            h[257..263].copy_from_slice(b"ustar\0");
            h[263..265].copy_from_slice(b"00");
            h[148..156].copy_from_slice(b"        ");
            let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
            h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
            out.extend_from_slice(&h);
            out.extend_from_slice(e.data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    /// A fresh directory holding `root/` (the unpack target) and
    /// `outside/` (what no entry may reach).
    pub(crate) fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("airlock-unpack-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("root")).expect("mkdir");
        std::fs::create_dir_all(d.join("outside")).expect("mkdir");
        d
    }

    fn unpack(d: &Path, layers: &[Vec<u8>]) -> Stats {
        let mut u = Unpacker::new(&d.join("root"), Limits::default()).expect("unpacker");
        for l in layers {
            u.apply_layer(l.as_slice()).expect("layer");
        }
        u.stats().clone()
    }

    fn outside_is_empty(d: &Path) {
        let n = std::fs::read_dir(d.join("outside")).expect("read").count();
        assert_eq!(n, 0, "something was written outside the root");
        let mut names: Vec<_> = std::fs::read_dir(d)
            .expect("read")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["outside", "root"],
            "something was written beside the root"
        );
    }

    #[test]
    fn files_dirs_links_modes_and_owners() {
        let d = scratch("basic");
        let mut suid = file("bin/su", b"#!/bin/sh\n");
        suid.mode = 0o4755;
        let mut owned = file("home/app/note", b"hi");
        owned.uid = 1000;
        let mut dev = file("dev/null", b"");
        dev.kind = b'3';
        let mut blk = file("dev/sda", b"");
        blk.kind = b'4';
        let mut fifo = file("run/fifo", b"");
        fifo.kind = b'6';
        let layer = tar(&[
            dir("bin"),
            suid,
            dir("home"),
            owned,
            link("bin/sh", b'2', "su"),
            link("bin/sh2", b'1', "bin/su"),
            dev,
            blk,
            fifo,
            file("./etc/hostname", b"box\n"),
        ]);
        let stats = unpack(&d, &[layer]);
        let root = d.join("root");
        let m = std::fs::metadata(root.join("bin/su")).expect("su");
        assert_eq!(m.permissions().mode() & 0o7777, 0o4755, "setuid kept");
        assert_eq!(
            std::fs::read(root.join("home/app/note")).expect("note"),
            b"hi"
        );
        // SAFETY: geteuid(2) takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(
                std::fs::metadata(root.join("home/app/note"))
                    .expect("m")
                    .uid(),
                1000
            );
        }
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).expect("symlink"),
            PathBuf::from("su")
        );
        let sh2 = std::fs::metadata(root.join("bin/sh2")).expect("hard link");
        assert_eq!(sh2.ino(), m.ino(), "a hard link to the same file");
        assert!(!root.join("dev/null").exists() && !root.join("dev/sda").exists());
        assert_eq!(stats.devices_dropped, 2);
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(root.join("run/fifo"))
            .expect("fifo")
            .file_type()
            .is_fifo());
        assert_eq!(
            std::fs::read(root.join("etc/hostname")).expect("h"),
            b"box\n"
        );
        assert_eq!(stats.refused, 0, "{stats:?}");
        outside_is_empty(&d);
    }

    #[test]
    fn whiteouts_remove_what_the_layers_below_made() {
        let d = scratch("whiteout");
        let l1 = tar(&[
            file("a/x", b"1"),
            file("a/y", b"2"),
            file("b/z", b"3"),
            file("c/keep", b"4"),
        ]);
        let l2 = tar(&[
            file("a/.wh.x", b""),
            file(".wh.b", b""),
            file(".wh.nothing", b""),
            file("c/new", b"5"),
            // A whiteout in the same layer does not hide that layer's file.
            file("c/.wh.new", b""),
        ]);
        let stats = unpack(&d, &[l1, l2]);
        let root = d.join("root");
        assert!(!root.join("a/x").exists());
        assert!(root.join("a/y").exists());
        assert!(!root.join("b").exists());
        assert!(root.join("c/keep").exists() && root.join("c/new").exists());
        assert!(!root.join("a/.wh.x").exists() && !root.join(".wh.b").exists());
        assert!(stats.whiteouts >= 3);
        outside_is_empty(&d);
    }

    #[test]
    fn an_opaque_directory_keeps_only_its_own_layer() {
        let d = scratch("opaque");
        let l1 = tar(&[
            file("d/old", b"1"),
            file("d/sub/deep", b"2"),
            file("e/stay", b"3"),
        ]);
        let l2 = tar(&[dir("d"), file("d/new", b"4"), file("d/.wh..wh..opq", b"")]);
        unpack(&d, &[l1, l2]);
        let root = d.join("root");
        let mut names: Vec<_> = std::fs::read_dir(root.join("d"))
            .expect("d")
            .map(|e| e.expect("e").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["new"]);
        assert!(root.join("e/stay").exists());
    }

    #[test]
    fn paths_out_of_the_root_are_refused_or_kept_inside() {
        let d = scratch("traversal");
        let layer = tar(&[
            file("../outside/evil", b"x"),
            file("a/../../outside/evil2", b"x"),
            file("/abs/file", b"inside"),
            link("hl", b'1', "../outside/target"),
            file("./../../x", b"x"),
        ]);
        let stats = unpack(&d, &[layer]);
        assert_eq!(
            std::fs::read(d.join("root/abs/file")).expect("absolute taken as relative"),
            b"inside"
        );
        assert_eq!(stats.refused, 4, "{stats:?}");
        outside_is_empty(&d);
    }

    #[test]
    fn nothing_is_written_through_a_symlink() {
        let d = scratch("symlinks");
        let outside = d.join("outside");
        let outside_s = outside.display().to_string();
        let l1 = tar(&[
            link("esc", b'2', &outside_s),
            link("up", b'2', "../outside"),
            link("etc", b'2', &outside_s),
        ]);
        let l2 = tar(&[
            file("esc/pwned", b"x"),
            file("up/pwned", b"x"),
            dir("etc/sub"),
            file("etc/sub/pwned", b"x"),
            link("esc/l", b'2', "/"),
            link("h", b'1', "esc/anything"),
            // Whiteouts through a symlink do nothing outside either.
            file("esc/.wh.keep", b""),
            file("esc/.wh..wh..opq", b""),
            // The same name as a symlink: the symlink is replaced, not followed.
            file("up", b"now a file"),
        ]);
        std::fs::write(outside.join("keep"), b"k").expect("write");
        let stats = unpack(&d, &[l1, l2]);
        assert_eq!(std::fs::read(outside.join("keep")).expect("kept"), b"k");
        std::fs::remove_file(outside.join("keep")).expect("rm");
        outside_is_empty(&d);
        assert!(stats.refused >= 5, "{stats:?}");
        let up = d.join("root/up");
        assert!(std::fs::symlink_metadata(&up).expect("up").is_file());
        assert_eq!(std::fs::read(up).expect("read"), b"now a file");
    }

    #[test]
    fn entries_and_bytes_are_bounded() {
        let d = scratch("bounds");
        let layer = tar(&[file("a", b"1"), file("b", b"2"), file("c", b"3")]);
        let mut u = Unpacker::new(
            &d.join("root"),
            Limits {
                max_entries: 2,
                ..Limits::default()
            },
        )
        .expect("unpacker");
        assert!(matches!(
            u.apply_layer(layer.as_slice()),
            Err(Error::TooManyEntries { .. })
        ));
        let d = scratch("bounds2");
        let big = vec![7u8; 5000];
        let layer = tar(&[file("a", &big), file("b", &big)]);
        let mut u = Unpacker::new(
            &d.join("root"),
            Limits {
                max_bytes: 6000,
                ..Limits::default()
            },
        )
        .expect("unpacker");
        assert!(matches!(
            u.apply_layer(layer.as_slice()),
            Err(Error::TooLarge { .. })
        ));
        let deep = "a/".repeat(300) + "f";
        let layer = tar(&[]);
        let _ = layer;
        assert!(components(deep.as_bytes(), &Limits::default()).is_err());
    }
}
