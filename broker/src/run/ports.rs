//! The guest-initiated vsock ports a run serves besides control: the
//! file ports (1025 in, 1026 out) and the model port (1027).

use std::io::{self, BufReader};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Instant;

use airlock_protocol::{FILES_IN_PORT, FILES_OUT_PORT};
use serde_json::{json, Value};

use crate::audit::{kind, AuditLog, Durability};
use crate::control::{self, Accepted, Acceptor};
use crate::engine;

use super::*;

/// Listens on the file ports this run serves (`--workspace`: 1025,
/// `--out`: 1026). Each accepts one connection, served in its accept thread
/// (so dropping the acceptor waits for the stream to end); later ones are
/// refused like the control port's.
pub(crate) fn file_ports(
    config: &RunConfig,
    vsock_uds: &Path,
    audit: &AuditLog,
) -> Result<Vec<Acceptor>, Error> {
    let mut acceptors = Vec::new();
    if let Some(root) = &config.files.workspace {
        let (root, deny, log) = (root.clone(), config.files.deny.clone(), audit.clone());
        let serve = move |stream: &UnixStream| match crate::files::send_workspace(
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
                json!({ "direction": "in", "entries": sent.entries, "bytes": sent.bytes,
                        "denied": sent.denied, "symlinks": sent.symlinks,
                        "skipped": sent.skipped })
            }
            Err(e) => {
                eprintln!("airlock: error: {}", crate::text::report(&e));
                json!({ "direction": "in", "error": crate::text::report(&e) })
            }
        };
        acceptors.push(file_port(FILES_IN_PORT, vsock_uds, audit, serve)?);
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
            let policy = crate::files::ResultsPolicy {
                out: &out,
                max_bytes: max,
                collect: &collect,
                deadline: Some(deadline),
            };
            let result = crate::files::receive_results(
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
                    json!({ "direction": "out", "accepted": got.accepted,
                            "refused": got.refused, "bytes": got.bytes,
                            "unrecorded": {
                                "accepted": got.unrecorded_accepted,
                                "refused": got.unrecorded_refused,
                                "records_sha256": got.unrecorded_sha256,
                            },
                            "dir_mtimes_not_restored": got.dir_times_dropped })
                }
                Err(e) => {
                    eprintln!(
                        "airlock: refused the rest of the results: {}",
                        crate::text::report(&e)
                    );
                    json!({ "direction": "out", "error": crate::text::report(&e),
                            "abandoned": matches!(e, crate::files::Error::Abandoned) })
                }
            }
        };
        acceptors.push(file_port(FILES_OUT_PORT, vsock_uds, audit, serve)?);
    }
    Ok(acceptors)
}

/// One file port: its first connection is audited as accepted, served by
/// `serve` (whose fields make the `files.done` record), later ones are
/// refused and audited. The first is served on a thread of its own (the
/// guest holds the results connection open while the command runs), so
/// that a later connection is refused, audited and named as it comes;
/// dropping the acceptor still waits for that thread.
pub(crate) fn file_port(
    port: u32,
    vsock_uds: &Path,
    audit: &AuditLog,
    serve: impl FnOnce(&UnixStream) -> Value + Send + 'static,
) -> Result<Acceptor, Error> {
    let path = engine::port_path(vsock_uds, port);
    let listen_error = |source| Error::Listen {
        path: path.clone(),
        source,
    };
    let listener = UnixListener::bind(&path).map_err(listen_error)?;
    let audit = audit.clone();
    let mut serve = Some(serve);
    // Owned by the accept loop's callback: joined when the loop ends.
    let mut server = JoinOnDrop(None);
    Acceptor::start(listener, move |accepted| match accepted {
        Accepted::Session(stream) => {
            audit.host(
                kind::CONTROL_ACCEPTED,
                json!({ "port": port }),
                Durability::Synced,
            );
            let (Some(serve), log) = (serve.take(), audit.clone()) else {
                return;
            };
            let spawned = std::thread::Builder::new()
                .name(format!("file-port-{port}"))
                .spawn(move || {
                    let fields = serve(&stream);
                    log.host(kind::FILES_DONE, fields, Durability::Synced);
                });
            match spawned {
                Ok(handle) => server.hold(handle),
                Err(e) => audit.host(
                    kind::CONTROL_FAILED,
                    json!({ "port": port, "error": e.to_string() }),
                    Durability::Synced,
                ),
            }
        }
        Accepted::Refused(n) => {
            audit.host(
                kind::CONTROL_REFUSED,
                json!({ "port": port, "count": n }),
                Durability::Synced,
            );
            eprintln!("airlock: refused extra connection {n} to file port {port}");
        }
        Accepted::Capped => audit.host(
            kind::CONTROL_CAPPED,
            json!({ "port": port, "max": control::MAX_CONNECTIONS }),
            Durability::Synced,
        ),
        Accepted::Failed(e) => audit.host(
            kind::CONTROL_FAILED,
            json!({ "port": port, "error": e.to_string() }),
            Durability::Synced,
        ),
    })
    .map_err(listen_error)
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

/// Listens on the model port (1027): always, so that an agent without
/// `--model-upstream` gets an API-shaped refusal rather than no answer.
pub(crate) fn model_port(
    config: &RunConfig,
    vsock_uds: &Path,
    audit: &AuditLog,
) -> Result<crate::model::ModelPort, Error> {
    crate::model::listen(&config.model, vsock_uds, audit).map_err(|source| Error::Listen {
        path: engine::port_path(vsock_uds, airlock_protocol::MODEL_PORT),
        source,
    })
}
