//! The `tcg` engine: QEMU system emulation (`-accel tcg -M microvm`), for
//! hosts without usable hardware KVM. Slower; the same isolation model (the
//! guest still runs its own kernel).
//!
//! The guest's vsock device is QEMU's `vhost-user-vsock-device`, served by a
//! `vhost-device-vsock` helper process that exposes the hybrid-vsock Unix
//! sockets at [`VmConfig::vsock_uds`]. Order: start the helper, wait for its
//! vhost-user socket, start QEMU (which connects to it at once). Guest
//! memory comes from a shared memfd backend, which vhost-user needs: the
//! helper maps it. `-no-reboot` turns the guest's reboot (how it ends: there
//! is no ACPI, so no power-off) into QEMU exiting 0.
//!
//! Two defects of vhost-device-vsock 0.3.0 (docs/FACTS.md) shape the guest side,
//! not this file: a guest write above 32 KiB stalls the connection, and a
//! guest `shutdown(SHUT_WR)` never reaches the host. A third, rare one (the
//! device never answers the guest at all) makes the run boot again
//! (`crate::run`); [`Vm::helper_threads`] and [`vhost_worker_note`] say
//! what the helper was doing.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use super::{Error, Process, Vm, VmConfig, BASE_CMDLINE, VM_LOG};

/// The vhost-user socket QEMU connects to, in the run directory. No longer
/// than the control socket's name (`vsock_1024`), whose path length the
/// caller checks against the Unix socket limit.
pub const VHOST_SOCKET: &str = "vhost.sock";
/// The helper's log, in the run directory.
pub const VHOST_LOG: &str = "vhost-device-vsock.log";
/// The helper's name in reports and `vm.start`.
pub const VHOST_NAME: &str = "vhost-device-vsock";
/// The thread of vhost-device-vsock that serves the device's queues
/// (vhost-user-backend's worker). When the device's event handler returns
/// an error, vhost-user-backend ends this thread and says nothing; the
/// process lives on and the guest's vsock never answers again.
pub const VHOST_WORKER: &str = "vring_worker";

/// What a report says of a vhost-device-vsock whose threads are `threads`
/// (read while it still ran): whether its queue worker is gone.
pub fn vhost_worker_note(threads: &[super::ThreadState]) -> Option<&'static str> {
    (!threads.is_empty() && !threads.iter().any(|t| t.name == VHOST_WORKER)).then_some(
        "its queue worker thread (vring_worker) is gone: it stopped on an error it \
         does not report, so the guest's vsock could not answer",
    )
}

/// The console FIFOs' base name in the run directory (QEMU opens `.in` and
/// `.out`).
const CONSOLE_PIPE: &str = "console";
/// How long the helper may take to create its socket (it takes milliseconds).
const VHOST_READY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tcg {
    /// The `qemu-system-x86_64` binary.
    pub qemu: PathBuf,
    /// The `vhost-device-vsock` binary.
    pub vhost_vsock: PathBuf,
}

impl Tcg {
    /// QEMU's arguments for `config`.
    pub fn args(&self, config: &VmConfig) -> Vec<OsString> {
        let mem = config.mem_mib;
        // The console goes through FIFOs (`console.in`, `console.out` in
        // the run directory) to a capped copy (see `console`).
        let mut serial = OsString::from("pipe,id=con0,path=");
        serial.push(qemu_escape(&config.run_dir.join(CONSOLE_PIPE)));
        let mut chardev = OsString::from("socket,id=vsock0,path=");
        chardev.push(config.run_dir.join(VHOST_SOCKET));
        let mut cmdline = String::from(BASE_CMDLINE);
        for word in &config.extra_cmdline {
            cmdline.push(' ');
            cmdline.push_str(word);
        }
        // Guest RAM: a shared memfd; for --debug-dump-guest-memory a shared
        // file at that path instead, which QEMU leaves behind when it exits.
        let backend = match &config.dump_memory {
            None => OsString::from(format!("memory-backend-memfd,id=mem,size={mem}M,share=on")),
            Some(path) => {
                let mut b = OsString::from(format!(
                    "memory-backend-file,id=mem,size={mem}M,share=on,mem-path="
                ));
                b.push(qemu_escape(path));
                b
            }
        };
        let mut args: Vec<OsString> = vec![
            "-M".into(),
            "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off,memory-backend=mem".into(),
            "-object".into(),
            backend,
            "-accel".into(),
            "tcg".into(),
            "-cpu".into(),
            "max".into(),
            "-m".into(),
            mem.to_string().into(),
            "-smp".into(),
            config.cpus.to_string().into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-chardev".into(),
            serial,
            "-serial".into(),
            "chardev:con0".into(),
            "-chardev".into(),
            chardev,
            "-device".into(),
            "vhost-user-vsock-device,chardev=vsock0".into(),
            // The guest stops with `reboot=k`: without a keyboard controller
            // it polls a missing one for about a second before resetting.
            "-device".into(),
            "i8042".into(),
            "-kernel".into(),
            config.kernel.clone().into(),
        ];
        if let Some(initrd) = &config.initrd {
            args.push("-initrd".into());
            args.push(initrd.clone().into());
        }
        // microvm has virtio-mmio transports only: a virtio-blk-device on
        // each. A comma in the path is doubled, so it cannot add options.
        for (i, disk) in config.disks.iter().enumerate() {
            let mut drive = OsString::from(format!(
                "if=none,format=raw,id=d{i},readonly={},file=",
                if disk.read_only { "on" } else { "off" }
            ));
            drive.push(qemu_escape(&disk.path));
            args.push("-drive".into());
            args.push(drive);
            args.push("-device".into());
            args.push(format!("virtio-blk-device,drive=d{i}").into());
        }
        args.extend(["-append".into(), cmdline.into(), "-no-reboot".into()]);
        args
    }

