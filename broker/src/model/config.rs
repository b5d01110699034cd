//! The model proxy's settings from the command line, validated before any
//! VM starts: the upstreams, the API keys (from the host's environment
//! or a secrets file; never logged, never sent to the guest), the policy.
//!
//! Each API (provider) has at most one upstream, and a provider's key is
//! only ever sent to that provider's upstream, on that provider's routes.
//! `--model-upstream` takes `anthropic=URL` or `openai=URL` to name the
//! provider, or a bare URL: `https://api.anthropic.com` serves only
//! Anthropic calls, `https://api.openai.com` only OpenAI calls, and any
//! other host (a gateway, or the local `airlock-upstream`) both, each call
//! carrying only its own provider's key. A provider given two upstreams is
//! an error.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::policy::{self, Overrides, Policy};
use super::rules::Api;

/// Largest secrets file read.
const MAX_KEY_FILE: u64 = 64 * 1024;
/// Longest key accepted.
const MAX_KEY: usize = 4096;
/// Longest OpenAI organization or project id accepted.
const MAX_ACCOUNT_ID: usize = 256;
/// Largest `--model-ca` file read (a distribution's whole bundle is
/// about 200 KiB).
const MAX_CA_FILE: u64 = 4 << 20;
/// Most certificates taken from it.
const MAX_CA_CERTS: usize = 1000;
/// The environment variables read by default, per API.
pub const ANTHROPIC_KEY_ENV: &str = "ANTHROPIC_API_KEY";
pub const OPENAI_KEY_ENV: &str = "OPENAI_API_KEY";
/// Where `--model-auth bearer` reads the Anthropic OAuth token by default
/// (the variable Claude Code itself reads).
pub const OAUTH_TOKEN_ENV: &str = "CLAUDE_CODE_OAUTH_TOKEN";

/// How the Anthropic credential is sent upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AnthropicAuth {
    /// An API key, as `x-api-key`.
    #[default]
    ApiKey,
    /// An OAuth token (a Claude subscription's), as
    /// `Authorization: Bearer`, with the `oauth-2025-04-20` beta the API
    /// asks of OAuth calls added to `anthropic-beta`.
    Bearer,
}

