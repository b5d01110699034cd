//! The `kvm` engine: our `airlock-vmm` on hardware KVM.
//!
//! The VMM builds the base kernel command line itself and appends
//! `--cmdline`. It serves the guest's vsock itself, as hybrid-vsock Unix
//! sockets at `--vsock-uds` (it moves bytes only; it knows no protocol). It
//! exits 0 when the guest reboots or stops cleanly, and non-zero with a
//! message on stderr otherwise; on stderr it also reports
//! `airlock-vmm: boot-timer: guest init reached after <ms> ms`. Its stdout
//! and stderr go to [`VM_LOG`] in the run directory.

use std::ffi::OsString;
use std::path::PathBuf;

use super::{snapshot, Error, Process, Vm, VmConfig, VM_LOG};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kvm {
    /// The `airlock-vmm` binary.
    pub vmm: PathBuf,
}

impl Kvm {
    /// `--kernel PATH [--initrd PATH] [--disk ro:PATH|rw:PATH]... --mem MIB
    /// --cpus N --console PATH --vsock-uds PATH --vsock-cid CID [--cmdline EXTRA]`.
    pub fn args(&self, config: &VmConfig) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--kernel".into(), config.kernel.clone().into()];
        if let Some(initrd) = &config.initrd {
            args.push("--initrd".into());
            args.push(initrd.clone().into());
        }
        for disk in &config.disks {
            let mut spec = OsString::from(if disk.read_only { "ro:" } else { "rw:" });
            spec.push(&disk.path);
            args.push("--disk".into());
            args.push(spec);
        }
        args.extend::<[OsString; 10]>([
            "--mem".into(),
            config.mem_mib.to_string().into(),
            "--cpus".into(),
            config.cpus.to_string().into(),
            "--console".into(),
            config.console_log.clone().into(),
            "--vsock-uds".into(),
            config.vsock_uds.clone().into(),
            "--vsock-cid".into(),
            config.guest_cid.to_string().into(),
        ]);
        if !config.extra_cmdline.is_empty() {
            args.push("--cmdline".into());
            args.push(config.extra_cmdline.join(" ").into());
        }
        if let Some(path) = &config.dump_memory {
            args.push("--dump-memory".into());
            args.push(path.clone().into());
        }
        args
    }

    /// Starts the VMM: woken from the snapshot cache when the run has a
    /// plan (said on stderr and cold otherwise), else booted.
    pub fn spawn(&self, config: &VmConfig) -> Result<Vm, Error> {
        if let Some(plan) = &config.snapshot {
            match self.spawn_restored(config, plan) {
                Ok(vm) => return Ok(vm),
                Err(Restore::Fallback(snapshot::Fallback(why))) => {
                    eprintln!("airlock: snapshot: {why}; booting without it");
                }
                Err(Restore::Failed(e)) => return Err(e),
            }
        }
        self.share(config)?;
        let vmm = self.spawn_vmm(config, [], &config.run_dir.join(VM_LOG))?;
        Ok(Vm::new(vmm, Vec::new()))
    }

    /// Spawns the VMM for `config` with `extra` arguments after its own,
    /// its stdout and stderr to `log`.
    fn spawn_vmm<const N: usize>(
        &self,
        config: &VmConfig,
        extra: [OsString; N],
        log: &std::path::Path,
    ) -> Result<Process, Error> {
        let mut args = self.args(config);
        args.extend(extra);
        Process::spawn("airlock-vmm", &self.vmm, &args, log, &config.inherited_fds)
    }

    fn share(&self, config: &VmConfig) -> Result<(), Error> {
        share_sockets_with_jail(config).map_err(|e| Error::Spawn {
            program: self.vmm.clone(),
            source: std::io::Error::new(
                e.kind(),
                format!("cannot give its jail access to the run's sockets: {e}"),
            ),
        })
    }

    /// Makes the plan's snapshot if needed, then wakes the run's VM from it.
    fn spawn_restored(&self, config: &VmConfig, plan: &snapshot::Plan) -> Result<Vm, Restore> {
        // The snapshot's own VMs: the boot that makes it and the wake that
        // records its working set, each with its own console and sockets.
        let aside = |console_log, vsock_uds| VmConfig {
            console_log,
            vsock_uds,
            snapshot: None,
            dump_memory: None,
            ..config.clone()
        };
        let make_log = config.run_dir.join("snapshot-vm.log");
        let boot = |dir: &std::path::Path| {
            let mut making = aside(dir.join("console.log"), config.run_dir.join("snapvsock"));
            making
                .extra_cmdline
                .push(snapshot::SNAPSHOT_CMDLINE.to_owned());
            making.extra_cmdline.extend(plan.boot_words.iter().cloned());
            self.spawn_vmm(&making, ["--snapshot-to".into(), dir.into()], &make_log)
        };
        let record_log = config.run_dir.join("snapshot-record.log");
        let record = |dir: &std::path::Path| {
            let waking = aside(
                config.run_dir.join("snapshot-record-console.log"),
                config.run_dir.join("recvsock"),
            );
            let extra = [
                "--restore".into(),
                dir.into(),
                "--record-working-set".into(),
                dir.join(snapshot::WORKING_SET_FILE).into(),
            ];
            self.spawn_vmm(&waking, extra, &record_log)
        };
        self.share(config).map_err(Restore::Failed)?;
        let made = snapshot::ensure(plan, &boot, &record, &make_log, &record_log)
            .map_err(Restore::Fallback)?;
        let state_sha256 = snapshot::state_digest(plan)
            .map_err(|e| Restore::Fallback(snapshot::Fallback(format!("cannot read it: {e}"))))?;
        snapshot::serve_wake(&config.vsock_uds).map_err(|e| {
            Restore::Fallback(snapshot::Fallback(format!(
                "cannot serve its wake port: {e}"
            )))
        })?;
        let log = config.run_dir.join(VM_LOG);
        let mut vmm = self
            .spawn_vmm(config, ["--restore".into(), plan.dir.clone().into()], &log)
            .map_err(Restore::Failed)?;
        snapshot::await_restore(plan, &mut vmm, &log).map_err(Restore::Fallback)?;
        let mut vm = Vm::new(vmm, Vec::new());
        vm.snapshot = Some(snapshot::Used {
            key: plan.key.clone(),
            state_sha256,
            made,
        });
        Ok(vm)
    }
}

