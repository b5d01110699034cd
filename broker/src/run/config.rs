//! What a run is to be, validated ([`RunConfig`]), and the kernel command
//! line words it boots with.

use std::path::PathBuf;
use std::time::Duration;

use airlock_protocol::RunSpec;
use serde_json::Value;

use crate::audit::Limits;
use crate::door::session::EncodedSpec;
use crate::engine::EngineChoice;
use crate::paths::ImagePaths;

/// Where the console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// The private run directory, removed at the end unless `keep`.
    Temp { keep: bool },
    /// A file the user named; kept.
    File(PathBuf),
}

/// What the audit log of a run is to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// `--audit`, made absolute; `None` for the default place.
    pub path: Option<PathBuf>,
    /// `--audit-key`.
    pub key: Option<PathBuf>,
    pub limits: Limits,
}

/// The validated `run` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    pub engine: EngineChoice,
    /// The kernel and the initrd or root image, resolved (not yet checked).
    pub image: ImagePaths,
    pub mem_mib: u32,
    pub cpus: u8,
    pub timeout: Duration,
    pub console: ConsoleTarget,
    /// The RunSpec frame, encoded (so within the protocol's limits).
    pub spec: EncodedSpec,
    /// The same RunSpec, for the audit log.
    pub run_spec: RunSpec,
    pub max_output_bytes: u64,
    pub extra_cmdline: Vec<String>,
    /// In image mode, run the command in a container (not `--no-container`).
    pub container: bool,
    /// `--image FILE`: the container's image archive, made absolute.
    pub archive: Option<PathBuf>,
    /// `--image NAME`: an image of the store, whose erofs disk the
    /// container runs on.
    pub stored_image: Option<crate::image::Resolved>,
    /// With a stored image: where the command, environment, directory and
    /// user came from (image or options), for the audit log.
    pub image_applied: Option<Value>,
    /// The container's user (`-u`, or the stored image's `User`).
    pub user: Option<String>,
    /// `--nested`: the command may run podman itself.
    pub nested: bool,
    /// `--vm-root`: without a container, the command runs as root.
    pub vm_root: bool,
    pub audit: AuditConfig,
    pub files: FilesConfig,
    /// The model proxy (`--model-*`), keys included (never logged).
    pub model: crate::model::Settings,
    /// `--report FILE`: the run's summary, written by airlock at the end.
    pub report: Option<PathBuf>,
    /// `--debug-dump-guest-memory`.
    pub dump_memory: Option<PathBuf>,
    /// Wake from the snapshot cache on the kvm engine (not
    /// `--no-snapshot`).
    pub snapshots: bool,
    /// `airlock create`: the supervisor of a live sandbox.
    pub sandbox: Option<crate::sandbox::server::Mode>,
    /// `--mount`, `-v`: live mounts of the agent's container.
    pub mounts: Vec<crate::share::MountSpec>,
    /// `--net-*`, `--host-port`: the egress door.
    pub egress: crate::egress::Settings,
}

/// `--workspace`, `--exclude`, `--out`, `--max-out-bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesConfig {
    pub workspace: Option<PathBuf>,
    pub deny: crate::door::files::Deny,
    pub out: Option<PathBuf>,
    pub max_out_bytes: u64,
    /// `--collect` patterns (empty: `/workspace/out`).
    pub collect: Vec<String>,
}

/// The kernel command line words of image mode: the root image is the
/// first disk, read-only erofs.
pub(crate) const IMAGE_CMDLINE: [&str; 3] = ["root=/dev/vda", "rootfstype=erofs", "ro"];
/// Tells the init to run the command directly in the VM (read from
/// /proc/cmdline; the protocol is unchanged).
pub(crate) const NO_CONTAINER_CMDLINE: &str = "airlock.container=0";
/// Tells the init that the second disk is an image archive to load and run
/// the container from.
pub(crate) const ARCHIVE_CMDLINE: &str = "airlock.archive=1";
/// Tells the init that the second disk is an image's root (erofs) to run
/// the container on.
pub(crate) const IMAGE_DISK_CMDLINE: &str = "airlock.imagedisk=1";
/// Tells the init to start a live sandbox's container before the snapshot
/// point, so that the snapshot holds it started: only the kvm engine's boot
/// that makes a snapshot has it (beside `airlock.snapshot=1`), and the
/// snapshot's key holds it.
pub(crate) const PREPARE_CMDLINE: &str = "airlock.prepare=1";
/// That container's working directory.
pub(crate) const PREPARE_CWD_CMDLINE: &str = "airlock.prepare_cwd";
/// That container's user (`-u` or the image's `User`; empty: the image's
/// default).
pub(crate) const PREPARE_USER_CMDLINE: &str = "airlock.prepare_user";
/// Tells the init to give the container what nested podman needs.
pub(crate) const NESTED_CMDLINE: &str = "airlock.nested=1";
/// Tells the init to run a command outside a container as root, not as
/// its unprivileged agent user (image and initramfs mode alike).
pub(crate) const VM_ROOT_CMDLINE: &str = "airlock.vmroot=1";
/// The host's wall clock at boot, in seconds since the epoch.
pub(crate) const EPOCH_CMDLINE: &str = "airlock.epoch";
/// The model request body limit (`--model-max-request-bytes`), for the
/// in-guest endpoint: one limit end to end.
pub(crate) const MODEL_MAX_BODY_CMDLINE: &str = "airlock.model_max_body";