impl AnthropicAuth {
    pub fn name(self) -> &'static str {
        match self {
            AnthropicAuth::ApiKey => "x-api-key",
            AnthropicAuth::Bearer => "bearer",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--model-upstream {0}: a bare URL on a host other than api.anthropic.com or \
         api.openai.com would take both providers' calls, and both an Anthropic and an \
         OpenAI key are set: name what it serves (--model-upstream anthropic={0} and/or \
         --model-upstream openai={0}), so that no key goes to another provider's upstream"
    )]
    AmbiguousGateway(String),
    #[error("--model-upstream {0:?}: {1}")]
    Url(String, &'static str),
    #[error(
        "--model-upstream {0:?}: the provider before '=' must be anthropic or openai \
         (or give a bare URL)"
    )]
    Provider(String),
    #[error(
        "--model-upstream: two upstreams for the {api} API ({0} and {1}); give each provider \
         at most one (anthropic=URL, openai=URL)",
        api = .2.name()
    )]
    Duplicate(String, String, Api),
    #[error(
        "--model-upstream {0} serves only the {api} API, but there is no key for it: set {env}, \
         or pass --model-key-env NAME or --model-key-file PATH",
        api = .1.name(),
        env = key_env_of(*.1)
    )]
    NoKeyFor(String, Api),
    #[error(
        "--model-upstream is set but there is no API key: set {ANTHROPIC_KEY_ENV} or \
         {OPENAI_KEY_ENV}, or pass --model-key-env NAME or --model-key-file PATH"
    )]
    NoKey,
    #[error("--model-key-env {0}: that variable is not set (or empty) in airlock's environment")]
    KeyEnv(String),
    #[error(
        "--model-auth bearer: {0} is not set (or empty) in airlock's environment; set it to \
         the OAuth token (claude setup-token prints one), or name another variable with \
         --model-oauth-token-env NAME"
    )]
    OauthEnv(String),
    #[error("cannot read the key file {}", .0.display())]
    KeyFile(PathBuf, #[source] std::io::Error),
    #[error("the key from {0} is not one line of printable ASCII of at most {MAX_KEY} bytes")]
    BadKey(String),
    #[error("--model-ca {}: cannot read it", .0.display())]
    CaRead(PathBuf, #[source] std::io::Error),
    #[error("--model-ca {path}: {1}", path = .0.display())]
    CaBad(PathBuf, String),
    #[error(
        "--model-ca {path} is given but --model-upstream {1} is plain http: there is no TLS \
         to verify (use an https:// upstream, or drop --model-ca)",
        path = .0.display()
    )]
    CaWithoutTls(PathBuf, String),
    #[error("--model-openai-{0} {1:?}: expected 1 to {MAX_ACCOUNT_ID} printable ASCII characters")]
    AccountId(&'static str, String),
    #[error(transparent)]
    Policy(#[from] policy::Error),
}

/// An API key. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    #[cfg(test)]
    pub fn for_tests(key: &str) -> Secret {
        Secret(key.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A key and where it came from (for messages and the audit log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub secret: Secret,
    pub source: String,
}

/// The environment variable of an API's key.
pub fn key_env_of(api: Api) -> &'static str {
    match api {
        Api::Anthropic => ANTHROPIC_KEY_ENV,
        Api::OpenAi => OPENAI_KEY_ENV,
    }
}

/// The upstream base URL, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`.
    pub authority: String,
    /// A base path without a trailing `/` (often empty).
    pub base: String,
}

impl Upstream {
    /// Parses `http(s)://host[:port][/base]`; no user info, query or
    /// fragment.
    pub fn parse(url: &str) -> Result<Upstream, Error> {
        let bad = |why| Error::Url(url.to_owned(), why);
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("not an http:// or https:// URL"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(bad("the scheme must be http or https"));
        }
        if rest.contains(['?', '#']) {
            return Err(bad("no query or fragment allowed"));
        }
        if !rest.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("holds spaces or non-ASCII characters"));
        }
        let (authority, base) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        if authority.contains('@') {
            return Err(bad(
                "no user or password in the URL: the key comes from the environment",
            ));
        }
        Ok(Upstream {
            scheme,
            authority: authority.to_owned(),
            base: base.to_owned(),
        })
    }

    /// The URL of `target` (which starts with `/`) on this upstream.
    pub fn url(&self, target: &str) -> String {
        format!("{}://{}{}{target}", self.scheme, self.authority, self.base)
    }

    pub fn display(&self) -> String {
        self.url("")
    }

    /// The host, lower-case, without port or trailing dot.
    pub fn host(&self) -> String {
        let a = self.authority.to_ascii_lowercase();
        let host = if let Some(rest) = a.strip_prefix('[') {
            rest.split(']').next().unwrap_or_default().to_owned()
        } else {
            a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h).to_owned()
        };
        host.trim_end_matches('.').to_owned()
    }

    /// The provider a bare URL serves by its host: Anthropic's and
    /// OpenAI's own API hosts serve one each; `None` for any other (a
    /// gateway serving both).
    pub fn provider_by_host(&self) -> Option<Api> {
        match self.host().as_str() {
            "api.anthropic.com" => Some(Api::Anthropic),
            "api.openai.com" => Some(Api::OpenAi),
            _ => None,
        }
    }
}

/// One `--model-upstream` value: the APIs it serves and where.
fn parse_upstream_arg(value: &str) -> Result<(Vec<Api>, Upstream), Error> {
    if let Some((name, url)) = value.split_once('=') {
        if !name.contains(['/', ':']) {
            let api = match name.trim().to_ascii_lowercase().as_str() {
                "anthropic" => Api::Anthropic,
                "openai" => Api::OpenAi,
                _ => return Err(Error::Provider(value.to_owned())),
            };
            return Ok((vec![api], Upstream::parse(url)?));
        }
    }
    let upstream = Upstream::parse(value)?;
    let apis = match upstream.provider_by_host() {
        Some(api) => vec![api],
        None => vec![Api::Anthropic, Api::OpenAi],
    };
    Ok((apis, upstream))
}

/// Extra CA certificates the proxy trusts for an `https://` upstream, on
/// top of the built-in (Mozilla) roots: `--model-ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFile {
    /// As given on the command line.
    pub path: PathBuf,
    /// Of the bytes read (the file is read once).
    pub sha256: String,
    /// The certificates, DER, each checked to be a usable trust anchor.
    pub certs: Vec<Vec<u8>>,
}

