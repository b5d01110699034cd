//! The `airlock-vmm` command: one process per microVM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use airlock_vmm::config::{Console, DiskConfig, VmConfig, VsockConfig, MAX_MEM_MIB, MIN_MEM_MIB};
use airlock_vmm::vmm::{Hardening, Outcome, SnapshotFiles, Vmm};
use airlock_vmm::{jail, seccomp, snapshot, timings};
use clap::Parser;

/// Boot an Airlock microVM on KVM.
///
/// Loads an uncompressed ELF kernel (PVH entry) and an optional initramfs,
/// runs the guest with a serial console, and exits when the guest resets or
/// powers off. Airlock's broker (`airlock run`) normally starts this for you.
///
/// Exit status: 0 the guest stopped cleanly (reset, triple fault or power
/// off), or the snapshot was written (`--snapshot-to`); 1 the VM failed (KVM
/// error: the message shows the exit reason, RIP and the instruction bytes);
/// 2 bad input (missing or non-ELF kernel, bad sizes, no access to
/// /dev/kvm); 3 the `--restore` snapshot is damaged or of another VMM
/// build, kernel, CPU or machine shape (nothing ran: boot cold instead).
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
    /// Debugging only: run without the seccomp filters.
    #[arg(long)]
    no_seccomp: bool,
    /// Debugging only: run without the jail (namespaces, empty root, rlimits,
    /// dropped privileges).
    #[arg(long)]
    no_jail: bool,
    /// The uid and gid to run as when started by root.
    #[arg(long, value_name = "ID", default_value_t = jail::DEFAULT_ID)]
    jail_uid: u32,
    /// Test hook: SECS after the guest's init started, make a forbidden
    /// system call.
    #[arg(long, value_name = "SECS", hide = true)]
    test_forbidden_syscall: Option<u64>,
    /// Test hook: print what the process sees from inside the jail.
    #[arg(long, hide = true)]
    test_report_jail: bool,
    /// Debugging and tests: once the guest has stopped, write its RAM
    /// (every region in guest-physical order, without the MMIO gap) to
    /// this file (created mode 0600, or truncated).
    #[arg(long, value_name = "PATH", hide = true)]
    dump_memory: Option<PathBuf>,
    /// Boot, and when the guest's init reaches its snapshot point (it
    /// writes the snapshot mark: `airlock.snapshot=1` on its command line)
    /// write a snapshot into DIR (`state` and `memory`, created mode 0600)
    /// and stop.
    #[arg(long, value_name = "DIR", conflicts_with = "restore")]
    snapshot_to: Option<PathBuf>,
    /// Do not boot: wake the guest from the snapshot in DIR (made by this
    /// airlock-vmm build with the same kernel, memory, vCPUs and disks;
    /// the console, vsock socket and disk paths are this run's). Its memory
    /// is mapped copy-on-write: VMs woken from one snapshot share the pages
    /// none of them wrote.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// With --restore: map the snapshot's data into KVM's page tables
    /// before the guest runs (KVM_PRE_FAULT_MEMORY, else
    /// MADV_POPULATE_READ), trading a longer restore for fewer guest page
    /// faults; a net loss where faults are cheap (docs/SNAPSHOTS.md).
    #[arg(long, requires = "restore")]
    prefault: bool,
    /// Print on stderr where the start goes: milliseconds since main() at
    /// each step (jail, restore or boot set-up, first KVM_RUN, the guest's
    /// first vsock packet and console line, with the vCPU exits so far; with
    /// --no-seccomp also KVM's counters of vCPU 0).
    #[arg(long)]
    timings: bool,
}

/// The snapshot files to write, opened before the jail.
fn open_snapshot_target(dir: &std::path::Path) -> std::io::Result<SnapshotFiles> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |name: &str| {
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
            })
    };
    Ok(SnapshotFiles {
        state: open(snapshot::STATE_FILE)?,
        memory: open(snapshot::MEMORY_FILE)?,
        tag: snapshot::new_memory_tag()?,
    })
}

/// A snapshot's files, for reading.
fn open_snapshot(dir: &std::path::Path) -> Result<(std::fs::File, std::fs::File), snapshot::Error> {
    let open = |name: &str| {
        std::fs::File::open(dir.join(name)).map_err(|e| {
            snapshot::Error::Corrupt(format!("cannot open {}: {e}", dir.join(name).display()))
        })
    };
    Ok((open(snapshot::STATE_FILE)?, open(snapshot::MEMORY_FILE)?))
}

/// Opens the `--dump-memory` file: before the jail, which leaves no file
/// system to open it in.
fn open_dump(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot create the memory dump {}: {e}", path.display()),
            )
        })
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

