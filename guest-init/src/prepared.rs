//! The agent's container started before the snapshot (`airlock.prepare=1`,
//! which the host gives a live sandbox's snapshot boot): instead of the
//! warm-up the init starts the container a `create` would start, running
//! the keeper's `pause`, and the snapshot holds it started. A woken init then
//! *adopts* it instead of running `podman run` (most of a woken `create`'s
//! time under emulation), if and only if the run's spec would have made
//! exactly that container: [`crate::image::containerize`] of the run's
//! spec, its environment left out, gives the very argv the prepared
//! container was started with. Anything else (another command, user or
//! directory, live mounts, standard input) and the prepared container is
//! removed and the run's own is made as on a cold boot.
//!
//! What it is made with, before any run exists: the keeper's `pause` in
//! the container as the sandbox's user and in its working directory (the
//! host's `airlock.prepare_user` and `airlock.prepare_cwd`: the image's
//! default user and `/` when empty), the VM's memory limit, the image's root
//! (the guest image's or the image disk's, mounted read-only first), and
//! the agent's network namespace (only `lo`), made and pinned empty: the
//! woken init listens for the model endpoint and the egress proxy in it
//! ([`crate::model::listen_ports`] with `made`). The run's environment (its
//! own variables, the model endpoint's and the proxy's) is what the
//! container's configuration lacks; every exec gets it instead (each exec's
//! own variables win; [`crate::execd::placed`]), which is what an exec of a
//! container made with it would see.
//!
//! Siblings woken from one snapshot share the prepared container's id,
//! its processes' ids, the overlay's scratch names, the user-space state
//! of podman, conmon, catatonit and the keeper (none of which makes a
//! random value after the wake), and the agent namespace's kernel hash
//! seed (made before the reseed: only its own VM's socket hash tables
//! depend on it): none is a secret, and nothing the agent or an exec runs
//! starts before the wake.

use std::path::Path;
use std::time::{Duration, Instant};

use airlock_protocol::RunSpec;

use crate::exec::Running;
use crate::image::{self, Container, Mode};

/// The longest the container may take to start (a nested test bed is slow).
const PATIENCE: Duration = Duration::from_secs(120);
/// How often the start is looked at.
const TICK: Duration = Duration::from_millis(50);

/// A live sandbox's command: the keeper's `pause` (the host sends it), in
/// `cwd`.
pub fn keeper_spec(cwd: &str) -> RunSpec {
    RunSpec {
        argv: vec![crate::keeper::PATH.into(), "pause".into()],
        env: Vec::new(),
        cwd: cwd.into(),
        timeout_ms: None,
        max_output_bytes: 0,
        stdin: false,
    }
}

/// The agent's container, started and waiting.
pub struct Prepared {
    /// Its `podman run`, the init's child: the sandbox's command once
    /// adopted.
    running: Running,
    /// What it was started with.
    argv: Vec<String>,
    /// The image disk's root it runs on, mounted before the snapshot.
    rootfs: Option<String>,
}

/// The container's shape before any run: what [`crate::rpc`] gives a run
/// as `user` with no live mounts.
fn setup(mode: Mode, rootfs: Option<String>, network: String, user: Option<String>) -> Container {
    Container {
        memory_mib: image::mem_total_kib().and_then(image::agent_memory_mib),
        nested: mode.nested,
        image: None,
        rootfs,
        user,
        network: Some(network),
        mounts: Vec::new(),
    }
}

/// What the host says of the container to start (`airlock.prepare_cwd`,
/// `airlock.prepare_user`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    /// Its working directory (`/` if `None` or empty).
    pub cwd: Option<String>,
    /// Its user (the image's default if `None` or empty).
    pub user: Option<String>,
}

/// Starts the container and waits until its keeper runs. An image archive
/// is loaded only after the wake, so it has nothing to start from.
pub fn prepare(mode: Mode, shape: Shape) -> Result<Prepared, String> {
    if mode.archive {
        return Err("the image archive is loaded after the wake".into());
    }
    let cwd = shape
        .cwd
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "/".into());
    let user = shape.user.filter(|u| !u.is_empty());
    if !cwd.starts_with('/') {
        return Err(format!("its working directory {cwd:?} is not absolute"));
    }
    // As the protocol allows a `RunAs`: never read as an option.
    if let Some(user) = &user {
        if airlock_protocol::check_run_as(user).is_err() {
            return Err(format!("its user {user:?} is not a user name or uid[:gid]"));
        }
    }
    let network = crate::model::make_netns()
        .map_err(|e| format!("its network namespace: {}", crate::console::chain(&e)))?;
    let rootfs = if mode.image_disk {
        match image::mount_image_disk() {
            Ok(dir) => Some(dir),
            Err(e) => {
                undo(None);
                return Err(format!("the image disk: {e}"));
            }
        }
    } else {
        None
    };
    let spec = image::containerize(
        keeper_spec(&cwd),
        &setup(mode, rootfs.clone(), network, user),
    );
    let running = match crate::exec::spawn(&spec, None) {
        Ok(running) => running,
        Err(e) => {
            undo(rootfs.as_deref());
            return Err(format!("podman run: {e}"));
        }
    };
    let prepared = Prepared {
        running,
        argv: spec.argv,
        rootfs,
    };
    let start = Instant::now();
    loop {
        if crate::keeper::keeper_runs(Path::new("/proc")).unwrap_or(false) {
            return Ok(prepared);
        }
        let why = if ended(prepared.running.pid()) {
            "podman run ended before the container's keeper ran".to_owned()
        } else if start.elapsed() > PATIENCE {
            format!("its keeper did not run within {} s", PATIENCE.as_secs())
        } else {
            std::thread::sleep(TICK);
            continue;
        };
        let rootfs = prepared.rootfs.clone();
        prepared.dispose();
        undo(rootfs.as_deref());
        return Err(why);
    }
}

