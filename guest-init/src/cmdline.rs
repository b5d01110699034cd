//! The init's options on the kernel command line (`/proc/cmdline`).
//!
//! Dotted parameters such as `airlock.debug=1` are taken by the kernel for
//! module parameters and not passed to init, so the init reads them here.

use std::fs;
use std::io;

/// Where the kernel shows its command line (needs `/proc`).
const CMDLINE_PATH: &str = "/proc/cmdline";

/// The command line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read {CMDLINE_PATH}")]
    Read(#[source] io::Error),
}

/// The init's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `airlock.debug=1`: print the debug lines.
    pub debug: bool,
    /// `airlock.container=0` (`airlock run --no-container`): in image mode,
    /// run the command directly in the VM instead of in a container.
    pub container: bool,
    /// `airlock.archive=1` (`airlock run --image FILE`): a second read-only
    /// disk holds an image archive; the container runs from it.
    pub archive: bool,
    /// `airlock.imagedisk=1` (`airlock run --image NAME` of an image in the
    /// host's store): a second read-only disk holds the image's root, an
    /// erofs filesystem; the container runs on it as on the guest image.
    pub image_disk: bool,
    /// `airlock.nested=1` (`airlock run --nested`): the container gets what
    /// podman inside it needs.
    pub nested: bool,
    /// `airlock.vmroot=1` (`airlock run --vm-root`): a command that runs
    /// directly in the VM (no container) runs as root rather than as the
    /// unprivileged agent user ([`crate::privilege`]).
    pub vm_root: bool,
    /// `airlock.epoch=SECS`: the host's wall clock at boot.
    pub epoch: Option<i64>,
    /// `airlock.snapshot=1`: stop at the snapshot point (the boot timer's
    /// snapshot mark) and, once woken, take the host's [`crate::wake`].
    pub snapshot: bool,
    /// `airlock.prepare=1` (a live sandbox's snapshot): with `snapshot`,
    /// the snapshot holds the agent's container started
    /// ([`crate::prepared`]).
    pub prepare: bool,
    /// `airlock.prepare_cwd=DIR`: that container's working directory
    /// (the run's `-w` or its image's `WorkingDir`); `/` if not given.
    pub prepare_cwd: Option<String>,
    /// `airlock.prepare_user=USER`: that container's user (the run's `-u`
    /// or its image's `User`); the image's default if not given.
    pub prepare_user: Option<String>,
    /// `airlock.model_max_body=BYTES` (`airlock run
    /// --model-max-request-bytes`): the in-guest model endpoint's body
    /// limit (capped at [`crate::model::MAX_BODY`] there).
    pub model_max_body: Option<u64>,
    /// `airlock.host_ports=P1,P2` (`airlock run --host-port`): the ports
    /// forwarded to the host, which the init listens on for the agent.
    pub host_ports: crate::egress::HostPorts,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            debug: false,
            container: true,
            archive: false,
            image_disk: false,
            nested: false,
            vm_root: false,
            epoch: None,
            snapshot: false,
            prepare: false,
            prepare_cwd: None,
            prepare_user: None,
            model_max_body: None,
            host_ports: crate::egress::HostPorts::default(),
        }
    }
}

impl Options {
    /// Reads the options from `/proc/cmdline`.
    pub fn read() -> Result<Self, Error> {
        let bytes = fs::read(CMDLINE_PATH).map_err(Error::Read)?;
        Ok(Self::parse(&String::from_utf8_lossy(&bytes)))
    }

    /// Parses a kernel command line. Unknown parameters are ignored; for a
    /// parameter given twice the last one wins, as in the kernel.
    pub fn parse(cmdline: &str) -> Self {
        let mut options = Self::default();
        for (key, value) in params(cmdline) {
            match key {
                "airlock.debug" => options.debug = parse_bool(value),
                "airlock.container" => options.container = parse_bool(value),
                "airlock.archive" => options.archive = parse_bool(value),
                "airlock.imagedisk" => options.image_disk = parse_bool(value),
                "airlock.nested" => options.nested = parse_bool(value),
                "airlock.vmroot" => options.vm_root = parse_bool(value),
                "airlock.epoch" => options.epoch = value.and_then(|v| v.parse().ok()),
                "airlock.snapshot" => options.snapshot = parse_bool(value),
                "airlock.prepare" => options.prepare = parse_bool(value),
                "airlock.prepare_cwd" => options.prepare_cwd = value.map(str::to_owned),
                "airlock.prepare_user" => options.prepare_user = value.map(str::to_owned),
                "airlock.host_ports" => {
                    options.host_ports = crate::egress::HostPorts::parse(value.unwrap_or(""));
                }
                "airlock.model_max_body" => {
                    options.model_max_body = value.and_then(|v| v.parse().ok());
                }
                _ => {}
            }
        }
        options
    }
}

