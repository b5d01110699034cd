//! What a model call may be: the route table (method, path and a query
//! allow list per route), which headers of the guest's survive, which of
//! the upstream's come back, and the API-shaped error bodies of a refusal.
//! Pure functions, unit-tested.
//!
//! The route table ([`route`]), each entry deliberate:
//!
//! | method and path | API | query allowed | budget |
//! |---|---|---|---|
//! | `POST /v1/messages` | Anthropic | `beta=true` | generates: output cap `max_tokens` lowered and reserved |
//! | `POST /v1/messages/count_tokens` | Anthropic | `beta=true` | a request, no tokens (free: nothing is generated) |
//! | `GET /v1/models` | by header | Anthropic: `beta=true`, `limit`, `before_id`, `after_id` | a request, no tokens |
//! | `GET /v1/models/{id}` | by header | Anthropic: `beta=true` | a request, no tokens |
//! | `POST /v1/chat/completions` | OpenAI | none | generates: `max_completion_tokens` / `max_tokens` (× `n`) |
//! | `POST /v1/responses` | OpenAI | none | generates: `max_output_tokens`; `background: true` refused |
//! | `POST /v1/embeddings` | OpenAI | none | a request; its input tokens are counted, nothing reserved |
//!
//! The Anthropic Message Batches and Files APIs (`/v1/messages/batches`,
//! `/v1/files`) and OpenAI's (`/v1/batches`, `/v1/files`, `/v1/uploads`)
//! are refused with a 403 that says why: a batch runs, and is billed,
//! after the run has ended and outside its budget, and a file outlives the
//! run in the account; no flag enables them. Anything else is a 404.
//!
//! Query strings: only the parameters a route allows, each at most once,
//! with a bounded, well-formed value (`beta` is exactly `true`; `limit`
//! 1 to 4 digits; ids of `A-Za-z0-9_-`, at most [`MAX_ID`] bytes); the
//! target is then forwarded exactly as the guest sent it. No fragment,
//! no `..`, no percent-encoding: the target is compared, not normalised.
//! A `{id}` in a path is 1 to [`MAX_ID`] bytes of `A-Za-z0-9._:-` not
//! starting with `.` (model ids such as `claude-sonnet-4-5-20250929` or
//! `ft:gpt-4o-mini:org::id`).

use serde_json::{json, Value};

/// The API a call speaks, which decides the key header and the error shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Anthropic Messages: `x-api-key`, `{"type":"error","error":{…}}`.
    Anthropic,
    /// OpenAI Chat Completions: `Authorization: Bearer`, `{"error":{…}}`.
    OpenAi,
}

impl Api {
    pub fn name(self) -> &'static str {
        match self {
            Api::Anthropic => "anthropic",
            Api::OpenAi => "openai",
        }
    }
}

/// What a route does to the run's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Generates output: its cap field is lowered to the tokens left and
    /// reserved while it is in flight.
    Generate,
    /// `count_tokens`: a JSON body naming a model, nothing generated; a
    /// request for `--model-max-requests`, never refused or charged by
    /// `--model-max-tokens`.
    CountTokens,
    /// `POST /v1/embeddings`: a JSON body naming a model; its input tokens
    /// are counted from the response, nothing is reserved.
    Embed,
    /// `GET /v1/models[/{id}]`: no body; a request, no tokens.
    Models,
}

/// An allowed call: its API and the exact target to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub api: Api,
    /// The target exactly as the guest sent it (path and checked query),
    /// to append to the upstream URL.
    pub target: String,
    pub kind: Kind,
    /// A `POST` whose JSON body names a model.
    pub completion: bool,
}

impl Route {
    /// Whether the token budget applies (refuses when spent, and reserves).
    pub fn spends_tokens(&self) -> bool {
        matches!(self.kind, Kind::Generate | Kind::Embed)
    }
}

/// Longest query string accepted.
const MAX_QUERY: usize = 512;
/// Longest id in a path or a query value.
pub const MAX_ID: usize = 128;

