//! The model proxy: the host end of the model port
//! ([`airlock_protocol::MODEL_PORT`], 1027; PROTOCOL.md "Model calls").
//!
//! The guest init relays each HTTP request the agent makes to its in-guest
//! endpoint over a connection of its own. Here each connection gets a
//! thread ([`proxy::Proxy::serve`]): the request is checked against the
//! allow list and the header rules ([`rules`]), the run's policy and budget
//! ([`policy`]: a call in flight holds its output cap against the token
//! budget), forwarded to its provider's upstream with that provider's real
//! key alone ([`config`]: from the host's
//! environment or a secrets file; it never enters the guest) over HTTP or
//! HTTPS (ureq + rustls, trusting Mozilla's roots and those of the
//! user's `--model-ca` file, [`config::CaFile`]), and the answer relayed
//! chunk by chunk as the upstream produces it, its token usage read on the
//! way ([`usage`]) and every configured key masked out of it ([`scrub`]).
//! Every call is audited (`model.call`), every refusal too
//! (`model.denied`, with an API-shaped JSON error for the agent that names
//! the rule or limit and the flag that changes it, and
//! `x-should-retry: false` so that the clients do not retry it; the first
//! of each reason in a run is told on stderr). The proxy changes nothing
//! in what the client sent or reads but the output cap under a token
//! budget ([`rules`] has the route table; batches and files are refused).
//!
//! Bounds: at most [`MAX_CONCURRENT`] connections are served at once (the
//! next waits to be accepted); after [`MAX_CONNECTIONS`] in a run the port
//! closes (`control.capped`, port 1027; the port server,
//! [`crate::door::ports`], accepts). Request bodies are bounded by the policy, frames by the
//! protocol; a body is read at its top level only, never built as a tree
//! ([`body`]).

pub mod body;
pub mod config;
pub mod policy;
pub mod proxy;
pub mod rules;
pub mod scrub;
pub mod usage;

use std::io;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use config::{Args, Settings};

use crate::audit::{AuditLog, Durability};
use crate::door::ports::{Live, Port};

/// Audit record kinds of the model proxy.
pub mod kind {
    /// A call forwarded to the upstream: `call`, `api`, `method`, `target`,
    /// `model`, `status`, `input_tokens`, `output_tokens`, `latency_ms`,
    /// `upstream_head_ms`, `first_chunk_ms`, `request_bytes`,
    /// `request_sha256`, `forwarded_sha256` (when the cap was lowered),
    /// `max_tokens_capped` (`field`, `asked`, `sent`, and `also` when both
    /// OpenAI cap fields were lowered), `reserved` (under a token budget:
    /// `output` = n × the cap sent, `input_estimate`, `n`), `charged`
    /// (`input`, `output`: what the run's count was given), `scrubbed`
    /// (`headers`, `body`: keys masked in the answer; null when none),
    /// `response_bytes` (from the upstream), `response_sha256` (of the
    /// body the guest got), `complete`, `error`, `dropped_headers`,
    /// `guest_credentials_dropped`.
    pub const CALL: &str = "model.call";
    /// A call refused: `api`, `method`, `target`, `model`, `reason`,
    /// `status`, `message`, `request_bytes`, `dropped_headers`,
    /// `guest_credentials_dropped`. Reasons: `path_not_allowed` (404),
    /// `method_not_allowed` (405), `query_not_allowed` (400),
    /// `outside_the_run` (403: batches, files, background responses),
    /// `other_host`, `no_upstream`, `no_upstream_for_api`, `no_key`,
    /// `model_not_allowed` (403), `body_too_large` (413), `bad_body`
    /// (400), `request_budget`, `token_budget` (429). The first refusal
    /// of each reason in a run is also told on stderr
    /// (`airlock: model: refused …`).
    pub const DENIED: &str = "model.denied";
    /// A model connection that broke the protocol: `port`, `reason`.
    pub const PROTOCOL_ERROR: &str = "model.protocol_error";
    /// At the end of the run: the counts and tokens.
    pub const SUMMARY: &str = "model.summary";
}

/// Most model connections served at once.
pub const MAX_CONCURRENT: usize = 16;
/// Most model connections accepted in one run.
pub const MAX_CONNECTIONS: u64 = 10_000;
/// At the end, how long connections still in progress get to finish.
const FINISH: Duration = Duration::from_secs(2);

/// The model port of a run, apart from its listener (served by the
/// [`crate::door::ports::PortServer`]). Dropping it, after the port server, gives the calls in
/// progress [`FINISH`] to end, shuts down the rest and writes
/// `model.summary`.
#[derive(Debug)]
pub struct ModelPort {
    live: Arc<Live>,
    proxy: Arc<proxy::Proxy>,
    audit: AuditLog,
}

/// The model port for the port server (`<vsock_uds>_1027`: each connection
/// served on a thread of its own, at most [`MAX_CONCURRENT`] at once, at
/// most [`MAX_CONNECTIONS`] in a run) and the [`ModelPort`] that sums it
/// up at the end.
pub fn port(
    settings: &Settings,
    vsock_uds: &Path,
    audit: &AuditLog,
) -> io::Result<(Port, ModelPort)> {
    let path = crate::engine::port_path(vsock_uds, airlock_protocol::MODEL_PORT);
    let listener = UnixListener::bind(&path)?;
    let proxy = Arc::new(proxy::Proxy::new(settings.clone(), audit.clone()));
    let (port, live) = Port::each_on_thread(
        airlock_protocol::MODEL_PORT,
        listener,
        MAX_CONNECTIONS,
        MAX_CONCURRENT,
        "model",
        {
            let proxy = Arc::clone(&proxy);
            move |_, stream: &std::os::unix::net::UnixStream| proxy.serve(stream)
        },
    );
    Ok((
        port,
        ModelPort {
            live,
            proxy,
            audit: audit.clone(),
        },
    ))
}

impl Drop for ModelPort {
    fn drop(&mut self) {
        self.live.wait(Instant::now() + FINISH);
        let unfinished = self.live.shut_down();
        let mut summary = self.proxy.summary();
        summary.unfinished_at_end = Some(unfinished);
        self.audit.record(&summary, Durability::Synced);
    }
}

#[cfg(test)]
mod tests;
