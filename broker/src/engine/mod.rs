//! The launcher interface: one [`VmConfig`] in, one running [`Vm`] out.
//!
//! Two engines boot the same kernel and initrd or root image:
//! - [`kvm::Kvm`]: our `airlock-vmm` on hardware KVM (the product);
//! - [`tcg::Tcg`]: QEMU system emulation, for hosts without usable KVM, with
//!   its vsock device served by a `vhost-device-vsock` helper process.
//!
//! Nothing outside this module knows which one runs: both take the same
//! config, write the guest console to the same file, expose the guest's
//! vsock as the same Firecracker "hybrid vsock" Unix sockets (a guest
//! connection to host port P arrives on `<vsock_uds>_<P>`; the host connects
//! to `<vsock_uds>` and writes `CONNECT <port>\n`), and end the same way
//! (the VM process exits 0 when the guest reboots cleanly). A [`Vm`] owns
//! every process of its engine and kills and reaps them all when dropped.

pub mod console;
pub mod kvm;
pub mod snapshot;
pub mod tcg;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::RawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::host::KvmUnusable;
use crate::paths;

/// The engine the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineChoice {
    /// Our airlock-vmm on hardware KVM.
    Kvm,
    /// QEMU emulation (TCG): slower, needs no hardware virtualization.
    Tcg,
    /// kvm where hardware KVM is usable, else tcg with a warning.
    Auto,
}

/// Everything an engine needs to boot a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Uncompressed ELF vmlinux with a PVH entry.
    pub kernel: PathBuf,
    /// cpio archive the kernel unpacks as its root (initramfs mode); `None`
    /// in image mode, where the root is the first of [`VmConfig::disks`].
    pub initrd: Option<PathBuf>,
    /// virtio-blk disks, in the order the guest sees them (`/dev/vda`, ...).
    pub disks: Vec<Disk>,
    pub mem_mib: u32,
    pub cpus: u8,
    /// File the serial console is written to (created or truncated by the engine).
    pub console_log: PathBuf,
    /// Words appended to the kernel command line.
    pub extra_cmdline: Vec<String>,
    /// The run's private directory (mode 0700). Engines keep their own
    /// sockets and the logs of their processes here.
    pub run_dir: PathBuf,
    /// Hybrid-vsock base path: a guest connection to host port P arrives as
    /// a connection on `<vsock_uds>_<P>`, which the caller listens on.
    pub vsock_uds: PathBuf,
    /// The guest's vsock context id.
    pub guest_cid: u32,
    /// Debugging and tests (`--debug-dump-guest-memory`): leave a copy of
    /// the guest's RAM here once the VM has stopped.
    pub dump_memory: Option<PathBuf>,
    /// Descriptors the VM process inherits: the kernel, initrd and disks
    /// airlock opened and hashed ([`crate::pinned`]), named above as
    /// `/proc/self/fd/N`. The caller keeps them open until the VM started.
    pub inherited_fds: Vec<RawFd>,
    /// The kvm engine wakes the guest from this snapshot (made first if
    /// the cache has none): see [`snapshot`].
    pub snapshot: Option<snapshot::Plan>,
}

/// A disk image the guest sees as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    /// The guest cannot write it (the engine opens it read-only).
    pub read_only: bool,
}

/// The file, in [`VmConfig::run_dir`], that receives the stdout and stderr of
/// the VM process (QEMU or airlock-vmm): not the terminal, which carries the
/// command's own output.
pub const VM_LOG: &str = "vm.log";

