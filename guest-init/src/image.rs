//! Image mode: the root is the read-only erofs image (`root=/dev/vda`), not
//! an initramfs. The init then also mounts the writable tmpfs set the
//! container engine needs ([`crate::mounts`]), names the host `airlock`,
//! brings up `lo`, and by default runs the command in a podman container
//! ([`containerize`]) whose root is an overlay of the image (`--rootfs /:O`).
//!
//! Inside the container, the command's exit code is podman's: the command's
//! own code, or 128+N when a signal N killed it (the same number `airlock
//! run` exits with for a signal-killed command outside a container; the
//! audit log's `command_status` then says `exited 128+N` rather than
//! `signaled N`), 125 to 127 when podman itself could not start it.

use std::ffi::CStr;
use std::io;
use std::mem;

use airlock_protocol::RunSpec;

/// `statfs(2)` magic of EROFS (`EROFS_SUPER_MAGIC_V1`).
const EROFS_SUPER_MAGIC: u64 = 0xE0F5_E1E2;
/// The container engine, as installed in the image.
pub const PODMAN: &str = "/usr/bin/podman";
/// The guest's host name.
const HOSTNAME: &CStr = c"airlock";
/// Most processes in the agent container.
const PIDS_LIMIT: &str = "4096";

/// Whether `/` is the erofs root image rather than an initramfs.
pub fn root_is_image() -> bool {
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct,
    // which the call below overwrites.
    let mut st: libc::statfs = unsafe { mem::zeroed() };
    // SAFETY: the path is a NUL-terminated 'static string and `st` is a
    // valid, writable `statfs` that outlives the call.
    let rc = unsafe { libc::statfs(c"/".as_ptr(), &mut st) };
    // `f_type` is signed on glibc and unsigned on musl: compared as u64.
    rc == 0 && u64::try_from(st.f_type).is_ok_and(|t| t == EROFS_SUPER_MAGIC)
}

