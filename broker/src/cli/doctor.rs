//! `airlock doctor`: can this host run sandboxes, and if not, what to fix.
//!
//! [`DoctorFacts::gather`] observes the host; [`checks`] turns the facts
//! into report lines and a verdict without touching the host.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cli::DoctorArgs;
use crate::engine::{self, Available, EngineChoice};
use crate::exit::Exit;
use crate::host::{self, KvmDevice, KvmFacts};
use crate::paths::{self, ImagePaths};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub status: Status,
    pub what: String,
    /// How to fix it, when `what` does not say it already.
    pub fix: Option<String>,
}

impl Check {
    fn ok(what: impl Into<String>) -> Check {
        Check {
            status: Status::Ok,
            what: what.into(),
            fix: None,
        }
    }

    /// A problem whose message already says how to fix it (in parentheses).
    fn says(status: Status, what: String) -> Check {
        Check {
            status,
            what,
            fix: None,
        }
    }

    fn problem(status: Status, what: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            status,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match self.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        write!(f, "{status}  {}", self.what)?;
        if let Some(fix) = &self.fix {
            write!(f, "; fix: {fix}")?;
        }
        Ok(())
    }
}

/// Everything the doctor looks at.
#[derive(Debug)]
pub struct DoctorFacts {
    pub kvm: KvmFacts,
    pub vmm: Result<PathBuf, paths::Error>,
    pub qemu: Result<PathBuf, paths::Error>,
    /// First line of `qemu-system-x86_64 --version`.
    pub qemu_version: Option<String>,
    /// The tcg engine's vsock backend.
    pub vhost_vsock: Result<PathBuf, paths::Error>,
    /// First line of `vhost-device-vsock --version`.
    pub vhost_vsock_version: Option<String>,
    pub image: ImagePaths,
    pub kernel: Result<(), paths::Error>,
    /// The check of the initrd, or of the root image in image mode.
    pub initrd: Result<(), paths::Error>,
}

impl DoctorFacts {
    pub fn gather(args: &DoctorArgs) -> DoctorFacts {
        let image = ImagePaths::from_env(
            args.image.kernel.clone(),
            args.image.initrd.clone(),
            args.image.image_root.clone(),
        );
        let qemu = paths::find_qemu();
        let qemu_version = qemu.as_ref().ok().and_then(|q| version_line(q));
        let vhost_vsock = paths::find_vhost_vsock();
        let vhost_vsock_version = vhost_vsock.as_ref().ok().and_then(|v| version_line(v));
        DoctorFacts {
            kvm: KvmFacts::gather(),
            vmm: paths::find_vmm(),
            qemu,
            qemu_version,
            vhost_vsock,
            vhost_vsock_version,
            kernel: paths::check_kernel(&image.kernel),
            initrd: match &image.root {
                Some(root) => paths::check_root(root),
                None => paths::check_initrd(&image.initrd),
            },
            image,
        }
    }
}

/// The first line `program --version` prints, if it answers.
fn version_line(program: &Path) -> Option<String> {
    let out = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_owned)
}

