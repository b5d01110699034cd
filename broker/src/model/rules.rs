//! What a model call may be: the allowed routes, which headers of the
//! guest's survive, which of the upstream's come back, and the API-shaped
//! error bodies of a refusal. Pure functions, unit-tested.

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

/// An allowed call: its API and the exact target to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub api: Api,
    /// The path (and for `GET /v1/models`, a checked query) to append to
    /// the upstream URL.
    pub target: String,
    /// A `POST` whose JSON body names a model.
    pub completion: bool,
}

/// Longest query string accepted on `GET /v1/models`.
const MAX_QUERY: usize = 256;

/// The API a request speaks, from its path, else its headers: the
/// Anthropic SDKs always send `anthropic-version`.
pub fn api_of(path: &str, headers: &[(String, String)]) -> Api {
    match path {
        "/v1/messages" => Api::Anthropic,
        "/v1/chat/completions" => Api::OpenAi,
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

/// Checks `method` and `target` against the allow list: exactly
/// `POST /v1/messages`, `POST /v1/chat/completions`, `GET /v1/models`
/// (the last with an optional query of `A-Za-z0-9_-.=&`, as the SDKs page
/// with `?limit=…`). No other path, no query on the POSTs, no fragment, no
/// `..`, no percent-encoding: the target is compared, not normalised.
pub fn route(method: &str, target: &str, headers: &[(String, String)]) -> Result<Route, Denial> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let api = api_of(path, headers);
    let completion = match (method, path) {
        ("POST", "/v1/messages" | "/v1/chat/completions") if query.is_none() => true,
        ("GET", "/v1/models") => false,
        ("POST", "/v1/messages" | "/v1/chat/completions") => {
            return Err(Denial::new(
                api,
                Reason::Path,
                "airlock allows no query string on this endpoint",
            ))
        }
        (_, "/v1/messages" | "/v1/chat/completions" | "/v1/models") => {
            return Err(Denial::new(
                api,
                Reason::Method,
                format!("airlock does not allow {method} on {path}"),
            ))
        }
        _ => return Err(Denial::new(
            api,
            Reason::Path,
            "airlock allows only POST /v1/messages, POST /v1/chat/completions and GET /v1/models",
        )),
    };
    if let Some(q) = query {
        let ok = q.len() <= MAX_QUERY
            && q.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.=&".contains(&b));
        if !ok {
            return Err(Denial::new(
                api,
                Reason::Path,
                "airlock refused the query string of this request",
            ));
        }
    }
    Ok(Route {
        api,
        target: target.to_owned(),
        completion,
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
                "airlock forwards model calls only to its configured upstream, not to the host this request names",
            ));
        }
    }
    Ok(())
}

/// Request headers passed on to the upstream (lower-case names); every
/// other header the guest sent is dropped: credentials (`authorization`,
/// `x-api-key`, `proxy-authorization`, `cookie`, other `anthropic-*` and
/// `openai-*` account selectors), hop-by-hop headers, `host`, `forwarded`,
/// `content-length` (recomputed) and `accept-encoding` (the proxy asks for
/// identity to read the usage).
fn keep_request_header(name: &str) -> bool {
    matches!(
        name,
        "content-type"
            | "accept"
            | "anthropic-version"
            | "anthropic-beta"
            | "user-agent"
            | "openai-beta"
            | "idempotency-key"
            | "x-request-id"
    ) || name.starts_with("x-stainless-")
}

/// The guest's headers split into those forwarded (names lower-cased) and
/// the names of those dropped.
pub fn filter_request_headers(
    headers: &[(String, String)],
) -> (Vec<(String, String)>, Vec<String>) {
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if keep_request_header(&lower) {
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
/// cookies.
pub fn keep_response_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "content-type" | "cache-control" | "retry-after" | "request-id" | "x-request-id"
    ) || name.starts_with("anthropic-")
        || name.starts_with("openai-")
        || name.starts_with("x-ratelimit-")
}

/// Why a call was refused (the audit record's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Path,
    Method,
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
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Path => "path_not_allowed",
            Reason::Method => "method_not_allowed",
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
        }
    }

    /// The HTTP status and the Anthropic error type.
    fn status(self) -> (u16, &'static str) {
        match self {
            Reason::Path => (404, "not_found_error"),
            Reason::Method => (405, "invalid_request_error"),
            Reason::Host
            | Reason::NoUpstream
            | Reason::NoRoute
            | Reason::NoKey
            | Reason::ModelNotAllowed => (403, "permission_error"),
            Reason::BodyTooLarge => (413, "request_too_large"),
            Reason::BadBody => (400, "invalid_request_error"),
            Reason::RequestBudget | Reason::TokenBudget => (429, "rate_limit_error"),
            Reason::Unreachable => (502, "api_error"),
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
                        Reason::Unreachable => "api_error",
                        _ => "invalid_request_error",
                    },
                    "code": self.reason.name(),
                },
            }),
        };
        v.to_string().into_bytes()
    }

    /// The response headers of the refusal.
    pub fn headers(&self) -> Vec<(String, String)> {
        vec![
            ("content-type".into(), "application/json".into()),
            ("x-airlock-denied".into(), self.reason.name().into()),
        ]
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

    #[test]
    fn only_the_three_routes_pass() {
        let none = h(&[]);
        let r = route("POST", "/v1/messages", &none).expect("messages");
        assert_eq!((r.api, r.completion), (Api::Anthropic, true));
        let r = route("POST", "/v1/chat/completions", &none).expect("chat");
        assert_eq!(r.api, Api::OpenAi);
        let r = route("GET", "/v1/models?limit=20&after_id=x", &none).expect("models");
        assert!(!r.completion);
        assert_eq!(r.target, "/v1/models?limit=20&after_id=x");
        for (method, target, reason) in [
            ("GET", "/v1/messages", Reason::Method),
            ("DELETE", "/v1/models", Reason::Method),
            ("POST", "/v1/messages/batches", Reason::Path),
            ("POST", "/v1/messages/", Reason::Path),
            ("POST", "/v1/messages?beta=true", Reason::Path),
            ("POST", "//evil.example/v1/messages", Reason::Path),
            ("POST", "/v1/../v1/messages", Reason::Path),
            ("POST", "/v1/%6dessages", Reason::Path),
            ("POST", "/v1/files", Reason::Path),
            ("GET", "/v1/models?x=%2F", Reason::Path),
            ("GET", "/", Reason::Path),
            ("CONNECT", "/v1/messages", Reason::Method),
        ] {
            let d = route(method, target, &none).expect_err(target);
            assert_eq!(d.reason, reason, "{method} {target}");
        }
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
            "anthropic-dangerous-direct-browser-access",
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
            "x-ratelimit-remaining-tokens",
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
}
