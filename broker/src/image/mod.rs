//! Images by name: `airlock image load|ls|inspect|rm`, the store they live
//! in ([`store`]), and what `airlock run --image NAME` takes from them: the
//! erofs disk the container runs on and the image's config (`Entrypoint`,
//! `Cmd`, `Env`, `WorkingDir`, `User`), with the run's own options over it
//! ([`apply`]).
//!
//! Everything an archive holds is the image author's, so untrusted: the
//! layers are unpacked by [`unpack`] (never through a symlink, never
//! outside the root, no device nodes), the documents by [`source`]
//! (bounded, every blob checked against its digest). What reaches the guest
//! is a read-only disk and a run spec: never a host path.

pub mod source;
pub mod store;
pub mod unpack;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::exit::Exit;
use store::{Store, Stored};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no image {0:?} in the store (`airlock image ls` lists them; `airlock image load FILE` adds one)")]
    NotFound(String),
    #[error(
        "{0:?} is not an image reference (name[:tag] of a-z A-Z 0-9 . _ / : -, or sha256: and \
         at least {min} hex digits)",
        min = store::MIN_PREFIX
    )]
    BadRef(String),
    #[error("{0:?} names {1} images: give more of the digest")]
    Ambiguous(String, usize),
    #[error("neither $XDG_DATA_HOME nor $HOME is set: no place for the image store")]
    NoHome,
    #[error("{}", .0.display())]
    Io(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Archive(#[from] crate::archive::Error),
    #[error(transparent)]
    Source(#[from] source::Error),
    #[error(transparent)]
    Unpack(#[from] unpack::Error),
    #[error(
        "image {0:?} is in use by the running sandbox(es) {1}: `airlock stop` or `airlock rm -f` \
         them first"
    )]
    InUse(String, String),
    #[error("cannot make the image's disk: {0}")]
    Mkfs(String),
    #[error("the image's {field} {value:?} is not usable: {why}")]
    Config {
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

impl Error {
    /// Bad input is 2; a store that cannot be written or a disk that
    /// cannot be made is 1.
    pub fn exit(&self) -> Exit {
        match self {
            Error::Io(..) | Error::Mkfs(_) | Error::NoHome => Exit::HostUnfit,
            _ => Exit::Usage,
        }
    }
}

/// What `--image VALUE` names.
#[derive(Debug, Clone)]
pub enum Choice {
    /// An archive file, loaded in the guest by `podman load` as before.
    File(PathBuf),
    /// An image of the store.
    Stored(Resolved),
}

/// An image of the store, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// What the user typed.
    pub reference: String,
    pub digest: String,
    pub names: Vec<String>,
    /// The erofs disk, on the host (never told to the guest).
    pub disk: PathBuf,
    pub config: ImageConfig,
}

/// `--image VALUE`: a file when VALUE exists as a path or looks like one
/// (starts with `/`, `./` or `../`, or ends with `.tar`); otherwise an image
/// of the store (name[:tag] or sha256:PREFIX).
pub fn choose(value: &OsStr) -> Result<Choice, Error> {
    let path = Path::new(value);
    let text = value.to_str();
    let looks_like_path = text.is_none_or(|t| {
        t.starts_with('/') || t.starts_with("./") || t.starts_with("../") || t.ends_with(".tar")
    });
    if path.symlink_metadata().is_ok() || looks_like_path {
        return Ok(Choice::File(path.to_path_buf()));
    }
    let reference = text.unwrap_or_default();
    let store = Store::open_default()?;
    let image = store.resolve(reference)?;
    Ok(Choice::Stored(resolved(reference, &image)?))
}

fn resolved(reference: &str, image: &Stored) -> Result<Resolved, Error> {
    Ok(Resolved {
        reference: reference.to_owned(),
        digest: image.digest.clone(),
        names: image.names.clone(),
        disk: image.disk(),
        config: ImageConfig::from_json(&image.config()?),
    })
}

/// The parts of an image's config a run honours.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=VALUE` entries, as in the config.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

impl ImageConfig {
    /// From a config blob (`{"config": {...}}`); what is missing or not of
    /// the right type is empty.
    pub fn from_json(v: &Value) -> ImageConfig {
        let c = v.get("config").unwrap_or(&Value::Null);
        let list = |k: &str| -> Vec<String> {
            c.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let text = |k: &str| {
            c.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        ImageConfig {
            entrypoint: list("Entrypoint"),
            cmd: list("Cmd"),
            env: list("Env"),
            working_dir: text("WorkingDir"),
            user: text("User"),
        }
    }
}

/// The run's own options that override the image's config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// The command after `--` (replaces `Cmd`).
    pub command: Vec<String>,
    /// `--entrypoint` (replaces `Entrypoint`, and drops `Cmd` as docker
    /// does; `""` clears it).
    pub entrypoint: Option<String>,
    /// `-e` pairs (replace or add to `Env`).
    pub env: Vec<(String, String)>,
    /// `-w`.
    pub workdir: Option<String>,
    /// `-u`.
    pub user: Option<String>,
}

/// The command, environment, directory and user a run gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `None`: the run's default (`/workspace` with a workspace, else `/`).
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// For the audit log: where each part came from.
    pub fields: Value,
}

/// Puts the image's config and the run's options together, as docker
/// does: argv is the entrypoint (`--entrypoint`, else the image's) then
/// the command (the one given, else the image's `Cmd` unless
/// `--entrypoint` was given); the image's `Env` with `-e` over it; `-w`,
/// else `WorkingDir`; `-u`, else `User`.
pub fn apply(config: &ImageConfig, o: Overrides) -> Result<Applied, Error> {
    let (entrypoint, ep_from) = match &o.entrypoint {
        Some(e) if e.is_empty() => (Vec::new(), "--entrypoint"),
        Some(e) => (vec![e.clone()], "--entrypoint"),
        None if config.entrypoint.is_empty() => (Vec::new(), "none"),
        None => (config.entrypoint.clone(), "image"),
    };
    let (args, cmd_from) = if !o.command.is_empty() {
        (o.command, "command")
    } else if o.entrypoint.is_none() && !config.cmd.is_empty() {
        (config.cmd.clone(), "image")
    } else {
        (Vec::new(), "none")
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(args).collect();
    let mut env: Vec<(String, String)> = Vec::new();
    let mut from_image = Vec::new();
    for entry in &config.env {
        let (name, value) = entry.split_once('=').unwrap_or((entry, ""));
        if name.is_empty() || name.contains('\0') || value.contains('\0') {
            return Err(Error::Config {
                field: "Env entry",
                value: entry.clone(),
                why: "not NAME=VALUE",
            });
        }
        env.retain(|(n, _)| n != name);
        env.push((name.to_owned(), value.to_owned()));
        from_image.push(name.to_owned());
    }
    let mut overridden = Vec::new();
    for (name, value) in o.env {
        if let Some(slot) = env.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = value;
            overridden.push(name);
        } else {
            env.push((name, value));
        }
    }
    let (cwd, wd_from) = match (o.workdir, &config.working_dir) {
        (Some(w), _) => (Some(w), "-w"),
        (None, Some(w)) if w.starts_with('/') => (Some(w.clone()), "image"),
        // Docker takes a relative WorkingDir from /.
        (None, Some(w)) => (Some(format!("/{w}")), "image"),
        (None, None) => (None, "default"),
    };
    let (user, user_from) = match (o.user, &config.user) {
        (Some(u), _) => (Some(u), "-u"),
        (None, Some(u)) => {
            airlock_protocol::check_run_as(u).map_err(|_| Error::Config {
                field: "User",
                value: u.clone(),
                why: "not USER or USER:GROUP of A-Z a-z 0-9 _ . -",
            })?;
            (Some(u.clone()), "image")
        }
        (None, None) => (None, "default"),
    };
    let fields = json!({
        "entrypoint": ep_from,
        "cmd": cmd_from,
        "env_from_image": from_image,
        "env_overridden": overridden,
        "working_dir": wd_from,
        "user": user_from,
    });
    Ok(Applied {
        argv,
        env,
        cwd,
        user,
        fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ImageConfig {
        ImageConfig::from_json(&json!({"config": {
            "Entrypoint": ["/entry.sh", "--flag"],
            "Cmd": ["serve"],
            "Env": ["PATH=/usr/bin:/bin", "MODE=prod"],
            "WorkingDir": "/app",
            "User": "1000:1000",
        }}))
    }

    #[test]
    fn the_image_config_applies_when_nothing_overrides_it() {
        let a = apply(&config(), Overrides::default()).expect("apply");
        assert_eq!(a.argv, ["/entry.sh", "--flag", "serve"]);
        assert_eq!(
            a.env,
            [
                ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
                ("MODE".to_owned(), "prod".to_owned())
            ]
        );
        assert_eq!(a.cwd.as_deref(), Some("/app"));
        assert_eq!(a.user.as_deref(), Some("1000:1000"));
        assert_eq!(a.fields["entrypoint"], "image");
        assert_eq!(a.fields["cmd"], "image");
        assert_eq!(a.fields["user"], "image");
    }

    #[test]
    fn options_override_the_image_config() {
        let a = apply(
            &config(),
            Overrides {
                command: vec!["id".into()],
                entrypoint: None,
                env: vec![("MODE".into(), "dev".into()), ("NEW".into(), "1".into())],
                workdir: Some("/tmp".into()),
                user: Some("0".into()),
            },
        )
        .expect("apply");
        assert_eq!(
            a.argv,
            ["/entry.sh", "--flag", "id"],
            "the command replaces Cmd"
        );
        assert!(a.env.contains(&("MODE".into(), "dev".into())));
        assert!(a.env.contains(&("NEW".into(), "1".into())));
        assert_eq!(a.env.len(), 3);
        assert_eq!(a.fields["env_overridden"], json!(["MODE"]));
        assert_eq!(
            (a.cwd.as_deref(), a.user.as_deref()),
            (Some("/tmp"), Some("0"))
        );
        // --entrypoint replaces the entrypoint and drops Cmd; "" clears it.
        let a = apply(
            &config(),
            Overrides {
                entrypoint: Some("/bin/sh".into()),
                ..Overrides::default()
            },
        )
        .expect("apply");
        assert_eq!(a.argv, ["/bin/sh"]);
        let a = apply(
            &config(),
            Overrides {
                entrypoint: Some(String::new()),
                command: vec!["true".into()],
                ..Overrides::default()
            },
        )
        .expect("apply");
        assert_eq!(a.argv, ["true"]);
    }

    #[test]
    fn a_bad_image_config_is_refused() {
        let bad_user = ImageConfig {
            user: Some("root; rm -rf /".into()),
            ..ImageConfig::default()
        };
        assert!(matches!(
            apply(&bad_user, Overrides::default()),
            Err(Error::Config { field: "User", .. })
        ));
        let bad_env = ImageConfig {
            env: vec!["=x".into()],
            ..ImageConfig::default()
        };
        assert!(apply(&bad_env, Overrides::default()).is_err());
        // A relative WorkingDir is taken from /; an empty config is empty.
        let rel = ImageConfig::from_json(&json!({"config": {"WorkingDir": "src"}}));
        let a = apply(&rel, Overrides::default()).expect("apply");
        assert_eq!(a.cwd.as_deref(), Some("/src"));
        assert_eq!(ImageConfig::from_json(&json!({})), ImageConfig::default());
    }
}
