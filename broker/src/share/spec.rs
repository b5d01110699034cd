//! A live mount as the user writes it: `--mount type=bind,src=HOST,dst=GUEST[,ro][,uid=N][,gid=N]`
//! or the docker short form `-v HOST:GUEST[:ro|:rw]`, checked before any
//! VM starts.

use std::path::{Path, PathBuf};

use airlock_protocol::limits::MAX_MOUNTS;
use airlock_protocol::{check_mount, MountEntry};

use crate::audit::records::MountRecord;

/// One live mount, checked: its source resolved (symlinks in the path
/// the user named are followed here, once, by airlock; never afterwards,
/// and never inside the share). The broker hands it to the share server
/// as it is (JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountSpec {
    /// The host file or directory, canonical.
    pub source: PathBuf,
    /// Where it appears in the agent's container.
    pub target: String,
    pub readonly: bool,
    /// A single file (served as [`SINGLE_FILE_NAME`] in a directory of
    /// its own), or a directory (`None`).
    pub file: Option<String>,
    /// Who files made through it belong to on the host (default: the
    /// user who runs airlock).
    pub uid: u32,
    pub gid: u32,
    /// Most bytes the guest may write (or preallocate) through it.
    pub max_write_bytes: u64,
    /// Most files, directories and links the guest may make through it.
    pub max_files: u64,
}

/// `--mount-max-write`'s default: 16 GiB per mount.
pub const DEFAULT_MAX_WRITE_BYTES: u64 = 16 << 30;
/// `--mount-max-files`' default: a million entries per mount.
pub const DEFAULT_MAX_FILES: u64 = 1_000_000;

impl MountSpec {
    /// What the guest is told.
    pub fn entry(&self) -> MountEntry {
        MountEntry {
            target: self.target.clone(),
            file: self.file.clone(),
            readonly: self.readonly,
        }
    }

    /// What `run.start` lists.
    pub fn record(&self) -> MountRecord {
        MountRecord {
            source: self.source.display().to_string(),
            target: self.target.clone(),
            mode: if self.readonly { "ro" } else { "rw" },
            kind: if self.file.is_some() { "file" } else { "dir" },
            uid: self.uid,
            gid: self.gid,
            max_write_bytes: self.max_write_bytes,
            max_files: self.max_files,
        }
    }
}

/// The name a single-file mount has in its served directory.
pub const SINGLE_FILE_NAME: &str = "file";

/// Targets the agent's container needs for itself.
const RESERVED: [&str; 6] = [
    "/proc",
    "/sys",
    "/dev",
    "/run/airlock",
    "/etc/hosts",
    "/etc/resolv.conf",
];

/// The current user's uid and gid.
fn me() -> (u32, u32) {
    // SAFETY: getuid/getgid cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// `-v HOST:GUEST[:ro|:rw]`.
pub fn parse_volume(text: &str) -> Result<MountSpec, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let (src, dst, mode) = match parts.as_slice() {
        [src, dst] => (*src, *dst, None),
        [src, dst, mode] => (*src, *dst, Some(*mode)),
        _ => {
            return Err(format!(
                "-v {text}: expected HOST:GUEST or HOST:GUEST:ro (host paths with ':' need --mount)"
            ))
        }
    };
    let readonly = match mode {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(other) => return Err(format!("-v {text}: unknown mode {other:?} (ro or rw)")),
    };
    let (uid, gid) = me();
    build(text, src, dst, readonly, uid, gid)
}

/// `type=bind,src=HOST,dst=GUEST[,ro|readonly][,uid=N][,gid=N]`
/// (`source`/`target`/`destination` as docker spells them too).
pub fn parse_mount(text: &str) -> Result<MountSpec, String> {
    let (mut src, mut dst, mut readonly) = (None, None, false);
    let (mut uid, mut gid) = me();
    for field in text.split(',') {
        let (key, value) = match field.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (field, None),
        };
        match (key, value) {
            ("type", Some("bind")) => {}
            ("type", Some(other)) => {
                return Err(format!(
                    "--mount {text}: type={other} is not supported (bind only)"
                ))
            }
            ("src" | "source", Some(v)) => src = Some(v),
            ("dst" | "destination" | "target", Some(v)) => dst = Some(v),
            ("ro" | "readonly", None | Some("true" | "1")) => readonly = true,
            ("ro" | "readonly", Some("false" | "0")) => readonly = false,
            ("uid", Some(v)) => uid = number(text, "uid", v)?,
            ("gid", Some(v)) => gid = number(text, "gid", v)?,
            _ => return Err(format!("--mount {text}: unknown field {field:?}")),
        }
    }
    let src = src.ok_or_else(|| format!("--mount {text}: src= is missing"))?;
    let dst = dst.ok_or_else(|| format!("--mount {text}: dst= is missing"))?;
    if (uid, gid) != me() && me().0 != 0 {
        return Err(format!(
            "--mount {text}: uid=/gid= other than your own need airlock to run as root"
        ));
    }
    build(text, src, dst, readonly, uid, gid)
}

