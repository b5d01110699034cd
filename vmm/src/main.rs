//! The `airlock-vmm` command: one process per microVM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use airlock_vmm::config::{Console, DiskConfig, VmConfig, VsockConfig, MAX_MEM_MIB, MIN_MEM_MIB};
use airlock_vmm::vmm::Vmm;
use clap::Parser;

/// Boot an Airlock microVM on KVM.
///
/// Loads an uncompressed ELF kernel (PVH entry) and an optional initramfs,
/// runs the guest with a serial console, and exits when the guest resets or
/// powers off. Airlock's broker (`airlock run`) normally starts this for you.
///
/// Exit status: 0 the guest stopped cleanly (reset, triple fault or power
/// off); 1 the VM failed (KVM error: the message shows the exit reason, RIP
/// and the instruction bytes); 2 bad input (missing or non-ELF kernel, bad
/// sizes, no access to /dev/kvm).
#[derive(Debug, Parser)]
#[command(name = "airlock-vmm", version, about, long_about)]
struct Cli {
    /// Uncompressed ELF kernel (vmlinux) with a PVH entry point.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs (newc cpio) handed to the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(i64::from(MIN_MEM_MIB)..=i64::from(MAX_MEM_MIB)))]
    mem: u32,
    /// Number of vCPUs (1 to 16).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=16))]
    cpus: u8,
    /// Extra kernel command-line arguments, appended to the VMM's own
    /// (`console=ttyS0 reboot=k panic=-1 quiet`).
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Where the guest's serial console goes: a file path, `-` for standard
    /// output, or `none`.
    #[arg(long, value_name = "PATH|-|none", default_value = "-")]
    console: String,
    /// Give the guest a virtio-vsock device whose host side is this Unix
    /// socket path (Firecracker's hybrid vsock): a guest connection to host
    /// port P arrives at `PATH_P`; host programs connect to PATH and write
    /// `CONNECT <guest port>\n`.
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// A disk for the guest, `ro:PATH` (read-only) or `rw:PATH`; repeat for
    /// more. The guest sees them as /dev/vda, /dev/vdb, ... in this order.
    #[arg(long = "disk", value_name = "ro:PATH|rw:PATH", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// The guest's vsock context id (3 or more).
    #[arg(long, value_name = "CID", default_value_t = 3, requires = "vsock_uds")]
    vsock_cid: u32,
}

fn parse_disk(spec: &str) -> Result<DiskConfig, String> {
    let (read_only, path) = match spec.split_once(':') {
        Some(("ro", path)) => (true, path),
        Some(("rw", path)) => (false, path),
        _ => return Err(format!("expected ro:PATH or rw:PATH, got {spec:?}")),
    };
    if path.is_empty() {
        return Err("empty disk path".into());
    }
    Ok(DiskConfig {
        path: path.into(),
        read_only,
    })
}

impl From<Cli> for VmConfig {
    fn from(cli: Cli) -> Self {
        let console = match cli.console.as_str() {
            "-" => Console::Stdout,
            "none" => Console::Discard,
            path => Console::File(path.into()),
        };
        VmConfig {
            kernel: cli.kernel,
            initrd: cli.initrd,
            mem_mib: cli.mem,
            cpus: cli.cpus,
            extra_cmdline: cli.cmdline,
            console,
            disks: cli.disks,
            vsock: cli.vsock_uds.map(|uds| VsockConfig {
                cid: cli.vsock_cid,
                uds,
            }),
        }
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    let config = VmConfig::from(Cli::parse());
    let outcome = Vmm::new(&config, start).and_then(Vmm::run);
    match outcome {
        Ok(outcome) if outcome.stop.is_clean() => {
            if let Some((refused, malformed)) = outcome.vsock_rejects.filter(|r| *r != (0, 0)) {
                eprintln!("airlock-vmm: vsock: refused {refused} packets, {malformed} malformed buffers from the guest");
            }
            eprintln!(
                "airlock-vmm: guest stopped: {} after {:.1} ms",
                outcome.stop,
                outcome.total.as_secs_f64() * 1e3
            );
            ExitCode::SUCCESS
        }
        Ok(outcome) => {
            eprintln!("airlock-vmm: error: {}", outcome.stop);
            ExitCode::from(1)
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                source = s.source();
            }
            eprintln!("airlock-vmm: error: {msg}");
            ExitCode::from(if e.is_bad_input() { 2 } else { 1 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs_name_their_mode() {
        let d = parse_disk("ro:/img/a.ext4").expect("ro");
        assert_eq!((d.path, d.read_only), ("/img/a.ext4".into(), true));
        let d = parse_disk("rw:scratch:1.img").expect("rw");
        assert_eq!((d.path, d.read_only), ("scratch:1.img".into(), false));
        assert!(parse_disk("/img/a.ext4").is_err());
        assert!(parse_disk("ro:").is_err());
        assert!(parse_disk("xx:/a").is_err());
    }
}
