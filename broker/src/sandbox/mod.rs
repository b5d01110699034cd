//! Sandboxes that live: `airlock create` boots one and leaves it running
//! under a supervisor; `exec`, `ls`, `inspect`, `stop`, `rm` and `logs`
//! find it again by name.
//!
//! Each sandbox has a private directory under the state root
//! (`$XDG_RUNTIME_DIR/airlock/sandboxes/`, or `/run/airlock/sandboxes/`
//! for root; mode 0700), holding:
//!
//! | file | what |
//! |---|---|
//! | `config.json` | name, labels, created, the options it was created with |
//! | `lock` | held (`flock`, exclusive) by the supervisor for as long as it lives: a sandbox whose lock can be taken has no supervisor |
//! | `ctl.sock` | the supervisor's control socket ([`server`]): only this user can reach it |
//! | `supervisor.log` | the supervisor's stderr (airlock's own lines) |
//! | `console.log` | the guest console |
//! | `state.json` | written when the supervisor ends: how the sandbox ended |
//!
//! The supervisor is `airlock run` itself, detached (its own session),
//! running a keeper command that does nothing, with the exec capability
//! on: the VM is its child and dies with it (`PR_SET_PDEATHSIG`), so no
//! VM outlives its supervisor. [`lifecycle`] is the handle that drives a
//! sandbox (the commands in `crate::cli::sandbox`, and a containerd shim
//! one day); [`server`] is the supervisor's side.

pub mod lifecycle;
pub mod pool;
pub mod server;

pub use lifecycle::{ExecEnd, ExecSpec, Sandbox, State};

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Longest sandbox name.
pub const MAX_NAME: usize = 63;
/// Most labels on one sandbox.
pub const MAX_LABELS: usize = 64;
/// Longest label key or value.
pub const MAX_LABEL: usize = 256;

/// The command a live sandbox's container runs while it waits for execs:
/// the guest init's keeper, mounted into every agent container, so that
/// an image needs no `sleep` of its own (guest-init/src/keeper.rs).
pub const KEEPER: [&str; 2] = ["/run/airlock/keeper", "pause"];
/// The same without a container (`--no-container`): the guest image's own.
pub const KEEPER_BARE: [&str; 2] = ["sleep", "infinity"];
/// Whether `name` is a sandbox name: `[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A generated name: `sbx-` and 12 hex digits.
pub fn new_name() -> String {
    let id = crate::audit::new_run_id();
    format!("sbx-{}", id.get(..12).unwrap_or(&id))
}

/// The state root: `$XDG_RUNTIME_DIR/airlock/sandboxes`, else
/// `/run/airlock/sandboxes` for root, else `/tmp/airlock-UID/sandboxes`.
pub fn root() -> PathBuf {
    if let Some(dir) = std::env::var_os("AIRLOCK_SANDBOX_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("airlock/sandboxes");
    }
    // SAFETY: getuid(2) cannot fail and takes no pointers.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/airlock/sandboxes")
    } else {
        PathBuf::from(format!("/tmp/airlock-{uid}/sandboxes"))
    }
}

/// Makes `dir` and its missing parents with mode 0700, and checks that
/// `dir` is ours and private.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::symlink_metadata(dir)?;
    // SAFETY: getuid(2) cannot fail and takes no pointers.
    let uid = unsafe { libc::getuid() };
    if !meta.is_dir() || std::os::unix::fs::MetadataExt::uid(&meta) != uid {
        return Err(io::Error::other(format!(
            "{} is not a directory of ours",
            dir.display()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// One sandbox's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dir {
    pub name: String,
    pub path: PathBuf,
}

impl Dir {
    pub fn of(name: &str) -> Dir {
        Dir {
            name: name.to_owned(),
            path: root().join(name),
        }
    }
    pub fn config(&self) -> PathBuf {
        self.path.join("config.json")
    }
    pub fn lock(&self) -> PathBuf {
        self.path.join("lock")
    }
    pub fn ctl(&self) -> PathBuf {
        self.path.join("ctl.sock")
    }
    pub fn log(&self) -> PathBuf {
        self.path.join("supervisor.log")
    }
    pub fn console(&self) -> PathBuf {
        self.path.join("console.log")
    }
    pub fn state(&self) -> PathBuf {
        self.path.join("state.json")
    }
    pub fn exists(&self) -> bool {
        self.config().exists()
    }

    /// Whether a supervisor holds the lock, and its pid (the lock file
    /// holds it).
    pub fn supervisor(&self) -> Option<i32> {
        lock_holder(&self.lock())
    }

    pub fn read_json(path: &Path) -> Option<serde_json::Value> {
        let text = fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Whether a process holds the lock file `lock` (`flock`), and its pid
/// (the lock file holds it; 0 if unreadable).
pub fn lock_holder(lock: &Path) -> Option<i32> {
    let file = fs::File::open(lock).ok()?;
    // SAFETY: flock(2) on a descriptor we own; no pointers.
    let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
    if free {
        return None;
    }
    fs::read_to_string(lock)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .or(Some(0))
}

/// Takes the lock file `lock` for this process (exclusive `flock`, our pid
/// written in it), held as long as the returned file is open; `Ok(None)`
/// if another process holds it.
pub fn take_lock(lock: &Path) -> io::Result<Option<fs::File>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .mode(0o600)
        .open(lock)?;
    // SAFETY: flock(2) on a descriptor we own; no pointers.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Ok(None);
    }
    let _ = file.set_len(0);
    let _ = (&file).write_all(format!("{}\n", std::process::id()).as_bytes());
    Ok(Some(file))
}

/// Makes `command`'s process its own session when it starts, so that the
/// terminal's signals (Ctrl-C) do not reach it (supervisors, keepers).
pub fn detach(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of
    // ours.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The running sandboxes (a supervisor holds the lock) whose config
/// records the stored image `digest`.
pub fn running_with_image(digest: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(root()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| valid_name(n))
        .map(|n| Dir::of(&n))
        .filter(|d| {
            Dir::read_json(&d.config())
                .is_some_and(|c| c["image"]["digest"].as_str() == Some(digest))
                && d.supervisor().is_some()
        })
        .map(|d| d.name)
        .collect();
    names.sort();
    names
}

/// Writes `value` to `path` atomically (a temporary file renamed over it).
pub fn write_json(path: &Path, value: &serde_json::Value) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(value).map_err(io::Error::other)?;
    fs::write(&tmp, text + "\n")?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "A1", "agent-7", "x_y.z", &"n".repeat(63)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "a/b",
            "a b",
            "..",
            "é",
            &"n".repeat(64),
            "a\n",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_name(&new_name()));
    }
}
