//! The share server's rules, played from the guest kernel's side: FUSE
//! requests written by hand to a socket, the replies read back (no VM, no
//! jail: the rules are the file system's own).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuse_backend_rs::api::server::Server;

use super::fs::{Deny, Limits, Share};

const LIMITS: Limits = Limits {
    max_write_bytes: 1 << 30,
    max_created: 1000,
};
use super::serve::{self, End};
use std::sync::atomic::AtomicU64;

const LOOKUP: u32 = 1;
const GETATTR: u32 = 3;
const READLINK: u32 = 5;
const MKDIR: u32 = 9;
const UNLINK: u32 = 10;
const OPEN: u32 = 14;
const READ: u32 = 15;
const RELEASE: u32 = 18;
const INIT: u32 = 26;
const CREATE: u32 = 35;

struct Guest {
    stream: UnixStream,
    server: Option<JoinHandle<(End, u64)>>,
    unique: u64,
    share: Arc<Share>,
}

fn deny_secrets() -> Deny {
    let deny = crate::door::files::Deny::new(&["private*".to_owned()]);
    Box::new(move |name| deny.denies(name))
}

impl Guest {
    fn start(root: &Path, readonly: bool) -> Guest {
        Guest::with_limits(root, readonly, LIMITS)
    }

    fn with_limits(root: &Path, readonly: bool, limits: Limits) -> Guest {
        let share = Arc::new(
            Share::new(
                root.to_str().expect("test step"),
                readonly,
                deny_secrets(),
                (0, 0),
                limits,
            )
            .expect("test step"),
        );
        let (ours, mut theirs) = UnixStream::pair().expect("test step");
        let server = Server::new(Arc::clone(&share));
        let handle = std::thread::spawn(move || {
            let undecodable = AtomicU64::new(0);
            let mut reader = theirs.try_clone().expect("test step");
            let end = serve::serve(&mut reader, &mut theirs, &server, 2, &undecodable);
            (end, undecodable.into_inner())
        });
        let mut guest = Guest {
            stream: ours,
            server: Some(handle),
            unique: 0,
            share,
        };
        let mut init = Vec::new();
        for v in [7u32, 31, 131072, 0] {
            init.extend_from_slice(&v.to_le_bytes());
        }
        let (err, _) = guest.call(INIT, 0, &init);
        assert_eq!(err, 0, "INIT");
        guest
    }

    /// Sends one request; returns (error, body).
    fn call(&mut self, opcode: u32, node: u64, body: &[u8]) -> (i32, Vec<u8>) {
        self.unique += 1;
        self.send(opcode, node, body);
        let mut head = [0u8; 16];
        self.stream.read_exact(&mut head).expect("test step");
        let len = u32::from_le_bytes(head[..4].try_into().expect("test step")) as usize;
        let err = i32::from_le_bytes(head[4..8].try_into().expect("test step"));
        let unique = u64::from_le_bytes(head[8..16].try_into().expect("test step"));
        assert_eq!(unique, self.unique);
        let mut rest = vec![0u8; len - 16];
        self.stream.read_exact(&mut rest).expect("test step");
        (err, rest)
    }

    fn send(&mut self, opcode: u32, node: u64, body: &[u8]) {
        let mut msg = Vec::new();
        msg.extend_from_slice(&u32::try_from(40 + body.len()).expect("small").to_le_bytes());
        msg.extend_from_slice(&opcode.to_le_bytes());
        msg.extend_from_slice(&self.unique.to_le_bytes());
        msg.extend_from_slice(&node.to_le_bytes());
        // uid, gid, pid: the guest claims to be root; the share ignores it.
        msg.extend_from_slice(&[0u8; 12]);
        msg.extend_from_slice(&[0u8; 4]);
        msg.extend_from_slice(body);
        self.stream.write_all(&msg).expect("test step");
    }

    fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<u64, i32> {
        let mut body = name.to_vec();
        body.push(0);
        match self.call(LOOKUP, parent, &body) {
            (0, entry) => Ok(u64::from_le_bytes(
                entry[..8].try_into().expect("test step"),
            )),
            (err, _) => Err(-err),
        }
    }

    fn open(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
        let mut body = u32::try_from(flags).expect("flags").to_le_bytes().to_vec();
        body.extend_from_slice(&0u32.to_le_bytes());
        match self.call(OPEN, node, &body) {
            (0, out) => Ok(u64::from_le_bytes(out[..8].try_into().expect("test step"))),
            (err, _) => Err(-err),
        }
    }

