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
/// The agent container's seccomp profile: podman's default except that
/// `socket(AF_VSOCK, …)` fails, so only the init speaks to the host (made
/// at image build by `scripts/image/agent-seccomp.py`).
pub const SECCOMP_PROFILE: &str = "/etc/airlock/seccomp.json";

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

/// The names that reach the host's `--host-port` forwards.
pub const HOST_NAMES: [&str; 2] = ["host.docker.internal", "host.airlock.internal"];

/// The spec that runs `spec` in a fresh podman container: no network device
/// (`--network none`, or the model endpoint's loopback-only namespace), the
/// image's own root as an overlay (`--rootfs /:O`; writes land in tmpfs and
/// vanish with the VM), `/workspace` shared, the working directory kept as
/// the spec says (the broker sends `/`, as without a container), the spec's
/// environment passed with `--env` (the container gets nothing else but
/// podman's defaults: `PATH`, `HOME`, `TERM` unless given, `container`,
/// `HOSTNAME`), the seccomp profile [`SECCOMP_PROFILE`] (also with
/// `--privileged`, which would otherwise drop seccomp). podman itself runs
/// with the init's default environment.
pub fn containerize(spec: RunSpec, container: &Container) -> RunSpec {
    let mut argv: Vec<String> = [
        PODMAN,
        "run",
        "--rm",
        // catatonit as the container's PID 1: the command is not PID 1, so
        // a signal kills it as it would outside a container (PID 1 of a
        // namespace ignores signals it has no handler for, even its own
        // `kill -9 $$`), and its orphans are reaped.
        "--init",
        // For the execs of a live sandbox (`crun exec` of its id, or
        // `podman exec airlock-agent`).
        "--name",
        crate::execd::CONTAINER_NAME,
        "--cidfile",
        crate::execd::CID_FILE,
        "--network",
        container.network.as_deref().unwrap_or("none"),
        "--hostname",
        "airlock",
        "--pids-limit",
        PIDS_LIMIT,
        "--security-opt",
        &format!("seccomp={SECCOMP_PROFILE}"),
        "-w",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    argv.push(spec.cwd.clone());
    // The host's names for --host-port forwards: loopback in the agent's
    // namespace, where the init listens on each forwarded port (and the
    // proxy takes the names too).
    if container.network.is_some() {
        for name in HOST_NAMES {
            argv.extend(["--add-host".into(), format!("{name}:127.0.0.1")]);
        }
    }
    // The VM's /workspace (copied in, results out), unless a live mount
    // takes its place.
    if !container.mounts.iter().any(|m| m.target == "/workspace") {
        argv.extend(["-v".into(), "/workspace:/workspace".into()]);
    }
    // Live mounts: targets are plain absolute paths without ',' or ':'
    // (checked by the protocol), so the option cannot be misread.
    for (i, m) in container.mounts.iter().enumerate() {
        let mut opt = format!(
            "type=bind,src={},dst={}",
            crate::share::source(i, m),
            m.target
        );
        if m.readonly {
            opt.push_str(",ro");
        }
        argv.extend(["--mount".into(), opt]);
    }
    // The keeper (this binary, read-only): what the host runs in the
    // container to keep, probe and stop a live sandbox (crate::keeper).
    if let Ok(me) = std::env::current_exe() {
        argv.push("-v".into());
        argv.push(format!("{}:{}:ro", me.display(), crate::keeper::PATH));
    }
    if container.nested {
        // podman inside the container needs to mount, make namespaces and
        // cgroups (a privileged container within the VM) and a container
        // store that is not itself on overlayfs ("'overlay' is not
        // supported over overlayfs"): a tmpfs of its own.
        argv.extend(
            [
                "--privileged",
                "--mount",
                "type=tmpfs,destination=/var/lib/containers",
            ]
            .map(str::to_owned),
        );
    }
    if let Some(mib) = container.memory_mib {
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
    if let Some(user) = &container.user {
        // One word, so that podman never reads the value as an option
        // (the protocol already allows only `A-Za-z0-9_.-` and one `:`).
        argv.push(format!("--user={user}"));
    }
    match &container.image {
        // The image's own entrypoint is cleared: the command runs exactly
        // as given, as it does on the guest image. The image is the first
        // operand, after which podman parses no more options.
        Some(image) => argv.extend(["--entrypoint=".into(), image.clone()]),
        // `--rootfs` is a switch: its path is the first operand, after
        // which podman parses no more options, so the command (even one
        // that starts with `-`) follows it verbatim.
        None => argv.extend([
            "--rootfs".into(),
            format!("{}:O", container.rootfs.as_deref().unwrap_or("/")),
        ]),
    }
    argv.extend(spec.argv);
    RunSpec {
        argv,
        env: Vec::new(),
        cwd: "/".into(),
        ..spec
    }
}

/// What the kernel command line asks of the container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mode {
    /// `airlock.nested=1`.
    pub nested: bool,
    /// `airlock.archive=1`.
    pub archive: bool,
    /// `airlock.imagedisk=1`.
    pub image_disk: bool,
}

/// How the agent's container is made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Container {
    /// Its memory cgroup limit, in MiB (`None`: no limit).
    pub memory_mib: Option<u64>,
    /// Give it what podman inside it needs (`airlock.nested=1`).
    pub nested: bool,
    /// Run it from this loaded image (`airlock.archive=1`) instead of the
    /// guest image's own root.
    pub image: Option<String>,
    /// Run it on this directory (`--rootfs DIR:O`, an overlay whose writes
    /// vanish with the VM; `airlock.imagedisk=1`: the image disk, mounted
    /// read-only) instead of the guest image's own root.
    pub rootfs: Option<String>,
    /// Run it as this user (`--user`; the host's `RunAs`), resolved by
    /// podman in the container's own root. `None`: the image's default,
    /// root.
    pub user: Option<String>,
    /// Its `--network`: `ns:PATH`, the namespace of the model endpoint
    /// ([`crate::model`]), which holds only `lo`; `None`: `none`. Either
    /// way the container has no network device.
    pub network: Option<String>,
    /// The live mounts ([`crate::share`]), mounted at
    /// `/run/airlock/mounts/N`, bound at their targets.
    pub mounts: Vec<airlock_protocol::MountEntry>,
}