impl CaFile {
    /// Reads and checks a PEM file of CA certificates: readable, at most
    /// [`MAX_CA_FILE`] bytes, well-formed PEM, at least one certificate,
    /// each an X.509 certificate rustls can use as a root. Other PEM
    /// sections (keys, CRLs) are ignored.
    pub fn load(path: &Path) -> Result<CaFile, Error> {
        let bad = |why: String| Error::CaBad(path.to_path_buf(), why);
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CA_FILE + 1).read_to_end(&mut bytes))
            .map_err(|e| Error::CaRead(path.to_path_buf(), e))?;
        if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_CA_FILE {
            return Err(bad(format!("larger than {MAX_CA_FILE} bytes")));
        }
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&bytes) {
            let item = item.map_err(|e| bad(format!("malformed PEM: {e}")))?;
            let ureq::tls::PemItem::Certificate(cert) = item else {
                continue;
            };
            if certs.len() == MAX_CA_CERTS {
                return Err(bad(format!("more than {MAX_CA_CERTS} certificates")));
            }
            let der = cert.der().to_vec();
            rustls::RootCertStore::empty()
                .add(rustls::pki_types::CertificateDer::from(der.as_slice()))
                .map_err(|e| {
                    bad(format!(
                        "certificate {} is not a usable X.509 CA certificate: {e}",
                        certs.len() + 1
                    ))
                })?;
            certs.push(der);
        }
        if certs.is_empty() {
            return Err(bad(
                "no certificate in it (expected PEM: -----BEGIN CERTIFICATE----- blocks)".into(),
            ));
        }
        Ok(CaFile {
            path: path.to_path_buf(),
            sha256: hex(&Sha256::digest(&bytes)),
            certs,
        })
    }

    /// What `run.start` records: where from and which file, never the
    /// certificates.
    pub fn fields(&self) -> Value {
        json!({
            "path": self.path.display().to_string(),
            "sha256": self.sha256,
            "certificates": self.certs.len(),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The model proxy's settings for one run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    /// Where Anthropic calls go, with the Anthropic key; `None`: they are
    /// refused (403).
    pub anthropic_upstream: Option<Upstream>,
    /// Where OpenAI calls go, with the OpenAI key.
    pub openai_upstream: Option<Upstream>,
    pub anthropic_key: Option<Key>,
    pub openai_key: Option<Key>,
    /// Trusted for the upstream besides the built-in roots (`https` only).
    pub ca: Option<CaFile>,
    pub policy: Policy,
    /// How `anthropic_key` is sent (an API key, or an OAuth token).
    pub anthropic_auth: AnthropicAuth,
    /// `OpenAI-Organization` / `OpenAI-Project` for OpenAI calls, set on
    /// the host (`--model-openai-organization`, `--model-openai-project`);
    /// the guest's own are always dropped.
    pub openai_headers: Vec<(String, String)>,
}

/// What the user typed.
#[derive(Debug, Clone, Default)]
pub struct Args {
    /// `--model-upstream`, each as typed: `[PROVIDER=]URL`.
    pub upstreams: Vec<String>,
    pub key_env: Option<String>,
    pub key_file: Option<PathBuf>,
    /// `--model-ca`: a PEM file of extra CA certificates.
    pub ca_file: Option<PathBuf>,
    pub policy_file: Option<PathBuf>,
    pub overrides: Overrides,
    /// `--model-auth bearer`, or `--model-oauth-token-env` given.
    pub bearer: bool,
    /// `--model-oauth-token-env NAME` (default [`OAUTH_TOKEN_ENV`]).
    pub oauth_token_env: Option<String>,
    /// `--model-openai-organization ID`.
    pub openai_organization: Option<String>,
    /// `--model-openai-project ID`.
    pub openai_project: Option<String>,
}

fn check_key(value: &str, source: &str) -> Result<Key, Error> {
    let value = value.trim();
    if value.is_empty() || value.len() > MAX_KEY || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::BadKey(source.to_owned()));
    }
    Ok(Key {
        secret: Secret(value.to_owned()),
        source: source.to_owned(),
    })
}

/// Keys from a secrets file: `ANTHROPIC_API_KEY=…` / `OPENAI_API_KEY=…`
/// lines (`export ` and quotes allowed, `#` comments), or else the whole
/// file (one line) as the key of both APIs.
fn keys_from_file(path: &Path) -> Result<(Option<Key>, Option<Key>), Error> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_KEY_FILE).read_to_string(&mut text))
        .map_err(|e| Error::KeyFile(path.to_path_buf(), e))?;
    let shown = path.display().to_string();
    let (mut anthropic, mut openai) = (None, None);
    let mut named = false;
    for line in text.lines() {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        match name.trim() {
            ANTHROPIC_KEY_ENV => {
                named = true;
                anthropic = Some(check_key(value, &format!("{shown} ({ANTHROPIC_KEY_ENV})"))?);
            }
            OPENAI_KEY_ENV => {
                named = true;
                openai = Some(check_key(value, &format!("{shown} ({OPENAI_KEY_ENV})"))?);
            }
            _ => {}
        }
    }
    if !named {
        let key = check_key(&text, &shown)?;
        return Ok((Some(key.clone()), Some(key)));
    }
    Ok((anthropic, openai))
}

