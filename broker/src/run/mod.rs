//! A run, from its config to its verdict: boot a sandbox, run one command
//! in it, stream its output, and exit with its exit code. `airlock run` is
//! this; a live sandbox's supervisor (`airlock create`) is this too, its
//! command the keeper that holds the sandbox up while execs come and go.
//!
//! Order: the config, validated by the command line ([`RunConfig`]) →
//! check the kernel and the initrd, or the root image in image mode
//! ([`boot_cmdline`]) → pick the engine → pin and hash what will boot
//! ([`start`]) → create the audit log and write `run.start` → then the
//! run's three steps, those of a sandbox's lifecycle: **create**
//! (`Booted::create`: the private run directory ([`RunDir`]), every vsock
//! port listening on the one port server ([`ports`]: control, the file
//! ports when asked, the model port), the VM spawned), **exec** (the
//! command, carried through the control session: [`supervise`] hands the
//! guest's control connection to a session thread
//! ([`crate::door::session::serve`]) and watches the VM, the deadlines,
//! the signals and the audit log), **remove** (the VM killed and reaped,
//! the ports stopped, the end judged in one place ([`judge`]), the run
//! directory removed) → write `run.end` and the seal. Everything that can
//! be wrong with the input is found before a VM starts; once the audit log
//! exists, every way the run ends is recorded in it, and a run whose log
//! cannot be written is stopped (fail closed).
//!
//! Threads: the main thread supervises and owns the VM (it spawned it,
//! which `PR_SET_PDEATHSIG` needs); the port server accepts on every port;
//! one session thread runs the control conversation with blocking I/O.
//! They report to the main thread over one channel.

mod config;
mod error;
mod ports;
mod report;
mod rundir;
mod start;
mod supervise;
#[cfg(test)]
mod tests;
mod verdict;

pub use config::*;
pub use error::*;
pub(crate) use report::*;
pub(crate) use rundir::*;
pub(crate) use start::*;
pub use supervise::*;
pub use verdict::*;

use std::fs;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant, SystemTime};

use airlock_protocol::{CONTROL_PORT, DEFAULT_GUEST_CID};
use serde_json::json;

use crate::audit::records::{ContainerImage, Durations, RunEnd, VmExit, VmProcess, VmStart};
use crate::audit::{self, keys, AuditLog, Durability};
use crate::engine::{self, Available, Disk, Vm, VmConfig};
use crate::exit::Exit;
use crate::paths;
use ports::Ports;