    fn read(&mut self, node: u64, fh: u64, size: u32) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&fh.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&[0u8; 20]);
        let (err, data) = self.call(READ, node, &body);
        assert_eq!(err, 0);
        data
    }

    fn create(&mut self, parent: u64, name: &[u8], mode: u32) -> Result<(), i32> {
        let mut body = Vec::new();
        for v in [libc::O_WRONLY as u32 | libc::O_CREAT as u32, mode, 0, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(name);
        body.push(0);
        match self.call(CREATE, parent, &body) {
            (0, _) => Ok(()),
            (err, _) => Err(-err),
        }
    }

    fn mkdir(&mut self, parent: u64, name: &[u8]) -> Result<(), i32> {
        let mut body = Vec::new();
        for v in [0o755u32, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(name);
        body.push(0);
        match self.call(MKDIR, parent, &body) {
            (0, _) => Ok(()),
            (err, _) => Err(-err),
        }
    }

    /// Requests the share refused so far.
    fn refused(&self) -> u64 {
        self.share
            .counts
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn finish(mut self) -> (End, u64) {
        self.stream
            .shutdown(std::net::Shutdown::Both)
            .expect("test step");
        self.server
            .take()
            .expect("test step")
            .join()
            .expect("test step")
    }
}

fn tree(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("airlock-share-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub")).expect("test step");
    std::fs::write(dir.join("a.txt"), "hello from the host").expect("test step");
    std::fs::write(dir.join(".env"), "SECRET=1").expect("test step");
    std::fs::write(dir.join("private.key"), "k").expect("test step");
    std::os::unix::fs::symlink("/etc/hostname", dir.join("out")).expect("test step");
    dir
}

#[test]
fn reads_files_and_serves_symlinks_as_links() {
    let dir = tree("read");
    let mut g = Guest::start(&dir, true);
    let a = g.lookup(1, b"a.txt").expect("test step");
    let fh = g.open(a, libc::O_RDONLY).expect("test step");
    assert_eq!(g.read(a, fh, 4096), b"hello from the host");
    let link = g.lookup(1, b"out").expect("test step");
    let (err, text) = g.call(READLINK, link, &[]);
    assert_eq!((err, text.as_slice()), (0, b"/etc/hostname".as_slice()));
    // Opening the link itself never reaches what it points at.
    assert!(g.open(link, libc::O_RDONLY).is_err());
    let (_, undecodable) = g.finish();
    assert_eq!(undecodable, 0);
    std::fs::remove_dir_all(&dir).expect("test step");
}

#[test]
fn hostile_names_and_denied_entries_are_refused() {
    let dir = tree("names");
    let mut g = Guest::start(&dir, false);
    for bad in [&b".."[..], b".", b"../etc", b"sub/../..", b"/etc", b""] {
        assert_eq!(g.lookup(1, bad), Err(libc::EINVAL), "{bad:?}");
    }
    let huge = vec![b'a'; 5000];
    assert!(g.lookup(1, &huge).is_err());
    assert_eq!(g.lookup(1, b".env"), Err(libc::ENOENT));
    assert_eq!(g.lookup(1, b"private.key"), Err(libc::ENOENT));
    // Nor can the guest make or replace them.
    assert_eq!(g.create(1, b".env", 0o644), Err(libc::EACCES));
    assert_eq!(g.mkdir(1, b".ssh"), Err(libc::EACCES));
    assert_eq!(
        std::fs::read_to_string(dir.join(".env")).expect("test step"),
        "SECRET=1"
    );
    // An inode number it was never given.
    let (err, _) = g.call(GETATTR, 123_456, &[0u8; 16]);
    assert_ne!(err, 0);
    assert!(g.open(987_654, libc::O_RDONLY).is_err());
    let refused = g.refused();
    assert!(refused >= 10, "refused {refused}");
    g.finish();
    std::fs::remove_dir_all(&dir).expect("test step");
}

#[test]
fn a_read_only_share_refuses_every_write() {
    let dir = tree("ro");
    let mut g = Guest::start(&dir, true);
    let a = g.lookup(1, b"a.txt").expect("test step");
    assert_eq!(g.open(a, libc::O_WRONLY), Err(libc::EROFS));
    assert_eq!(g.open(a, libc::O_RDONLY | libc::O_TRUNC), Err(libc::EROFS));
    assert_eq!(g.create(1, b"new", 0o644), Err(libc::EROFS));
    assert_eq!(g.mkdir(1, b"d"), Err(libc::EROFS));
    let mut name = b"a.txt".to_vec();
    name.push(0);
    assert_eq!(g.call(UNLINK, 1, &name).0, -libc::EROFS);
    g.finish();
    assert_eq!(
        std::fs::read_to_string(dir.join("a.txt")).expect("test step"),
        "hello from the host"
    );
    assert!(!dir.join("new").exists() && !dir.join("d").exists());
    std::fs::remove_dir_all(&dir).expect("test step");
}

#[test]
fn files_made_by_the_guest_lose_set_id_bits() {
    let dir = tree("suid");
    let mut g = Guest::start(&dir, false);
    g.create(1, b"tool", 0o104755).expect("test step");
    g.finish();
    let mode = std::fs::metadata(dir.join("tool"))
        .expect("test step")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "{mode:o}");
    std::fs::remove_dir_all(&dir).expect("test step");
}

