//! What this host offers: is hardware KVM usable?
//!
//! [`KvmFacts::gather`] observes the host; [`kvm_usability`] is a pure
//! decision over those facts, so every reason can be unit-tested.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The KVM API version every KVM since Linux 2.6.22 reports.
pub const KVM_API_VERSION: i32 = 12;
/// `KVM_GET_API_VERSION` = `_IO(KVMIO, 0x00)` with `KVMIO` = 0xAE.
const KVM_GET_API_VERSION: libc::Ioctl = 0xAE00;

const KVM_DEVICE: &str = "/dev/kvm";
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// What opening `/dev/kvm` read-write gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmDevice {
    /// There is no `/dev/kvm`.
    Missing,
    /// It exists, but we may not open it read-write.
    PermissionDenied,
    /// Opening it failed for another reason (the message of the error).
    OpenFailed(String),
    /// It opened; `KVM_GET_API_VERSION` answered this (or failed with this message).
    Opened { api_version: Result<i32, String> },
}

/// The observed facts the KVM decision rests on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmFacts {
    pub device: KvmDevice,
    /// `/sys/module/kvm_pvm` exists: `/dev/kvm` is the Pagetable-based
    /// Virtual Machine, under which guest userspace cannot make system calls.
    pub pvm_loaded: bool,
    /// `/proc/cpuinfo` flags contain `svm` or `vmx`.
    pub cpu_virt_flag: bool,
}

/// Why hardware KVM is not usable here. `Display` says what; [`Self::fix`] how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvmUnusable {
    #[error("/dev/kvm does not exist")]
    Missing,
    #[error("/dev/kvm is kvm_pvm (no hardware virtualization)")]
    Pvm,
    #[error("the CPU has no svm or vmx flag (no hardware virtualization)")]
    NoCpuFlag,
    #[error("no permission on /dev/kvm")]
    PermissionDenied,
    #[error("/dev/kvm cannot be opened: {0}")]
    OpenFailed(String),
    #[error("KVM_GET_API_VERSION failed: {0}")]
    ApiQueryFailed(String),
    #[error("KVM API version is {0}, not {KVM_API_VERSION}")]
    ApiVersion(i32),
}

impl KvmUnusable {
    /// How to fix it, in plain words.
    pub fn fix(&self) -> &'static str {
        match self {
            KvmUnusable::Missing | KvmUnusable::NoCpuFlag => {
                "enable Intel VT-x or AMD-V in the firmware and load kvm_intel or kvm_amd; \
                 in a cloud VM, enable nested virtualization"
            }
            KvmUnusable::Pvm => "use a host with Intel VT-x or AMD-V",
            KvmUnusable::PermissionDenied => {
                "add yourself to the kvm group: sudo usermod -aG kvm $USER, then log in again"
            }
            KvmUnusable::OpenFailed(_) | KvmUnusable::ApiQueryFailed(_) => {
                "check that the kvm module loaded cleanly (dmesg | grep -i kvm)"
            }
            KvmUnusable::ApiVersion(_) => "use a host kernel with a standard KVM",
        }
    }
}

/// Decides whether hardware KVM is usable. All of: `/dev/kvm` exists and
/// opens read-write, it is not `kvm_pvm`, the CPU advertises `svm`/`vmx`, and
/// the API version is 12. The most fundamental problem is reported first
/// (fixing a permission does not help on a host without virtualization).
pub fn kvm_usability(facts: &KvmFacts) -> Result<(), KvmUnusable> {
    if facts.device == KvmDevice::Missing {
        return Err(KvmUnusable::Missing);
    }
    if facts.pvm_loaded {
        return Err(KvmUnusable::Pvm);
    }
    if !facts.cpu_virt_flag {
        return Err(KvmUnusable::NoCpuFlag);
    }
    match &facts.device {
        KvmDevice::Missing => Err(KvmUnusable::Missing),
        KvmDevice::PermissionDenied => Err(KvmUnusable::PermissionDenied),
        KvmDevice::OpenFailed(e) => Err(KvmUnusable::OpenFailed(e.clone())),
        KvmDevice::Opened {
            api_version: Err(e),
        } => Err(KvmUnusable::ApiQueryFailed(e.clone())),
        KvmDevice::Opened { api_version: Ok(v) } if *v != KVM_API_VERSION => {
            Err(KvmUnusable::ApiVersion(*v))
        }
        KvmDevice::Opened { .. } => Ok(()),
    }
}

