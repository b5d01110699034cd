//! `--secret`, `--secret-env`, `--secret-bind` and `--secret-ca` as the
//! user writes them, checked before any VM starts.

use std::path::PathBuf;

use serde_json::{json, Value};

/// Most secrets in one sandbox.
pub const MAX_SECRETS: usize = 32;
/// Most hosts one `--secret-bind` names (presets expanded).
pub const MAX_HOSTS: usize = 32;
/// Longest secret name.
const MAX_NAME: usize = 64;

/// Where a secret's value comes from, on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `env:VAR`: airlock's own environment.
    Env(String),
    /// `file:PATH`: the file's content, a trailing newline dropped.
    File(PathBuf),
    /// `cmd:COMMAND`: run with `sh -c`; its output is the value (or JSON
    /// with `value` and `expires_in`), fetched again when it expires.
    Cmd(String),
}

impl Source {
    /// What `run.start` records: the kind and where, never the value.
    pub fn fields(&self) -> Value {
        match self {
            Self::Env(var) => json!({"kind": "env", "var": var}),
            Self::File(path) => json!({"kind": "file", "path": path.display().to_string()}),
            Self::Cmd(cmd) => json!({"kind": "cmd", "command": cmd}),
        }
    }
}

/// One `--secret NAME=SOURCE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSpec {
    pub name: String,
    pub source: Source,
    /// The variables that hold its placeholder in the guest:
    /// `AIRLOCK_SECRET_<NAME>` and those of `--secret-env`.
    pub env: Vec<String>,
}

/// How a set header carries the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// The value as it is.
    Raw,
    /// `Bearer VALUE`.
    Bearer,
    /// `token VALUE` (GitHub's older form).
    Token,
    /// `Basic base64(USER:VALUE)`.
    Basic(String),
    /// Anthropic: `x-api-key: VALUE`, or `Authorization: Bearer VALUE`
    /// for an OAuth token (`sk-ant-oat…`); the header named is ignored.
    Anthropic,
}

/// A bound host: a name (case-insensitive) or the names below a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Name(String),
    Below(String),
}

impl HostPattern {
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match self {
            Self::Name(n) => host == *n,
            Self::Below(d) => host.len() > d.len() + 1 && host.ends_with(&format!(".{d}")),
        }
    }

    pub fn text(&self) -> String {
        match self {
            Self::Name(n) => n.clone(),
            Self::Below(d) => format!("*.{d}"),
        }
    }
}

/// One `--secret-bind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub secret: String,
    pub hosts: Vec<HostPattern>,
    /// Set this header (replacing what the client sent) on every request.
    pub header: SetHeader,
    /// Also replace the placeholder in the request line.
    pub url: bool,
    /// As the user wrote it.
    pub text: String,
}

impl Bind {
    pub fn fields(&self) -> Value {
        json!({
            "secret": self.secret,
            "hosts": self.hosts.iter().map(HostPattern::text).collect::<Vec<_>>(),
            "header": self.header.as_ref().map(|(h, _)| h),
            "url": self.url,
            "as_written": self.text,
        })
    }
}

/// A header a binding sets, and how.
type SetHeader = Option<(String, Format)>;

/// A preset: its hosts and the header it sets.
fn preset(name: &str) -> Option<(Vec<HostPattern>, SetHeader)> {
    let names = |list: &[&str]| -> Vec<HostPattern> {
        list.iter()
            .map(|h| match h.strip_prefix("*.") {
                Some(d) => HostPattern::Below((*d).to_owned()),
                None => HostPattern::Name((*h).to_owned()),
            })
            .collect()
    };
    let auth = |f: Format| Some(("authorization".to_owned(), f));
    Some(match name {
        "anthropic" => (
            names(&["api.anthropic.com"]),
            Some(("x-api-key".into(), Format::Anthropic)),
        ),
        "openai" => (names(&["api.openai.com"]), auth(Format::Bearer)),
        "github" => (
            names(&[
                "github.com",
                "api.github.com",
                "uploads.github.com",
                "codeload.github.com",
                "*.githubusercontent.com",
            ]),
            auth(Format::Basic("x-access-token".into())),
        ),
        "npm" => (names(&["registry.npmjs.org"]), auth(Format::Bearer)),
        "pypi" => (
            names(&["upload.pypi.org", "test.pypi.org"]),
            auth(Format::Basic("__token__".into())),
        ),
        _ => return None,
    })
}

