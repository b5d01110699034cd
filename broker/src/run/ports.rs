//! The vsock ports a run serves, handed to the one port server
//! ([`crate::door::ports`]): control (1024, to the supervisor), the file
//! ports (1025 in, 1026 out) when the run has them, and the model port
//! (1027), always.

use std::io::{self, BufReader};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::Sender;
use std::time::Instant;

use airlock_protocol::{CONTROL_PORT, FILES_IN_PORT, FILES_OUT_PORT};

use crate::audit::records::{Direction, FilesDone, PortFailed, Unrecorded};
use crate::audit::{AuditLog, Durability};
use crate::door::ports::{Accepted, Port, PortServer};
use crate::engine;

use super::*;

/// The ports of a run, served. Dropping it stops accepting, waits for a
/// file stream still in progress (the VM is gone by then, so it ends),
/// then lets the model calls in progress end and writes `model.summary`.
#[derive(Debug)]
pub(crate) struct Ports {
    server: Option<PortServer>,
    model: Option<crate::model::ModelPort>,
    share: Option<crate::share::ShareServer>,
    egress: Option<crate::egress::EgressPort>,
}

impl Drop for Ports {
    fn drop(&mut self) {
        // In this order: the model's summary counts what the server took.
        drop(self.server.take());
        drop(self.share.take());
        drop(self.model.take());
        drop(self.egress.take());
    }
}

/// Listens on every port of the run (before the VM starts, so that the
/// guest's connections always find us) and serves them; the control
/// session and what else happens on the control port go to `events`.
pub(crate) fn serve(
    config: &RunConfig,
    vsock_uds: &Path,
    audit: &AuditLog,
    events: Sender<Event>,
) -> Result<Ports, Error> {
    let control = Port::one(CONTROL_PORT, bind(vsock_uds, CONTROL_PORT)?, move |a| {
        let _ = events.send(Event::Accepted(a));
    });
    let mut ports = vec![control];
    ports.extend(file_ports(config, vsock_uds, audit)?);
    let (model_port, model) =
        crate::model::port(&config.model, vsock_uds, audit).map_err(|source| Error::Listen {
            path: engine::port_path(vsock_uds, airlock_protocol::MODEL_PORT),
            source,
        })?;
    ports.push(model_port);
    let (egress_port, egress) = crate::egress::port(
        &config.egress,
        bind(vsock_uds, airlock_protocol::EGRESS_PORT)?,
        audit,
    );
    ports.push(egress_port);
    let share = if config.mounts.is_empty() {
        None
    } else {
        let run_dir = vsock_uds
            .parent()
            .unwrap_or_else(|| Path::new("/nonexistent"));
        let share = crate::share::ShareServer::start(
            &config.mounts,
            config.files.deny.patterns(),
            run_dir,
            audit,
        )
        .map_err(Error::Shares)?;
        ports.push(share.port(bind(vsock_uds, airlock_protocol::MOUNTS_PORT)?, audit));
        Some(share)
    };
    let server = PortServer::start(ports, audit).map_err(|source| Error::Listen {
        path: engine::port_path(vsock_uds, CONTROL_PORT),
        source,
    })?;
    Ok(Ports {
        server: Some(server),
        model: Some(model),
        share,
        egress: Some(egress),
    })
}

/// Binds the socket of `port`.
fn bind(vsock_uds: &Path, port: u32) -> Result<UnixListener, Error> {
    let path = engine::port_path(vsock_uds, port);
    UnixListener::bind(&path).map_err(|source| Error::Listen { path, source })
}

