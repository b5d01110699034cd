//! One share as the guest sees it: `fuse-backend-rs`'s passthrough file
//! system under a wrapper that holds our rules, whatever the guest kernel
//! asks:
//!
//! - **Names**: every name the guest sends is one plain component
//!   (`validate_path_component`: no `/`, no `.` or `..`, not empty);
//!   otherwise `EINVAL`. Lookups are the library's `openat(parent, name,
//!   O_PATH | O_NOFOLLOW)`: a symlink is served as a symlink (its text),
//!   never followed on the host.
//! - **The deny list** (`.env*`, `.ssh`, …, `--exclude`): such entries do
//!   not exist for the guest (lookup `ENOENT`, left out of listings) and
//!   cannot be made or renamed onto (`EACCES`), so a hidden secret can be
//!   neither read nor overwritten.
//! - **Read-only** shares answer `EROFS` to everything that writes (open
//!   for writing, truncate, create, mkdir, rename, …); the server's own
//!   read-only bind mount is the second wall.
//! - **Ownership**: every operation runs as the share's owner (the user who
//!   runs airlock, or the mount's `uid=`/`gid=`), whoever the guest says it
//!   is; `chown` from the guest is dropped (documented), set-user-ID and
//!   set-group-ID bits are stripped, and only regular files and FIFOs can
//!   be made with `mknod`.
//! - **Bounds**: at most [`MAX_INODES`] inode references (each holds a
//!   host file descriptor) and [`MAX_HANDLES`] open handles; past them the
//!   guest gets `ENFILE`/`EMFILE`. What the guest adds to the host is
//!   bounded too ([`Limits`]: bytes written or preallocated, entries
//!   made); past that, `EDQUOT`.
//! - **Counts** for the audit log: bytes read and written, entries made
//!   and removed, requests refused.
//! - **Coherence** (for SQLite across the boundary): entry and attribute
//!   timeouts of 0 and no `KEEP_CACHE` (the page cache is dropped at every
//!   open), `AUTO_INVAL_DATA` (a changed mtime or size seen on a read drops
//!   it too), no writeback cache (each guest write reaches the host file
//!   before the write returns).

use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::api::validate_path_component;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

/// Most inode references the guest may hold on one share.
pub const MAX_INODES: u64 = 65_536;
/// Most open files and directories the guest may hold on one share.
pub const MAX_HANDLES: u64 = 4_096;

/// How much a guest may add to the host through one share: bytes written
/// (and preallocated), and entries made. Past either, the request fails
/// with `EDQUOT` (and is counted as refused): a hostile agent cannot fill
/// the host's disk through a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_write_bytes: u64,
    pub max_created: u64,
}

/// What a share did, for `mount.done`.
#[derive(Debug, Default)]
pub struct Counts {
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub created: AtomicU64,
    pub removed: AtomicU64,
    pub refused: AtomicU64,
}

/// Whether a name is on the deny list.
pub type Deny = Box<dyn Fn(&std::ffi::OsStr) -> bool + Send + Sync>;