    /// vhost-device-vsock's arguments for `config`. Separate flags rather
    /// than `--vm key=value,...`, whose comma-separated form would break on
    /// a path holding a comma.
    pub fn vhost_args(&self, config: &VmConfig) -> Vec<OsString> {
        vec![
            "--guest-cid".into(),
            config.guest_cid.to_string().into(),
            "--socket".into(),
            config.run_dir.join(VHOST_SOCKET).into(),
            "--uds-path".into(),
            config.vsock_uds.clone().into(),
        ]
    }

    /// Starts vhost-device-vsock, waits for its socket, then starts QEMU.
    ///
    /// The run directory may hold what an earlier boot of the same run
    /// left (a second boot when the guest could not reach the host): its
    /// vhost-user socket, which would look ready before the new helper
    /// listens, and the console FIFOs; they are removed first.
    pub fn spawn(&self, config: &VmConfig) -> Result<Vm, Error> {
        let socket = config.run_dir.join(VHOST_SOCKET);
        let pipe = config.run_dir.join(CONSOLE_PIPE);
        let pipe_in = pipe.with_extension("in");
        let pipe_out = pipe.with_extension("out");
        for stale in [&socket, &pipe_in, &pipe_out] {
            match std::fs::remove_file(stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::Stale {
                        path: stale.clone(),
                        source: e,
                    })
                }
                _ => {}
            }
        }
        let mut helper = Process::spawn(
            VHOST_NAME,
            &self.vhost_vsock,
            &self.vhost_args(config),
            &config.run_dir.join(VHOST_LOG),
            &[],
        )?;
        // On any error below, dropping `helper` kills and reaps it.
        if !helper.wait_ready(VHOST_READY, || socket.exists())? {
            return Err(Error::HelperNotReady {
                name: VHOST_NAME,
                socket,
                waited: VHOST_READY,
            });
        }
        let fifo_error = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| Error::Log { path, source }
        };
        for fifo in [&pipe_in, &pipe_out] {
            super::console::mkfifo(fifo).map_err(fifo_error(fifo))?;
        }
        let pump = super::console::ConsolePump::start(
            &pipe_out,
            &config.console_log,
            super::console::CONSOLE_CAP,
        )
        .map_err(fifo_error(&config.console_log))?;
        let qemu = Process::spawn(
            "qemu",
            &self.qemu,
            &self.args(config),
            &config.run_dir.join(VM_LOG),
            &config.inherited_fds,
        )?;
        Ok(Vm::new(qemu, vec![helper]).with_console(pump))
    }
}