/// Where the init looks for block devices.
const SYS_BLOCK: &str = "/sys/block";

/// Finds the image-archive disk: the read-only virtio disk that is not the
/// root (`airlock run --image` attaches it after the root image).
pub fn archive_device() -> io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let root_dev = std::fs::metadata("/")?.dev();
    let root = (libc::major(root_dev), libc::minor(root_dev));
    let mut names: Vec<String> = std::fs::read_dir(SYS_BLOCK)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("vd"))
        .collect();
    names.sort();
    for name in names {
        let sys = std::path::Path::new(SYS_BLOCK).join(&name);
        let dev = std::fs::read_to_string(sys.join("dev")).unwrap_or_default();
        let is_root = dev
            .trim()
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            == Some(root);
        let read_only = std::fs::read_to_string(sys.join("ro")).is_ok_and(|v| v.trim() == "1");
        if !is_root && read_only {
            return Ok(format!("/dev/{name}"));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no read-only disk besides the root holds the image archive",
    ))
}

/// Where the image disk (`airlock.imagedisk=1`) is mounted, read-only.
pub const IMAGE_ROOT: &str = "/run/airlock/image";

/// Mounts the image disk (the read-only disk besides the root: an erofs
/// filesystem the host made from the image's layers) read-only at
/// [`IMAGE_ROOT`] and returns that directory, for the container's
/// `--rootfs`. No device nodes are honoured there (`nodev`; the host drops
/// them anyway).
pub fn mount_image_disk() -> io::Result<String> {
    use std::ffi::CString;
    let device = archive_device()?;
    std::fs::create_dir_all(IMAGE_ROOT)?;
    let source = CString::new(device).map_err(io::Error::other)?;
    let target = CString::new(IMAGE_ROOT).map_err(io::Error::other)?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call (data may be null, which mount(2) accepts); the kernel only
    // reads them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"erofs".as_ptr(),
            libc::MS_RDONLY | libc::MS_NODEV,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(IMAGE_ROOT.to_owned())
}

/// The image a `podman load` output names (`Loaded image: REF` or
/// `Loaded image(s): REF[,REF…]`; the first one).
pub fn loaded_image(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|line| {
        let (_, refs) = line.split_once("Loaded image")?;
        let refs = refs.split_once(':')?.1;
        refs.split(',')
            .map(str::trim)
            .find(|r| !r.is_empty())
            .map(str::to_owned)
    })
}