/// One share's rules around the passthrough file system.
pub struct Share {
    inner: PassthroughFs<()>,
    readonly: bool,
    deny: Deny,
    /// The host uid/gid every operation runs as, as the library's
    /// credential switch takes them (0: stay as the server is).
    uid: u32,
    gid: u32,
    refs: AtomicU64,
    handles: AtomicU64,
    limits: Limits,
    /// Bytes written plus bytes preallocated, against `max_write_bytes`.
    budget: AtomicU64,
    pub counts: Counts,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("readonly", &self.readonly)
            .finish()
    }
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl Share {
    /// A share of the directory `root` (a path in the server's own mount
    /// namespace), opened at the guest's `FUSE_INIT`. `uid`/`gid`: who
    /// the operations run as (0: as the server itself).
    pub fn new(
        root: &str,
        readonly: bool,
        deny: Deny,
        (uid, gid): (u32, u32),
        limits: Limits,
    ) -> io::Result<Share> {
        let cfg = Config {
            root_dir: root.to_owned(),
            entry_timeout: Duration::ZERO,
            attr_timeout: Duration::ZERO,
            cache_policy: CachePolicy::Auto,
            writeback: false,
            do_import: true,
            no_open: false,
            no_opendir: false,
            killpriv_v2: false,
            xattr: false,
            inode_file_handles: false,
            ..Config::default()
        };
        let inner = PassthroughFs::<()>::new(cfg).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Share {
            inner,
            readonly,
            deny,
            uid,
            gid,
            refs: AtomicU64::new(0),
            handles: AtomicU64::new(0),
            limits,
            budget: AtomicU64::new(0),
            counts: Counts::default(),
        })
    }

    fn refuse<T>(&self, code: i32) -> io::Result<T> {
        self.counts.refused.fetch_add(1, Ordering::Relaxed);
        Err(err(code))
    }

    /// A name the guest sent: one plain component.
    fn name(&self, name: &CStr) -> io::Result<()> {
        if name.to_bytes().is_empty() || validate_path_component(name).is_err() {
            return self.refuse(libc::EINVAL);
        }
        Ok(())
    }

    fn denied(&self, name: &CStr) -> bool {
        use std::os::unix::ffi::OsStrExt;
        (self.deny)(std::ffi::OsStr::from_bytes(name.to_bytes()))
    }

    /// A name to look up or remove: plain, and `ENOENT` if denied.
    fn existing(&self, name: &CStr) -> io::Result<()> {
        self.name(name)?;
        if self.denied(name) {
            return self.refuse(libc::ENOENT);
        }
        Ok(())
    }

    /// A name to rename onto: plain, writable share, not denied.
    fn target_name(&self, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.name(name)?;
        if self.denied(name) {
            return self.refuse(libc::EACCES);
        }
        Ok(())
    }

    /// A name to make: as [`Share::target_name`], and room for one more
    /// entry.
    fn new_name(&self, name: &CStr) -> io::Result<()> {
        self.target_name(name)?;
        self.create_room()
    }

    fn writable(&self) -> io::Result<()> {
        if self.readonly {
            return self.refuse(libc::EROFS);
        }
        Ok(())
    }

    /// Room for one more entry made by the guest.
    fn create_room(&self) -> io::Result<()> {
        if self.counts.created.load(Ordering::Relaxed) >= self.limits.max_created {
            return self.refuse(libc::EDQUOT);
        }
        Ok(())
    }

    /// Takes `bytes` from the write budget, or refuses.
    fn spend(&self, bytes: u64) -> io::Result<()> {
        let max = self.limits.max_write_bytes;
        let took = self
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_add(bytes).filter(|&n| n <= max)
            });
        if took.is_err() {
            return self.refuse(libc::EDQUOT);
        }
        Ok(())
    }

    /// Gives back what a write did not use.
    fn refund(&self, bytes: u64) {
        let _ = self
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(bytes))
            });
    }

    /// Room for one more inode reference.
    fn inode_room(&self) -> io::Result<()> {
        if self.refs.load(Ordering::Relaxed) >= MAX_INODES {
            return self.refuse(libc::ENFILE);
        }
        Ok(())
    }

    fn took(&self, entry: io::Result<Entry>) -> io::Result<Entry> {
        if entry.is_ok() {
            self.refs.fetch_add(1, Ordering::Relaxed);
        }
        entry
    }

    fn made(&self, entry: io::Result<Entry>) -> io::Result<Entry> {
        if entry.is_ok() {
            self.counts.created.fetch_add(1, Ordering::Relaxed);
        }
        self.took(entry)
    }

    fn removed(&self, r: io::Result<()>) -> io::Result<()> {
        if r.is_ok() {
            self.counts.removed.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn handle_room(&self) -> io::Result<()> {
        if self.handles.load(Ordering::Relaxed) >= MAX_HANDLES {
            return self.refuse(libc::EMFILE);
        }
        Ok(())
    }

    fn opened<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if r.is_ok() {
            self.handles.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn closed(&self) {
        let _ = self
            .handles
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    fn forgot(&self, count: u64) {
        let _ = self
            .refs
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(count))
            });
    }
}

/// Permission bits the guest may set: no set-user-ID or set-group-ID.
const MODE_KEEP: u32 = !(libc::S_ISUID | libc::S_ISGID);