impl Settings {
    /// Validates the arguments and reads the keys from `env` (the host's
    /// environment) or the key file. Keys are read only when an upstream
    /// is set.
    pub fn resolve(args: &Args, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, Error> {
        let policy = Policy::load(args.policy_file.as_deref(), &args.overrides)?;
        if args.upstreams.is_empty() {
            return Ok(Settings {
                policy,
                ..Settings::default()
            });
        }
        let (mut anthropic_upstream, mut openai_upstream): (Option<Upstream>, Option<Upstream>) =
            (None, None);
        // A bare URL on a host that is neither provider's own: it serves both.
        let mut gateway: Option<Upstream> = None;
        for value in &args.upstreams {
            let (apis, upstream) = parse_upstream_arg(value)?;
            if apis.len() > 1 {
                gateway = Some(upstream.clone());
            }
            for api in apis {
                let slot = match api {
                    Api::Anthropic => &mut anthropic_upstream,
                    Api::OpenAi => &mut openai_upstream,
                };
                if let Some(first) = slot {
                    return Err(Error::Duplicate(first.display(), upstream.display(), api));
                }
                *slot = Some(upstream.clone());
            }
        }
        let upstreams: Vec<&Upstream> = [&anthropic_upstream, &openai_upstream]
            .into_iter()
            .flatten()
            .collect();
        // Checked before the keys: a CA for a plaintext upstream is a
        // mistake worth stopping on (the user believes the link verified).
        let ca = match &args.ca_file {
            Some(path) => {
                if let Some(plain) = upstreams.iter().find(|u| u.scheme != "https") {
                    return Err(Error::CaWithoutTls(path.clone(), plain.display()));
                }
                Some(CaFile::load(path)?)
            }
            None => None,
        };
        let nonempty = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let (anthropic_key, openai_key) = if let Some(path) = &args.key_file {
            keys_from_file(path)?
        } else if let Some(name) = &args.key_env {
            let value = nonempty(name).ok_or_else(|| Error::KeyEnv(name.clone()))?;
            let key = check_key(&value, &format!("${name}"))?;
            (Some(key.clone()), Some(key))
        } else {
            let from = |name: &str| {
                nonempty(name)
                    .map(|v| check_key(&v, &format!("${name}")))
                    .transpose()
            };
            (from(ANTHROPIC_KEY_ENV)?, from(OPENAI_KEY_ENV)?)
        };
        // An OAuth token replaces the Anthropic API key.
        let bearer = args.bearer || args.oauth_token_env.is_some();
        let anthropic_key = if bearer {
            let name = args.oauth_token_env.as_deref().unwrap_or(OAUTH_TOKEN_ENV);
            let value = nonempty(name).ok_or_else(|| Error::OauthEnv(name.to_owned()))?;
            Some(check_key(&value, &format!("${name}"))?)
        } else {
            anthropic_key
        };
        let anthropic_auth = if bearer {
            AnthropicAuth::Bearer
        } else {
            AnthropicAuth::ApiKey
        };
        if anthropic_key.is_none() && openai_key.is_none() {
            return Err(Error::NoKey);
        }
        // Two different keys and one URL that would take both providers'
        // calls: the user may think it is one provider's (an Anthropic
        // gateway, a regional host), and the other's key would go there.
        if let (Some(gw), Some(a), Some(o)) = (&gateway, &anthropic_key, &openai_key) {
            if a.secret.expose() != o.secret.expose() {
                return Err(Error::AmbiguousGateway(gw.display()));
            }
        }
        let mut openai_headers = Vec::new();
        for (what, header, value) in [
            (
                "organization",
                "openai-organization",
                &args.openai_organization,
            ),
            ("project", "openai-project", &args.openai_project),
        ] {
            if let Some(id) = value {
                let ok = (1..=MAX_ACCOUNT_ID).contains(&id.len())
                    && id.bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    return Err(Error::AccountId(what, id.clone()));
                }
                openai_headers.push((header.to_owned(), id.clone()));
            }
        }
        // An upstream whose only provider has no key could carry no call.
        let routed = [
            (Api::Anthropic, &anthropic_upstream, &anthropic_key),
            (Api::OpenAi, &openai_upstream, &openai_key),
        ];
        if !routed.iter().any(|(_, u, k)| u.is_some() && k.is_some()) {
            if let Some((api, Some(u), _)) = routed.iter().find(|(_, u, _)| u.is_some()) {
                return Err(Error::NoKeyFor(u.display(), *api));
            }
        }
        Ok(Settings {
            anthropic_upstream,
            openai_upstream,
            anthropic_key,
            openai_key,
            ca,
            policy,
            anthropic_auth,
            openai_headers,
        })
    }