/// After a failed start: unmounts the agent's namespace and the image
/// disk, so that the run makes both as on a cold boot.
fn undo(rootfs: Option<&str>) {
    for path in std::iter::once(crate::model::NETNS_PATH).chain(rootfs) {
        let Ok(c) = std::ffi::CString::new(path) else {
            continue;
        };
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            crate::console::warn(&format!(
                "cannot unmount {path}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
}

/// Whether child `pid` has ended, leaving it for the reaper to collect.
fn ended(pid: libc::pid_t) -> bool {
    let Ok(id) = libc::id_t::try_from(pid) else {
        return true;
    };
    // SAFETY: all-zero is a valid siginfo_t, which waitid fills.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a live, writable siginfo_t; WNOWAIT leaves the
    // child waitable.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            id,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: waitid filled `info` (si_pid stays 0 while the child runs).
    rc != 0 || unsafe { info.si_pid() } != 0
}

impl Prepared {
    /// The image disk's root it runs on, if it runs on one.
    pub fn rootfs(&self) -> Option<&str> {
        self.rootfs.as_deref()
    }

    /// The container, if `would_be` (what the run's spec would start,
    /// its environment left out) is exactly what it was started as and its
    /// keeper still runs; otherwise it is removed and why is returned.
    pub fn adopt(self, would_be: &[String]) -> Result<(Running, Vec<String>), String> {
        let why = if would_be != self.argv.as_slice() {
            "the run asks for another container"
        } else if ended(self.running.pid())
            || !crate::keeper::keeper_runs(Path::new("/proc")).unwrap_or(false)
        {
            "it is no longer running"
        } else {
            return Ok((self.running, self.argv));
        };
        self.dispose();
        Err(why.into())
    }

    /// Stops and removes the container (so that the run's own may take its
    /// name), leaving the image disk mounted.
    pub fn dispose(self) {
        // Kills its `podman run` (the process group); conmon and the
        // container live on until podman removes them.
        drop(self.running);
        // Twice if need be: the run's own container takes its name.
        let removed = (0..2).any(|_| {
            let status =
                image::podman(&["rm", "--force", "--time", "0", crate::execd::CONTAINER_NAME])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            matches!(status, Ok(s) if s.success())
        });
        if !removed {
            crate::console::warn("cannot remove the container started before the snapshot");
        }
        let _ = std::fs::remove_file(crate::execd::CID_FILE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prepared_container_is_a_live_sandboxs_and_nothing_of_a_run() {
        let mode = Mode {
            nested: false,
            archive: false,
            image_disk: true,
        };
        let s = setup(
            mode,
            Some("/run/airlock/image".into()),
            "ns:/x".into(),
            None,
        );
        let argv = image::containerize(keeper_spec("/"), &s).argv;
        // The host's command for a live sandbox.
        assert_eq!(argv[argv.len() - 2..], ["/run/airlock/keeper", "pause"]);
        assert!(!argv.iter().any(|a| a.starts_with("--env") || a == "-i"));
        assert!(!argv.iter().any(|a| a.starts_with("--user")));
        assert!(argv.windows(2).any(|w| w == ["--network", "ns:/x"]));
        assert!(argv.windows(2).any(|w| w == ["-w", "/"]));
        // A run with the same command and shape would start the same
        // container once its environment is left out...
        let mut run = keeper_spec("/");
        run.env = vec![("A".into(), "1".into())];
        run.timeout_ms = Some(5);
        run.max_output_bytes = 1 << 20;
        let would_be = image::containerize(
            RunSpec {
                env: Vec::new(),
                ..run
            },
            &s,
        )
        .argv;
        assert_eq!(would_be, argv);
        // ...and one with a user, a mount, stdin or another command not.
        let mut user = s.clone();
        user.user = Some("1000".into());
        assert_ne!(image::containerize(keeper_spec("/"), &user).argv, argv);
        let mut mounted = s.clone();
        mounted.mounts = vec![airlock_protocol::MountEntry {
            target: "/data".into(),
            file: None,
            readonly: false,
        }];
        assert_ne!(image::containerize(keeper_spec("/"), &mounted).argv, argv);
        let mut stdin = keeper_spec("/");
        stdin.stdin = true;
        assert_ne!(image::containerize(stdin, &s).argv, argv);
        let mut other = keeper_spec("/");
        other.argv = vec!["sh".into()];
        assert_ne!(image::containerize(other, &s).argv, argv);
        assert_ne!(image::containerize(keeper_spec("/app"), &s).argv, argv);
        // Started as a user in a directory, it is what a run as that user
        // in that directory would start.
        let app = setup(mode, None, "ns:/x".into(), Some("node".into()));
        let as_node = image::containerize(keeper_spec("/app"), &app).argv;
        assert!(as_node.iter().any(|a| a == "--user=node"));
        assert!(as_node.windows(2).any(|w| w == ["-w", "/app"]));
    }
}