/// The API a request speaks, from its path, else its headers: the
/// Anthropic SDKs always send `anthropic-version`.
pub fn api_of(path: &str, headers: &[(String, String)]) -> Api {
    match path {
        "/v1/messages" | "/v1/messages/count_tokens" => Api::Anthropic,
        "/v1/chat/completions" | "/v1/responses" | "/v1/embeddings" => Api::OpenAi,
        _ if path.starts_with("/v1/messages/") => Api::Anthropic,
        _ if header(headers, "anthropic-version").is_some() => Api::Anthropic,
        _ if header(headers, "authorization").is_some() => Api::OpenAi,
        _ => Api::Anthropic,
    }
}

/// The first value of header `name` (compared without case).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A query parameter a route allows, and the check of its value.
type Param = (&'static str, fn(&str) -> bool);

fn is_true(v: &str) -> bool {
    v == "true"
}

fn is_limit(v: &str) -> bool {
    (1..=4).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit())
}

fn is_query_id(v: &str) -> bool {
    (1..=MAX_ID).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A model id in a path: see the module docs.
pub fn is_model_id(v: &str) -> bool {
    (1..=MAX_ID).contains(&v.len())
        && !v.starts_with('.')
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

const BETA: &[Param] = &[("beta", is_true)];
const ANTHROPIC_MODELS: &[Param] = &[
    ("beta", is_true),
    ("limit", is_limit),
    ("before_id", is_query_id),
    ("after_id", is_query_id),
];

/// Checks a query against the route's allow list: `name=value` pairs
/// joined by `&`, each name allowed and given once, each value well-formed.
fn check_query(query: &str, allowed: &[Param]) -> Result<(), String> {
    if allowed.is_empty() {
        return Err("airlock allows no query string on this route".into());
    }
    if query.len() > MAX_QUERY {
        return Err(format!("the query string is over {MAX_QUERY} bytes"));
    }
    let mut seen: Vec<&str> = Vec::new();
    for pair in query.split('&') {
        let Some((name, value)) = pair.split_once('=') else {
            return Err(format!("query parameter {pair:?} has no value"));
        };
        let Some((_, ok)) = allowed.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "query parameter {name:?} is not allowed on this route (allowed: {})",
                names.join(", ")
            ));
        };
        if seen.contains(&name) {
            return Err(format!("query parameter {name:?} is given twice"));
        }
        seen.push(name);
        if !ok(value) {
            return Err(format!(
                "query parameter {name}={value:?} is not well-formed"
            ));
        }
    }
    Ok(())
}

/// Why the batch and file routes are refused, if `path` is one of them.
fn out_of_run(path: &str) -> Option<&'static str> {
    let under = |p: &str, base: &str| p == base || p.starts_with(&format!("{base}/"));
    if under(path, "/v1/messages/batches") || under(path, "/v1/batches") {
        Some(
            "airlock does not forward batch APIs: a batch runs, and is billed, after this run has \
             ended and outside its budget; send the messages one by one (no flag enables batches)",
        )
    } else if under(path, "/v1/files") || under(path, "/v1/uploads") {
        Some(
            "airlock does not forward the Files API: an uploaded file outlives this run in the \
             account, outside its audit and lifetime; put the content in the request instead \
             (no flag enables files)",
        )
    } else {
        None
    }
}

/// What airlock's route table allows, for the refusals.
const ROUTES: &str = "POST /v1/messages, POST /v1/messages/count_tokens, GET /v1/models[/{id}], \
     POST /v1/chat/completions, POST /v1/responses, POST /v1/embeddings";

