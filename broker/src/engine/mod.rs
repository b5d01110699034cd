//! The launcher interface: one [`VmConfig`] in, one running [`Vm`] out.
//!
//! Two engines boot the same kernel and initrd:
//! - [`kvm::Kvm`]: our `airlock-vmm` on hardware KVM (the product);
//! - [`tcg::Tcg`]: QEMU system emulation, for hosts without usable KVM.
//!
//! Nothing outside this module knows which one runs: both take the same
//! config, write the guest console to the same file, and end the same way
//! (the VM process exits 0 when the guest reboots cleanly). The vsock Unix
//! socket, when it comes, is one more [`VmConfig`] field that both engines
//! expose identically (the VMM's `--vsock-uds`; QEMU's vhost-user device
//! served by `vhost-device-vsock`, a helper process [`Vm`] will own too).

pub mod kvm;
pub mod tcg;

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
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
    /// cpio archive the kernel unpacks as its root.
    pub initrd: PathBuf,
    pub mem_mib: u32,
    pub cpus: u8,
    /// File the serial console is written to (created or truncated by the engine).
    pub console_log: PathBuf,
    /// Words appended to the kernel command line.
    pub extra_cmdline: Vec<String>,
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
}

impl Engine {
    /// The engine's name as the user selects it.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Kvm(_) => "kvm",
            Engine::Tcg(_) => "tcg",
        }
    }

    /// The program and arguments that boot `config`.
    pub fn command_line(&self, config: &VmConfig) -> (&Path, Vec<OsString>) {
        match self {
            Engine::Kvm(kvm) => (&kvm.vmm, kvm.args(config)),
            Engine::Tcg(tcg) => (&tcg.qemu, tcg.args(config)),
        }
    }

    /// Starts the VM. The returned [`Vm`] kills it when dropped.
    pub fn spawn(&self, config: &VmConfig) -> Result<Vm, Error> {
        let (program, args) = self.command_line(config);
        Vm::spawn(program, &args).map_err(|source| Error::Spawn {
            program: program.to_path_buf(),
            source,
        })
    }
}

/// What the host offers each engine.
#[derive(Debug)]
pub struct Available {
    pub kvm: Result<(), KvmUnusable>,
    pub vmm: Result<PathBuf, paths::Error>,
    pub qemu: Result<PathBuf, paths::Error>,
}

impl Available {
    /// Looks at this host.
    pub fn gather() -> Available {
        Available {
            kvm: crate::host::kvm_usability(&crate::host::KvmFacts::gather()),
            vmm: paths::find_vmm(),
            qemu: paths::find_qemu(),
        }
    }
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
    #[error("no engine can run here: {kvm} ({fix}), and {qemu}", fix = .kvm.fix())]
    NoEngine {
        kvm: KvmUnusable,
        qemu: paths::Error,
    },
}