/// podman with `args` as the init runs it for itself: a clean environment
/// (the standard `PATH`, `HOME=/root`) and no stdin.
pub(crate) fn podman(args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(PODMAN);
    command
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .stdin(std::process::Stdio::null());
    command
}

/// Loads the image archive into the VM's container store (`podman load`,
/// offline) and returns the image to run.
pub fn load_archive() -> io::Result<String> {
    let device = archive_device()?;
    let out = podman(&["load", "--input", &device]).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let why: String = stderr.trim().chars().take(1000).collect();
        return Err(io::Error::other(format!(
            "podman load failed ({}): {why}",
            out.status
        )));
    }
    loaded_image(&stdout).ok_or_else(|| {
        io::Error::other(format!(
            "podman load named no image: {}",
            stdout.trim().chars().take(500).collect::<String>()
        ))
    })
}

/// `seccomp=` [`SECCOMP_PROFILE`], as the agent container gets it.
const WARM_UP_SECCOMP: &str = "seccomp=/etc/airlock/seccomp.json";
/// The longest a [`warm_up`] may take (a nested test bed is slow).
const WARM_UP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

/// The warm-up container: the agent container's shape ([`containerize`])
/// on the VM's own root, running `true`, nothing of any run in it.
pub fn warm_up_argv() -> Vec<&'static str> {
    vec![
        PODMAN,
        "run",
        "--rm",
        "--init",
        "--network",
        "none",
        "--hostname",
        "airlock",
        "--pids-limit",
        PIDS_LIMIT,
        "--security-opt",
        WARM_UP_SECCOMP,
        "-w",
        "/",
        "--rootfs",
        "/:O",
        "true",
    ]
}