/// Checks `method` and `target` against the route table (see the module
/// docs).
pub fn route(method: &str, target: &str, headers: &[(String, String)]) -> Result<Route, Denial> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let api = api_of(path, headers);
    if let Some(why) = out_of_run(path) {
        return Err(Denial::new(api, Reason::OutOfRun, why));
    }
    let model_id = path
        .strip_prefix("/v1/models/")
        .filter(|id| is_model_id(id));
    let known = matches!(
        path,
        "/v1/messages"
            | "/v1/messages/count_tokens"
            | "/v1/chat/completions"
            | "/v1/responses"
            | "/v1/embeddings"
            | "/v1/models"
    ) || model_id.is_some();
    if !known {
        return Err(Denial::new(
            api,
            Reason::Path,
            format!(
                "airlock does not forward {path:?}: its route table allows only {ROUTES} \
                 (no flag changes it)"
            ),
        ));
    }
    let (kind, params): (Kind, &[Param]) = match (method, path, api) {
        ("POST", "/v1/messages", _) => (Kind::Generate, BETA),
        ("POST", "/v1/messages/count_tokens", _) => (Kind::CountTokens, BETA),
        ("POST", "/v1/chat/completions" | "/v1/responses", _) => (Kind::Generate, &[]),
        ("POST", "/v1/embeddings", _) => (Kind::Embed, &[]),
        ("GET", "/v1/models", Api::Anthropic) => (Kind::Models, ANTHROPIC_MODELS),
        ("GET", "/v1/models", Api::OpenAi) => (Kind::Models, &[]),
        ("GET", _, Api::Anthropic) if model_id.is_some() => (Kind::Models, BETA),
        ("GET", _, Api::OpenAi) if model_id.is_some() => (Kind::Models, &[]),
        _ => {
            return Err(Denial::new(
                api,
                Reason::Method,
                format!(
                    "airlock does not forward {method} {path}: its route table allows only \
                     {ROUTES} (no flag changes it)"
                ),
            ))
        }
    };
    if let Some(q) = query {
        check_query(q, params).map_err(|why| {
            Denial::new(
                api,
                Reason::Query,
                format!("{why}: airlock refused {method} {path} (no flag changes it)"),
            )
        })?;
    }
    Ok(Route {
        api,
        target: target.to_owned(),
        kind,
        completion: method == "POST",
    })
}

/// A `Host` header names the in-guest endpoint (loopback, any port) or is
/// absent; anything else is an attempt to reach another host.
pub fn check_host(api: Api, headers: &[(String, String)]) -> Result<(), Denial> {
    for (name, value) in headers {
        if !(name.eq_ignore_ascii_case("host")
            || name.eq_ignore_ascii_case(":authority")
            || name.eq_ignore_ascii_case("x-forwarded-host"))
        {
            continue;
        }
        let host = value.trim();
        let bare = if let Some(rest) = host.strip_prefix('[') {
            rest.split(']').next().unwrap_or_default()
        } else {
            host.rsplit_once(':').map_or(host, |(h, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    h
                } else {
                    host
                }
            })
        };
        if !matches!(
            bare.to_ascii_lowercase().as_str(),
            "127.0.0.1" | "localhost" | "::1"
        ) {
            return Err(Denial::new(
                api,
                Reason::Host,
                "airlock forwards model calls only to its configured upstream (--model-upstream), \
                 not to the host this request names",
            ));
        }
    }
    Ok(())
}

/// Request headers passed on to the upstream (lower-case names); every
/// other header the guest sent is dropped: credentials (`authorization`,
/// `x-api-key`, `proxy-authorization`, `cookie`, and the account
/// selectors `openai-organization` / `openai-project`, which only the
/// host sets: [`super::config::Settings::openai_headers`]), hop-by-hop
/// headers, `host`, `forwarded`, `content-length` (recomputed) and
/// `accept-encoding` (the proxy asks for identity to read the usage).
/// What is kept is what the official clients send and is harmless: the
/// API version and beta lists, the SDKs' `x-stainless-*` telemetry (at
/// most [`MAX_STAINLESS`] of them, each value at most
/// [`MAX_STAINLESS_VALUE`] bytes; the rest dropped), Claude Code's `x-app`
/// and session id, and the browser-access opt-in (a CORS switch, no
/// credential).
fn keep_request_header(name: &str) -> bool {
    matches!(
        name,
        "content-type"
            | "accept"
            | "anthropic-version"
            | "anthropic-beta"
            | "anthropic-dangerous-direct-browser-access"
            | "user-agent"
            | "openai-beta"
            | "idempotency-key"
            | "x-request-id"
            | "x-app"
            | "x-claude-code-session-id"
    ) || name.starts_with("x-stainless-")
}

/// Most `x-stainless-*` headers forwarded.
pub const MAX_STAINLESS: usize = 24;
/// Longest `x-stainless-*` name and value forwarded.
pub const MAX_STAINLESS_VALUE: usize = 256;

