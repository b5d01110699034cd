//! The docker front end's policy file: `$AIRLOCK_DOCKER_CONFIG`, else
//! `$XDG_CONFIG_HOME/airlock/docker.toml`, else
//! `~/.config/airlock/docker.toml`. An agent platform passes no airlock
//! flags, so what its sandboxes may do (egress rules, host ports, the
//! model upstream, limits, the engine) is said here, once, by whoever
//! installs it. Every key is one of `airlock create`'s options (with `_`
//! for `-`), given to every sandbox the front end makes, and checked by
//! `create` itself; `host_ports` is the front end's own: the host ports
//! that `--add-host NAME:host-gateway` and a proxy variable naming
//! `host.docker.internal:PORT` may reach. No file: the defaults (no
//! egress, no host port, no model upstream).

use std::path::{Path, PathBuf};

use toml::Value;

/// The file may not be larger than this.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The options a key may set, and how: a flag with a value (repeated for
/// a list), or a switch.
const KEYS: &[(&str, Kind)] = &[
    ("engine", Kind::Value),
    ("kernel", Kind::Value),
    ("initrd", Kind::Value),
    ("image_root", Kind::Value),
    ("mem", Kind::Value),
    ("cpus", Kind::Value),
    ("max_lifetime", Kind::Value),
    ("idle_timeout", Kind::Value),
    ("max_output_bytes", Kind::Value),
    ("audit_key", Kind::Value),
    ("audit_max_guest_events", Kind::Value),
    ("audit_max_guest_bytes", Kind::Value),
    ("exclude", Kind::List),
    ("mount_max_write", Kind::Value),
    ("mount_max_files", Kind::Value),
    ("net_allow", Kind::List),
    ("net_deny", Kind::List),
    ("net_policy", Kind::Value),
    ("net_max_tunnels", Kind::Value),
    ("net_max_bytes", Kind::Value),
    ("net_connect_timeout", Kind::Value),
    ("net_idle_timeout", Kind::Value),
    ("secret", Kind::List),
    ("secret_env", Kind::List),
    ("secret_bind", Kind::List),
    ("secret_ca", Kind::Value),
    ("model_upstream", Kind::List),
    ("model_key_env", Kind::Value),
    ("model_key_file", Kind::Value),
    ("model_auth", Kind::Value),
    ("model_oauth_token_env", Kind::Value),
    ("model_openai_organization", Kind::Value),
    ("model_openai_project", Kind::Value),
    ("model_ca", Kind::Value),
    ("model_policy", Kind::Value),
    ("model_allow", Kind::List),
    ("model_max_requests", Kind::Value),
    ("model_max_tokens", Kind::Value),
    ("model_max_request_bytes", Kind::Value),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Value,
    List,
}

/// The front end's memory for a sandbox when neither `--memory` nor the
/// file's `mem` says (docker sets no limit; an agent needs room).
pub const DEFAULT_MEM_MIB: u32 = 1024;

/// The policy, read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// Where it was read from (`None`: no file, the defaults).
    pub source: Option<PathBuf>,
    /// `create` options, by key (sorted), each list in its order.
    pub flags: Vec<String>,
    /// Whether the file sets `mem`.
    pub sets_mem: bool,
    /// `host_ports`: (guest port, host port) pairs.
    pub host_ports: Vec<(u16, u16)>,
}

/// Where the file is looked for.
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AIRLOCK_DOCKER_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("airlock/docker.toml"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/airlock/docker.toml"))
}

/// Reads the file (a missing file at the default place is the defaults;
/// one named by `AIRLOCK_DOCKER_CONFIG` must exist).
pub fn load() -> Result<Config, String> {
    let Some(path) = path() else {
        return Ok(Config::default());
    };
    let named = std::env::var_os("AIRLOCK_DOCKER_CONFIG").is_some_and(|p| !p.is_empty());
    let text = match read_bounded(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => {
            return Ok(Config::default())
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut config = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    config.source = Some(path);
    Ok(config)
}

fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::other("larger than 1 MiB"));
    }
    Ok(text)
}