/// The file ports this run serves (`--workspace`: 1025, `--out`: 1026).
/// Each serves one connection, on a thread of its own that the port's
/// handler holds (so stopping the port server waits for the stream to
/// end).
pub(crate) fn file_ports(
    config: &RunConfig,
    vsock_uds: &Path,
    audit: &AuditLog,
) -> Result<Vec<Port>, Error> {
    let mut ports = Vec::new();
    if let Some(root) = &config.files.workspace {
        let (root, deny, log) = (root.clone(), config.files.deny.clone(), audit.clone());
        let serve = move |stream: &UnixStream| match crate::door::files::send_workspace(
            io::BufWriter::with_capacity(256 * 1024, stream),
            &root,
            &deny,
            &log,
        ) {
            Ok(sent) => {
                if sent.symlinks > 0 {
                    eprintln!(
                        "airlock: workspace: skipped {} symlink(s) (never followed)",
                        sent.symlinks
                    );
                }
                FilesDone::In {
                    direction: Direction::In,
                    entries: sent.entries,
                    bytes: sent.bytes,
                    denied: sent.denied,
                    symlinks: sent.symlinks,
                    skipped: sent.skipped,
                }
            }
            Err(e) => {
                eprintln!("airlock: error: {}", crate::text::report(&e));
                FilesDone::Failed {
                    direction: Direction::In,
                    error: crate::text::report(&e),
                    abandoned: None,
                }
            }
        };
        ports.push(file_port(FILES_IN_PORT, vsock_uds, audit, serve)?);
    }
    if let Some(out) = &config.files.out {
        let (out, max, log) = (out.clone(), config.files.max_out_bytes, audit.clone());
        let collect = config.files.collect.clone();
        // The results pass never keeps airlock past the run's time: the VM
        // is stopped at the timeout, and what is still queued is abandoned
        // shortly after.
        let deadline = Instant::now() + config.timeout + RESULTS_GRACE;
        let serve = move |stream: &UnixStream| {
            // Short reads, so that the deadline is seen even if the guest
            // stops sending mid-frame.
            let _ = stream.set_read_timeout(Some(POLL * 10));
            let policy = crate::door::files::ResultsPolicy {
                out: &out,
                max_bytes: max,
                collect: &collect,
                deadline: Some(deadline),
            };
            let result = crate::door::files::receive_results(
                BufReader::with_capacity(256 * 1024, stream),
                &policy,
                &log,
                &mut |path: &str, why: &str| {
                    // Both come from the guest's names: no control bytes
                    // reach the terminal, no line can pass as airlock's.
                    eprintln!(
                        "airlock: refused result file {}: {}",
                        crate::text::sanitize(path.as_bytes()),
                        crate::text::sanitize(why.as_bytes())
                    )
                },
            );
            // Closing tells the guest we have it all.
            let _ = stream.shutdown(Shutdown::Both);
            match result {
                Ok(got) => {
                    if got.unnamed > 0 {
                        eprintln!(
                            "airlock: refused {} more result file(s), not named here \
                             (the audit log has them)",
                            got.unnamed
                        );
                    }
                    FilesDone::Out {
                        direction: Direction::Out,
                        accepted: got.accepted,
                        refused: got.refused,
                        bytes: got.bytes,
                        unrecorded: Unrecorded {
                            accepted: got.unrecorded_accepted,
                            refused: got.unrecorded_refused,
                            records_sha256: got.unrecorded_sha256,
                        },
                        dir_mtimes_not_restored: got.dir_times_dropped,
                    }
                }
                Err(e) => {
                    eprintln!(
                        "airlock: refused the rest of the results: {}",
                        crate::text::report(&e)
                    );
                    FilesDone::Failed {
                        direction: Direction::Out,
                        error: crate::text::report(&e),
                        abandoned: Some(matches!(e, crate::door::files::Error::Abandoned)),
                    }
                }
            }
        };
        ports.push(file_port(FILES_OUT_PORT, vsock_uds, audit, serve)?);
    }
    Ok(ports)
}

/// One file port: its connection is served by `serve` (whose result is
/// the `files.done` record) on a thread of its own, so that a later
/// connection is refused, audited and named as it comes (the guest holds
/// the results connection open while the command runs); the handler
/// holds that thread and joins it when the port server drops it.
pub(crate) fn file_port(
    port: u32,
    vsock_uds: &Path,
    audit: &AuditLog,
    serve: impl FnOnce(&UnixStream) -> FilesDone + Send + 'static,
) -> Result<Port, Error> {
    let listener = bind(vsock_uds, port)?;
    let audit = audit.clone();
    let mut serve = Some(serve);
    // Owned by the handler: joined when the port server drops it.
    let mut server = JoinOnDrop(None);
    Ok(Port::one(port, listener, move |accepted| match accepted {
        Accepted::Stream(stream) => {
            let (Some(serve), log) = (serve.take(), audit.clone()) else {
                return;
            };
            let spawned = std::thread::Builder::new()
                .name(format!("file-port-{port}"))
                .spawn(move || {
                    let done = serve(&stream);
                    log.record(&done, Durability::Synced);
                });
            match spawned {
                Ok(handle) => server.hold(handle),
                Err(e) => audit.record(
                    &PortFailed {
                        port,
                        error: e.to_string(),
                    },
                    Durability::Synced,
                ),
            }
        }
        Accepted::Refused(n) => {
            eprintln!("airlock: refused extra connection {n} to file port {port}");
        }
        Accepted::Capped(_) | Accepted::Failed(_) => {}
    }))
}

/// Joins its thread when dropped.
#[derive(Debug)]
pub(crate) struct JoinOnDrop(pub(crate) Option<std::thread::JoinHandle<()>>);

impl JoinOnDrop {
    pub(crate) fn hold(&mut self, handle: std::thread::JoinHandle<()>) {
        self.0 = Some(handle);
    }
}

impl Drop for JoinOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            // A panic there is reported by the thread itself.
            let _ = handle.join();
        }
    }
}