/// The guest's headers split into those forwarded (names lower-cased) and
/// the names of those dropped.
pub fn filter_request_headers(
    headers: &[(String, String)],
) -> (Vec<(String, String)>, Vec<String>) {
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    let mut stainless = 0;
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        let mut keep = keep_request_header(&lower);
        if keep && lower.starts_with("x-stainless-") {
            stainless += 1;
            keep = stainless <= MAX_STAINLESS
                && lower.len() <= MAX_STAINLESS_VALUE
                && value.len() <= MAX_STAINLESS_VALUE;
        }
        if keep {
            kept.push((lower, value.clone()));
        } else if !dropped.contains(&lower) {
            dropped.push(lower);
        }
    }
    (kept, dropped)
}

/// Whether a header that carries a credential (recorded when dropped).
pub fn is_credential(name: &str) -> bool {
    matches!(
        name,
        "authorization" | "x-api-key" | "proxy-authorization" | "cookie" | "api-key"
    )
}

/// Response headers passed back to the guest; hop-by-hop, length and
/// encoding headers are not (the body's length is its chunks'), nor are
/// cookies. The upstream's retry advice (`x-should-retry`, `retry-after`,
/// `retry-after-ms`) and rate-limit headers (`anthropic-ratelimit-*`,
/// `x-ratelimit-*`) pass unchanged: the clients' retry logic reads them.
pub fn keep_response_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "content-type"
            | "cache-control"
            | "retry-after"
            | "retry-after-ms"
            | "x-should-retry"
            | "request-id"
            | "x-request-id"
    ) || name.starts_with("anthropic-")
        || name.starts_with("openai-")
        || name.starts_with("x-ratelimit-")
}

/// Why a call was refused (the audit record's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Path,
    Method,
    /// A query parameter the route does not allow, or a malformed value.
    Query,
    /// Batches and files: work or data outside the run.
    OutOfRun,
    Host,
    BodyTooLarge,
    BadBody,
    NoUpstream,
    /// An upstream is set, but none for this call's API.
    NoRoute,
    NoKey,
    ModelNotAllowed,
    RequestBudget,
    TokenBudget,
    Unreachable,
    /// Too many large request bodies in flight at once (the proxy's
    /// held-bodies budget): transient, so the client may retry.
    Busy,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Path => "path_not_allowed",
            Reason::Method => "method_not_allowed",
            Reason::Query => "query_not_allowed",
            Reason::OutOfRun => "outside_the_run",
            Reason::Host => "other_host",
            Reason::BodyTooLarge => "body_too_large",
            Reason::BadBody => "bad_body",
            Reason::NoUpstream => "no_upstream",
            Reason::NoRoute => "no_upstream_for_api",
            Reason::NoKey => "no_key",
            Reason::ModelNotAllowed => "model_not_allowed",
            Reason::RequestBudget => "request_budget",
            Reason::TokenBudget => "token_budget",
            Reason::Unreachable => "upstream_unreachable",
            Reason::Busy => "busy",
        }
    }

    /// The HTTP status and the Anthropic error type.
    fn status(self) -> (u16, &'static str) {
        match self {
            Reason::Path => (404, "not_found_error"),
            Reason::Method => (405, "invalid_request_error"),
            Reason::Query => (400, "invalid_request_error"),
            Reason::OutOfRun => (403, "permission_error"),
            Reason::Host
            | Reason::NoUpstream
            | Reason::NoRoute
            | Reason::NoKey
            | Reason::ModelNotAllowed => (403, "permission_error"),
            Reason::BodyTooLarge => (413, "request_too_large"),
            Reason::BadBody => (400, "invalid_request_error"),
            Reason::RequestBudget | Reason::TokenBudget => (429, "rate_limit_error"),
            Reason::Unreachable => (502, "api_error"),
            Reason::Busy => (503, "overloaded_error"),
        }
    }
}

/// A refusal, answered with an API-shaped JSON error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub api: Api,
    pub reason: Reason,
    pub message: String,
}

impl Denial {
    pub fn new(api: Api, reason: Reason, message: impl Into<String>) -> Denial {
        Denial {
            api,
            reason,
            message: message.into(),
        }
    }