/// Guest memory bounds, in MiB.
pub const MEM_MIB_RANGE: std::ops::RangeInclusive<u32> = 64..=65536;
/// vCPU bounds.
pub const CPUS_RANGE: std::ops::RangeInclusive<u32> = 1..=16;
/// The console substring that means the guest kernel died.
pub(crate) const PANIC_MARKER: &str = "Kernel panic";
/// The guest must say Hello within this long (or `--timeout`, if shorter).
/// Generous: the tcg engine boots in ~3 s, our VMM in the nested test bed in
/// ~10 s; a loaded CI machine may be several times slower.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(120);
/// How long the guest may take to power off after the command's exit status.
pub const POWER_OFF_GRACE: Duration = Duration::from_secs(10);
/// The same with `--debug-dump-guest-memory`, which the VMM writes first.
pub(crate) const DUMP_GRACE: Duration = Duration::from_secs(300);
/// After the VM process ends before the exit status came, how long the
/// session may still read what the engine had in flight.
pub(crate) const DRAIN: Duration = Duration::from_secs(1);
/// How long we wait for the session thread once its stream is shut down (it
/// may be blocked writing to a slow stdout).
pub(crate) const SESSION_END: Duration = Duration::from_secs(2);
/// How long after the run's timeout a results stream may still be read;
/// then it is abandoned, so that `--timeout` bounds airlock's own exit.
pub(crate) const RESULTS_GRACE: Duration = Duration::from_secs(2);
/// How often the VM, the deadlines and the signals are looked at.
pub(crate) const POLL: Duration = Duration::from_millis(20);
/// The hybrid-vsock base socket's name in the run directory.
pub(crate) const VSOCK_NAME: &str = "vsock";
/// `--timeout`'s default, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// Runs `config` to its end: checks what it names, boots, supervises,
/// judges the end, audits every step, and returns the exit code. A
/// live sandbox's supervisor (`config.sandbox`) runs the same way, its
/// command the keeper that holds the sandbox up while execs come and go.
pub fn run(mut config: RunConfig) -> Result<Exit, Error> {
    let began = Instant::now();
    if config.sandbox.is_some() {
        config.spec.execs = true;
    }
    let image = config.image.clone();
    paths::check_kernel(&image.kernel)?;
    match &image.root {
        Some(root) => paths::check_root(root)?,
        None => paths::check_initrd(&image.initrd)?,
    }
    if let Some(ws) = &config.files.workspace {
        crate::door::files::check_workspace(ws, &config.files.deny)?;
    }
    if let Some(out) = &config.files.out {
        fs::create_dir_all(out).map_err(|e| Error::OutDir(out.clone(), e))?;
    }
    let key = match &config.audit.key {
        Some(path) => Some(keys::load_signing_key(path).map_err(audit::Error::from)?),
        None => None,
    };
    let run_id = audit::new_run_id();
    let audit_path = match &config.audit.path {
        Some(path) => path.clone(),
        None => audit::log::default_path(
            &audit::log::default_dir()?,
            audit::time::micros(SystemTime::now()),
            &run_id,
        )?,
    };
    // Nothing airlock writes for the user may be where results land: a
    // result named like it would replace it mid-run.
    if let Some(out) = &config.files.out {
        let what = if config.audit.path.is_some() {
            "--audit"
        } else {
            "the default audit log (pass --audit FILE elsewhere)"
        };
        let mut checks = vec![(what, audit_path.clone())];
        if let ConsoleTarget::File(path) = &config.console {
            checks.push(("--console-log", path.clone()));
        }
        if let Some(path) = &config.report {
            checks.push(("--report", path.clone()));
        }
        for (what, path) in checks {
            if paths::is_within(out, &path).map_err(|e| Error::Place(path.clone(), e))? {
                return Err(Error::InsideOut {
                    what,
                    path,
                    out: out.clone(),
                });
            }
        }
    }
    if image.root.is_none() && !config.container {
        eprintln!("airlock: warning: --no-container: no root image, so no container anyway");
    }
    if config.stored_image.is_some() && image.root.is_none() {
        return Err(Error::ArchiveWithoutRoot);
    }
    if config.user.is_some() && image.root.is_none() {
        return Err(Error::UserWithoutContainer);
    }
    let archive_format = match &config.archive {
        Some(_) if image.root.is_none() => return Err(Error::ArchiveWithoutRoot),
        Some(path) => Some(crate::archive::check(path)?),
        None => None,
    };
    if !config.mounts.is_empty() && image.root.is_none() {
        return Err(Error::Mount(
            "live mounts appear in the agent's container: they need the guest root image, \
             not --initrd"
                .into(),
        ));
    }
    if config.nested && image.root.is_none() {
        return Err(Error::NestedWithoutRoot);
    }
    if config.vm_root && config.container && image.root.is_some() {
        return Err(Error::VmRootInContainer);
    }
    // From here on airlock hashes, and the engine boots, these open files.
    let second_disk = config
        .archive
        .clone()
        .or_else(|| config.stored_image.as_ref().map(|i| i.disk.clone()));
    let pins = Pins::open(&image, second_disk.as_deref())?;
    let selection = engine::select(config.engine, Available::gather())?;
    if let Some(warning) = &selection.warning {
        eprintln!("airlock: warning: {warning}");
    }
    eprintln!(
        "airlock: engine: {} ({})",
        selection.engine.name(),
        selection.reason
    );

    let mut start = run_start(&config, &pins, &selection, &run_id, key.as_ref())?;
    if let (Some(pin), Some(format)) = (&pins.archive, archive_format) {
        let disk = hashed(pin)?;
        start.container_image = Some(ContainerImage::File {
            path: disk.path,
            format: format.name(),
            sha256: disk.sha256,
            bytes: disk.bytes,
        });
    }
    if let (Some(pin), Some(stored)) = (&pins.archive, &config.stored_image) {
        start.container_image = Some(ContainerImage::Store {
            reference: stored.reference.clone(),
            digest: stored.digest.clone(),
            names: stored.names.clone(),
            disk: hashed(pin)?,
            config_applied: config.image_applied.clone(),
        });
    }
    let audit = AuditLog::create(&audit_path, config.audit.limits, key)?;
    if let Some(mode) = &config.sandbox {
        // For `airlock inspect`: the sandbox's one audit log.
        let _ = fs::write(
            mode.dir.path.join("audit.path"),
            format!("{}\n", audit_path.display()),
        );
    }
    audit.record(&start, Durability::Synced);
    if let Some(why) = audit.failure() {
        return Err(audit::Error::Write(why).into());
    }

    let digests = snapshot_digests(&config, &start, &selection);
    let (mut exit, end, console_log) =
        match boot(&config, &pins, &selection, &audit, began, digests) {
            Ok(ran) => (ran.exit, ran.end, ran.console_log),
            Err(e) => {
                eprintln!("airlock: error: {}", crate::text::report(&e));
                let verdict = Verdict::of_error(&e);
                let end = verdict.run_end(Durations {
                    total: millis(began.elapsed()),
                    boot: None,
                    command: None,
                });
                (verdict.exit, end, None)
            }
        };
    let finished = match audit.end(&end) {
        Ok(finished) => Some(finished),
        Err(e) => {
            eprintln!("airlock: error: {}", crate::text::report(&e));
            exit = Exit::SandboxFailed;
            None
        }
    };
    // The log is judged where the user will look for it.
    let placed = match audit.check_place() {
        Some(Ok(placed)) => Some(placed),
        Some(Err(e)) => {
            eprintln!("airlock: error: {}", crate::text::report(&e));
            exit = Exit::SandboxFailed;
            None
        }
        None => None,
    };
    eprintln!("airlock: audit log: {}", audit_path.display());
    if let Some(path) = &config.report {
        let report = json!({
            "airlock_version": env!("CARGO_PKG_VERSION"),
            "run_id": run_id,
            "exit_code": exit.code(),
            "how": end.how,
            "command_status": end.command_status,
            "message": end.message,
            "audit_log": {
                "path": audit_path.display().to_string(),
                "intact_at_path": placed.is_some(),
                "sha256": placed.as_ref().map(|p| p.sha256.clone()),
                "bytes": placed.as_ref().map(|p| p.bytes),
                "records": finished.as_ref().map(|f| f.records),
                "run_end_sha256": finished.as_ref().map(|f| f.run_end_hash.clone()),
                "signed": config.audit.key.is_some(),
            },
            "console_log": console_log.map(|p| p.display().to_string()),
            "out": config.files.out.as_ref().map(|p| p.display().to_string()),
        });
        if let Err(e) = write_report(path, &report) {
            let e = Error::Report(path.clone(), e);
            eprintln!("airlock: error: {}", crate::text::report(&e));
            exit = Exit::SandboxFailed;
        }
    }
    Ok(exit)
}