/// The path a guest connection to host `port` arrives on.
pub fn port_path(vsock_uds: &Path, port: u32) -> PathBuf {
    let mut path = vsock_uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// The kernel command line every engine starts from: console on the serial
/// port, reboot through the i8042 (no ACPI, so no power-off), reboot at once
/// on panic, and `quiet` (each serial byte costs a VM exit).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// A launcher, with the binary it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    Kvm(kvm::Kvm),
    Tcg(tcg::Tcg),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start {}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {} (left by an earlier boot of this run)", path.display())]
    Stale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the log file {}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{name} stopped ({exit}) before it was ready; {tail}")]
    HelperExited {
        name: &'static str,
        exit: ProcessExit,
        /// The last lines of its log, described ([`describe_tail`]).
        tail: String,
    },
    #[error("{name} did not create {} within {} s", socket.display(), waited.as_secs())]
    HelperNotReady {
        name: &'static str,
        socket: PathBuf,
        waited: Duration,
    },
    #[error("lost track of {name}")]
    Wait {
        name: &'static str,
        #[source]
        source: io::Error,
    },
}

impl Engine {
    /// The engine's name as the user selects it.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Kvm(_) => "kvm",
            Engine::Tcg(_) => "tcg",
        }
    }

    /// Starts the VM and whatever helper it needs. The returned [`Vm`] kills
    /// them all when dropped; on error nothing is left running.
    pub fn spawn(&self, config: &VmConfig) -> Result<Vm, Error> {
        match self {
            Engine::Kvm(kvm) => kvm.spawn(config),
            Engine::Tcg(tcg) => tcg.spawn(config),
        }
    }
}

/// What the host offers each engine.
#[derive(Debug)]
pub struct Available {
    pub kvm: Result<(), KvmUnusable>,
    pub vmm: Result<PathBuf, paths::Error>,
    pub qemu: Result<PathBuf, paths::Error>,
    /// The tcg engine's vsock backend.
    pub vhost_vsock: Result<PathBuf, paths::Error>,
}

impl Available {
    /// Looks at this host.
    pub fn gather() -> Available {
        Available {
            kvm: crate::host::kvm_usability(&crate::host::KvmFacts::gather()),
            vmm: paths::find_vmm(),
            qemu: paths::find_qemu(),
            vhost_vsock: paths::find_vhost_vsock(),
        }
    }
}

/// The tcg engine, if both its binaries are here (else the first one missing).
pub fn tcg_engine(
    qemu: Result<PathBuf, paths::Error>,
    vhost_vsock: Result<PathBuf, paths::Error>,
) -> Result<tcg::Tcg, paths::Error> {
    Ok(tcg::Tcg {
        qemu: qemu?,
        vhost_vsock: vhost_vsock?,
    })
}

/// The engine chosen, why, and what the user should be warned about.
#[derive(Debug)]
pub struct Selection {
    pub engine: Engine,
    /// Why this engine, for the `airlock: engine: NAME (WHY)` line.
    pub reason: String,
    /// Set when `auto` had to settle for the slower engine.
    pub warning: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("the kvm engine cannot run here: {0} ({fix}; or use --engine tcg)", fix = .0.fix())]
    KvmUnusable(KvmUnusable),
    #[error(transparent)]
    Missing(paths::Error),
    #[error("no engine can run here: {kvm} ({fix}), and {tcg}", fix = .kvm.fix())]
    NoEngine {
        kvm: KvmUnusable,
        /// Why the tcg engine cannot run.
        tcg: paths::Error,
    },
}