    pub fn status(&self) -> u16 {
        self.reason.status().0
    }

    /// The body: `{"type":"error","error":{"type","message"}}` for
    /// Anthropic, `{"error":{"message","type","code"}}` for OpenAI.
    pub fn body(&self) -> Vec<u8> {
        let (_, kind) = self.reason.status();
        let v: Value = match self.api {
            Api::Anthropic => json!({
                "type": "error",
                "error": { "type": kind, "message": self.message },
            }),
            Api::OpenAi => json!({
                "error": {
                    "message": self.message,
                    "type": match self.reason {
                        Reason::RequestBudget | Reason::TokenBudget => "rate_limit_exceeded",
                        Reason::Unreachable | Reason::Busy => "api_error",
                        _ => "invalid_request_error",
                    },
                    "code": self.reason.name(),
                },
            }),
        };
        v.to_string().into_bytes()
    }

    /// Whether a client may get another answer by sending the same
    /// request again: only when the upstream could not be reached for a
    /// reason other than TLS (a network blip); every other refusal is
    /// airlock's rule or limit and stays until the user changes a flag.
    pub fn retryable(&self) -> bool {
        self.reason == Reason::Busy
            || (self.reason == Reason::Unreachable
                && !self.message.contains("TLS handshake failed"))
    }

    /// The response headers of the refusal: `x-should-retry: false`
    /// (the Anthropic and OpenAI SDKs, and Claude Code, then do not
    /// retry) on all but [`Denial::retryable`] ones, which carry no advice
    /// (the client's default: a few retries with backoff).
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut headers = vec![
            ("content-type".into(), "application/json".into()),
            ("x-airlock-denied".into(), self.reason.name().into()),
        ];
        if !self.retryable() {
            headers.push(("x-should-retry".into(), "false".into()));
        }
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Every route of the table, with and without its allowed queries;
    /// the target is forwarded exactly.
    #[test]
    fn the_route_table() {
        let none = h(&[]);
        let openai = h(&[("authorization", "Bearer x")]);
        for (method, target, headers, api, kind) in [
            (
                "POST",
                "/v1/messages",
                &none,
                Api::Anthropic,
                Kind::Generate,
            ),
            (
                "POST",
                "/v1/messages?beta=true",
                &none,
                Api::Anthropic,
                Kind::Generate,
            ),
            (
                "POST",
                "/v1/messages/count_tokens",
                &none,
                Api::Anthropic,
                Kind::CountTokens,
            ),
            (
                "POST",
                "/v1/messages/count_tokens?beta=true",
                &none,
                Api::Anthropic,
                Kind::CountTokens,
            ),
            ("GET", "/v1/models", &none, Api::Anthropic, Kind::Models),
            (
                "GET",
                "/v1/models?limit=20&after_id=x",
                &none,
                Api::Anthropic,
                Kind::Models,
            ),
            (
                "GET",
                "/v1/models?beta=true&limit=1000&before_id=claude-3_a",
                &none,
                Api::Anthropic,
                Kind::Models,
            ),
            (
                "GET",
                "/v1/models/claude-sonnet-4-5-20250929",
                &none,
                Api::Anthropic,
                Kind::Models,
            ),
            (
                "GET",
                "/v1/models/claude-x?beta=true",
                &none,
                Api::Anthropic,
                Kind::Models,
            ),
            (
                "POST",
                "/v1/chat/completions",
                &none,
                Api::OpenAi,
                Kind::Generate,
            ),
            ("POST", "/v1/responses", &none, Api::OpenAi, Kind::Generate),
            ("POST", "/v1/embeddings", &none, Api::OpenAi, Kind::Embed),
            ("GET", "/v1/models", &openai, Api::OpenAi, Kind::Models),
            (
                "GET",
                "/v1/models/ft:gpt-4o-mini:org::abc.1",
                &openai,
                Api::OpenAi,
                Kind::Models,
            ),
        ] {
            let r = route(method, target, headers).expect(target);
            assert_eq!((r.api, r.kind), (api, kind), "{method} {target}");
            assert_eq!(r.target, target, "forwarded exactly");
            assert_eq!(r.completion, method == "POST");
            assert_eq!(
                r.spends_tokens(),
                matches!(kind, Kind::Generate | Kind::Embed)
            );
        }
    }