/// How a booted run ended: the exit code and the `run.end` fields.
#[derive(Debug)]
pub(crate) struct Ran {
    pub(crate) exit: Exit,
    pub(crate) end: RunEnd,
    /// The console log, when it is kept.
    pub(crate) console_log: Option<PathBuf>,
}

/// Boots the VM, supervises it, judges the end and tells the user: a run
/// is [`Booted::create`], [`Booted::exec`] of its one command, and
/// [`Booted::remove`].
/// What a snapshot of this run's guest is made of (the digests
/// `run.start` records), when the run may use the snapshot cache: the kvm
/// engine, no `--no-snapshot`, no memory dump, a cache directory.
pub(crate) struct SnapshotDigests {
    kernel: String,
    root: String,
    image_disk: Option<String>,
    vmm: PathBuf,
    cache: PathBuf,
}

fn snapshot_digests(
    config: &RunConfig,
    start: &crate::audit::records::RunStart,
    selection: &engine::Selection,
) -> Option<SnapshotDigests> {
    let engine::Engine::Kvm(kvm) = &selection.engine else {
        return None;
    };
    if !config.snapshots || config.dump_memory.is_some() {
        return None;
    }
    let root = start.initrd.as_ref().or(start.root_image.as_ref())?;
    Some(SnapshotDigests {
        kernel: start.kernel.sha256.clone(),
        root: root.sha256.clone(),
        image_disk: start.container_image.as_ref().map(|c| match c {
            ContainerImage::File { sha256, .. } => sha256.clone(),
            ContainerImage::Store { disk, .. } => disk.sha256.clone(),
        }),
        vmm: kvm.vmm.clone(),
        cache: engine::snapshot::cache_root()?,
    })
}

