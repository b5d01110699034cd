//! The filesystems the init mounts, as a table (the Kata agent's way), and
//! the code that mounts them in order.

use std::ffi::{CStr, OsStr};
use std::fs::DirBuilder;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::ptr;

use libc::{c_ulong, MS_NODEV, MS_NOEXEC, MS_NOSUID};

use crate::console;

/// A mount failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to create mount point {path}")]
    MountPoint {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to mount {fstype} on {path}")]
    Mount {
        fstype: String,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// One entry of the mount table.
#[derive(Debug)]
struct Mount {
    source: &'static CStr,
    target: &'static CStr,
    fstype: &'static CStr,
    flags: c_ulong,
    data: Option<&'static CStr>,
    /// A failure stops the boot; otherwise it is a warning.
    required: bool,
    /// Mounted only in image mode ([`crate::image`]): the writable places
    /// the container engine needs on a read-only root.
    image_only: bool,
}

/// What the init mounts, in order. A target's parent mount comes first.
const MOUNTS: &[Mount] = &[
    Mount {
        source: c"proc",
        target: c"/proc",
        fstype: c"proc",
        flags: MS_NOSUID | MS_NODEV | MS_NOEXEC,
        data: None,
        required: true,
        image_only: false,
    },
    Mount {
        source: c"sysfs",
        target: c"/sys",
        fstype: c"sysfs",
        flags: MS_NOSUID | MS_NODEV | MS_NOEXEC,
        data: None,
        required: true,
        image_only: false,
    },
    // For the container engine; a kernel without cgroup v2 still boots.
    Mount {
        source: c"cgroup2",
        target: c"/sys/fs/cgroup",
        fstype: c"cgroup2",
        flags: MS_NOSUID | MS_NODEV | MS_NOEXEC,
        data: None,
        required: false,
        image_only: false,
    },
    // Not noexec: executable mappings of /dev/zero and friends must work.
    Mount {
        source: c"devtmpfs",
        target: c"/dev",
        fstype: c"devtmpfs",
        flags: MS_NOSUID,
        data: Some(c"mode=0755"),
        required: true,
        image_only: false,
    },
    Mount {
        source: c"devpts",
        target: c"/dev/pts",
        fstype: c"devpts",
        flags: MS_NOSUID | MS_NOEXEC,
        data: Some(c"mode=0620,ptmxmode=0666"),
        required: true,
        image_only: false,
    },
    // Not noexec: builds and package managers run programs from /tmp.
    Mount {
        source: c"tmpfs",
        target: c"/tmp",
        fstype: c"tmpfs",
        flags: MS_NOSUID | MS_NODEV,
        data: Some(c"mode=1777"),
        required: true,
        image_only: false,
    },
    Mount {
        source: c"tmpfs",
        target: c"/run",
        fstype: c"tmpfs",
        flags: MS_NOSUID | MS_NODEV,
        data: Some(c"mode=0755"),
        required: true,
        image_only: false,
    },
    // Image mode only, from here on: a read-only root needs writable
    // places for the container engine (overlayfs is refused as its graph
    // root's backing store, so a plain tmpfs) and for the command.
    Mount {
        source: c"tmpfs",
        target: c"/dev/shm",
        fstype: c"tmpfs",
        flags: MS_NOSUID | MS_NODEV,
        data: Some(c"mode=1777"),
        required: true,
        image_only: true,
    },
    Mount {
        source: c"tmpfs",
        target: c"/var/tmp",
        fstype: c"tmpfs",
        flags: MS_NOSUID | MS_NODEV,
        data: Some(c"mode=1777"),
        required: true,
        image_only: true,
    },
    Mount {
        source: c"tmpfs",
        target: c"/var/cache/containers",
        fstype: c"tmpfs",
        flags: MS_NOSUID | MS_NODEV,
        data: Some(c"mode=0700"),
        required: true,
        image_only: true,
    },
    Mount {
        source: c"tmpfs",
        target: c"/var/lib/containers",
        fstype: c"tmpfs",
        flags: MS_NOSUID | MS_NODEV,
        data: Some(c"mode=0700"),
        required: true,
        image_only: true,
    },
    Mount {
        source: c"tmpfs",
        target: c"/workspace",
        fstype: c"tmpfs",
        flags: MS_NOSUID | MS_NODEV,
        data: Some(c"mode=0755"),
        required: true,
        image_only: true,
    },
];

/// Mounts the table in order (the image-only entries when `image`). Stops
/// at the first required mount that fails; an optional one that fails is a
/// warning.
pub fn mount_all(image: bool) -> Result<(), Error> {
    for m in MOUNTS.iter().filter(|m| image || !m.image_only) {
        match mount(m) {
            Ok(()) => {}
            Err(err) if !m.required => console::warn(&console::chain(&err)),
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn mount(m: &Mount) -> Result<(), Error> {
    let path = Path::new(OsStr::from_bytes(m.target.to_bytes()));
    if !path.is_dir() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(path)
            .map_err(|source| Error::MountPoint {
                path: lossy(m.target),
                source,
            })?;
    }
    let data = m.data.map_or(ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: source, target, fstype and data are NUL-terminated strings
    // with 'static lifetime (data may be null, which mount(2) accepts); the
    // kernel only reads them during the call.
    let rc = unsafe {
        libc::mount(
            m.source.as_ptr(),
            m.target.as_ptr(),
            m.fstype.as_ptr(),
            m.flags,
            data,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    // Already mounted there (e.g. by the kernel): fine.
    if source.raw_os_error() == Some(libc::EBUSY) {
        return Ok(());
    }
    Err(Error::Mount {
        fstype: lossy(m.fstype),
        path: lossy(m.target),
        source,
    })
}

fn lossy(s: &CStr) -> String {
    s.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(target: &CStr) -> Option<usize> {
        MOUNTS.iter().position(|m| m.target == target)
    }

    #[test]
    fn targets_are_absolute_and_clean() {
        for m in MOUNTS {
            let t = m.target.to_str().expect("target is UTF-8");
            assert!(t.starts_with('/'), "{t} is not absolute");
            assert!(t.len() == 1 || !t.ends_with('/'), "{t} ends with /");
            assert!(!t.contains("//") && !t.contains("/./") && !t.contains("/../"));
        }
    }

    #[test]
    fn targets_are_unique() {
        for (i, m) in MOUNTS.iter().enumerate() {
            assert_eq!(
                position(m.target),
                Some(i),
                "{:?} is mounted twice",
                m.target
            );
        }
    }

    #[test]
    fn proc_comes_first() {
        assert_eq!(position(c"/proc"), Some(0));
    }

    #[test]
    fn parents_are_mounted_before_children() {
        for (i, child) in MOUNTS.iter().enumerate() {
            let child_path = Path::new(OsStr::from_bytes(child.target.to_bytes()));
            for (j, parent) in MOUNTS.iter().enumerate() {
                let parent_path = Path::new(OsStr::from_bytes(parent.target.to_bytes()));
                if child_path != parent_path && child_path.starts_with(parent_path) {
                    assert!(j < i, "{child_path:?} is mounted before {parent_path:?}");
                }
            }
        }
    }

    #[test]
    fn pseudo_filesystems_are_required() {
        for target in [c"/proc", c"/sys", c"/dev", c"/dev/pts", c"/tmp", c"/run"] {
            let i = position(target).expect("in the table");
            assert!(MOUNTS[i].required, "{target:?} must be required");
        }
        let cgroup = position(c"/sys/fs/cgroup").expect("cgroup2 in the table");
        assert!(!MOUNTS[cgroup].required);
    }

    #[test]
    fn image_mode_adds_only_writable_tmpfs_for_the_container_engine() {
        let image_only: Vec<&CStr> = MOUNTS
            .iter()
            .filter(|m| m.image_only)
            .map(|m| m.target)
            .collect();
        assert_eq!(
            image_only,
            [
                c"/dev/shm",
                c"/var/tmp",
                c"/var/cache/containers",
                c"/var/lib/containers",
                c"/workspace"
            ]
        );
        for m in MOUNTS.iter().filter(|m| m.image_only) {
            assert_eq!(m.fstype, c"tmpfs", "{:?}", m.target);
            assert!(m.required, "{:?}", m.target);
        }
    }

    #[test]
    fn nothing_is_setuid_capable() {
        for m in MOUNTS {
            assert_ne!(m.flags & MS_NOSUID, 0, "{:?} lacks nosuid", m.target);
        }
    }
}