    #[test]
    fn anything_else_is_refused_with_its_reason() {
        let none = h(&[]);
        let openai = h(&[("authorization", "Bearer x")]);
        for (method, target, headers, reason) in [
            ("GET", "/v1/messages", &none, Reason::Method),
            ("DELETE", "/v1/models", &none, Reason::Method),
            ("POST", "/v1/models", &none, Reason::Method),
            ("GET", "/v1/messages/count_tokens", &none, Reason::Method),
            ("CONNECT", "/v1/messages", &none, Reason::Method),
            ("POST", "/v1/messages/batches", &none, Reason::OutOfRun),
            (
                "GET",
                "/v1/messages/batches/msgbatch_1/results",
                &none,
                Reason::OutOfRun,
            ),
            ("POST", "/v1/files", &none, Reason::OutOfRun),
            ("GET", "/v1/files/file_1/content", &none, Reason::OutOfRun),
            ("POST", "/v1/batches", &openai, Reason::OutOfRun),
            ("POST", "/v1/uploads", &openai, Reason::OutOfRun),
            ("POST", "/v1/messages/", &none, Reason::Path),
            ("POST", "/v1/messages/count_tokens/x", &none, Reason::Path),
            ("POST", "//evil.example/v1/messages", &none, Reason::Path),
            ("POST", "/v1/../v1/messages", &none, Reason::Path),
            ("POST", "/v1/%6dessages", &none, Reason::Path),
            ("GET", "/v1/models/..", &none, Reason::Path),
            ("GET", "/v1/models/.hidden", &none, Reason::Path),
            ("GET", "/v1/models/a/b", &none, Reason::Path),
            ("GET", "/v1/models/a%2Fb", &none, Reason::Path),
            ("GET", "/v1/models/", &none, Reason::Path),
            (
                "GET",
                &format!("/v1/models/{}", "m".repeat(MAX_ID + 1)),
                &none,
                Reason::Path,
            ),
            ("GET", "/", &none, Reason::Path),
            ("POST", "/v1/complete", &none, Reason::Path),
            // Queries: only the allowed names, once, with good values.
            ("POST", "/v1/messages?beta=false", &none, Reason::Query),
            (
                "POST",
                "/v1/messages?beta=true&beta=true",
                &none,
                Reason::Query,
            ),
            ("POST", "/v1/messages?beta", &none, Reason::Query),
            ("POST", "/v1/messages?", &none, Reason::Query),
            ("POST", "/v1/messages?beta=true&", &none, Reason::Query),
            ("POST", "/v1/messages?x=1", &none, Reason::Query),
            ("POST", "/v1/messages?limit=1", &none, Reason::Query),
            (
                "POST",
                "/v1/messages/count_tokens?beta=TRUE",
                &none,
                Reason::Query,
            ),
            (
                "POST",
                "/v1/chat/completions?beta=true",
                &none,
                Reason::Query,
            ),
            ("POST", "/v1/responses?include=x", &none, Reason::Query),
            ("POST", "/v1/embeddings?a=b", &none, Reason::Query),
            ("GET", "/v1/models?x=%2F", &none, Reason::Query),
            ("GET", "/v1/models?limit=10000", &none, Reason::Query),
            ("GET", "/v1/models?limit=-1", &none, Reason::Query),
            ("GET", "/v1/models?after_id=a.b", &none, Reason::Query),
            ("GET", "/v1/models?limit=1", &openai, Reason::Query),
            ("GET", "/v1/models/claude-x?limit=1", &none, Reason::Query),
            ("GET", "/v1/models/gpt-x?beta=true", &openai, Reason::Query),
        ] {
            let d = route(method, target, headers).expect_err(target);
            assert_eq!(d.reason, reason, "{method} {target}: {}", d.message);
            assert!(
                d.message.contains("flag"),
                "{method} {target}: {}",
                d.message
            );
        }
        let long = format!("/v1/models?after_id={}", "a".repeat(MAX_QUERY));
        assert_eq!(
            route("GET", &long, &none).expect_err("long").reason,
            Reason::Query
        );
    }