/// The report lines, and whether at least one engine can run a sandbox.
pub fn checks(facts: DoctorFacts) -> (Vec<Check>, bool) {
    let mut lines = Vec::new();
    let kvm = host::kvm_usability(&facts.kvm);

    // The KVM facts, one by one. Each only limits the kvm engine: warn.
    match &facts.kvm.device {
        KvmDevice::Missing => lines.push(Check::problem(
            Status::Warn,
            "/dev/kvm: missing",
            host::KvmUnusable::Missing.fix(),
        )),
        KvmDevice::PermissionDenied => lines.push(Check::problem(
            Status::Warn,
            "/dev/kvm: present, but no permission to open it read-write",
            host::KvmUnusable::PermissionDenied.fix(),
        )),
        KvmDevice::OpenFailed(e) => lines.push(Check::problem(
            Status::Warn,
            format!("/dev/kvm: present, but opening it failed: {e}"),
            host::KvmUnusable::OpenFailed(e.clone()).fix(),
        )),
        KvmDevice::Opened { api_version } => {
            lines.push(Check::ok("/dev/kvm: present, opens read-write"));
            lines.push(match api_version {
                Ok(v) if *v == host::KVM_API_VERSION => Check::ok(format!("KVM API version {v}")),
                Ok(v) => Check::problem(
                    Status::Warn,
                    format!("KVM API version {v}, not {}", host::KVM_API_VERSION),
                    host::KvmUnusable::ApiVersion(*v).fix(),
                ),
                Err(e) => Check::problem(
                    Status::Warn,
                    format!("KVM_GET_API_VERSION failed: {e}"),
                    host::KvmUnusable::ApiQueryFailed(e.clone()).fix(),
                ),
            });
        }
    }
    lines.push(if facts.kvm.pvm_loaded {
        Check::problem(
            Status::Warn,
            "KVM module: kvm_pvm, not hardware KVM (guest userspace cannot make system calls under it)",
            host::KvmUnusable::Pvm.fix(),
        )
    } else {
        Check::ok("KVM module: not kvm_pvm")
    });
    lines.push(if facts.kvm.cpu_virt_flag {
        Check::ok("CPU: hardware virtualization (svm or vmx flag)")
    } else {
        Check::problem(
            Status::Warn,
            "CPU: no svm or vmx flag (no hardware virtualization)",
            host::KvmUnusable::NoCpuFlag.fix(),
        )
    });

    // The engines' binaries.
    lines.push(match &facts.vmm {
        Ok(path) => Check::ok(format!("airlock-vmm: {}", path.display())),
        Err(e) => Check::says(Status::Warn, format!("airlock-vmm: {e}")),
    });
    lines.push(match (&facts.qemu, &facts.qemu_version) {
        (Ok(path), Some(version)) => Check::ok(format!("qemu: {} ({version})", path.display())),
        (Ok(path), None) => Check::problem(
            Status::Warn,
            format!("qemu: {} does not answer --version", path.display()),
            "reinstall Debian package qemu-system-x86",
        ),
        (Err(e), _) => Check::says(Status::Warn, format!("qemu: {e}")),
    });
    lines.push(match (&facts.vhost_vsock, &facts.vhost_vsock_version) {
        (Ok(path), Some(version)) => Check::ok(format!(
            "{}: {} ({version})",
            paths::VHOST_VSOCK_BINARY,
            path.display()
        )),
        (Ok(path), None) => Check::problem(
            Status::Warn,
            format!(
                "{}: {} does not answer --version",
                paths::VHOST_VSOCK_BINARY,
                path.display()
            ),
            format!(
                "reinstall it: remove it and run scripts/build.sh (installs version {})",
                paths::VHOST_VSOCK_VERSION
            ),
        ),
        (Err(e), _) => Check::says(Status::Warn, format!("{}: {e}", paths::VHOST_VSOCK_BINARY)),
    });

    // The guest image: every engine needs it.
    let image_ok = facts.kernel.is_ok() && facts.initrd.is_ok();
    lines.push(match &facts.kernel {
        Ok(()) => Check::ok(format!("kernel: {} (ELF64)", facts.image.kernel.display())),
        Err(e) => Check::says(Status::Fail, format!("kernel: {}", crate::text::report(e))),
    });
    let (what, path) = match &facts.image.root {
        Some(root) => ("root image", root),
        None => ("initrd", &facts.image.initrd),
    };
    lines.push(match &facts.initrd {
        Ok(()) => Check::ok(format!("{what}: {}", path.display())),
        Err(e) => Check::says(Status::Fail, format!("{what}: {}", crate::text::report(e))),
    });

    // The engines.
    let kvm_engine = match (&kvm, &facts.vmm) {
        (Ok(()), Ok(_)) => Ok(()),
        (Err(why), _) => Err((
            format!("engine kvm: hardware KVM not usable: {why}"),
            why.fix().to_owned(),
        )),
        (Ok(()), Err(e)) => Err(("engine kvm: airlock-vmm missing".to_owned(), e.to_string())),
    };
    let tcg_engine = match (&facts.qemu, &facts.vhost_vsock) {
        (Ok(_), Ok(_)) => Ok(()),
        (Err(e), _) => Err((
            format!("engine tcg: {} missing", paths::QEMU_BINARY),
            e.to_string(),
        )),
        (Ok(_), Err(e)) => Err((
            format!(
                "engine tcg: {} (its vsock device) missing",
                paths::VHOST_VSOCK_BINARY
            ),
            e.to_string(),
        )),
    };
    let any_engine = kvm_engine.is_ok() || tcg_engine.is_ok();
    // An unusable engine is a warning while the other one works.
    let severity = if any_engine {
        Status::Warn
    } else {
        Status::Fail
    };
    for (name, engine) in [("kvm", kvm_engine), ("tcg", tcg_engine)] {
        lines.push(match engine {
            Ok(()) => Check::ok(format!("engine {name}: usable")),
            Err((what, fix)) => Check::problem(severity, what, fix),
        });
    }
    let available = Available {
        kvm,
        vmm: facts.vmm,
        qemu: facts.qemu,
        vhost_vsock: facts.vhost_vsock,
    };
    lines.push(match engine::select(EngineChoice::Auto, available) {
        Ok(s) => Check::ok(format!(
            "engine auto: would use {} ({})",
            s.engine.name(),
            s.reason
        )),
        Err(e) => Check::says(
            Status::Fail,
            format!("engine auto: {}", crate::text::report(&e)),
        ),
    });
    (lines, any_engine && image_ok)
}