/// The presets `--secret-bind NAME=@PRESET` knows.
pub const PRESETS: [&str; 5] = ["anthropic", "openai", "github", "npm", "pypi"];

fn check_name(name: &str, flag: &str, text: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{flag} {text}: the name must be letters, digits and _ (not starting with a digit), \
             at most {MAX_NAME}"
        ))
    }
}

/// `--secret NAME=env:VAR|file:PATH|cmd:COMMAND`.
pub fn parse_secret(text: &str) -> Result<SecretSpec, String> {
    let (name, source) = text.split_once('=').ok_or_else(|| {
        format!("--secret {text}: expected NAME=env:VAR, NAME=file:PATH or NAME=cmd:COMMAND")
    })?;
    check_name(name, "--secret", text)?;
    let source = match source.split_once(':') {
        Some(("env", var)) if !var.is_empty() && !var.contains(['=', '\0']) => {
            Source::Env(var.to_owned())
        }
        Some(("file", path)) if !path.is_empty() && !path.contains('\0') => {
            let path = PathBuf::from(path);
            Source::File(std::path::absolute(&path).unwrap_or(path))
        }
        Some(("cmd", cmd)) if !cmd.trim().is_empty() && !cmd.contains('\0') => {
            Source::Cmd(cmd.to_owned())
        }
        _ => {
            return Err(format!(
                "--secret {text}: the source is env:VAR (airlock's environment), file:PATH or \
                 cmd:COMMAND (a host program whose output is the value)"
            ))
        }
    };
    Ok(SecretSpec {
        name: name.to_owned(),
        source,
        env: vec![format!("AIRLOCK_SECRET_{name}")],
    })
}

/// `--secret-env NAME=VAR`: VAR holds NAME's placeholder too.
pub fn parse_secret_env(text: &str) -> Result<(String, String), String> {
    let (name, var) = text
        .split_once('=')
        .ok_or_else(|| format!("--secret-env {text}: expected NAME=VAR"))?;
    check_name(name, "--secret-env", text)?;
    check_name(var, "--secret-env", text)?;
    Ok((name.to_owned(), var.to_owned()))
}

fn parse_host(h: &str, text: &str) -> Result<HostPattern, String> {
    let h = h.trim().trim_end_matches('.').to_ascii_lowercase();
    let (below, name) = match h.strip_prefix("*.") {
        Some(d) => (true, d.to_owned()),
        None => (false, h),
    };
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with('.')
        && !name.contains("..");
    if !ok {
        return Err(format!(
            "--secret-bind {text}: {name:?} is not a host name (NAME, *.DOMAIN or @PRESET; \
             IPv4 addresses are names too, ports are not given: every port the policy allows)"
        ));
    }
    Ok(if below {
        HostPattern::Below(name)
    } else {
        HostPattern::Name(name)
    })
}

fn parse_format(token: &str, text: &str) -> Result<Option<Format>, String> {
    Ok(Some(match token {
        "raw" => Format::Raw,
        "bearer" => Format::Bearer,
        "token" => Format::Token,
        "basic" => Format::Basic("x-access-token".into()),
        t => match t.strip_prefix("basic=") {
            Some(user) if !user.is_empty() && !user.contains([':', '\0', '\r', '\n']) => {
                Format::Basic(user.to_owned())
            }
            Some(_) => {
                return Err(format!(
                    "--secret-bind {text}: basic=USER needs a user without ':'"
                ))
            }
            None => return Ok(None),
        },
    }))
}