/// A QEMU option value: every `,` doubled, as QEMU's option parser wants.
fn qemu_escape(path: &std::path::Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::with_capacity(path.as_os_str().len());
    for &b in path.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helper_without_its_queue_worker_is_called_out() {
        let thread = |name: &str| super::super::ThreadState {
            name: name.into(),
            state: 'S',
            wchan: "do_epoll_wait".into(),
        };
        let whole = [thread("vhost-device-vs"), thread(VHOST_WORKER)];
        assert_eq!(vhost_worker_note(&whole), None);
        let note = vhost_worker_note(&whole[..1]).expect("a note");
        assert!(note.contains("vring_worker) is gone"), "{note}");
        // Nothing read (the helper had ended): nothing claimed.
        assert_eq!(vhost_worker_note(&[]), None);
    }

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
            snapshot: None,
            inherited_fds: Vec::new(),
        }
    }

    fn tcg() -> Tcg {
        Tcg {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            vhost_vsock: "/c/vhost-device-vsock".into(),
        }
    }

    /// The value following `flag` in `args`.
    fn value<'a>(args: &'a [OsString], flag: &str) -> &'a str {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} missing from {args:?}"));
        args[i + 1].to_str().expect("utf-8")
    }

    #[test]
    fn argv() {
        let args = tcg().args(&config());
        assert_eq!(value(&args, "-m"), "512");
        assert_eq!(value(&args, "-smp"), "2");
        assert_eq!(value(&args, "-kernel"), "/k/vmlinux");
        assert_eq!(value(&args, "-initrd"), "/k/initramfs.cpio");
        assert_eq!(value(&args, "-serial"), "chardev:con0");
        assert!(args
            .iter()
            .any(|a| a.to_str() == Some("pipe,id=con0,path=/tmp/run/console")));
        assert_eq!(value(&args, "-accel"), "tcg");
        assert_eq!(
            value(&args, "-object"),
            "memory-backend-memfd,id=mem,size=512M,share=on"
        );
        assert!(value(&args, "-M").starts_with("microvm,"));
        assert!(value(&args, "-M").ends_with(",memory-backend=mem"));
        assert_eq!(
            value(&args, "-append"),
            "console=ttyS0 reboot=k panic=-1 quiet"
        );
        assert!(args
            .iter()
            .any(|a| a.to_str() == Some("socket,id=vsock0,path=/tmp/run/vhost.sock")));
        assert_eq!(
            value(&args, "-device"),
            "vhost-user-vsock-device,chardev=vsock0"
        );
        assert_eq!(args.last(), Some(&OsString::from("-no-reboot")));
        assert!(args.iter().any(|a| a == "-nodefaults"));
        assert!(args.iter().any(|a| a == "i8042"), "reset path for reboot=k");
    }

    #[test]
    fn image_mode_attaches_the_disk_read_only() {
        let config = VmConfig {
            initrd: None,
            disks: vec![super::super::Disk {
                path: "/b/a,b.img".into(),
                read_only: true,
            }],
            ..config()
        };
        let args = tcg().args(&config);
        assert!(!args.iter().any(|a| a == "-initrd"));
        assert_eq!(
            value(&args, "-drive"),
            "if=none,format=raw,id=d0,readonly=on,file=/b/a,,b.img"
        );
        let devices: Vec<&OsString> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(flag, _)| *flag == "-device")
            .map(|(_, v)| v)
            .collect();
        assert!(devices.iter().any(|d| *d == "virtio-blk-device,drive=d0"));
    }

    #[test]
    fn a_memory_dump_backs_the_ram_with_that_file() {
        let config = VmConfig {
            dump_memory: Some("/d/ram,1".into()),
            snapshot: None,
            ..config()
        };
        assert_eq!(
            value(&tcg().args(&config), "-object"),
            "memory-backend-file,id=mem,size=512M,share=on,mem-path=/d/ram,,1"
        );
    }

    #[test]
    fn vhost_argv() {
        let config = VmConfig {
            guest_cid: 7,
            ..config()
        };
        let expected: Vec<OsString> = [
            "--guest-cid",
            "7",
            "--socket",
            "/tmp/run/vhost.sock",
            "--uds-path",
            "/tmp/run/vsock",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        assert_eq!(tcg().vhost_args(&config), expected);
    }

    #[test]
    fn extra_cmdline_is_appended() {
        let config = VmConfig {
            extra_cmdline: vec!["a=1".into(), "b".into()],
            ..config()
        };
        assert_eq!(
            value(&tcg().args(&config), "-append"),
            "console=ttyS0 reboot=k panic=-1 quiet a=1 b"
        );
    }

    #[test]
    fn a_missing_helper_binary_is_a_spawn_error() {
        let dir = crate::paths::TestDir::new("tcg-spawn");
        let config = VmConfig {
            run_dir: dir.path().to_path_buf(),
            vsock_uds: dir.path().join("vsock"),
            ..config()
        };
        let tcg = Tcg {
            vhost_vsock: dir.path().join("no-such-binary"),
            ..tcg()
        };
        assert!(matches!(tcg.spawn(&config), Err(Error::Spawn { .. })));
    }
}
