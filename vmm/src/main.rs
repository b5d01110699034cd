//! The `airlock-vmm` command: one process per microVM.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use airlock_vmm::config::{Console, VmConfig, VsockConfig};
use airlock_vmm::vmm::{Hardening, Outcome, RecordTarget, SnapshotFiles, Vmm, WakeMemory};
use airlock_vmm::{jail, seccomp, snapshot, timings, working_set};
use cli::Cli;

mod cli;

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

/// What of the snapshot in `dir` a restore maps ahead (its files opened
/// before the jail).
fn wake_memory(cli: &Cli, dir: &std::path::Path) -> WakeMemory {
    if cli.record_working_set.is_some() {
        return WakeMemory::Record;
    }
    match cli.prefault {
        cli::Prefault::None => WakeMemory::OnDemand,
        cli::Prefault::All => WakeMemory::All,
        cli::Prefault::WorkingSet => {
            let path = dir.join(working_set::FILE);
            match std::fs::File::open(&path) {
                Ok(file) => WakeMemory::WorkingSet(file),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => WakeMemory::OnDemand,
                Err(e) => {
                    eprintln!(
                        "airlock-vmm: warning: the snapshot's working set is not used: cannot open {}: {e}",
                        path.display()
                    );
                    WakeMemory::OnDemand
                }
            }
        }
    }
}

/// Creates `path` (mode 0600) for writing `what` (the `--dump-memory`
/// file, the `--record-working-set` file): before the jail, which leaves no
/// file system to open it in.
fn create_file(path: &std::path::Path, what: &str) -> std::io::Result<std::fs::File> {
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
                format!("cannot create {what} {}: {e}", path.display()),
            )
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
    let dump = cli
        .dump_memory
        .as_deref()
        .map(|p| create_file(p, "the memory dump"))
        .transpose()?;
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
    let wake = cli.restore.as_deref().map(|dir| wake_memory(&cli, dir));
    let working_set_out = cli
        .record_working_set
        .as_deref()
        .map(|p| create_file(p, "the working set"))
        .transpose()?;
    // Single-threaded here: the namespaces (a user namespace needs it) and
    // the fork into the new PID namespace come before anything else.
    let jail = if cli.no_jail {
        eprintln!("airlock-vmm: WARNING: --no-jail: the VMM runs with the host's file system, network and privileges (debugging only)");
        None
    } else {
        Some(jail::enter_namespaces(cli.jail_uid, cli.test_report_jail)?)
    };
    timings::mark("namespaces entered");
    // This process's own (after the fork into the PID namespace), opened
    // before the jail leaves no /proc.
    let record = match working_set_out {
        Some(out) => Some(RecordTarget {
            pagemap: std::fs::File::open("/proc/self/pagemap").map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot open /proc/self/pagemap: {e}"))
            })?,
            out,
        }),
        None => None,
    };
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
    let config = VmConfig::from(cli);
    let mut vmm = match (snapshot_source, wake) {
        (Some((mut state, memory)), Some(wake)) => {
            let vmm = Vmm::restore(&config, start, &mut state, memory, wake)?;
            if let Some(why) = vmm.working_set_unused() {
                eprintln!("airlock-vmm: warning: the snapshot's working set is not used: {why}");
            }
            // One line, whole numbers: no floating-point formatting and one
            // write before the woken guest runs.
            let prefaulted = vmm.prefault().map_or_else(String::new, |p| {
                format!(
                    " (prefaulted {} pages of {}, {} of them copied, in {} us: {})",
                    p.pages,
                    p.what,
                    p.copied,
                    p.took.as_micros(),
                    p.how
                )
            });
            eprintln!(
                "airlock-vmm: restored from the snapshot in {} ms{prefaulted}",
                start.elapsed().as_millis()
            );
            vmm
        }
        _ => Vmm::new(&config, start)?,
    };
    if let Some(record) = record {
        vmm.record_working_set_to(record);
    }
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
    let cli = match cli::parse(std::env::args_os().skip(1)) {
        Ok(cli::Command::Run(cli)) => *cli,
        Ok(cli::Command::Help) => return print_out(&cli::help()),
        Ok(cli::Command::Version) => return print_out(&cli::version()),
        Err(e) => {
            eprintln!(
                "airlock-vmm: error: {e}\n\n{}\n\nFor more information, try 'airlock-vmm --help'.",
                cli::USAGE
            );
            return ExitCode::from(2);
        }
    };
    let outcome = build_and_run(cli, start);
    timings::flush();
    match outcome {
        Ok(outcome) if outcome.snapshot.is_some() => {
            eprintln!(
                "airlock-vmm: snapshot written ({} MiB of memory) after {:.1} ms",
                outcome.snapshot.unwrap_or(0) >> 20,
                outcome.total.as_secs_f64() * 1e3
            );
            ExitCode::SUCCESS
        }
        Ok(airlock_vmm::vmm::Outcome {
            working_set: Some(recorded),
            total,
            ..
        }) => {
            eprintln!(
                "airlock-vmm: working set recorded: {} pages, {} of them written, after {:.1} ms ({})",
                recorded.pages,
                recorded.written,
                total.as_secs_f64() * 1e3,
                recorded.how
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

/// Writes `text` to standard output (`--help`, `--version`).
fn print_out(text: &str) -> ExitCode {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(1),
    }
}