pub(crate) fn boot(
    config: &RunConfig,
    pins: &Pins,
    selection: &engine::Selection,
    audit: &AuditLog,
    began: Instant,
    snapshot: Option<SnapshotDigests>,
) -> Result<Ran, Error> {
    let mut booted = Booted::create(config, pins, selection, audit, snapshot)?;
    let end = booted.exec();
    booted.remove(end, began)
}

/// A run's VM, booted: its private directory, its ports, the engine's
/// processes and the supervisor's channel. Dropping it kills the VM and
/// removes the directory.
struct Booted<'a> {
    config: &'a RunConfig,
    audit: &'a AuditLog,
    selection: &'a engine::Selection,
    vm_config: VmConfig,
    run_dir: RunDir,
    ports: Ports,
    vm: Vm,
    /// The VM was booted a second time ([`Booted::vsock_never_answered`]).
    booted_again: bool,
    /// The helpers' threads, read when the VM stopped before the guest
    /// connected (while the helpers still ran), for the report.
    helper_threads: Vec<(&'static str, Vec<engine::ThreadState>)>,
    events: Receiver<Event>,
    session: SessionParams,
    stop: StopSignal,
    started: Instant,
    timings: Timings,
}

impl<'a> Booted<'a> {
    /// Makes the run directory, listens on every port, starts the VM and
    /// records `vm.start`.
    fn create(
        config: &'a RunConfig,
        pins: &Pins,
        selection: &'a engine::Selection,
        audit: &'a AuditLog,
        snapshot: Option<SnapshotDigests>,
    ) -> Result<Booted<'a>, Error> {
        let run_dir = RunDir::create(&config.console)?;
        let vsock_uds = run_dir.dir.join(VSOCK_NAME);
        let control_path = engine::port_path(&vsock_uds, CONTROL_PORT);
        // The engines' own sockets in the run directory have names no
        // longer than this one's.
        if control_path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::SocketPath(control_path));
        }
        let mut vm_config = vm_config(config, pins, &run_dir, vsock_uds);
        vm_config.snapshot = snapshot.map(|d| {
            // The boot that makes the snapshot adds these; the key holds
            // them like every word.
            let boot_words = if pins.image_mode {
                prepare_words(config)
            } else {
                Vec::new()
            };
            let mut cmdline = vm_config.extra_cmdline.clone();
            cmdline.extend(boot_words.iter().cloned());
            let key = engine::snapshot::key(&engine::snapshot::KeyParts {
                kernel_sha256: &d.kernel,
                root_sha256: &d.root,
                image_disk_sha256: d.image_disk.as_deref(),
                vmm: &d.vmm,
                mem_mib: vm_config.mem_mib,
                cpus: vm_config.cpus,
                guest_cid: vm_config.guest_cid,
                disks_read_only: vm_config.disks.iter().map(|d| d.read_only).collect(),
                cmdline: &cmdline,
            });
            engine::snapshot::Plan {
                dir: d.cache.join(&key),
                key,
                boot_words,
            }
        });
        let (events_tx, events) = mpsc::channel();
        // Listening before the VM starts: the guest's connections always
        // find us.
        let ports = ports::serve(config, &vm_config.vsock_uds, audit, events_tx.clone())?;
        if let Some(mode) = &config.sandbox {
            let ctl = mode.dir.ctl();
            crate::sandbox::server::start(
                mode,
                &vm_config.vsock_uds,
                audit,
                config.max_output_bytes,
            )
            .map_err(|source| Error::Listen { path: ctl, source })?;
        }
        // Installed just before the VM starts: from here on a signal means
        // "stop the VM and clean up", not "die at once".
        let stop = StopSignal::install().map_err(Error::Signals)?;
        let started = Instant::now();
        let vm = spawn_vm(selection, &vm_config, audit)?;
        let session = SessionParams {
            spec: config.spec.clone(),
            max_output_bytes: config.max_output_bytes,
            events: events_tx,
            writers: terminal,
            audit: audit.clone(),
        };
        Ok(Booted {
            config,
            audit,
            selection,
            vm_config,
            run_dir,
            ports,
            vm,
            booted_again: false,
            helper_threads: Vec::new(),
            events,
            session,
            stop,
            started,
            timings: Timings::default(),
        })
    }

    /// Carries the run's command through the control session, watching
    /// the VM, the deadlines, the signals and the audit log, until the run
    /// is over.
    ///
    /// A tcg VM whose guest could not reach the host at all is booted once
    /// more ([`Booted::vsock_never_answered`]), with a boot deadline of its
    /// own; `--timeout` still counts from the first boot.
    fn exec(&mut self) -> Result<End, Error> {
        // When the VM now running was started.
        let mut spawned = self.started;
        loop {
            let mut deadlines = Deadlines::from_start(self.started, self.config.timeout);
            // A second boot gets the whole boot allowance; --timeout still
            // counts from the first.
            deadlines.boot = (spawned + deadlines.boot_limit).min(deadlines.timeout);
            if self.config.dump_memory.is_some() {
                // The engine writes the guest's RAM out before it exits.
                deadlines.power_off_grace = DUMP_GRACE;
                deadlines.past_timeout = None;
            }
            let end = supervise(
                &mut self.vm,
                &self.events,
                &self.session,
                deadlines,
                &self.stop,
                &mut self.timings,
            )
            .map_err(Error::Supervise)?;
            let End::StoppedBeforeConnect(exit) = end else {
                return Ok(end);
            };
            self.helper_threads = self.vm.helper_threads();
            if self.booted_again || !self.vsock_never_answered() {
                return Ok(end);
            }
            self.boot_again(exit)?;
            spawned = Instant::now();
        }
    }

    /// Whether the guest stopped because the engine's vsock device never
    /// answered it: on the tcg engine, the init's "failed to connect to
    /// the host" on the console of a VM that ended before any connection
    /// reached the control port. vhost-device-vsock, which serves that
    /// device, can stop answering for good from the start (its queue
    /// worker can end on an error it does not report; seen twice in some
    /// twenty CI runs, docs/FACTS.md). Nothing of the run has happened yet
    /// (no connection was taken, the command never started), so booting
    /// again loses nothing. Our own VMM (kvm) is not given this second
    /// chance: there a guest that cannot connect is a defect to see.
    fn vsock_never_answered(&self) -> bool {
        matches!(self.selection.engine, engine::Engine::Tcg(_))
            && engine::tail_lines(&self.run_dir.console, engine::TAIL_LINES)
                .iter()
                .any(|line| line.contains(airlock_protocol::CONNECT_FAILED))
    }

    /// Stops what is left of the first VM, says why and records its
    /// `vm.exit`, then starts the VM again (a new `vm.start`).
    fn boot_again(&mut self, exit: engine::ProcessExit) -> Result<(), Error> {
        let mut why = String::from(
            "the guest could not reach the host: the tcg engine's vsock device \
             (vhost-device-vsock) never answered its connects",
        );
        if let Some(note) = vhost_note(&self.helper_threads) {
            why.push_str(&format!(" ({note})"));
        }
        eprintln!("airlock: warning: {why}; booting the VM again (once)");
        for line in diagnostics(&self.run_dir.console, &self.vm)
            .into_iter()
            .chain(helper_lines(&self.helper_threads))
        {
            eprintln!("airlock:   {line}");
        }
        self.vm.kill().map_err(Error::Supervise)?;
        self.audit.record(
            &VmExit {
                status: Some(exit.to_string()),
                stopped_by: "itself",
                why: format!("{why}; airlock boots it again"),
            },
            Durability::Synced,
        );
        self.booted_again = true;
        self.vm = spawn_vm(self.selection, &self.vm_config, self.audit)?;
        Ok(())
    }

    /// Stops everything, records `vm.exit`, judges `end`, tells the user,
    /// and returns the `run.end` to write.
    fn remove(self, end: Result<End, Error>, began: Instant) -> Result<Ran, Error> {
        let Booted {
            config,
            audit,
            run_dir,
            ports,
            mut vm,
            started,
            timings,
            helper_threads,
            ..
        } = self;
        // Whatever happened, nothing of the VM outlives this point.
        let killed = vm.kill();
        // Stops accepting; waits for a file stream still in progress (the
        // VM is gone, so it ends); model calls still in progress end and
        // `model.summary` is written.
        drop(ports);
        let verdict = match &end {
            Ok(end) => judge(end, config.timeout),
            Err(e) => Verdict::of_error(e),
        };
        audit.record(&verdict.vm_exit(killed.as_ref().ok()), Durability::Synced);
        end?;
        killed.map_err(Error::Supervise)?;

        if let Some(line) = &verdict.message {
            eprintln!("airlock: {line}");
        }
        if verdict.diagnostics {
            let note =
                vhost_note(&helper_threads).map(|n| format!("{}: {n}", engine::tcg::VHOST_NAME));
            for line in diagnostics(&run_dir.console, &vm)
                .into_iter()
                .chain(helper_lines(&helper_threads))
                .chain(note)
            {
                eprintln!("airlock: {line}");
            }
            if matches!(config.console, ConsoleTarget::Temp { keep: false }) {
                eprintln!("airlock: (pass --keep-console to keep the whole console log)");
            }
        }
        drop(vm);
        let console_log = run_dir.finish();
        if let Some(kept) = &console_log {
            eprintln!("airlock: console log: {}", kept.display());
        }
        let since = |from: Instant, to: Option<Instant>| {
            to.map(|t| millis(t.saturating_duration_since(from)))
        };
        let end = verdict.run_end(Durations {
            total: millis(began.elapsed()),
            boot: since(started, timings.hello),
            command: timings.hello.and_then(|hello| since(hello, timings.exited)),
        });
        Ok(Ran {
            exit: verdict.exit,
            end,
            console_log,
        })
    }
}