    /// The upstream of `api`'s calls.
    pub fn upstream(&self, api: Api) -> Option<&Upstream> {
        match api {
            Api::Anthropic => self.anthropic_upstream.as_ref(),
            Api::OpenAi => self.openai_upstream.as_ref(),
        }
    }

    /// Whether any call may go anywhere.
    pub fn has_upstream(&self) -> bool {
        self.anthropic_upstream.is_some() || self.openai_upstream.is_some()
    }

    pub fn key(&self, api: Api) -> Option<&Key> {
        match api {
            Api::Anthropic => self.anthropic_key.as_ref(),
            Api::OpenAi => self.openai_key.as_ref(),
        }
    }

    /// The settings as `run.start` records them: where keys come from,
    /// never the keys.
    pub fn fields(&self) -> Value {
        json!({
            "anthropic_upstream": self.anthropic_upstream.as_ref().map(Upstream::display),
            "openai_upstream": self.openai_upstream.as_ref().map(Upstream::display),
            "anthropic_key_from": self.anthropic_key.as_ref().map(|k| k.source.clone()),
            "anthropic_auth": self.anthropic_auth.name(),
            "openai_headers": self.openai_headers.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
            "openai_key_from": self.openai_key.as_ref().map(|k| k.source.clone()),
            "ca_file": self.ca.as_ref().map(CaFile::fields),
            "policy": self.policy.fields(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::TestDir;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn args(upstream: &str) -> Args {
        Args {
            upstreams: vec![upstream.into()],
            ..Args::default()
        }
    }

    #[test]
    fn urls() {
        let u = Upstream::parse("https://api.anthropic.com").expect("plain");
        assert_eq!(
            u.url("/v1/messages"),
            "https://api.anthropic.com/v1/messages"
        );
        let u = Upstream::parse("http://127.0.0.1:8080/proxy/").expect("base");
        assert_eq!(u.url("/v1/models"), "http://127.0.0.1:8080/proxy/v1/models");
        for bad in [
            "ftp://x",
            "api.anthropic.com",
            "https://",
            "https://u:p@x",
            "https://x/?a",
            "http://x y",
        ] {
            assert!(matches!(Upstream::parse(bad), Err(Error::Url(..))), "{bad}");
        }
    }

    #[test]
    fn keys_from_the_environment() {
        let none = Settings::resolve(&Args::default(), &env(&[("ANTHROPIC_API_KEY", "k")]))
            .expect("no upstream");
        assert!(!none.has_upstream() && none.anthropic_key.is_none());
        let s = Settings::resolve(
            &args("http://h"),
            &env(&[("ANTHROPIC_API_KEY", " sk-ant-1\n")]),
        )
        .expect("env");
        assert_eq!(
            s.key(Api::Anthropic).map(|k| k.secret.expose()),
            Some("sk-ant-1")
        );
        assert!(s.key(Api::OpenAi).is_none());
        assert!(
            !format!("{s:?}").contains("sk-ant-1"),
            "Debug shows the key"
        );
        assert!(!s.fields().to_string().contains("sk-ant-1"));
        assert!(matches!(
            Settings::resolve(&args("http://h"), &env(&[])),
            Err(Error::NoKey)
        ));
        assert!(matches!(
            Settings::resolve(&args("http://h"), &env(&[("ANTHROPIC_API_KEY", "a b")])),
            Err(Error::BadKey(_))
        ));
        let a = Args {
            key_env: Some("MY_KEY".into()),
            ..args("http://h")
        };
        let s = Settings::resolve(&a, &env(&[("MY_KEY", "mine"), ("OPENAI_API_KEY", "other")]))
            .expect("named");
        assert_eq!(s.key(Api::OpenAi).map(|k| k.secret.expose()), Some("mine"));
        assert!(matches!(
            Settings::resolve(&a, &env(&[])),
            Err(Error::KeyEnv(_))
        ));
    }

    /// Each provider gets at most one upstream: named, or by its host; any
    /// other host serves both.
    #[test]
    fn one_upstream_per_provider() {
        let keys = env(&[("ANTHROPIC_API_KEY", "sk-a"), ("OPENAI_API_KEY", "sk-o")]);
        let resolve = |values: &[&str]| {
            let a = Args {
                upstreams: values.iter().map(|v| (*v).to_owned()).collect(),
                ..Args::default()
            };
            Settings::resolve(&a, &keys)
        };
        let shown = |s: &Settings, api| s.upstream(api).map(Upstream::display);
        let s = resolve(&["https://api.anthropic.com"]).expect("anthropic");
        assert_eq!(
            shown(&s, Api::Anthropic).as_deref(),
            Some("https://api.anthropic.com")
        );
        assert_eq!(shown(&s, Api::OpenAi), None);
        let s = resolve(&["https://API.OpenAI.com:443/"]).expect("openai");
        assert_eq!(shown(&s, Api::Anthropic), None);
        assert!(shown(&s, Api::OpenAi).is_some());
        // With two different keys, a bare gateway URL must say what it
        // serves; named for both, it serves both.
        let e = resolve(&["http://127.0.0.1:8080/gw"]).expect_err("ambiguous");
        assert!(matches!(e, Error::AmbiguousGateway(_)), "{e}");
        assert!(
            e.to_string().contains("anthropic=http://127.0.0.1:8080/gw"),
            "{e}"
        );
        let s = resolve(&[
            "anthropic=http://127.0.0.1:8080/gw",
            "openai=http://127.0.0.1:8080/gw",
        ])
        .expect("gateway");
        assert_eq!(shown(&s, Api::Anthropic), shown(&s, Api::OpenAi));
        assert!(shown(&s, Api::OpenAi).is_some());
        // One key (or the same one for both): a bare gateway URL is fine.
        let one = env(&[("ANTHROPIC_API_KEY", "sk-a")]);
        let a = Args {
            upstreams: vec!["http://127.0.0.1:8080/gw".to_owned()],
            ..Args::default()
        };
        assert!(Settings::resolve(&a, &one).is_ok());
        let s =
            resolve(&["anthropic=http://127.0.0.1:1", "openai=http://127.0.0.1:2"]).expect("named");
        assert_eq!(
            shown(&s, Api::Anthropic).as_deref(),
            Some("http://127.0.0.1:1")
        );
        assert_eq!(
            shown(&s, Api::OpenAi).as_deref(),
            Some("http://127.0.0.1:2")
        );
        let fields = s.fields();
        assert_eq!(fields["anthropic_upstream"], "http://127.0.0.1:1");
        assert_eq!(fields["openai_upstream"], "http://127.0.0.1:2");
        let s = resolve(&["https://api.anthropic.com", "openai=http://h/q=1"]).expect("mixed");
        assert_eq!(shown(&s, Api::OpenAi).as_deref(), Some("http://h/q=1"));
        // A URL with '=' in its path is a bare URL.
        let e = resolve(&["http://h/a=b"]).expect_err("bare, so ambiguous with two keys");
        assert!(
            matches!(&e, Error::AmbiguousGateway(u) if u == "http://h/a=b"),
            "{e:?}"
        );
        for dup in [
            &["http://gw", "openai=http://x"][..],
            &["anthropic=http://a", "anthropic=http://b"],
            &["https://api.openai.com", "openai=http://x"],
            &["http://gw", "http://gw2"],
        ] {
            let e = resolve(dup).expect_err("duplicate");
            assert!(matches!(e, Error::Duplicate(..)), "{dup:?}: {e:?}");
            assert!(e.to_string().starts_with("--model-upstream"), "{e}");
        }
        let e = resolve(&["azure=http://x"]).expect_err("provider");
        assert!(matches!(e, Error::Provider(_)), "{e:?}");
        assert!(matches!(resolve(&["openai=ftp://x"]), Err(Error::Url(..))));
        // Anthropic's own host and only an OpenAI key: no call could go.
        let a = args("https://api.anthropic.com");
        let e = Settings::resolve(&a, &env(&[("OPENAI_API_KEY", "sk-o")])).expect_err("no key");
        assert!(matches!(e, Error::NoKeyFor(_, Api::Anthropic)), "{e:?}");
        assert!(e.to_string().contains("ANTHROPIC_API_KEY"), "{e}");
    }

    #[test]
    fn keys_from_a_file() {
        let dir = TestDir::new("keys");
        let path = dir.path().join("secrets");
        std::fs::write(&path, "sk-whole\n").expect("write");
        let a = Args {
            key_file: Some(path.clone()),
            ..args("http://h")
        };
        let s = Settings::resolve(&a, &env(&[])).expect("whole");
        assert_eq!(
            s.key(Api::OpenAi).map(|k| k.secret.expose()),
            Some("sk-whole")
        );
        assert_eq!(
            s.key(Api::Anthropic).map(|k| k.secret.expose()),
            Some("sk-whole")
        );
        std::fs::write(
            &path,
            "# keys\nexport ANTHROPIC_API_KEY=\"sk-a\"\nOTHER=1\n",
        )
        .expect("write");
        let s = Settings::resolve(&a, &env(&[])).expect("named");
        assert_eq!(
            s.key(Api::Anthropic).map(|k| k.secret.expose()),
            Some("sk-a")
        );
        assert!(s.key(Api::OpenAi).is_none());
        std::fs::write(&path, "two\nlines\n").expect("write");
        assert!(matches!(
            Settings::resolve(&a, &env(&[])),
            Err(Error::BadKey(_))
        ));
        let missing = Args {
            key_file: Some(dir.path().join("nope")),
            ..args("http://h")
        };
        assert!(matches!(
            Settings::resolve(&missing, &env(&[])),
            Err(Error::KeyFile(..))
        ));
    }

    /// A CA certificate, PEM, made here (the proxy tests' PKI maker).
    fn ca_pem(name: &str) -> String {
        crate::model::tests::pki(name, &["localhost"]).ca
    }

    #[test]
    fn ca_files() {
        let dir = TestDir::new("model-ca");
        let path = dir.path().join("ca.pem");
        let (one, two) = (ca_pem("One CA"), ca_pem("Two CA"));
        // A bundle of two, with a key and a comment that are skipped.
        let key = rcgen::KeyPair::generate().expect("key").serialize_pem();
        let text = format!("# corporate roots\n{one}{key}{two}");
        std::fs::write(&path, &text).expect("write");
        let a = Args {
            ca_file: Some(path.clone()),
            ..args("https://gateway.internal:8443")
        };
        let s = Settings::resolve(&a, &env(&[("ANTHROPIC_API_KEY", "k")])).expect("ca");
        let ca = s.ca.as_ref().expect("the CA file");
        assert_eq!(ca.certs.len(), 2);
        let fields = s.fields();
        assert_eq!(fields["ca_file"]["path"], path.display().to_string());
        assert_eq!(
            fields["ca_file"]["sha256"],
            hex(&Sha256::digest(text.as_bytes()))
        );
        assert_eq!(fields["ca_file"]["certificates"], 2);
        let body_line = one.lines().nth(1).expect("a base64 line");
        assert!(
            !fields.to_string().contains(body_line),
            "the certificate is recorded"
        );
        // No --model-ca: null in the record, the built-in roots alone.
        let s = Settings::resolve(&args("https://h"), &env(&[("ANTHROPIC_API_KEY", "k")]))
            .expect("no ca");
        assert!(s.ca.is_none() && s.fields()["ca_file"].is_null());
    }

    #[test]
    fn bad_ca_files_are_refused_naming_the_file() {
        let dir = TestDir::new("model-ca-bad");
        let path = dir.path().join("ca.pem");
        let shown = path.display().to_string();
        let cases: [(&str, &str); 5] = [
            ("", "no certificate in it"),
            ("just some text\n", "no certificate in it"),
            (
                "-----BEGIN CERTIFICATE-----\n!!! not base64 !!!\n-----END CERTIFICATE-----\n",
                "malformed PEM",
            ),
            (
                "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n",
                "malformed PEM",
            ),
            (
                "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
                "certificate 1 is not a usable X.509 CA certificate",
            ),
        ];
        let a = Args {
            ca_file: Some(path.clone()),
            ..args("https://h")
        };
        let key = env(&[("ANTHROPIC_API_KEY", "k")]);
        for (text, want) in cases {
            std::fs::write(&path, text).expect("write");
            let e = Settings::resolve(&a, &key).expect_err(text);
            assert!(matches!(e, Error::CaBad(..)), "{text:?}: {e:?}");
            let line = e.to_string();
            assert!(
                line.contains(&shown) && line.contains(want),
                "{text:?}: {line}"
            );
        }
        let missing = Args {
            ca_file: Some(dir.path().join("nope.pem")),
            ..args("https://h")
        };
        let e = Settings::resolve(&missing, &key).expect_err("missing");
        assert!(matches!(e, Error::CaRead(..)), "{e:?}");
        assert!(e.to_string().contains("nope.pem"), "{e}");
        // A CA for a plaintext upstream: refused, even with a good file.
        std::fs::write(&path, ca_pem("One CA")).expect("write");
        let plain = Args {
            ca_file: Some(path.clone()),
            ..args("http://127.0.0.1:8080")
        };
        let e = Settings::resolve(&plain, &key).expect_err("http");
        assert!(matches!(e, Error::CaWithoutTls(..)), "{e:?}");
        assert!(e.to_string().contains("plain http"), "{e}");
    }

    /// `--model-auth bearer` reads the OAuth token from
    /// CLAUDE_CODE_OAUTH_TOKEN (or the variable named), in place of the
    /// Anthropic API key; the OpenAI key is unchanged; never shown.
    #[test]
    fn an_oauth_token_for_anthropic() {
        let vars = env(&[
            ("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-token"),
            ("ANTHROPIC_API_KEY", "sk-ant-api-key"),
            ("OPENAI_API_KEY", "sk-o"),
            ("MY_TOKEN", "sk-ant-oat01-mine"),
        ]);
        // Two different credentials: the gateway names both providers.
        let a = Args {
            bearer: true,
            upstreams: vec!["anthropic=http://h".into(), "openai=http://h".into()],
            ..Args::default()
        };
        let s = Settings::resolve(&a, &vars).expect("bearer");
        assert_eq!(s.anthropic_auth, AnthropicAuth::Bearer);
        assert_eq!(
            s.key(Api::Anthropic).map(|k| k.secret.expose()),
            Some("sk-ant-oat01-token")
        );
        assert_eq!(s.key(Api::OpenAi).map(|k| k.secret.expose()), Some("sk-o"));
        assert_eq!(s.fields()["anthropic_auth"], "bearer");
        assert_eq!(s.fields()["anthropic_key_from"], "$CLAUDE_CODE_OAUTH_TOKEN");
        assert!(!s.fields().to_string().contains("oat01"));
        let both = vec![
            "anthropic=http://h".to_owned(),
            "openai=http://h".to_owned(),
        ];
        let a = Args {
            oauth_token_env: Some("MY_TOKEN".into()),
            upstreams: both.clone(),
            ..Args::default()
        };
        let s = Settings::resolve(&a, &vars).expect("named");
        assert_eq!(
            s.key(Api::Anthropic).map(|k| k.secret.expose()),
            Some("sk-ant-oat01-mine")
        );
        let e = Settings::resolve(
            &Args {
                bearer: true,
                ..args("http://h")
            },
            &env(&[("ANTHROPIC_API_KEY", "k")]),
        )
        .expect_err("no token");
        assert!(matches!(e, Error::OauthEnv(_)), "{e:?}");
        assert!(e.to_string().contains("CLAUDE_CODE_OAUTH_TOKEN"), "{e}");
        let a = Args {
            upstreams: both,
            ..Args::default()
        };
        let s = Settings::resolve(&a, &vars).expect("key");
        assert_eq!(s.anthropic_auth, AnthropicAuth::ApiKey);
        assert_eq!(s.fields()["anthropic_auth"], "x-api-key");
    }

    /// The OpenAI organization and project come only from the host's
    /// flags, checked.
    #[test]
    fn openai_account_headers_from_the_host() {
        let keys = env(&[("OPENAI_API_KEY", "sk-o")]);
        let a = Args {
            openai_organization: Some("org-1".into()),
            openai_project: Some("proj_2".into()),
            ..args("https://api.openai.com")
        };
        let s = Settings::resolve(&a, &keys).expect("ids");
        assert_eq!(
            s.openai_headers,
            [
                ("openai-organization".to_owned(), "org-1".to_owned()),
                ("openai-project".to_owned(), "proj_2".to_owned())
            ]
        );
        assert!(Settings::resolve(&args("https://api.openai.com"), &keys)
            .expect("none")
            .openai_headers
            .is_empty());
        for bad in ["", "a b", "x\n"] {
            let a = Args {
                openai_project: Some(bad.into()),
                ..args("https://api.openai.com")
            };
            assert!(
                matches!(Settings::resolve(&a, &keys), Err(Error::AccountId(..))),
                "{bad:?}"
            );
        }
    }
}