fn number(text: &str, what: &str, v: &str) -> Result<u32, String> {
    v.parse()
        .map_err(|_| format!("--mount {text}: {what}={v} is not a number"))
}

fn build(
    text: &str,
    src: &str,
    dst: &str,
    readonly: bool,
    uid: u32,
    gid: u32,
) -> Result<MountSpec, String> {
    if src.is_empty() {
        return Err(format!("{text}: the host path is empty"));
    }
    let source = std::fs::canonicalize(Path::new(src))
        .map_err(|e| format!("{text}: host path {src}: {e}"))?;
    let meta = std::fs::metadata(&source).map_err(|e| format!("{text}: host path {src}: {e}"))?;
    let file = if meta.is_dir() {
        None
    } else if meta.is_file() {
        // The guest sees it under this name in the served directory, not
        // under the host's: no host name crosses the door.
        Some(SINGLE_FILE_NAME.to_owned())
    } else {
        return Err(format!(
            "{text}: host path {src} is neither a directory nor a regular file"
        ));
    };
    let target = dst.trim_end_matches('/');
    let spec = MountSpec {
        source,
        target: target.to_owned(),
        readonly,
        file,
        uid,
        gid,
        max_write_bytes: DEFAULT_MAX_WRITE_BYTES,
        max_files: DEFAULT_MAX_FILES,
    };
    check_mount(&spec.entry()).map_err(|_| {
        format!(
            "{text}: the guest path {dst:?} must be absolute and plain (no '.', '..', \
             empty parts, ',', ':' or control characters) and not '/'"
        )
    })?;
    if RESERVED
        .iter()
        .any(|r| target == *r || target.starts_with(&format!("{r}/")))
    {
        return Err(format!(
            "{text}: {target} is the container's own (reserved: {})",
            RESERVED.join(", ")
        ));
    }
    Ok(spec)
}

/// Checks a run's mounts together: at most [`MAX_MOUNTS`], no target twice.
pub fn check_all(mounts: &[MountSpec]) -> Result<(), String> {
    if mounts.len() > MAX_MOUNTS {
        return Err(format!(
            "{} mounts: at most {MAX_MOUNTS} per sandbox",
            mounts.len()
        ));
    }
    for (i, a) in mounts.iter().enumerate() {
        if mounts[..i].iter().any(|b| b.target == a.target) {
            return Err(format!("two mounts at {}", a.target));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_forms() {
        let dir = std::env::temp_dir();
        let canon = std::fs::canonicalize(&dir).expect("test setup");
        let d = dir.display();
        let v = parse_volume(&format!("{d}:/workspace")).expect("test setup");
        assert_eq!(
            (v.source.clone(), v.target.as_str(), v.readonly),
            (canon.clone(), "/workspace", false)
        );
        assert!(
            parse_volume(&format!("{d}:/w:ro"))
                .expect("test setup")
                .readonly
        );
        assert!(
            !parse_volume(&format!("{d}:/w:rw"))
                .expect("test setup")
                .readonly
        );
        let m = parse_mount(&format!("type=bind,src={d},dst=/data/x/,ro")).expect("test setup");
        assert_eq!((m.target.as_str(), m.readonly), ("/data/x", true));
        let m = parse_mount(&format!("source={d},target=/t,readonly=false")).expect("test setup");
        assert!(!m.readonly);
        assert!(parse_volume(&format!("{d}:/w:rx")).is_err());
        assert!(parse_volume(&format!("{d}")).is_err());
        assert!(parse_mount(&format!("type=volume,src={d},dst=/w")).is_err());
        assert!(parse_mount(&format!("src={d}")).is_err());
        assert!(parse_mount(&format!("src={d},dst=/w,bogus=1")).is_err());
    }

    #[test]
    fn guest_paths_are_checked() {
        let d = std::env::temp_dir();
        let d = d.display();
        for bad in [
            "relative",
            "/",
            "/a/../etc",
            "/proc/x",
            "/run/airlock",
            "/dev",
            "/a,b",
        ] {
            assert!(parse_volume(&format!("{d}:{bad}")).is_err(), "{bad}");
        }
        assert!(parse_volume("/no/such/dir/airlock:/w").is_err());
    }

    #[test]
    fn single_files_and_duplicates() {
        let dir = std::env::temp_dir().join(format!("airlock-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test setup");
        let f = dir.join("CLAUDE.md");
        std::fs::write(&f, "x").expect("test setup");
        let m = parse_volume(&format!("{}:/workspace/agent/CLAUDE.md:ro", f.display()))
            .expect("test setup");
        assert_eq!(m.file.as_deref(), Some(SINGLE_FILE_NAME));
        let a = parse_volume(&format!("{}:/w", dir.display())).expect("test setup");
        assert!(check_all(&[a.clone(), m.clone()]).is_ok());
        assert!(check_all(&[a.clone(), a]).is_err());
        assert!(check_all(&vec![m; MAX_MOUNTS + 1]).is_err());
        std::fs::remove_dir_all(&dir).expect("test setup");
    }
}