/// Runs one throw-away container before a snapshot is taken, so the
/// snapshot holds a warmed container engine: podman, conmon, crun and
/// catatonit read into the page cache from the (content-keyed, read-only)
/// root image, and podman's store initialised on its tmpfs. Nothing of a run
/// is in it (no spec, env, mounts or user: those come after the wake), and
/// the container is gone (`--rm`) before the snapshot point. In the test
/// bed a first `podman --version` took 5.5 s and a first `podman run` 5.0 s
/// against 0.5 s and 2.8 s warm. Returns how long it took.
pub fn warm_up() -> io::Result<std::time::Duration> {
    let start = std::time::Instant::now();
    let argv = warm_up_argv();
    let mut child = podman(&argv[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    loop {
        if let Some(status) = child.try_wait()? {
            return if status.success() {
                Ok(start.elapsed())
            } else {
                Err(io::Error::other(format!("the warm-up container: {status}")))
            };
        }
        if start.elapsed() > WARM_UP_PATIENCE {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(format!(
                "the warm-up container took more than {} s; killed",
                WARM_UP_PATIENCE.as_secs()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
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
    fn the_warm_up_container_has_the_agent_containers_shape_and_nothing_of_a_run() {
        let warm = warm_up_argv();
        let spec = RunSpec {
            argv: vec!["true".into()],
            env: Vec::new(),
            cwd: "/".into(),
            timeout_ms: None,
            max_output_bytes: 10,
            stdin: false,
        };
        let agent = containerize(spec, &Container::default()).argv;
        // Every option of the warm-up is one the agent container has too
        // (so what it warms is what a run uses), and it mounts nothing.
        for w in warm.windows(2) {
            if w[0].starts_with("--") && !w[1].starts_with("--") && w[0] != "--rootfs" {
                assert!(
                    agent.windows(2).any(|a| a[0] == w[0] && a[1] == w[1]),
                    "{} {} is not an agent container option: {agent:?}",
                    w[0],
                    w[1]
                );
            }
        }
        assert!(!warm
            .iter()
            .any(|a| *a == "-v" || *a == "--mount" || *a == "--env"));
        assert_eq!(warm[..2], [PODMAN, "run"]);
        assert_eq!(warm[warm.len() - 3..], ["--rootfs", "/:O", "true"]);
        assert_eq!(WARM_UP_SECCOMP, format!("seccomp={SECCOMP_PROFILE}"));
    }

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
        let out = containerize(
            spec,
            &Container {
                memory_mib: Some(700),
                ..Container::default()
            },
        );
        let argv: Vec<&str> = out.argv.iter().map(String::as_str).collect();
        assert_eq!(argv[..3], [PODMAN, "run", "--rm"]);
        let pos = |s: &str| argv.iter().position(|a| *a == s).expect(s);
        assert_eq!(argv[pos("--network") + 1], "none");
        assert_eq!(argv[pos("-w") + 1], "/workspace");
        assert_eq!(argv[pos("--rootfs") + 1..], ["/:O", "sh", "-c", "exit 7"]);
        assert!(argv.windows(2).any(|w| w == ["--env", "A=1 2"]));
        assert!(argv.windows(2).any(|w| w == ["--env", "B=x=y"]));
        assert_eq!(argv[pos("--memory") + 1], "700m");
        assert_eq!(
            argv[pos("--security-opt") + 1],
            "seccomp=/etc/airlock/seccomp.json"
        );
        assert!(!argv.contains(&"-i"));
        assert!(out.env.is_empty());
        assert_eq!(out.cwd, "/");
        assert_eq!(out.timeout_ms, Some(5));
        assert_eq!(out.max_output_bytes, 10);
        assert!(!argv.contains(&"--privileged"), "not nested by default");
    }

    #[test]
    fn nested_and_archive_containers() {
        let spec = RunSpec {
            argv: vec!["-x".into(), "y".into()],
            env: Vec::new(),
            cwd: "/".into(),
            timeout_ms: None,
            max_output_bytes: 10,
            stdin: false,
        };
        let out = containerize(
            spec,
            &Container {
                memory_mib: None,
                nested: true,
                image: Some("localhost/agent:1".into()),
                network: Some("ns:/run/airlock/netns/agent".into()),
                ..Container::default()
            },
        );
        let argv: Vec<&str> = out.argv.iter().map(String::as_str).collect();
        assert!(argv.contains(&"--privileged"));
        assert!(
            argv.windows(2)
                .any(|w| w == ["--security-opt", "seccomp=/etc/airlock/seccomp.json"]),
            "the profile also for a privileged container"
        );
        assert!(argv
            .windows(2)
            .any(|w| w == ["--mount", "type=tmpfs,destination=/var/lib/containers"]));
        assert!(!argv.contains(&"--rootfs"));
        assert!(
            argv.windows(2)
                .any(|w| w == ["--network", "ns:/run/airlock/netns/agent"]),
            "the model endpoint's namespace"
        );
        assert!(!argv.contains(&"none"));
        assert_eq!(
            argv[argv.len() - 4..],
            ["--entrypoint=", "localhost/agent:1", "-x", "y"]
        );
    }

    #[test]
    fn an_image_disk_container_runs_on_its_root_as_its_user() {
        let spec = RunSpec {
            argv: vec!["/entry".into(), "-v".into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/app".into(),
            timeout_ms: None,
            max_output_bytes: 10,
            stdin: false,
        };
        let out = containerize(
            spec,
            &Container {
                rootfs: Some(IMAGE_ROOT.into()),
                user: Some("1000:1000".into()),
                ..Container::default()
            },
        );
        let argv: Vec<&str> = out.argv.iter().map(String::as_str).collect();
        let pos = |s: &str| argv.iter().position(|a| *a == s).expect(s);
        assert_eq!(argv[pos("-w") + 1], "/app");
        assert!(argv.contains(&"--user=1000:1000"));
        assert!(pos("--user=1000:1000") < pos("--rootfs"));
        assert_eq!(
            argv[pos("--rootfs") + 1..],
            ["/run/airlock/image:O", "/entry", "-v"]
        );
        assert!(argv.windows(2).any(|w| w == ["--env", "PATH=/bin"]));
        assert!(!argv.iter().any(|a| a.starts_with("--entrypoint")));
    }

    #[test]
    fn the_loaded_image_is_read_from_podmans_output() {
        assert_eq!(
            loaded_image("Loaded image: localhost/airlock-test:latest\n").as_deref(),
            Some("localhost/airlock-test:latest")
        );
        assert_eq!(
            loaded_image("Getting image source signatures\nLoaded image(s): a:1, b:2\n").as_deref(),
            Some("a:1")
        );
        assert_eq!(
            loaded_image("Loaded image: sha256:abc\n").as_deref(),
            Some("sha256:abc")
        );
        assert_eq!(loaded_image("nothing\n"), None);
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
        let out = containerize(spec, &Container::default());
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