impl FileSystem for Share {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut opts = self.inner.init(capable)?;
        let want = FsOptions::MAX_PAGES
            | FsOptions::BIG_WRITES
            | FsOptions::AUTO_INVAL_DATA
            | FsOptions::PARALLEL_DIROPS;
        opts |= capable & want;
        // Never: the host decides; writes go through at once.
        opts.remove(FsOptions::WRITEBACK_CACHE | FsOptions::ZERO_MESSAGE_OPEN);
        Ok(opts)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        ctx.uid = self.uid;
        ctx.gid = self.gid;
        Ok(())
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.existing(name)?;
        self.inode_room()?;
        self.took(self.inner.lookup(ctx, parent, name))
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.forgot(count);
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        self.forgot(requests.iter().map(|(_, n)| *n).sum());
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        mut attr: stat64,
        handle: Option<u64>,
        mut valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        // chown from the guest is dropped: files stay the owner's.
        valid.remove(SetattrValid::UID | SetattrValid::GID);
        attr.st_mode &= MODE_KEEP;
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.new_name(name)?;
        self.inode_room()?;
        self.made(self.inner.symlink(ctx, linkname, parent, name))
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        _rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.new_name(name)?;
        let kind = mode & libc::S_IFMT;
        if kind != libc::S_IFREG && kind != libc::S_IFIFO {
            return self.refuse(libc::EPERM);
        }
        self.inode_room()?;
        self.made(
            self.inner
                .mknod(ctx, parent, name, mode & MODE_KEEP, 0, umask),
        )
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.new_name(name)?;
        self.inode_room()?;
        self.made(self.inner.mkdir(ctx, parent, name, mode & MODE_KEEP, umask))
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.existing(name)?;
        self.removed(self.inner.unlink(ctx, parent, name))
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.existing(name)?;
        self.removed(self.inner.rmdir(ctx, parent, name))
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        self.existing(oldname)?;
        self.target_name(newname)?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.new_name(newname)?;
        self.inode_room()?;
        self.made(self.inner.link(ctx, inode, newparent, newname))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let access = flags & libc::O_ACCMODE as u32;
        let writes =
            access != libc::O_RDONLY as u32 || flags & (libc::O_TRUNC | libc::O_CREAT) as u32 != 0;
        if writes {
            self.writable()?;
        }
        self.handle_room()?;
        self.opened(self.inner.open(ctx, inode, flags, fuse_flags))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.new_name(name)?;
        self.inode_room()?;
        self.handle_room()?;
        args.mode &= MODE_KEEP;
        let r = self.inner.create(ctx, parent, name, args);
        if r.is_ok() {
            self.counts.created.fetch_add(1, Ordering::Relaxed);
            self.refs.fetch_add(1, Ordering::Relaxed);
            self.handles.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let n = self
            .inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)?;
        self.counts
            .bytes_read
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        self.spend(u64::from(size))?;
        let written = self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        );
        let n = written.as_ref().map_or(0, |&n| n as u64);
        self.refund(u64::from(size).saturating_sub(n));
        self.counts.bytes_written.fetch_add(n, Ordering::Relaxed);
        written
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        self.spend(length)?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let r = self
            .inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner);
        if r.is_ok() {
            self.closed();
        }
        r
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.handle_room()?;
        self.opened(self.inner.opendir(ctx, inode, flags))
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let deny = &self.deny;
        self.inner
            .readdir(ctx, inode, handle, size, offset, &mut |entry| {
                if deny(std::ffi::OsStr::from_bytes(entry.name)) {
                    // Skipped: a listing never names a denied entry.
                    // Returning 1 keeps the library going (0 means
                    // "the buffer is full").
                    return Ok(1);
                }
                add_entry(entry)
            })
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let mut skipped = Vec::new();
        let r = self
            .inner
            .readdirplus(ctx, inode, handle, size, offset, &mut |dir, entry| {
                let name = dir.name;
                if (self.deny)(std::ffi::OsStr::from_bytes(name)) {
                    // The library took a reference on it: give it back
                    // below, so the entry's inode number leads nowhere.
                    if entry.inode != 0 {
                        skipped.push(entry.inode);
                    }
                    return Ok(1);
                }
                let inode = entry.inode;
                let n = add_entry(dir, entry)?;
                if n > 0 && inode != 0 && name != b"." && name != b".." {
                    self.refs.fetch_add(1, Ordering::Relaxed);
                }
                Ok(n)
            });
        for inode in skipped {
            self.inner.forget(ctx, inode, 1);
        }
        r
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        let r = self.inner.releasedir(ctx, inode, flags, handle);
        if r.is_ok() {
            self.closed();
        }
        r
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.writable()?;
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}