/// A scalar as a flag's value.
fn scalar(key: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Boolean(_)
        | Value::Float(_)
        | Value::Datetime(_)
        | Value::Array(_)
        | Value::Table(_) => Err(format!("{key}: expected a string or a whole number")),
    }
}

/// One `host_ports` entry: `PORT` or `"PORT:HOSTPORT"`.
fn host_port(v: &Value) -> Option<(u16, u16)> {
    let ok = |p: u16| (p >= 1).then_some(p);
    match v {
        Value::Integer(i) => u16::try_from(*i).ok().and_then(ok).map(|p| (p, p)),
        Value::String(s) => match s.split_once(':') {
            Some((a, b)) => Some((ok(a.parse().ok()?)?, ok(b.parse().ok()?)?)),
            None => ok(s.parse().ok()?).map(|p| (p, p)),
        },
        _ => None,
    }
}

/// Parses the file's text.
pub fn parse(text: &str) -> Result<Config, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        e.to_string()
            .lines()
            .next()
            .unwrap_or("not TOML")
            .to_owned()
    })?;
    let mut config = Config::default();
    for (key, value) in &table {
        if key == "host_ports" {
            let Value::Array(items) = value else {
                return Err("host_ports: expected a list of ports (8080 or \"8080:18080\")".into());
            };
            for item in items {
                let pair = host_port(item).ok_or_else(|| {
                    format!("host_ports: {item:?} is not a port 1-65535 or \"PORT:HOSTPORT\"")
                })?;
                config.host_ports.push(pair);
            }
            continue;
        }
        let Some((_, kind)) = KEYS.iter().find(|(k, _)| k == key) else {
            let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
            return Err(format!(
                "unknown key {key:?} (known: host_ports, {})",
                known.join(", ")
            ));
        };
        let flag = format!("--{}", key.replace('_', "-"));
        match (kind, value) {
            (Kind::List, Value::Array(items)) => {
                for item in items {
                    config.flags.push(flag.clone());
                    config.flags.push(scalar(key, item)?);
                }
            }
            (Kind::List, _) => return Err(format!("{key}: expected a list")),
            (Kind::Value, v) => {
                config.flags.push(flag);
                config.flags.push(scalar(key, v)?);
            }
        }
        if key == "mem" {
            config.sets_mem = true;
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_create_options() {
        let c = parse(
            r#"
engine = "tcg"
mem = 2048
net_allow = ["api.github.com", "*.npmjs.org:443"]
host_ports = [10255, "8080:18080"]
model_upstream = ["anthropic=http://127.0.0.1:9"]
"#,
        )
        .expect("parses");
        assert_eq!(
            c.flags,
            [
                "--engine",
                "tcg",
                "--mem",
                "2048",
                "--model-upstream",
                "anthropic=http://127.0.0.1:9",
                "--net-allow",
                "api.github.com",
                "--net-allow",
                "*.npmjs.org:443"
            ]
        );
        assert!(c.sets_mem);
        assert_eq!(c.host_ports, [(10255, 10255), (8080, 18080)]);
    }

    #[test]
    fn bad_files_are_refused_with_the_key() {
        let e = parse("privileged = true").expect_err("unknown key");
        assert!(e.contains("unknown key \"privileged\""), "{e}");
        let e = parse("net_allow = \"x\"").expect_err("not a list");
        assert!(e.contains("net_allow: expected a list"), "{e}");
        let e = parse("host_ports = [0]").expect_err("port 0");
        assert!(e.contains("host_ports"), "{e}");
        let e = parse("host_ports = [70000]").expect_err("port too big");
        assert!(e.contains("host_ports"), "{e}");
        let e = parse("mem = 1.5").expect_err("float");
        assert!(e.contains("mem: expected"), "{e}");
        let e = parse("engine = ").expect_err("not toml");
        assert!(!e.is_empty());
    }
}