/// A kernel boolean: a bare `key`, or `key=` 1/y/yes/on/true.
fn parse_bool(value: Option<&str>) -> bool {
    match value {
        None => true,
        Some(v) => matches!(
            v.to_ascii_lowercase().as_str(),
            "1" | "y" | "yes" | "on" | "true"
        ),
    }
}

/// Splits a command line into `(key, value)` pairs the way the kernel's
/// `next_arg` does: words separated by whitespace, double quotes group
/// (and are dropped from) a value, and `--` ends the kernel's part.
fn params(cmdline: &str) -> Vec<(&str, Option<&str>)> {
    let mut out = Vec::new();
    let mut rest = cmdline.trim_start();
    while !rest.is_empty() {
        let mut in_quote = false;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            if c == '"' {
                in_quote = !in_quote;
            } else if c.is_whitespace() && !in_quote {
                end = i;
                break;
            }
        }
        let word = &rest[..end];
        rest = rest[end..].trim_start();
        if word == "--" {
            break;
        }
        // A word that opens with a quote loses it and its closing quote.
        let word = match word.strip_prefix('"') {
            Some(w) => w.strip_suffix('"').unwrap_or(w),
            None => word,
        };
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(unquote(v))),
            None => (word, None),
        };
        out.push((key, value));
    }
    out
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .map(|v| v.strip_suffix('"').unwrap_or(v))
        .unwrap_or(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debug(cmdline: &str) -> bool {
        Options::parse(cmdline).debug
    }

    #[test]
    fn debug_is_off_by_default() {
        assert!(!debug(""));
        assert!(!debug("console=ttyS0 reboot=k panic=-1 quiet\n"));
    }

    #[test]
    fn debug_values() {
        assert!(debug("console=ttyS0 airlock.debug=1 quiet\n"));
        assert!(debug("airlock.debug"));
        assert!(debug("airlock.debug=on"));
        assert!(debug("airlock.debug=Y"));
        assert!(!debug("airlock.debug=0"));
        assert!(!debug("airlock.debug="));
        assert!(!debug("airlock.debug=off"));
    }

    #[test]
    fn container_is_on_unless_turned_off() {
        assert!(Options::parse("").container);
        assert!(Options::parse("airlock.container=1").container);
        assert!(!Options::parse("quiet airlock.container=0").container);
        assert!(!Options::parse("airlock.container=off").container);
    }

    #[test]
    fn the_model_body_limit() {
        assert_eq!(Options::parse("").model_max_body, None);
        let o = Options::parse("airlock.model_max_body=1024 airlock.model_max_body=2048");
        assert_eq!(o.model_max_body, Some(2048));
        assert_eq!(
            Options::parse("airlock.model_max_body=x").model_max_body,
            None
        );
    }

    #[test]
    fn archive_and_nested_are_off_unless_asked() {
        let o = Options::parse("root=/dev/vda");
        assert!(!o.archive && !o.nested && !o.image_disk);
        let o = Options::parse("airlock.archive=1 airlock.nested=1");
        assert!(o.archive && o.nested && !o.image_disk);
        assert!(Options::parse("airlock.imagedisk=1").image_disk);
        assert_eq!(
            Options::parse("airlock.epoch=1800000000").epoch,
            Some(1_800_000_000)
        );
        assert_eq!(Options::parse("airlock.epoch=soon").epoch, None);
    }

    #[test]
    fn vm_root_is_off_unless_asked() {
        assert!(!Options::parse("root=/dev/vda airlock.container=0").vm_root);
        assert!(Options::parse("airlock.vmroot=1").vm_root);
        assert!(!Options::parse("airlock.vmroot=1 airlock.vmroot=0").vm_root);
        assert!(!Options::parse("airlock.vmrootx=1").vm_root);
    }

    #[test]
    fn last_one_wins() {
        assert!(!debug("airlock.debug=1 airlock.debug=0"));
        assert!(debug("airlock.debug=0 airlock.debug=1"));
    }

    #[test]
    fn look_alikes_do_not_count() {
        assert!(!debug("xairlock.debug=1"));
        assert!(!debug("airlock.debugx=1"));
        assert!(!debug("foo=\"airlock.debug=1\""));
        assert!(!debug("foo=\"a airlock.debug=1 b\""));
    }

    #[test]
    fn init_arguments_are_not_options() {
        assert!(!debug("quiet -- airlock.debug=1"));
    }

    #[test]
    fn splits_like_the_kernel() {
        assert_eq!(
            params("  a=1\tb \"c=x y\" d=\"p q\" e\n"),
            vec![
                ("a", Some("1")),
                ("b", None),
                ("c", Some("x y")),
                ("d", Some("p q")),
                ("e", None),
            ]
        );
    }
}