/// Picks the engine for `choice` from what the host offers.
pub fn select(choice: EngineChoice, available: Available) -> Result<Selection, SelectError> {
    let Available { kvm, vmm, qemu } = available;
    let kvm_engine = |vmm| Engine::Kvm(kvm::Kvm { vmm });
    let tcg_engine = |qemu| Engine::Tcg(tcg::Tcg { qemu });
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
            engine: tcg_engine(qemu.map_err(SelectError::Missing)?),
            reason: "requested".into(),
            warning: None,
        }),
        EngineChoice::Auto => match (kvm, vmm, qemu) {
            (Ok(()), Ok(vmm), _) => Ok(Selection {
                engine: kvm_engine(vmm),
                reason: "auto: hardware KVM is usable".into(),
                warning: None,
            }),
            (Ok(()), Err(missing), Ok(qemu)) => Ok(Selection {
                engine: tcg_engine(qemu),
                reason: "auto: airlock-vmm not found".into(),
                warning: Some(format!("{missing}; using the tcg engine (slower)")),
            }),
            (Ok(()), Err(missing), Err(_)) => Err(SelectError::Missing(missing)),
            (Err(why), _, Ok(qemu)) => Ok(Selection {
                engine: tcg_engine(qemu),
                reason: "auto: no usable hardware KVM".into(),
                warning: Some(format!("{why}; using the tcg engine (slower)")),
            }),
            (Err(kvm), _, Err(qemu)) => Err(SelectError::NoEngine { kvm, qemu }),
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

/// A running VM process. Its stdout and stderr are relayed to our stderr
/// (our stdout carries only the guest console). Dropping it kills and reaps
/// the process, so no VM outlives its handle; if airlock itself is killed,
/// the kernel kills the VM (`PR_SET_PDEATHSIG`).
#[derive(Debug)]
pub struct Vm {
    child: Child,
    relays: Vec<JoinHandle<()>>,
    exit: Option<ProcessExit>,
}

impl Vm {
    fn spawn(program: &Path, args: &[OsString]) -> io::Result<Vm> {
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches only us, and
            // we stop the VM in order (kill, reap, clean up).
            .process_group(0);
        let parent = libc::pid_t::try_from(std::process::id()).ok();
        // SAFETY: the closure runs in the forked child before exec, where only
        // async-signal-safe calls are allowed: prctl(2) and getppid(2) are
        // plain system calls, and the errors are built from raw errno values
        // without allocating. PR_SET_PDEATHSIG fires when the forking thread
        // exits; we spawn from the main thread, which lives until airlock exits.
        unsafe {
            command.pre_exec(move || {
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
        // From here on the VM is owned by a `Vm`, whose drop kills it if a
        // later step fails.
        let mut vm = Vm {
            child: command.spawn()?,
            relays: Vec::new(),
            exit: None,
        };
        if let Some(out) = vm.child.stdout.take() {
            vm.relays.push(relay::<ChildStdout>(out)?);
        }
        if let Some(err) = vm.child.stderr.take() {
            vm.relays.push(relay::<ChildStderr>(err)?);
        }
        Ok(vm)
    }

    /// The exit, if the VM process has ended (reaping it).
    pub fn try_wait(&mut self) -> io::Result<Option<ProcessExit>> {
        if self.exit.is_none() {
            if let Some(status) = self.child.try_wait()? {
                self.exit = Some(status.into());
                self.join_relays();
            }
        }
        Ok(self.exit)
    }

    /// Waits up to `timeout` for the VM process to end.
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

    /// Kills the VM process (SIGKILL: the VM is disposable) and reaps it.
    pub fn kill(&mut self) -> io::Result<ProcessExit> {
        if let Some(exit) = self.exit {
            return Ok(exit);
        }
        // Fails only when the process already ended; wait() then reaps it.
        let _ = self.child.kill();
        let exit = ProcessExit::from(self.child.wait()?);
        self.exit = Some(exit);
        self.join_relays();
        Ok(exit)
    }

    fn join_relays(&mut self) {
        for relay in self.relays.drain(..) {
            // A relay thread only copies bytes; if it panicked there is nothing to recover.
            let _ = relay.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Copies a child's output pipe to our stderr until the child closes it.
fn relay<R: io::Read + Send + 'static>(mut pipe: R) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("vm-output".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let _ = io::stderr().write_all(&buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        })
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
    fn vm_handle_waits_and_kills() {
        let mut vm =
            Vm::spawn(Path::new("/bin/sh"), &["-c".into(), "exit 3".into()]).expect("spawn sh");
        assert_eq!(
            vm.wait_timeout(Duration::from_secs(10)).expect("wait"),
            Some(ProcessExit::Code(3))
        );

        let mut vm = Vm::spawn(Path::new("/bin/sleep"), &["30".into()]).expect("spawn sleep");
        assert_eq!(
            vm.wait_timeout(Duration::from_millis(50)).expect("wait"),
            None
        );
        assert_eq!(vm.kill().expect("kill"), ProcessExit::Signal(libc::SIGKILL));
        // Killing again reports the same exit.
        assert_eq!(vm.kill().expect("kill"), ProcessExit::Signal(libc::SIGKILL));
    }
}