/// Builds the VM, jails the process (unless `--no-jail`) and runs the guest
/// with the seccomp filters (unless `--no-seccomp`).
fn build_and_run(cli: Cli, start: Instant) -> Result<Outcome, Box<dyn std::error::Error>> {
    if cli.timings {
        timings::enable(start);
        if cli.no_seccomp {
            timings::allow_stats();
        }
    }
    let dump = cli.dump_memory.as_deref().map(open_dump).transpose()?;
    let snapshot_target = cli
        .snapshot_to
        .as_deref()
        .map(open_snapshot_target)
        .transpose()?;
    let snapshot_source = cli
        .restore
        .as_deref()
        .map(open_snapshot)
        .transpose()
        .map_err(airlock_vmm::vmm::Error::from)?;
    // Single-threaded here: the namespaces (a user namespace needs it) and
    // the fork into the new PID namespace come before anything else.
    let jail = if cli.no_jail {
        eprintln!("airlock-vmm: WARNING: --no-jail: the VMM runs with the host's file system, network and privileges (debugging only)");
        None
    } else {
        Some(jail::enter_namespaces(cli.jail_uid, cli.test_report_jail)?)
    };
    timings::mark("namespaces entered");
    let filters = if cli.no_seccomp {
        eprintln!("airlock-vmm: WARNING: --no-seccomp: the VMM runs without system call filters (debugging only)");
        None
    } else {
        seccomp::install_sigsys_handler()?;
        Some(if snapshot_target.is_some() {
            seccomp::Filters::for_snapshot()?
        } else {
            seccomp::Filters::new()?
        })
    };
    timings::mark("seccomp filters built");
    let test_forbidden_syscall = cli.test_forbidden_syscall.map(Duration::from_secs);
    let report = cli.test_report_jail;
    let prefault = cli.prefault;
    let config = VmConfig::from(cli);
    let mut vmm = match snapshot_source {
        None => Vmm::new(&config, start)?,
        Some((mut state, memory)) => {
            let vmm = Vmm::restore(&config, start, &mut state, memory, prefault)?;
            eprintln!(
                "airlock-vmm: restored from the snapshot in {:.1} ms",
                start.elapsed().as_secs_f64() * 1e3
            );
            if let Some(p) = vmm.prefault() {
                eprintln!(
                    "airlock-vmm: prefaulted {:.1} MiB of the snapshot's memory in {:.1} ms ({})",
                    p.bytes as f64 / f64::from(1u32 << 20),
                    p.took.as_secs_f64() * 1e3,
                    p.how
                );
            }
            vmm
        }
    };
    if let Some(files) = snapshot_target {
        vmm.snapshot_to(&config, files)?;
    }
    if let Some(jail) = &jail {
        let socket_dir = config.vsock.as_ref().and_then(|v| v.uds.parent());
        let socket_dir = socket_dir.filter(|d| !d.as_os_str().is_empty());
        jail.lock_down(socket_dir, config.mem_bytes(), config.cpus)?;
        timings::mark("locked down");
        if report {
            jail.report();
        }
    }
    // The same mappings (the regions are shared), kept for the dump.
    let mem = dump.is_some().then(|| vmm.memory().clone());
    let outcome = vmm.run_hardened(Hardening {
        filters,
        test_forbidden_syscall,
    })?;
    if let (Some(mut file), Some(mem)) = (dump, mem) {
        airlock_vmm::memory::dump(&mem, &mut file).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot write the memory dump: {e}"))
        })?;
    }
    Ok(outcome)
}

fn main() -> ExitCode {
    let start = Instant::now();
    let outcome = build_and_run(Cli::parse(), start);
    match outcome {
        Ok(outcome) if outcome.snapshot.is_some() => {
            eprintln!(
                "airlock-vmm: snapshot written ({} MiB of memory) after {:.1} ms",
                outcome.snapshot.unwrap_or(0) >> 20,
                outcome.total.as_secs_f64() * 1e3
            );
            ExitCode::SUCCESS
        }
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
            let mut source = e.source();
            while let Some(s) = source {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                source = s.source();
            }
            eprintln!("airlock-vmm: error: {msg}");
            let vmm_error = e.downcast_ref::<airlock_vmm::vmm::Error>();
            let unusable = vmm_error.is_some_and(
                |e| matches!(e, airlock_vmm::vmm::Error::Snapshot(s) if s.is_unusable_snapshot()),
            );
            let bad_input = vmm_error.is_some_and(airlock_vmm::vmm::Error::is_bad_input);
            ExitCode::from(if unusable {
                3
            } else if bad_input {
                2
            } else {
                1
            })
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