/// Sets the host name to `airlock`.
pub fn set_hostname() -> io::Result<()> {
    let name = HOSTNAME.to_bytes();
    // SAFETY: the pointer and length describe the bytes of a 'static string,
    // which sethostname(2) only reads.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Brings the loopback interface up (SIOCSIFFLAGS IFF_UP on `lo`).
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just opened and own; OwnedFd closes it.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: an all-zero `ifreq` is a valid value of this plain C struct.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(c"lo".to_bytes()) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: `req` is a valid `ifreq` naming "lo" (NUL-terminated by the
    // zeroing) that lives across both calls; SIOCGIFFLAGS fills its flags
    // union member, which SIOCSIFFLAGS then reads.
    unsafe {
        if libc::ioctl(raw, libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(io::Error::last_os_error());
        }
        let up = libc::c_short::try_from(libc::IFF_UP).map_err(io::Error::other)?;
        req.ifr_ifru.ifru_flags |= up;
        if libc::ioctl(raw, libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The spec that runs `spec` in a fresh podman container: no network, the
/// image's own root as an overlay (`--rootfs /:O`; writes land in tmpfs and
/// vanish with the VM), `/workspace` shared, the working directory kept as
/// the spec says (the broker sends `/`, as without a container), the spec's
/// environment passed with `--env` (the container gets nothing else but
/// podman's defaults: `PATH`, `HOME`, `TERM` unless given, `container`,
/// `HOSTNAME`). podman itself runs with the init's default environment.
pub fn containerize(spec: RunSpec, memory_mib: Option<u64>) -> RunSpec {
    let mut argv: Vec<String> = [
        PODMAN,
        "run",
        "--rm",
        // catatonit as the container's PID 1: the command is not PID 1, so
        // a signal kills it as it would outside a container (PID 1 of a
        // namespace ignores signals it has no handler for, even its own
        // `kill -9 $$`), and its orphans are reaped.
        "--init",
        "--network",
        "none",
        "--hostname",
        "airlock",
        "--pids-limit",
        PIDS_LIMIT,
        "-v",
        "/workspace:/workspace",
        "-w",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    argv.push(spec.cwd.clone());
    if let Some(mib) = memory_mib {
        // The container's memory cgroup (tmpfs pages it writes count too):
        // the agent cannot starve the init, podman and the control session.
        argv.push("--memory".into());
        argv.push(format!("{mib}m"));
    }
    if spec.stdin {
        argv.push("-i".into());
    }
    for (name, value) in &spec.env {
        argv.push("--env".into());
        argv.push(format!("{name}={value}"));
    }
    // `--rootfs` is a switch: its path is the first operand, after which
    // podman parses no more options, so the command (even one that starts
    // with `-`) follows it verbatim.
    argv.extend(["--rootfs".into(), "/:O".into()]);
    argv.extend(spec.argv);
    RunSpec {
        argv,
        env: Vec::new(),
        cwd: "/".into(),
        ..spec
    }
}

/// What the VM keeps for itself (kernel, init, podman, conmon): a quarter of
/// its memory, at least this much.
const RESERVED_MIB: u64 = 96;
/// The smallest limit worth setting; below it the VM is too small to split.
const MIN_AGENT_MIB: u64 = 32;

/// The agent container's memory limit for a VM with `total_kib` of memory
/// (`MemTotal` in /proc/meminfo): all but a reserve for the VM itself.
pub fn agent_memory_mib(total_kib: u64) -> Option<u64> {
    let total = total_kib / 1024;
    let limit = total.checked_sub(RESERVED_MIB.max(total / 4))?;
    (limit >= MIN_AGENT_MIB).then_some(limit)
}

/// `MemTotal` from `/proc/meminfo`, in KiB.
pub fn mem_total_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_container_gets_the_command_env_and_cwd() {
        let spec = RunSpec {
            argv: vec!["sh".into(), "-c".into(), "exit 7".into()],
            env: vec![("A".into(), "1 2".into()), ("B".into(), "x=y".into())],
            cwd: "/workspace".into(),
            timeout_ms: Some(5),
            max_output_bytes: 10,
            stdin: false,
        };
        let out = containerize(spec, Some(700));
        let argv: Vec<&str> = out.argv.iter().map(String::as_str).collect();
        assert_eq!(argv[..3], [PODMAN, "run", "--rm"]);
        let pos = |s: &str| argv.iter().position(|a| *a == s).expect(s);
        assert_eq!(argv[pos("--network") + 1], "none");
        assert_eq!(argv[pos("-w") + 1], "/workspace");
        assert_eq!(argv[pos("--rootfs") + 1..], ["/:O", "sh", "-c", "exit 7"]);
        assert!(argv.windows(2).any(|w| w == ["--env", "A=1 2"]));
        assert!(argv.windows(2).any(|w| w == ["--env", "B=x=y"]));
        assert_eq!(argv[pos("--memory") + 1], "700m");
        assert!(!argv.contains(&"-i"));
        assert!(out.env.is_empty());
        assert_eq!(out.cwd, "/");
        assert_eq!(out.timeout_ms, Some(5));
        assert_eq!(out.max_output_bytes, 10);
    }

    #[test]
    fn stdin_is_attached_when_asked() {
        let spec = RunSpec {
            argv: vec!["cat".into()],
            env: Vec::new(),
            cwd: "/".into(),
            timeout_ms: None,
            max_output_bytes: 10,
            stdin: true,
        };
        let out = containerize(spec, None);
        assert!(out.argv.iter().any(|a| a == "-i"));
        assert!(
            !out.argv.iter().any(|a| a == "--memory"),
            "no limit when unknown"
        );
    }

    #[test]
    fn the_agent_gets_all_memory_but_the_vms_reserve() {
        assert_eq!(agent_memory_mib(1024 * 1024), Some(768));
        assert_eq!(agent_memory_mib(256 * 1024), Some(160));
        assert_eq!(agent_memory_mib(120 * 1024), None, "too small to split");
        assert_eq!(agent_memory_mib(0), None);
    }
}