/// The boot word that gives the in-guest model endpoint the proxy's body
/// limit.
pub(crate) fn model_max_body_word(config: &RunConfig) -> String {
    format!(
        "{MODEL_MAX_BODY_CMDLINE}={}",
        config.model.policy.max_request_bytes
    )
}

/// The words appended to the engine's base command line: in image mode
/// the root, and `airlock.container=0` for `--no-container`;
/// `airlock.vmroot=1` for `--vm-root`; then the user's `--cmdline`, which
/// comes last so that it can override.
pub fn boot_cmdline(config: &RunConfig, image_mode: bool) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    if image_mode {
        words.extend(IMAGE_CMDLINE.iter().map(|w| (*w).to_owned()));
        if !config.container {
            words.push(NO_CONTAINER_CMDLINE.to_owned());
        }
        if config.archive.is_some() {
            words.push(ARCHIVE_CMDLINE.to_owned());
        }
        if config.stored_image.is_some() {
            words.push(IMAGE_DISK_CMDLINE.to_owned());
        }
        if config.nested {
            words.push(NESTED_CMDLINE.to_owned());
        }
    }
    if config.vm_root {
        words.push(VM_ROOT_CMDLINE.to_owned());
    }
    words.extend(config.extra_cmdline.iter().cloned());
    words
}

/// The words that let a snapshot of this run's VM hold its container
/// started (none if it cannot): a live sandbox (its command the keeper's
/// pause, no stdin) in a container made from the guest image or a stored
/// image, with no live mounts; its working directory and user go along
/// (`airlock.prepare_cwd`, `airlock.prepare_user`, empty for the image's
/// default: a guest path and a name, nothing of the host's; only of
/// characters that cannot end or split a word). The init starts
/// that container before the snapshot point (guest-init `prepared`) and
/// adopts it after a wake only if the run's spec would make exactly it.
pub(crate) fn prepare_words(config: &RunConfig) -> Vec<String> {
    prepare_words_of(config, config.sandbox.is_some())
}

/// [`prepare_words`] of a run that is (`live`) or is not a live sandbox.
pub(crate) fn prepare_words_of(config: &RunConfig, live: bool) -> Vec<String> {
    let spec = &config.run_spec;
    if !(config.snapshots
        && config.container
        && live
        && config.archive.is_none()
        && config.mounts.is_empty()
        && !spec.stdin
        && spec.argv == crate::sandbox::KEEPER)
    {
        return Vec::new();
    }
    // A guest path of plain characters (nothing that could end or split a
    // boot word), short enough for the kernel's command line.
    let plain = |s: &str| {
        s.starts_with('/')
            && s.len() <= MAX_PREPARE_CWD
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
    };
    if !plain(&spec.cwd) {
        return Vec::new();
    }
    // What the guest accepts as a RunAs: a name or uid[:gid].
    let user = config.user.as_deref().unwrap_or("");
    if !user.is_empty() && airlock_protocol::check_run_as(user).is_err() {
        return Vec::new();
    }
    // Both always: a user's `--cmdline` cannot set them (these come last).
    vec![
        PREPARE_CMDLINE.to_owned(),
        format!("{PREPARE_CWD_CMDLINE}={}", spec.cwd),
        format!("{PREPARE_USER_CMDLINE}={user}"),
    ]
}

/// The longest working directory a snapshot's container is started in.
const MAX_PREPARE_CWD: usize = 256;

/// Who the command runs as in the VM, for the audit log's `run.start`, as
/// the init reads `words` (the whole `boot_cmdline`, the user's `--cmdline`
/// included: the last `airlock.container` / `airlock.vmroot` wins there).
pub(crate) fn command_user(words: &[String], image_mode: bool) -> &'static str {
    let flag = |key: &str, default: bool| {
        words
            .iter()
            .rev()
            .find_map(|w| match w.split_once('=') {
                Some((k, v)) if k == key => Some(matches!(
                    v.to_ascii_lowercase().as_str(),
                    "1" | "y" | "yes" | "on" | "true"
                )),
                None if w == key => Some(true),
                _ => None,
            })
            .unwrap_or(default)
    };
    if image_mode && flag("airlock.container", true) {
        if flag("airlock.nested", false) {
            "privileged container root"
        } else {
            "container root"
        }
    } else if flag("airlock.vmroot", false) {
        "root"
    } else {
        "uid 1000"
    }
}