/// Why a restore did not give a VM.
enum Restore {
    /// Boot cold instead (said on stderr).
    Fallback(snapshot::Fallback),
    /// The engine itself failed.
    Failed(Error),
}

/// The uid and gid `airlock-vmm` jails itself as when started by root (its
/// `--jail-uid` default).
pub const JAIL_ID: u32 = 65534;

/// Started by root, the VMM drops to [`JAIL_ID`] inside its jail but must
/// still connect to the run's `<vsock_uds>_<port>` sockets: the socket
/// directory becomes searchable (not readable, not writable) by the jail
/// group, and each socket already bound there connectable by it. Sockets
/// bound later need [`share_socket`]. Not root: the VMM stays our user.
fn share_sockets_with_jail(config: &VmConfig) -> std::io::Result<()> {
    use std::os::unix::fs::{chown, FileTypeExt, PermissionsExt};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let Some(dir) = config.vsock_uds.parent() else {
        return Ok(());
    };
    chown(dir, None, Some(JAIL_ID))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_socket() {
            share_socket(&entry.path())?;
        }
    }
    Ok(())
}

/// Lets the jailed VMM connect to `socket` (when we are root).
pub fn share_socket(socket: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{chown, PermissionsExt};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    chown(socket, None, Some(JAIL_ID))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initramfs.cpio".into()),
            disks: Vec::new(),
            mem_mib: 512,
            cpus: 2,
            console_log: "/tmp/run/console.log".into(),
            extra_cmdline: Vec::new(),
            run_dir: "/tmp/run".into(),
            vsock_uds: "/tmp/run/vsock".into(),
            guest_cid: 3,
            dump_memory: None,
            inherited_fds: Vec::new(),
            snapshot: None,
        }
    }

    #[test]
    fn argv() {
        let kvm = Kvm {
            vmm: "/bin/airlock-vmm".into(),
        };
        let expected: Vec<OsString> = [
            "--kernel",
            "/k/vmlinux",
            "--initrd",
            "/k/initramfs.cpio",
            "--mem",
            "512",
            "--cpus",
            "2",
            "--console",
            "/tmp/run/console.log",
            "--vsock-uds",
            "/tmp/run/vsock",
            "--vsock-cid",
            "3",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        assert_eq!(kvm.args(&config()), expected);

        let with_extra = VmConfig {
            extra_cmdline: vec!["airlock.debug=1".into(), "foo=bar".into()],
            ..config()
        };
        let args = kvm.args(&with_extra);
        assert_eq!(
            args[args.len() - 2..],
            [
                OsString::from("--cmdline"),
                "airlock.debug=1 foo=bar".into()
            ]
        );
    }

    #[test]
    fn image_mode_has_a_disk_and_no_initrd() {
        let kvm = Kvm {
            vmm: "/bin/airlock-vmm".into(),
        };
        let image = VmConfig {
            initrd: None,
            disks: vec![super::super::Disk {
                path: "/b/rootfs.img".into(),
                read_only: true,
            }],
            ..config()
        };
        let args = kvm.args(&image);
        assert!(!args.iter().any(|a| a == "--initrd"));
        assert_eq!(
            args[..4],
            [
                OsString::from("--kernel"),
                "/k/vmlinux".into(),
                "--disk".into(),
                "ro:/b/rootfs.img".into()
            ]
        );
    }
}