    #[test]
    fn the_api_follows_the_path_then_the_headers() {
        assert_eq!(
            api_of("/v1/models", &h(&[("Anthropic-Version", "2023-06-01")])),
            Api::Anthropic
        );
        assert_eq!(
            api_of("/v1/models", &h(&[("Authorization", "Bearer x")])),
            Api::OpenAi
        );
        assert_eq!(
            api_of("/v1/chat/completions", &h(&[("anthropic-version", "1")])),
            Api::OpenAi
        );
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_are_dropped() {
        let (kept, dropped) = filter_request_headers(&h(&[
            ("Authorization", "Bearer sk-guest"),
            ("X-Api-Key", "guest"),
            ("Proxy-Authorization", "Basic x"),
            ("Cookie", "a=b"),
            ("Host", "evil.example"),
            ("Connection", "keep-alive"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "5"),
            ("Accept-Encoding", "gzip"),
            ("anthropic-version", "2023-06-01"),
            ("anthropic-beta", "tools-2024"),
            ("anthropic-dangerous-direct-browser-access", "true"),
            ("OpenAI-Organization", "org-x"),
            ("Content-Type", "application/json"),
            ("x-stainless-lang", "python"),
            ("Forwarded", "host=evil"),
            ("x-api-key", "again"),
        ]));
        assert_eq!(
            kept,
            h(&[
                ("anthropic-version", "2023-06-01"),
                ("anthropic-beta", "tools-2024"),
                ("anthropic-dangerous-direct-browser-access", "true"),
                ("content-type", "application/json"),
                ("x-stainless-lang", "python"),
            ])
        );
        for name in [
            "authorization",
            "x-api-key",
            "proxy-authorization",
            "cookie",
            "host",
            "connection",
            "transfer-encoding",
            "content-length",
            "accept-encoding",
            "openai-organization",
            "forwarded",
        ] {
            assert!(dropped.iter().any(|d| d == name), "{name} not dropped");
        }
        assert_eq!(dropped.iter().filter(|d| *d == "x-api-key").count(), 1);
        assert!(is_credential("authorization") && !is_credential("content-type"));
    }

    #[test]
    fn host_must_be_the_loopback_endpoint() {
        for ok in ["127.0.0.1:4000", "localhost", "LOCALHOST:1", "[::1]:4000"] {
            check_host(Api::Anthropic, &h(&[("Host", ok)])).expect(ok);
        }
        check_host(Api::Anthropic, &h(&[])).expect("absent");
        for bad in [
            "api.anthropic.com",
            "evil.example:443",
            "127.0.0.2",
            "localhost.evil",
            "[::2]:1",
            "localhost:x",
        ] {
            let d = check_host(Api::OpenAi, &h(&[("host", bad)])).expect_err(bad);
            assert_eq!(d.reason, Reason::Host);
            assert_eq!(d.status(), 403);
        }
        assert!(check_host(Api::OpenAi, &h(&[("X-Forwarded-Host", "evil")])).is_err());
    }

    #[test]
    fn response_headers() {
        for keep in [
            "Content-Type",
            "request-id",
            "anthropic-ratelimit-requests-limit",
            "retry-after",
            "retry-after-ms",
            "x-should-retry",
            "X-Should-Retry",
            "x-ratelimit-remaining-tokens",
            "anthropic-ratelimit-tokens-reset",
        ] {
            assert!(keep_response_header(keep), "{keep}");
        }
        for drop in [
            "content-length",
            "transfer-encoding",
            "connection",
            "set-cookie",
            "content-encoding",
            "server",
        ] {
            assert!(!keep_response_header(drop), "{drop}");
        }
    }

    #[test]
    fn errors_have_each_api_shape() {
        let d = Denial::new(Api::Anthropic, Reason::BodyTooLarge, "too big");
        let v: Value = serde_json::from_slice(&d.body()).expect("json");
        assert_eq!(
            v,
            json!({"type": "error", "error": {"type": "request_too_large", "message": "too big"}})
        );
        assert_eq!(d.status(), 413);
        let d = Denial::new(Api::OpenAi, Reason::RequestBudget, "budget");
        let v: Value = serde_json::from_slice(&d.body()).expect("json");
        assert_eq!(
            v,
            json!({"error": {"message": "budget", "type": "rate_limit_exceeded", "code": "request_budget"}})
        );
        assert_eq!(d.status(), 429);
        assert_eq!(
            Denial::new(Api::OpenAi, Reason::NoUpstream, "x").status(),
            403
        );
        let d = Denial::new(Api::OpenAi, Reason::NoRoute, "x");
        assert_eq!(d.status(), 403);
        let v: Value = serde_json::from_slice(&d.body()).expect("json");
        assert_eq!(v["error"]["code"], "no_upstream_for_api");
        assert_eq!(
            Denial::new(Api::OpenAi, Reason::Unreachable, "x").status(),
            502
        );
    }

    /// What Claude Code and the SDKs send reaches the upstream; the
    /// telemetry headers are bounded in number and length.
    #[test]
    fn the_clients_headers_pass_and_stainless_ones_are_bounded() {
        let mut sent = h(&[
            ("x-app", "cli"),
            ("X-Claude-Code-Session-Id", "3f2a-1"),
            ("anthropic-dangerous-direct-browser-access", "true"),
            ("anthropic-beta", "claude-code-20250219,oauth-2025-04-20"),
            ("openai-beta", "assistants=v2"),
            ("x-stainless-long", &"v".repeat(MAX_STAINLESS_VALUE + 1)),
            ("openai-project", "proj_guest"),
            ("openai-organization", "org_guest"),
        ]);
        for i in 0..MAX_STAINLESS + 3 {
            sent.push((format!("x-stainless-n{i}"), "1".into()));
        }
        let (kept, dropped) = filter_request_headers(&sent);
        for name in [
            "x-app",
            "x-claude-code-session-id",
            "anthropic-dangerous-direct-browser-access",
            "anthropic-beta",
            "openai-beta",
        ] {
            assert!(kept.iter().any(|(n, _)| n == name), "{name} dropped");
        }
        let stainless = kept
            .iter()
            .filter(|(n, _)| n.starts_with("x-stainless-"))
            .count();
        assert_eq!(
            stainless,
            MAX_STAINLESS - 1,
            "the long one and the extra ones dropped"
        );
        for name in ["x-stainless-long", "openai-project", "openai-organization"] {
            assert!(dropped.iter().any(|d| d == name), "{name} kept");
        }
        assert!(dropped
            .iter()
            .any(|d| d == &format!("x-stainless-n{}", MAX_STAINLESS + 2)));
    }

    /// Every refusal says not to retry, but a network failure on the way
    /// to the upstream (the client's own backoff applies).
    #[test]
    fn refusals_say_do_not_retry() {
        let retry = |d: &Denial| {
            d.headers()
                .iter()
                .find(|(n, _)| n == "x-should-retry")
                .map(|(_, v)| v.clone())
        };
        for reason in [
            Reason::Path,
            Reason::Method,
            Reason::Query,
            Reason::OutOfRun,
            Reason::Host,
            Reason::BodyTooLarge,
            Reason::BadBody,
            Reason::NoUpstream,
            Reason::NoRoute,
            Reason::NoKey,
            Reason::ModelNotAllowed,
            Reason::RequestBudget,
            Reason::TokenBudget,
        ] {
            let d = Denial::new(Api::Anthropic, reason, "x");
            assert_eq!(retry(&d).as_deref(), Some("false"), "{reason:?}");
        }
        let d = Denial::new(Api::OpenAi, Reason::Unreachable, "connection refused");
        assert_eq!(retry(&d), None);
        let d = Denial::new(
            Api::OpenAi,
            Reason::Unreachable,
            "airlock could not reach the model upstream: TLS handshake failed: x",
        );
        assert_eq!(retry(&d).as_deref(), Some("false"));
        let d = Denial::new(Api::Anthropic, Reason::OutOfRun, "x");
        assert_eq!(d.status(), 403);
        let v: Value = serde_json::from_slice(&d.body()).expect("json");
        assert_eq!(v["error"]["type"], "permission_error");
        assert_eq!(
            Denial::new(Api::Anthropic, Reason::Query, "x").status(),
            400
        );
    }
}
