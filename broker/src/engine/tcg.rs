//! The `tcg` engine: QEMU system emulation (`-accel tcg -M microvm`), for
//! hosts without usable hardware KVM. Slower; the same isolation model (the
//! guest still runs its own kernel).
//!
//! Guest memory comes from a shared memfd backend, which the vhost-user
//! vsock device will need. `-no-reboot` turns the guest's reboot (how it
//! ends: there is no ACPI, so no power-off) into QEMU exiting 0.

use std::ffi::OsString;
use std::path::PathBuf;

use super::{VmConfig, BASE_CMDLINE};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tcg {
    /// The `qemu-system-x86_64` binary.
    pub qemu: PathBuf,
}

impl Tcg {
    /// QEMU's arguments for `config`.
    pub fn args(&self, config: &VmConfig) -> Vec<OsString> {
        let mem = config.mem_mib;
        let mut serial = OsString::from("file:");
        serial.push(&config.console_log);
        let mut cmdline = String::from(BASE_CMDLINE);
        for word in &config.extra_cmdline {
            cmdline.push(' ');
            cmdline.push_str(word);
        }
        let args: Vec<OsString> = vec![
            "-M".into(),
            "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off,memory-backend=mem".into(),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on").into(),
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
            "-serial".into(),
            serial,
            "-kernel".into(),
            config.kernel.clone().into(),
            "-initrd".into(),
            config.initrd.clone().into(),
            "-append".into(),
            cmdline.into(),
            "-no-reboot".into(),
        ];
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: "/k/vmlinux".into(),
            initrd: "/k/initramfs.cpio".into(),
            mem_mib: 512,
            cpus: 2,
            console_log: "/tmp/run/console.log".into(),
            extra_cmdline: Vec::new(),
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
        let tcg = Tcg {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
        };
        let args = tcg.args(&config());
        assert_eq!(value(&args, "-m"), "512");
        assert_eq!(value(&args, "-smp"), "2");
        assert_eq!(value(&args, "-kernel"), "/k/vmlinux");
        assert_eq!(value(&args, "-initrd"), "/k/initramfs.cpio");
        assert_eq!(value(&args, "-serial"), "file:/tmp/run/console.log");
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
        assert_eq!(args.last(), Some(&OsString::from("-no-reboot")));
        assert!(args.iter().any(|a| a == "-nodefaults"));
    }

    #[test]
    fn extra_cmdline_is_appended() {
        let tcg = Tcg {
            qemu: "qemu".into(),
        };
        let config = VmConfig {
            extra_cmdline: vec!["a=1".into(), "b".into()],
            ..config()
        };
        assert_eq!(
            value(&tcg.args(&config), "-append"),
            "console=ttyS0 reboot=k panic=-1 quiet a=1 b"
        );
    }
}
