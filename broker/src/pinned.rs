//! Files airlock opens once and hands to the engine by descriptor.
//!
//! The kernel, the initrd or root image, and a container image archive are
//! hashed for the audit log and then read by the engine (QEMU or
//! airlock-vmm). Both read the file airlock holds open: the engine inherits
//! the descriptor and is given `/proc/self/fd/N`, which opens that same
//! inode. Replacing the file at its path after airlock checked and hashed
//! it cannot change what boots, so `run.start`'s hashes name what ran.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// A regular file held open for the whole run.
#[derive(Debug)]
pub struct Pinned {
    path: PathBuf,
    file: File,
}

impl Pinned {
    /// Opens `path` read-only (close-on-exec: only the engine process it
    /// is passed to inherits it). Anything but a regular file is refused
    /// (non-blocking, so that a FIFO put in its place cannot hang us).
    pub fn open(path: &Path) -> io::Result<Pinned> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(Pinned {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The path the user gave (for messages and the audit log).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The descriptor the engine process must inherit.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The name under which a process holding the descriptor opens the
    /// pinned file afresh (its own offset): in airlock to hash it, in the
    /// engine once it inherited the descriptor.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_pinned_file_survives_a_swap_of_its_path() {
        let dir = std::env::temp_dir().join(format!("airlock-pinned-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("vmlinux");
        std::fs::write(&path, b"checked kernel").expect("write");
        let pinned = Pinned::open(&path).expect("pin");
        // Someone replaces the file after airlock checked it.
        let other = dir.join("evil");
        std::fs::write(&other, b"another kernel").expect("write");
        std::fs::rename(&other, &path).expect("swap");
        let mut seen = String::new();
        File::open(pinned.fd_path())
            .and_then(|mut f| f.read_to_string(&mut seen))
            .expect("read through the descriptor");
        assert_eq!(seen, "checked kernel");
        assert_eq!(pinned.path(), path);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_regular_files_are_pinned() {
        let err = Pinned::open(Path::new("/")).expect_err("a directory");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(Pinned::open(Path::new("/nonexistent/airlock")).is_err());
    }
}