/// `airlock doctor`.
pub fn main(args: DoctorArgs) -> Exit {
    let (lines, can_run) = checks(DoctorFacts::gather(&args));
    for line in &lines {
        println!("{line}");
    }
    if can_run {
        println!("airlock doctor: this host can run sandboxes");
        Exit::Success
    } else {
        println!("airlock doctor: this host cannot run sandboxes yet (fix the FAIL lines)");
        Exit::HostUnfit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(kvm: KvmFacts, qemu: bool, image: bool) -> DoctorFacts {
        DoctorFacts {
            kvm,
            vmm: Ok("/bin/airlock-vmm".into()),
            qemu: if qemu {
                Ok("/usr/bin/qemu-system-x86_64".into())
            } else {
                Err(paths::Error::QemuNotFound)
            },
            qemu_version: qemu.then(|| "QEMU emulator version 7.2.22".into()),
            vhost_vsock: Ok("/c/tools/bin/vhost-device-vsock".into()),
            vhost_vsock_version: Some("vhost-device-vsock 0.3.0".into()),
            image: ImagePaths {
                kernel: "/r/build/vmlinux".into(),
                initrd: "/r/build/initramfs.cpio".into(),
                root: None,
            },
            kernel: if image {
                Ok(())
            } else {
                Err(paths::Error::KernelNotFound("/r/build/vmlinux".into()))
            },
            initrd: Ok(()),
        }
    }

    fn pvm() -> KvmFacts {
        KvmFacts {
            device: KvmDevice::Opened {
                api_version: Ok(12),
            },
            pvm_loaded: true,
            cpu_virt_flag: false,
        }
    }

    fn hardware() -> KvmFacts {
        KvmFacts {
            pvm_loaded: false,
            cpu_virt_flag: true,
            ..pvm()
        }
    }

    fn find<'a>(lines: &'a [Check], prefix: &str) -> &'a Check {
        lines
            .iter()
            .find(|c| c.what.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in {lines:?}"))
    }

    #[test]
    fn pvm_host_with_qemu_uses_tcg() {
        let (lines, ok) = checks(facts(pvm(), true, true));
        assert!(ok);
        let module = find(&lines, "KVM module");
        assert_eq!(module.status, Status::Warn);
        assert!(module.what.contains("kvm_pvm"));
        assert_eq!(find(&lines, "engine kvm").status, Status::Warn);
        assert_eq!(find(&lines, "engine tcg").status, Status::Ok);
        assert!(find(&lines, "engine auto").what.contains("would use tcg"));
    }

    #[test]
    fn hardware_host_uses_kvm() {
        let (lines, ok) = checks(facts(hardware(), false, true));
        assert!(ok);
        assert!(find(&lines, "engine auto").what.contains("would use kvm"));
        assert_eq!(find(&lines, "engine tcg").status, Status::Warn);
    }

    #[test]
    fn no_engine_fails() {
        let (lines, ok) = checks(facts(pvm(), false, true));
        assert!(!ok);
        assert_eq!(find(&lines, "engine kvm").status, Status::Fail);
        assert_eq!(find(&lines, "engine tcg").status, Status::Fail);
        assert_eq!(find(&lines, "engine auto").status, Status::Fail);
    }

    #[test]
    fn tcg_without_vhost_device_vsock_says_how_to_install_it() {
        let (lines, ok) = checks(DoctorFacts {
            vhost_vsock: Err(paths::Error::VhostVsockNotFound),
            vhost_vsock_version: None,
            ..facts(pvm(), true, true)
        });
        assert!(!ok);
        let line = find(&lines, "vhost-device-vsock");
        assert_eq!(line.status, Status::Warn);
        assert!(line.to_string().contains("scripts/build.sh"), "{line}");
        let tcg = find(&lines, "engine tcg");
        assert_eq!(tcg.status, Status::Fail);
        assert!(tcg.to_string().contains("scripts/build.sh"), "{tcg}");

        let (lines, _) = checks(facts(pvm(), true, true));
        let line = find(&lines, "vhost-device-vsock");
        assert_eq!(line.status, Status::Ok);
        assert!(line.what.contains("0.3.0"), "{line}");
    }

    #[test]
    fn missing_kernel_fails() {
        let (lines, ok) = checks(facts(hardware(), true, false));
        assert!(!ok);
        let kernel = find(&lines, "kernel");
        assert_eq!(kernel.status, Status::Fail);
        assert!(kernel.to_string().contains("scripts/build-kernel.sh"));
    }

    #[test]
    fn line_format() {
        assert_eq!(Check::ok("x").to_string(), "ok    x");
        assert_eq!(
            Check::problem(Status::Fail, "y", "do z").to_string(),
            "FAIL  y; fix: do z"
        );
    }
}
