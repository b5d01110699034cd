//! The in-guest model endpoint: a small, strict HTTP/1.1 server on
//! `127.0.0.1:`[`PORT`] that relays each request to the host's model proxy
//! over its own vsock connection ([`MODEL_PORT`], PROTOCOL.md "Model
//! calls") and streams the answer back as it arrives.
//!
//! It runs only when the host's `Hello` listed the `model` capability. The
//! agent finds it through [`agent_env`]: `ANTHROPIC_BASE_URL`,
//! `OPENAI_BASE_URL`, and *placeholder* API keys (the SDKs refuse to start
//! without one). The real key stays on the host, which drops every
//! credential header the guest sends and injects its own.
//!
//! Where it listens:
//! - with the agent in a container ([`listen_ports`]): a helper
//!   thread unshares a fresh network namespace holding only `lo`, binds the
//!   listener there (a socket stays in the namespace it was made in) and
//!   pins the namespace at [`NETNS_PATH`], which podman joins with
//!   `--network ns:PATH`. The container has loopback and the endpoint, and
//!   still no network device.
//! - otherwise, in the VM's own namespace.
//!
//! The egress proxy ([`crate::egress`]) listens in the same namespace.
//!
//! One thread accepts; each connection gets its own thread, at most
//! [`MAX_CONNECTIONS`] at once (beyond that: `429`). A request's head is at
//! most [`MAX_HEAD`] bytes, its body at most [`MAX_BODY`] (by
//! `Content-Length` or chunked), every client read and write times out
//! after [`CLIENT_TIMEOUT`] and the whole request must arrive within
//! [`REQUEST_DEADLINE`] (a client trickling bytes cannot keep a slot);
//! each read from the host waits at most [`HOST_TIMEOUT`] (a model may
//! think for minutes). Hop-by-hop headers are dropped ([`HOP_BY_HOP`]
//! and those `Connection` names); absolute-URL targets are refused. The
//! response goes back with `Connection: close`, chunked (or with the
//! host's `Content-Length`), each `HttpBody` written as it arrives so that
//! server-sent events reach the agent incrementally. Errors of the endpoint
//! itself are API-shaped JSON (Anthropic's `{"type":"error","error":{…}}`,
//! which OpenAI clients read too through `error.message`).

mod http;
mod netns;
mod relay;
mod server;
#[cfg(test)]
mod tests;

pub(crate) use http::*;
pub(crate) use netns::*;
pub use relay::*;
pub(crate) use server::*;

use std::io;
use std::time::Duration;

use crate::console;

/// The endpoint's TCP port on 127.0.0.1.
pub const PORT: u16 = 8088;

/// Where the agent container's network namespace is pinned.
pub const NETNS_PATH: &str = "/run/airlock/netns/agent";

/// The API key the agent sees: a placeholder, never a real key (the host
/// holds that one and drops whatever key the guest sends).
pub const PLACEHOLDER_KEY: &str = "airlock-placeholder";

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// Largest request body: the protocol's model body limit (32 MiB). The
/// host passes its `--model-max-request-bytes` on the kernel command line
/// (`airlock.model_max_body`); the endpoint takes the smaller of the two,
/// so that the agent meets one limit end to end.
pub const MAX_BODY: u64 = airlock_protocol::limits::MAX_MODEL_BODY;

/// What the connectivity probe answers (`HEAD`/`GET /api/hello`, Claude
/// Code's check before its first call): never forwarded.
const HELLO_BODY: &str = r#"{"ok":true,"service":"airlock model endpoint"}"#;

/// Bound on each read from and write to the agent.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on reading a whole request (head and body) from the agent.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(300);

/// Bound on each read from the host: a model may think for minutes before
/// its first byte.
pub const HOST_TIMEOUT: Duration = Duration::from_secs(600);

/// After an answer, how long unread request bytes are drained before
/// closing (closing with unread data would reset the connection and could
/// lose the answer on its way).
const LINGER: Duration = Duration::from_secs(2);

/// Most bytes drained after an answer.
const LINGER_BYTES: u64 = MAX_BODY + 64 * 1024;

/// The endpoint could not be set up (the run goes on without it).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to create the agent's network namespace")]
    Unshare(#[source] io::Error),
    #[error("failed to bring up lo")]
    Loopback(#[source] io::Error),
    #[error("failed to pin the network namespace at {NETNS_PATH}")]
    Pin(#[source] io::Error),
    #[error("failed to start the endpoint's thread")]
    Thread(#[source] io::Error),
}

/// The variables that point the agent at the endpoint, minus those the
/// run's own environment `spec_env` sets (the user's choice wins).
pub fn agent_env(spec_env: &[(String, String)]) -> Vec<(String, String)> {
    let base = format!("http://127.0.0.1:{PORT}");
    [
        ("ANTHROPIC_BASE_URL", base.clone()),
        ("OPENAI_BASE_URL", format!("{base}/v1")),
        ("ANTHROPIC_API_KEY", PLACEHOLDER_KEY.to_owned()),
        ("OPENAI_API_KEY", PLACEHOLDER_KEY.to_owned()),
    ]
    .into_iter()
    .filter(|(name, _)| !spec_env.iter().any(|(n, _)| n == name))
    .map(|(name, value)| (name.to_owned(), value))
    .collect()
}

/// Starts the endpoint for a run on `listener` (from [`listen_ports`]).
pub fn start(
    listener: std::net::TcpListener,
    reporter: Option<Reporter>,
    max_body: Option<u64>,
) -> Result<(), Error> {
    spawn_server(listener, VsockRelay, reporter, max_body)?;
    console::debug(&format!("model endpoint on 127.0.0.1:{PORT}"));
    Ok(())
}