/// Picks the engine for `choice` from what the host offers.
pub fn select(choice: EngineChoice, available: Available) -> Result<Selection, SelectError> {
    let Available {
        kvm,
        vmm,
        qemu,
        vhost_vsock,
    } = available;
    let kvm_engine = |vmm| Engine::Kvm(kvm::Kvm { vmm });
    let tcg = tcg_engine(qemu, vhost_vsock).map(Engine::Tcg);
    match choice {
        EngineChoice::Kvm => {
            kvm.map_err(SelectError::KvmUnusable)?;
            Ok(Selection {
                engine: kvm_engine(vmm.map_err(SelectError::Missing)?),
                reason: "requested".into(),
                warning: None,
            })
        }
        EngineChoice::Tcg => Ok(Selection {
            engine: tcg.map_err(SelectError::Missing)?,
            reason: "requested".into(),
            warning: None,
        }),
        EngineChoice::Auto => match (kvm, vmm, tcg) {
            (Ok(()), Ok(vmm), _) => Ok(Selection {
                engine: kvm_engine(vmm),
                reason: "auto: hardware KVM is usable".into(),
                warning: None,
            }),
            (Ok(()), Err(missing), Ok(tcg)) => Ok(Selection {
                engine: tcg,
                reason: "auto: airlock-vmm not found".into(),
                warning: Some(format!("{missing}; using the tcg engine (slower)")),
            }),
            (Ok(()), Err(missing), Err(_)) => Err(SelectError::Missing(missing)),
            (Err(why), _, Ok(tcg)) => Ok(Selection {
                engine: tcg,
                reason: "auto: no usable hardware KVM".into(),
                warning: Some(format!("{why}; using the tcg engine (slower)")),
            }),
            (Err(kvm), _, Err(tcg)) => Err(SelectError::NoEngine { kvm, tcg }),
        },
    }
}

/// How a VM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessExit {
    Code(i32),
    Signal(i32),
}

impl ProcessExit {
    pub fn success(self) -> bool {
        self == ProcessExit::Code(0)
    }
}

impl From<ExitStatus> for ProcessExit {
    fn from(status: ExitStatus) -> ProcessExit {
        match (status.code(), status.signal()) {
            (Some(code), _) => ProcessExit::Code(code),
            (None, Some(signal)) => ProcessExit::Signal(signal),
            // Neither a code nor a signal: stopped/continued, which wait() never reports.
            (None, None) => ProcessExit::Code(-1),
        }
    }
}

impl fmt::Display for ProcessExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessExit::Code(code) => write!(f, "exit status {code}"),
            ProcessExit::Signal(signal) => write!(f, "signal {signal}"),
        }
    }
}

/// The environment variables an engine process inherits; everything else
/// (API keys, tokens: the host holds every credential) is withheld from it.
const INHERITED_ENV: &[&str] = &["PATH", "RUST_LOG", "RUST_BACKTRACE"];

/// One process of an engine. Its stdout and stderr go to a log file.
/// Dropping it kills and reaps it; if airlock itself dies, the kernel kills
/// it (`PR_SET_PDEATHSIG`).
#[derive(Debug)]
pub(crate) struct Process {
    name: &'static str,
    child: Child,
    exit: Option<ProcessExit>,
    log: PathBuf,
}

