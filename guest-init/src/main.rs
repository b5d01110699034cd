//! `airlock-init`: the PID 1 of an Airlock microVM.
//!
//! The kernel starts it from the initramfs or from the root image (image
//! mode: see [`image`]) with `/dev/console` (the serial port) as stdin,
//! stdout and stderr. In order it:
//!
//! 1. mounts the pseudo filesystems from the table in [`mounts`] (and, when
//!    the root is the erofs image rather than an initramfs, the writable
//!    tmpfs set of [`image`] mode);
//! 2. makes itself non-dumpable ([`privilege`]), reads the kernel command
//!    line ([`cmdline`]) for `airlock.debug=1`, `airlock.container=0` and
//!    `airlock.vmroot=1`; in image mode sets the host name and brings up
//!    `lo`;
//! 3. writes the boot-timer mark ([`boottimer`]) for the benchmarks;
//! 4. installs the SIGCHLD reaper ([`reaper`]); with `airlock.snapshot=1`
//!    warms the container engine (image mode with a container: one
//!    throw-away container, [`image::warm_up`]; with `airlock.prepare=1`
//!    the live sandbox's container itself, started, [`prepared`]), then
//!    stops at the snapshot point and, woken, takes the host's time,
//!    entropy and identity ([`wake`]); prints
//!    [`airlock_protocol::INIT_READY_LINE`];
//! 5. connects to the host over vsock and runs the control session
//!    ([`rpc`]): handshake, run spec, the connections to the host's file
//!    ports, the command ([`exec`]; in image mode inside a podman container
//!    unless turned off, else as the unprivileged agent user unless
//!    `airlock.vmroot=1`) with its output
//!    streamed as it comes, its exit status, and, when the host takes
//!    them, audit events about the processes in the VM ([`procevents`]);
//!    when the host relays model calls, the in-guest model endpoint
//!    ([`model`]) serves the command on 127.0.0.1;
//! 6. syncs, stops every process, syncs and reboots ([`power`]): without
//!    ACPI a reset is how the VM ends, and the VMM treats it as a clean exit.
//!
//! PID 1 must never exit (the kernel panics) and never panic: every error is
//! printed as `airlock-init: error: …` and the run still ends in step 6. A
//! panic hook sends a panic there too, whatever the panic strategy.
//!
//! Run anywhere else than as PID 1, it touches nothing and exits with 2.

mod boottimer;
mod clock;
mod cmdline;
mod console;
mod egress;
mod exec;
mod execd;
mod files;
mod image;
mod keeper;
mod model;
mod mounts;
mod power;
mod prepared;
mod privilege;
mod procevents;
mod reaper;
mod rpc;
mod share;
mod vsock;
mod wake;

use std::process::ExitCode;

/// What stops the init before it is ready.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Mount(#[from] mounts::Error),
    #[error(transparent)]
    Reap(#[from] reaper::Error),
    #[error(transparent)]
    Rpc(#[from] rpc::Error),
    #[error(transparent)]
    Wake(#[from] wake::Error),
}

fn main() -> ExitCode {
    if let Some(code) = keeper::dispatch() {
        return code;
    }
    let pid = std::process::id();
    if pid != 1 {
        console::error(&format!(
            "not PID 1 (pid {pid}): this is the Airlock guest init and runs only inside the microVM; doing nothing"
        ));
        return ExitCode::from(2);
    }
    std::panic::set_hook(Box::new(|info| {
        console::error(&format!("panic: {info}"));
        power::power_off()
    }));
    if let Err(err) = run() {
        console::error(&console::chain(&err));
    }
    power::power_off()
}

fn run() -> Result<(), Error> {
    // First: nothing started later, whatever its uid, may ptrace PID 1 or
    // take its descriptors unless it has CAP_SYS_PTRACE.
    if let Err(err) = privilege::make_undumpable() {
        console::warn(&format!("cannot make the init non-dumpable: {err}"));
    }
    let image = image::root_is_image();
    mounts::mount_all(image)?;
    // A user may not hard-link (or follow a sticky directory's symlink to)
    // a file it does not own: the agent cannot link a root-only file into
    // /workspace/out for the init, which reads as root, to send.
    privilege::protect_links();
    let options = cmdline::Options::read().unwrap_or_else(|err| {
        console::warn(&console::chain(&err));
        cmdline::Options::default()
    });
    console::set_debug(options.debug);
    if let Some(epoch) = options.epoch {
        if let Err(err) = clock::set_if_behind(epoch) {
            console::warn(&format!("cannot set the clock: {err}"));
        }
    }
    if image {
        if let Err(err) = image::set_hostname() {
            console::warn(&format!("cannot set the host name: {err}"));
        }
        if let Err(err) = image::loopback_up() {
            console::warn(&format!("cannot bring up lo: {err}"));
        }
    }
    let container = image && options.container;
    console::debug(&format!("image mode: {image}; container: {container}"));
    if let Err(err) = boottimer::mark() {
        console::debug(&console::chain(&err));
    }
    let mut reaper = reaper::Reaper::install()?;
    let mode = container.then_some(image::Mode {
        nested: options.nested,
        archive: options.archive,
        image_disk: options.image_disk,
    });
    let mut prepared = None;
    if options.snapshot {
        if let Some(mode) = mode {
            // A live sandbox's snapshot holds its container started (see
            // prepared); any other holds a warmed container engine (see
            // image::warm_up). A failure only makes the wake slower.
            if options.prepare && !mode.archive {
                match prepared::prepare(
                    mode,
                    prepared::Shape {
                        cwd: options.prepare_cwd.clone(),
                        user: options.prepare_user.clone(),
                    },
                ) {
                    Ok(p) => {
                        console::debug("started the agent's container for the snapshot");
                        prepared = Some(p);
                    }
                    Err(err) => console::warn(&format!(
                        "cannot start the agent's container for the snapshot: {err}"
                    )),
                }
            }
            if prepared.is_none() {
                match image::warm_up() {
                    Ok(took) => console::debug(&format!(
                        "warmed the container engine in {} ms",
                        took.as_millis()
                    )),
                    Err(err) => console::warn(&format!("cannot warm the container engine: {err}")),
                }
            }
        }
        // A snapshot is taken here; a woken guest goes on from here.
        wake::snapshot_point()?;
    }
    console::out(airlock_protocol::INIT_READY_LINE);
    // Without a container the command runs as the agent user unless the
    // host asked for root (`airlock run --vm-root`).
    let agent = !container && !options.vm_root;
    console::debug(&format!(
        "command user: {}",
        if container {
            "container root"
        } else if agent {
            "agent (uid 1000)"
        } else {
            "root"
        }
    ));
    let status = rpc::run(
        &mut reaper,
        rpc::Placement {
            container: mode,
            agent,
            model_max_body: options.model_max_body,
            host_ports: options.host_ports,
        },
        prepared,
    )?;
    console::debug(&format!("command ended: {status:?}"));
    power::sync();
    Ok(())
}