/// A line per helper of what its threads were doing (`NAME's threads: ...`).
fn helper_lines(helpers: &[(&'static str, Vec<engine::ThreadState>)]) -> Vec<String> {
    helpers
        .iter()
        .map(|(name, threads)| {
            let list: Vec<String> = threads.iter().map(ToString::to_string).collect();
            format!("{name}'s threads: {}", list.join(", "))
        })
        .collect()
}

/// Whether vhost-device-vsock, among `helpers`, had lost its queue worker
/// ([`engine::tcg::vhost_worker_note`]).
fn vhost_note(helpers: &[(&'static str, Vec<engine::ThreadState>)]) -> Option<&'static str> {
    helpers
        .iter()
        .find(|(name, _)| *name == engine::tcg::VHOST_NAME)
        .and_then(|(_, threads)| engine::tcg::vhost_worker_note(threads))
}

/// Starts the VM of `vm_config` on the selected engine and records
/// `vm.start`.
fn spawn_vm(
    selection: &engine::Selection,
    vm_config: &VmConfig,
    audit: &AuditLog,
) -> Result<Vm, Error> {
    let vm = selection.engine.spawn(vm_config)?;
    let processes = vm
        .processes()
        .into_iter()
        .map(|(name, pid)| VmProcess {
            name: name.to_owned(),
            pid,
        })
        .collect();
    audit.record(
        &VmStart {
            engine: selection.engine.name(),
            processes,
            snapshot: vm.snapshot.clone(),
        },
        Durability::Synced,
    );
    Ok(vm)
}

/// What the engine boots: the pinned files (read through the descriptors
/// it inherits), the memory and CPUs, and the kernel command line.
fn vm_config(config: &RunConfig, pins: &Pins, run_dir: &RunDir, vsock_uds: PathBuf) -> VmConfig {
    let mut extra_cmdline = boot_cmdline(config, pins.image_mode);
    // The guest has no clock of its own worth trusting: the init sets it
    // from this (files the command writes get real mtimes). Not a secret.
    if let Ok(now) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        extra_cmdline.insert(0, format!("{EPOCH_CMDLINE}={}", now.as_secs()));
    }
    // Before the user's --cmdline, which may lower it (the init caps it).
    extra_cmdline.insert(0, model_max_body_word(config));
    // The ports the guest forwards to the host (numbers only, no host
    // address): the init listens on them for the agent.
    if let Some(word) = config.egress.cmdline_word() {
        extra_cmdline.insert(0, word);
    }
    let (initrd, disks) = if pins.image_mode {
        let disks = std::iter::once(&pins.root)
            .chain(pins.archive.as_ref())
            .map(|pin| Disk {
                path: pin.fd_path(),
                read_only: true,
            })
            .collect();
        (None, disks)
    } else {
        (Some(pins.root.fd_path()), Vec::new())
    };
    VmConfig {
        kernel: pins.kernel.fd_path(),
        initrd,
        disks,
        mem_mib: config.mem_mib,
        cpus: config.cpus,
        console_log: run_dir.console.clone(),
        extra_cmdline,
        run_dir: run_dir.dir.clone(),
        vsock_uds,
        guest_cid: DEFAULT_GUEST_CID,
        dump_memory: config.dump_memory.clone(),
        inherited_fds: pins.fds(),
        snapshot: None,
    }
}