impl Process {
    /// Starts `program` with `args`, its output appended to `log`; of
    /// airlock's descriptors it inherits only `inherit` (and its standard
    /// streams). Must be called from the main thread (see the
    /// `PR_SET_PDEATHSIG` note).
    pub(crate) fn spawn(
        name: &'static str,
        program: &Path,
        args: &[OsString],
        log: &Path,
        inherit: &[RawFd],
    ) -> Result<Process, Error> {
        let log_error = |source| Error::Log {
            path: log.to_path_buf(),
            source,
        };
        let out = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(log)
            .map_err(log_error)?;
        let err = out.try_clone().map_err(log_error)?;
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .envs(
                INHERITED_ENV.iter().filter_map(|name| {
                    std::env::var_os(name).map(|value| (OsStr::new(name), value))
                }),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: a terminal's Ctrl-C reaches only us, and
            // we stop the VM in order (kill, reap, clean up).
            .process_group(0);
        let parent = libc::pid_t::try_from(std::process::id()).ok();
        let inherit = inherit.to_vec();
        // SAFETY: the closure runs in the forked child before exec, where only
        // async-signal-safe calls are allowed: fcntl(2), prctl(2) and
        // getppid(2) are plain system calls, `inherit` was allocated before
        // the fork and is only read, and the errors are built from raw errno
        // values without allocating. PR_SET_PDEATHSIG fires when the forking
        // thread exits; we spawn from the main thread, which lives until
        // airlock exits.
        unsafe {
            command.pre_exec(move || {
                // Close-on-exec off in the child's copy of the table only.
                for &fd in &inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl: then nobody would kill us.
                if parent.is_some_and(|p| libc::getppid() != p) {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| Error::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
        Ok(Process {
            name,
            child,
            exit: None,
            log: log.to_path_buf(),
        })
    }

    /// The exit, if the process has ended (reaping it).
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ProcessExit>> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait()?.map(ProcessExit::from);
        }
        Ok(self.exit)
    }

    /// Kills the process (SIGKILL: the VM is disposable) and reaps it.
    pub(crate) fn kill(&mut self) -> io::Result<ProcessExit> {
        if let Some(exit) = self.exit {
            return Ok(exit);
        }
        // Fails only when the process already ended; wait() then reaps it.
        let _ = self.child.kill();
        let exit = ProcessExit::from(self.child.wait()?);
        self.exit = Some(exit);
        Ok(exit)
    }

    /// Waits until `ready` holds, the process ends, or `limit` passes.
    pub(crate) fn wait_ready(
        &mut self,
        limit: Duration,
        ready: impl Fn() -> bool,
    ) -> Result<bool, Error> {
        const STEP: Duration = Duration::from_millis(5);
        let start = Instant::now();
        loop {
            if ready() {
                return Ok(true);
            }
            let exit = self.try_wait().map_err(|source| Error::Wait {
                name: self.name,
                source,
            })?;
            if let Some(exit) = exit {
                return Err(Error::HelperExited {
                    name: self.name,
                    exit,
                    tail: describe_tail(&tail_lines(&self.log, TAIL_LINES), "its log"),
                });
            }
            if start.elapsed() >= limit {
                return Ok(false);
            }
            thread::sleep(STEP);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A running VM: the VM process (whose end is the VM's end) and the helper
/// processes it needs. Dropping it kills and reaps all of them, so no
/// process outlives its handle.
#[derive(Debug)]
pub struct Vm {
    main: Process,
    helpers: Vec<Process>,
    /// Woken from a snapshot: which (for `vm.start`).
    pub snapshot: Option<snapshot::Used>,
    /// Copies the console to its log when the engine cannot cap it itself
    /// (tcg); finished once the VM process has ended.
    console: Option<console::ConsolePump>,
}

impl Vm {
    pub(crate) fn new(main: Process, helpers: Vec<Process>) -> Vm {
        Vm {
            main,
            helpers,
            snapshot: None,
            console: None,
        }
    }

    /// The same VM, its console copied by `pump`.
    pub(crate) fn with_console(mut self, pump: console::ConsolePump) -> Vm {
        self.console = Some(pump);
        self
    }

    /// Copies the rest of the console (if a pump does) and stops copying.
    fn finish_console(&mut self) {
        if let Some(pump) = &mut self.console {
            pump.finish();
        }
    }

    /// The exit of the VM process, if it has ended (reaping it). Helpers
    /// keep running until [`Vm::kill`]: they may still hold guest bytes.
    pub fn try_wait(&mut self) -> io::Result<Option<ProcessExit>> {
        let exit = self.main.try_wait()?;
        if exit.is_some() {
            self.finish_console();
        }
        Ok(exit)
    }

    /// Waits up to `timeout` for the VM process to end.
    #[cfg(test)]
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ProcessExit>> {
        const STEP: Duration = Duration::from_millis(10);
        let start = Instant::now();
        loop {
            if let Some(exit) = self.try_wait()? {
                return Ok(Some(exit));
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                return Ok(None);
            }
            thread::sleep(STEP.min(timeout - elapsed));
        }
    }

    /// Kills the VM process and then its helpers, reaps them all, and
    /// returns how the VM process ended.
    pub fn kill(&mut self) -> io::Result<ProcessExit> {
        let exit = self.main.kill();
        self.finish_console();
        let mut helper_error = Ok(());
        for helper in &mut self.helpers {
            if let Err(e) = helper.kill() {
                helper_error = Err(e);
            }
        }
        let exit = exit?;
        helper_error.map(|()| exit)
    }

    /// The engine's processes, each with its name and pid (the VM process
    /// first).
    pub fn processes(&self) -> Vec<(&'static str, u32)> {
        std::iter::once(&self.main)
            .chain(&self.helpers)
            .map(|p| (p.name, p.child.id()))
            .collect()
    }

    /// What each helper still running is doing: its name and its threads
    /// as `/proc` shows them, for the report of a VM that never reached
    /// the host. A helper can stop serving while its process lives on (a
    /// thread that ended or waits for good); its threads say which.
    pub fn helper_threads(&mut self) -> Vec<(&'static str, Vec<ThreadState>)> {
        let mut report = Vec::new();
        for helper in &mut self.helpers {
            if matches!(helper.try_wait(), Ok(None)) {
                report.push((helper.name, threads_of(helper.child.id())));
            }
        }
        report
    }

    /// The log files of the engine's processes, each with the process's name.
    pub fn logs(&self) -> Vec<(&'static str, &Path)> {
        std::iter::once(&self.main)
            .chain(&self.helpers)
            .map(|p| (p.name, p.log.as_path()))
            .collect()
    }
}

/// One thread of a helper process, as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadState {
    /// Its name (`comm`).
    pub name: String,
    /// Its state letter (`R`, `S`, `D`, ...).
    pub state: char,
    /// The kernel function it waits in (`wchan`), if any.
    pub wchan: String,
}

impl fmt::Display for ThreadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}", self.name, self.state)?;
        if !self.wchan.is_empty() && self.wchan != "0" {
            write!(f, " {}", self.wchan)?;
        }
        f.write_str(")")
    }
}

/// Most threads of one process a report lists.
const MAX_THREADS: usize = 64;

/// The threads of process `pid` (at most [`MAX_THREADS`]), in thread id
/// order; empty if `/proc` cannot be read.
fn threads_of(pid: u32) -> Vec<ThreadState> {
    let task = PathBuf::from(format!("/proc/{pid}/task"));
    let Ok(entries) = std::fs::read_dir(&task) else {
        return Vec::new();
    };
    let mut tids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    tids.truncate(MAX_THREADS);
    let read = |tid: u32, file: &str| {
        std::fs::read(task.join(tid.to_string()).join(file))
            .map(|b| crate::text::sanitize(b[..b.len().min(256)].trim_ascii()))
            .unwrap_or_default()
    };
    tids.into_iter()
        .map(|tid| {
            // `stat` is `tid (comm) S ...`; comm may hold spaces and `)`.
            let stat = read(tid, "stat");
            let state = stat
                .rfind(')')
                .and_then(|end| stat[end + 1..].trim_start().chars().next())
                .unwrap_or('?');
            ThreadState {
                name: read(tid, "comm"),
                state,
                wchan: read(tid, "wchan"),
            }
        })
        .collect()
}

/// How many lines a failure report shows of a console or log.
pub const TAIL_LINES: usize = 15;
/// How much of the end of a file [`tail_lines`] reads.
const TAIL_BYTES: u64 = 16 * 1024;
/// A line longer than this is cut in a report.
const MAX_TAIL_LINE: usize = 512;

/// The last `n` lines of a file (read from its last few KiB, so bounded
/// however large the file), made safe for a terminal. Empty if unreadable.
pub fn tail_lines(path: &Path, n: usize) -> Vec<String> {
    let read = || -> io::Result<Vec<u8>> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
        let mut buf = Vec::new();
        file.take(TAIL_BYTES).read_to_end(&mut buf)?;
        Ok(buf)
    };
    let buf = read().unwrap_or_default();
    let mut lines: Vec<String> = buf
        .split(|&b| b == b'\n')
        .map(|line| {
            let line = &line[..line.len().min(MAX_TAIL_LINE)];
            crate::text::sanitize(line)
        })
        .filter(|line| !line.trim().is_empty())
        .collect();
    let skip = lines.len().saturating_sub(n);
    lines.drain(..skip);
    lines
}

/// `last lines of WHAT:` and the lines, indented; or `WHAT was empty`.
pub fn describe_tail(lines: &[String], what: &str) -> String {
    if lines.is_empty() {
        return format!("{what} was empty");
    }
    let mut text = format!("last lines of {what}:");
    for line in lines {
        text.push_str("\n    ");
        text.push_str(line);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn available(kvm: Result<(), KvmUnusable>, vmm: bool, qemu: bool) -> Available {
        Available {
            kvm,
            vmm: if vmm {
                Ok("/bin/airlock-vmm".into())
            } else {
                Err(paths::Error::VmmNotFound)
            },
            qemu: if qemu {
                Ok("/usr/bin/qemu-system-x86_64".into())
            } else {
                Err(paths::Error::QemuNotFound)
            },
            vhost_vsock: Ok("/cache/tools/bin/vhost-device-vsock".into()),
        }
    }

    fn name(r: Result<Selection, SelectError>) -> &'static str {
        r.expect("selected").engine.name()
    }

    #[test]
    fn explicit_choices() {
        assert_eq!(
            name(select(EngineChoice::Kvm, available(Ok(()), true, false))),
            "kvm"
        );
        assert_eq!(
            name(select(EngineChoice::Tcg, available(Ok(()), true, true))),
            "tcg"
        );
        let err = select(
            EngineChoice::Kvm,
            available(Err(KvmUnusable::Pvm), true, true),
        )
        .expect_err("kvm unusable");
        let msg = err.to_string();
        assert!(msg.contains("kvm_pvm"), "{msg}");
        assert!(msg.contains("--engine tcg"), "{msg}");
        let err = select(
            EngineChoice::Kvm,
            available(Err(KvmUnusable::PermissionDenied), true, true),
        )
        .expect_err("no permission");
        assert!(err.to_string().contains("kvm group"), "{err}");
        assert!(matches!(
            select(EngineChoice::Kvm, available(Ok(()), false, true)),
            Err(SelectError::Missing(paths::Error::VmmNotFound))
        ));
        let err = select(EngineChoice::Tcg, available(Ok(()), true, false)).expect_err("no qemu");
        assert!(err.to_string().contains("qemu-system-x86"), "{err}");
    }

    #[test]
    fn auto_prefers_kvm() {
        let s = select(EngineChoice::Auto, available(Ok(()), true, true)).expect("selected");
        assert_eq!(s.engine.name(), "kvm");
        assert!(s.warning.is_none());
    }

    #[test]
    fn auto_falls_back_to_tcg_with_a_warning() {
        let s = select(
            EngineChoice::Auto,
            available(Err(KvmUnusable::Pvm), true, true),
        )
        .expect("selected");
        assert_eq!(s.engine.name(), "tcg");
        assert_eq!(
            s.warning.as_deref(),
            Some("/dev/kvm is kvm_pvm (no hardware virtualization); using the tcg engine (slower)")
        );
        let s = select(EngineChoice::Auto, available(Ok(()), false, true)).expect("selected");
        assert_eq!(s.engine.name(), "tcg");
        assert!(s.warning.is_some());
    }

    #[test]
    fn auto_without_any_engine() {
        assert!(matches!(
            select(
                EngineChoice::Auto,
                available(Err(KvmUnusable::Missing), true, false)
            ),
            Err(SelectError::NoEngine { .. })
        ));
        assert!(matches!(
            select(EngineChoice::Auto, available(Ok(()), false, false)),
            Err(SelectError::Missing(paths::Error::VmmNotFound))
        ));
    }

    #[test]
    fn process_exit() {
        assert_eq!(
            ProcessExit::from(ExitStatus::from_raw(0)),
            ProcessExit::Code(0)
        );
        assert_eq!(
            ProcessExit::from(ExitStatus::from_raw(3 << 8)),
            ProcessExit::Code(3)
        );
        assert_eq!(
            ProcessExit::from(ExitStatus::from_raw(9)),
            ProcessExit::Signal(9)
        );
        assert!(ProcessExit::Code(0).success());
        assert!(!ProcessExit::Signal(9).success());
    }

    #[test]
    fn tcg_needs_vhost_device_vsock() {
        let without = |choice| {
            select(
                choice,
                Available {
                    vhost_vsock: Err(paths::Error::VhostVsockNotFound),
                    ..available(Err(KvmUnusable::Pvm), true, true)
                },
            )
        };
        let err = without(EngineChoice::Tcg).expect_err("no vhost-device-vsock");
        assert!(err.to_string().contains("scripts/build.sh"), "{err}");
        assert!(matches!(
            without(EngineChoice::Auto),
            Err(SelectError::NoEngine {
                tcg: paths::Error::VhostVsockNotFound,
                ..
            })
        ));
    }

    #[test]
    fn port_paths() {
        assert_eq!(
            port_path(Path::new("/run/x/vsock"), 1024),
            Path::new("/run/x/vsock_1024")
        );
    }

    fn spawn(dir: &Path, name: &'static str, script: &str) -> Process {
        Process::spawn(
            name,
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            &dir.join(format!("{name}.log")),
            &[],
        )
        .expect("spawn sh")
    }

    #[test]
    fn the_vm_process_inherits_only_the_pinned_descriptors() {
        let dir = paths::TestDir::new("vm-fds");
        let pinned = dir.path().join("pinned");
        let other = dir.path().join("other");
        std::fs::write(&pinned, "pinned bytes\n").expect("write");
        std::fs::write(&other, "other bytes\n").expect("write");
        let pinned = crate::pinned::Pinned::open(&pinned).expect("pin");
        let other = crate::pinned::Pinned::open(&other).expect("pin");
        let script = format!(
            "cat {}; test -e /proc/self/fd/{} && echo LEAKED; exit 0",
            pinned.fd_path().display(),
            other.fd()
        );
        let p = Process::spawn(
            "fds",
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            &dir.path().join("fds.log"),
            &[pinned.fd()],
        )
        .expect("spawn sh");
        let mut vm = Vm::new(p, Vec::new());
        assert_eq!(
            vm.wait_timeout(Duration::from_secs(10)).expect("wait"),
            Some(ProcessExit::Code(0))
        );
        assert_eq!(
            tail_lines(&dir.path().join("fds.log"), 5),
            ["pinned bytes"],
            "the pinned file is readable through its descriptor, nothing else leaks"
        );
    }

    #[test]
    fn vm_handle_waits_and_kills_every_process() {
        let dir = paths::TestDir::new("vm-handle");
        let mut vm = Vm::new(spawn(dir.path(), "main", "echo hi >&2; exit 3"), Vec::new());
        assert_eq!(
            vm.wait_timeout(Duration::from_secs(10)).expect("wait"),
            Some(ProcessExit::Code(3))
        );
        assert_eq!(tail_lines(&dir.path().join("main.log"), 5), ["hi"]);

        let mut vm = Vm::new(
            spawn(dir.path(), "sleeper", "exec sleep 30"),
            vec![spawn(dir.path(), "helper", "exec sleep 30")],
        );
        assert_eq!(
            vm.wait_timeout(Duration::from_millis(50)).expect("wait"),
            None
        );
        assert_eq!(vm.kill().expect("kill"), ProcessExit::Signal(libc::SIGKILL));
        assert_eq!(vm.helpers[0].exit, Some(ProcessExit::Signal(libc::SIGKILL)));
        // Killing again reports the same exit.
        assert_eq!(vm.kill().expect("kill"), ProcessExit::Signal(libc::SIGKILL));
        let names: Vec<_> = vm.logs().into_iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["sleeper", "helper"]);
        let processes = vm.processes();
        assert_eq!(processes.len(), 2);
        assert_eq!(processes[1].0, "helper");
        assert_ne!(processes[0].1, processes[1].1);
    }

    #[test]
    fn dropping_a_vm_reaps_its_helpers() {
        let dir = paths::TestDir::new("vm-drop");
        let helper = spawn(dir.path(), "helper", "exec sleep 30");
        let pid = helper.child.id();
        drop(Vm::new(
            spawn(dir.path(), "main", "exec sleep 30"),
            vec![helper],
        ));
        // Reaped: the pid no longer names our child.
        let pid = libc::pid_t::try_from(pid).expect("pid");
        // SAFETY: waitpid with WNOHANG on a pid only inspects our children;
        // no memory is passed (null status pointer is allowed).
        let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        assert_eq!(r, -1, "helper was not reaped");
    }

    #[test]
    fn helper_that_dies_reports_its_log() {
        let dir = paths::TestDir::new("helper-dies");
        let mut helper = spawn(dir.path(), "helper", "echo bad socket path >&2; exit 1");
        let err = helper
            .wait_ready(Duration::from_secs(10), || false)
            .expect_err("helper died");
        let text = err.to_string();
        assert!(text.contains("helper stopped (exit status 1)"), "{text}");
        assert!(text.contains("bad socket path"), "{text}");

        let mut slow = spawn(dir.path(), "slow", "exec sleep 30");
        assert!(!slow
            .wait_ready(Duration::from_millis(30), || false)
            .expect("still running"));
        assert!(slow
            .wait_ready(Duration::from_millis(30), || true)
            .expect("ready"));
    }

    #[test]
    fn engine_processes_do_not_inherit_secrets() {
        let dir = paths::TestDir::new("env");
        std::env::set_var("AIRLOCK_TEST_SECRET", "s3cr3t");
        let mut p = spawn(dir.path(), "env", "env");
        p.wait_ready(Duration::from_secs(10), || false)
            .expect_err("ends");
        let log = std::fs::read_to_string(dir.path().join("env.log")).expect("log");
        assert!(!log.contains("s3cr3t"), "{log}");
        assert!(log.contains("PATH="), "{log}");
    }

    #[test]
    fn threads_of_names_each_thread_with_its_state() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let waiter = thread::Builder::new()
            .name("al-probe".into())
            .spawn(move || {
                let _ = rx.recv();
            })
            .expect("spawn");
        // Until it blocks in recv().
        let mut probe = None;
        for _ in 0..200 {
            probe = threads_of(std::process::id())
                .into_iter()
                .find(|t| t.name == "al-probe" && t.state == 'S');
            if probe.is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let probe = probe.expect("the sleeping thread is listed");
        assert!(probe.to_string().starts_with("al-probe (S"), "{probe}");
        drop(tx);
        waiter.join().expect("join");
        assert!(!threads_of(std::process::id())
            .iter()
            .any(|t| t.name == "al-probe"));
        // A process that is gone has no threads to show.
        assert!(threads_of(u32::MAX).is_empty());
    }

    #[test]
    fn tails() {
        let dir = paths::TestDir::new("tail");
        let path = dir.path().join("log");
        let mut text = String::new();
        for i in 0..10_000 {
            text.push_str(&format!("line {i}\n"));
        }
        text.push_str("\x1b[31mred\n");
        std::fs::write(&path, text).expect("write");
        let tail = tail_lines(&path, 3);
        assert_eq!(tail, ["line 9998", "line 9999", "\\u{1b}[31mred"]);
        assert_eq!(
            describe_tail(&tail[..1], "the console"),
            "last lines of the console:\n    line 9998"
        );
        assert_eq!(describe_tail(&[], "the console"), "the console was empty");
        assert!(tail_lines(&dir.path().join("missing"), 3).is_empty());
    }
}