fn check_header_name(h: &str, text: &str) -> Result<(), String> {
    if h.is_empty()
        || h.len() > 100
        || !h
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        return Err(format!("--secret-bind {text}: {h:?} is not a header name"));
    }
    let lower = h.to_ascii_lowercase();
    if matches!(
        lower.as_str(),
        "host" | "content-length" | "transfer-encoding" | "connection" | "upgrade"
    ) {
        return Err(format!(
            "--secret-bind {text}: airlock does not set {h}: it frames the request"
        ));
    }
    Ok(())
}

/// `--secret-bind NAME=HOST[,HOST...][:header=HEADER[:FORMAT]][:url]`,
/// HOST a name, `*.DOMAIN` or `@PRESET`.
pub fn parse_bind(text: &str) -> Result<Bind, String> {
    let (secret, rest) = text.split_once('=').ok_or_else(|| {
        format!("--secret-bind {text}: expected NAME=HOST[,HOST...][:header=HEADER[:FORMAT]][:url]")
    })?;
    check_name(secret, "--secret-bind", text)?;
    let mut tokens = rest.split(':');
    let hosts_text = tokens.next().unwrap_or_default();
    let mut hosts = Vec::new();
    let mut header = None;
    for h in hosts_text.split(',') {
        if let Some(p) = h.trim().strip_prefix('@') {
            let (ph, pheader) = preset(p).ok_or_else(|| {
                format!(
                    "--secret-bind {text}: no preset {p:?} (the presets: {})",
                    PRESETS.join(", ")
                )
            })?;
            hosts.extend(ph);
            header = header.or(pheader);
        } else {
            hosts.push(parse_host(h, text)?);
        }
    }
    let mut url = false;
    let tokens: Vec<&str> = tokens.collect();
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i];
        if t == "url" {
            url = true;
        } else if let Some(h) = t.strip_prefix("header=") {
            check_header_name(h, text)?;
            let mut format = Format::Raw;
            if let Some(next) = tokens.get(i + 1) {
                if let Some(f) = parse_format(next, text)? {
                    format = f;
                    i += 1;
                }
            }
            header = Some((h.to_ascii_lowercase(), format));
        } else {
            return Err(format!(
                "--secret-bind {text}: unknown option {t:?} (header=HEADER[:raw|bearer|token|\
                 basic|basic=USER], url)"
            ));
        }
        i += 1;
    }
    if hosts.len() > MAX_HOSTS {
        return Err(format!("--secret-bind {text}: at most {MAX_HOSTS} hosts"));
    }
    Ok(Bind {
        secret: secret.to_owned(),
        hosts,
        header,
        url,
        text: text.to_owned(),
    })
}

/// The secret flags of a run, parsed and checked against each other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags {
    pub secrets: Vec<SecretSpec>,
    pub binds: Vec<Bind>,
    pub ca_file: Option<PathBuf>,
}

/// Parses the secret flags together.
pub fn parse(
    secrets: &[String],
    envs: &[String],
    binds: &[String],
    ca_file: Option<&std::path::Path>,
) -> Result<Flags, String> {
    let mut out = Flags::default();
    for s in secrets {
        let spec = parse_secret(s)?;
        if out.secrets.iter().any(|o| o.name == spec.name) {
            return Err(format!("--secret {}: given twice", spec.name));
        }
        out.secrets.push(spec);
    }
    if out.secrets.len() > MAX_SECRETS {
        return Err(format!("at most {MAX_SECRETS} --secret"));
    }
    for e in envs {
        let (name, var) = parse_secret_env(e)?;
        let spec = out
            .secrets
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| format!("--secret-env {e}: no --secret {name}=..."))?;
        if !spec.env.contains(&var) {
            spec.env.push(var);
        }
    }
    for b in binds {
        let bind = parse_bind(b)?;
        if !out.secrets.iter().any(|s| s.name == bind.secret) {
            return Err(format!(
                "--secret-bind {b}: no --secret {}=... to bind",
                bind.secret
            ));
        }
        out.binds.push(bind);
    }
    if ca_file.is_some() && out.binds.is_empty() {
        return Err("--secret-ca is for the hosts of --secret-bind: give one".into());
    }
    out.ca_file = ca_file.map(std::path::Path::to_path_buf);
    Ok(out)
}