impl KvmFacts {
    /// Observes this host.
    pub fn gather() -> KvmFacts {
        KvmFacts {
            device: probe_device(Path::new(KVM_DEVICE)),
            pvm_loaded: Path::new(PVM_MODULE).exists(),
            cpu_virt_flag: fs::read_to_string("/proc/cpuinfo")
                .map(|s| cpuinfo_has_virt_flag(&s))
                .unwrap_or(false),
        }
    }
}

fn probe_device(path: &Path) -> KvmDevice {
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return KvmDevice::Missing,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return KvmDevice::PermissionDenied
        }
        Err(e) => return KvmDevice::OpenFailed(e.to_string()),
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and returns an int; it
    // reads and writes no memory of this process. `file` is an open
    // descriptor that stays open for the whole call (it is dropped after).
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    let api_version = if version < 0 {
        Err(io::Error::last_os_error().to_string())
    } else {
        Ok(version)
    };
    KvmDevice::Opened { api_version }
}

/// Whether any `flags` line of `/proc/cpuinfo` text lists `svm` or `vmx`.
pub fn cpuinfo_has_virt_flag(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| key.trim() == "flags")
        .any(|(_, flags)| {
            flags
                .split_whitespace()
                .any(|flag| flag == "svm" || flag == "vmx")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hardware() -> KvmFacts {
        KvmFacts {
            device: KvmDevice::Opened {
                api_version: Ok(12),
            },
            pvm_loaded: false,
            cpu_virt_flag: true,
        }
    }

    #[test]
    fn hardware_kvm_is_usable() {
        assert_eq!(kvm_usability(&hardware()), Ok(()));
    }

    #[test]
    fn each_reason() {
        let cases = [
            (
                KvmFacts {
                    device: KvmDevice::Missing,
                    ..hardware()
                },
                KvmUnusable::Missing,
            ),
            (
                KvmFacts {
                    pvm_loaded: true,
                    ..hardware()
                },
                KvmUnusable::Pvm,
            ),
            (
                KvmFacts {
                    cpu_virt_flag: false,
                    ..hardware()
                },
                KvmUnusable::NoCpuFlag,
            ),
            (
                KvmFacts {
                    device: KvmDevice::PermissionDenied,
                    ..hardware()
                },
                KvmUnusable::PermissionDenied,
            ),
            (
                KvmFacts {
                    device: KvmDevice::OpenFailed("busy".into()),
                    ..hardware()
                },
                KvmUnusable::OpenFailed("busy".into()),
            ),
            (
                KvmFacts {
                    device: KvmDevice::Opened {
                        api_version: Err("bad ioctl".into()),
                    },
                    ..hardware()
                },
                KvmUnusable::ApiQueryFailed("bad ioctl".into()),
            ),
            (
                KvmFacts {
                    device: KvmDevice::Opened {
                        api_version: Ok(11),
                    },
                    ..hardware()
                },
                KvmUnusable::ApiVersion(11),
            ),
        ];
        for (facts, reason) in cases {
            assert_eq!(kvm_usability(&facts), Err(reason), "{facts:?}");
        }
    }

    #[test]
    fn pvm_outranks_permission_and_api() {
        // What this workplace's machines look like: kvm_pvm, no svm/vmx, API 12.
        let facts = KvmFacts {
            device: KvmDevice::Opened {
                api_version: Ok(12),
            },
            pvm_loaded: true,
            cpu_virt_flag: false,
        };
        assert_eq!(kvm_usability(&facts), Err(KvmUnusable::Pvm));
        let facts = KvmFacts {
            device: KvmDevice::PermissionDenied,
            ..facts
        };
        assert_eq!(kvm_usability(&facts), Err(KvmUnusable::Pvm));
    }

    #[test]
    fn cpu_flags() {
        let amd = "processor\t: 0\nflags\t\t: fpu vme svm lm\nbugs\t\t: none\n";
        let intel = "flags\t: fpu vmx_ept vmx\n";
        let none = "flags\t: fpu vme lm hypervisor\nvmx flags\t: ept\n";
        assert!(cpuinfo_has_virt_flag(amd));
        assert!(cpuinfo_has_virt_flag(intel));
        assert!(!cpuinfo_has_virt_flag(none));
        assert!(!cpuinfo_has_virt_flag(""));
    }
}