#[test]
fn lengths_out_of_bounds_end_the_connection() {
    let dir = tree("len");
    let mut g = Guest::start(&dir, false);
    let mut msg = 20u32.to_le_bytes().to_vec();
    msg.extend_from_slice(&[0u8; 16]);
    g.stream.write_all(&msg).expect("test step");
    let mut rest = Vec::new();
    let _ = g.stream.read_to_end(&mut rest);
    let (end, _) = g
        .server
        .take()
        .expect("test step")
        .join()
        .expect("test step");
    assert_eq!(end, End::BadLength(20));
    let mut g = Guest::start(&dir, false);
    g.stream
        .write_all(&u32::MAX.to_le_bytes())
        .expect("test step");
    let (end, _) = g
        .server
        .take()
        .expect("test step")
        .join()
        .expect("test step");
    assert_eq!(end, End::BadLength(u32::MAX));
    std::fs::remove_dir_all(&dir).expect("test step");
}

#[test]
fn undecodable_requests_get_no_reply_and_are_counted() {
    let dir = tree("garbage");
    let mut g = Guest::start(&dir, false);
    // A READ whose body is cut short.
    g.unique += 1;
    g.send(READ, 1, &[1, 2, 3]);
    // The connection still serves the next request.
    assert!(g.lookup(1, b"a.txt").is_ok());
    let (end, _) = g.finish();
    assert_eq!(end, End::Closed);
    std::fs::remove_dir_all(&dir).expect("test step");
}

#[test]
fn a_flood_of_opens_is_bounded_and_recovers() {
    let dir = tree("flood");
    let mut g = Guest::start(&dir, true);
    let a = g.lookup(1, b"a.txt").expect("a.txt");
    let mut handles = Vec::new();
    for _ in 0..super::fs::MAX_HANDLES {
        handles.push(g.open(a, libc::O_RDONLY).expect("within the bound"));
    }
    assert_eq!(g.open(a, libc::O_RDONLY), Err(libc::EMFILE));
    // RELEASE one: room for one more.
    let mut body = handles[0].to_le_bytes().to_vec();
    body.extend_from_slice(&[0u8; 16]);
    assert_eq!(g.call(RELEASE, a, &body).0, 0);
    assert!(g.open(a, libc::O_RDONLY).is_ok());
    let refused = g.refused();
    assert_eq!(refused, 1);
    g.finish();
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

const WRITE: u32 = 16;

#[test]
fn what_the_guest_adds_to_the_host_is_bounded() {
    let dir = tree("quota");
    let limits = Limits {
        max_write_bytes: 10,
        max_created: 2,
    };
    let mut g = Guest::with_limits(&dir, false, limits);
    let a = g.lookup(1, b"a.txt").expect("a.txt");
    let fh = g.open(a, libc::O_WRONLY).expect("open");
    let write = |g: &mut Guest, data: &[u8]| {
        let mut body = Vec::new();
        body.extend_from_slice(&fh.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&u32::try_from(data.len()).expect("small").to_le_bytes());
        body.extend_from_slice(&[0u8; 20]);
        body.extend_from_slice(data);
        g.call(WRITE, a, &body).0
    };
    assert_eq!(write(&mut g, b"12345678"), 0);
    assert_eq!(write(&mut g, b"12345"), -libc::EDQUOT);
    assert_eq!(write(&mut g, b"12"), 0);
    g.create(1, b"one", 0o644).expect("first");
    g.mkdir(1, b"two").expect("second");
    assert_eq!(g.create(1, b"three", 0o644), Err(libc::EDQUOT));
    assert_eq!(g.mkdir(1, b"four"), Err(libc::EDQUOT));
    g.finish();
    assert!(!dir.join("three").exists() && !dir.join("four").exists());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
