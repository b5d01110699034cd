//! What will boot, pinned and hashed: the files the engine reads
//! ([`Pins`]) and the `run.start` record.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_protocol::PROTOCOL_VERSION;
use ed25519_dalek::SigningKey;
use serde_json::Value;

use crate::audit::records::{AuditKey, Hashed, Host, Init, Policy, RunStart, Spec};
use crate::audit::{digest, keys};
use crate::engine::{self, EngineChoice};
use crate::paths::{self, ImagePaths};
use crate::pinned::Pinned;

use super::*;

/// The files a run boots, opened once: hashed for `run.start` and read by
/// the engine through the same descriptors ([`crate::pinned`]).
#[derive(Debug)]
pub(crate) struct Pins {
    pub(crate) kernel: Pinned,
    /// The initrd (initramfs mode) or the root image (image mode).
    pub(crate) root: Pinned,
    pub(crate) image_mode: bool,
    /// The container image archive (`--image`), the second disk.
    pub(crate) archive: Option<Pinned>,
}

impl Pins {
    pub(crate) fn open(image: &ImagePaths, archive: Option<&Path>) -> Result<Pins, Error> {
        let pin = |path: &Path| {
            Pinned::open(path).map_err(|source| Error::Pin {
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(Pins {
            kernel: pin(&image.kernel)?,
            root: pin(image.root.as_deref().unwrap_or(&image.initrd))?,
            image_mode: image.root.is_some(),
            archive: archive.map(pin).transpose()?,
        })
    }

    /// Every descriptor the VM process must inherit.
    pub(crate) fn fds(&self) -> Vec<std::os::fd::RawFd> {
        [Some(&self.kernel), Some(&self.root), self.archive.as_ref()]
            .into_iter()
            .flatten()
            .map(Pinned::fd)
            .collect()
    }
}

/// Where file digests are remembered: `digests/` in the Airlock cache.
pub(crate) fn digest_cache() -> Option<PathBuf> {
    paths::cache_dir(
        std::env::var_os("AIRLOCK_CACHE"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
    .map(|c| c.join("digests"))
}

/// A duration in whole milliseconds, for the audit log.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Hashes `pin` (through the digest cache) for the audit log.
pub(crate) fn hashed(pin: &Pinned) -> Result<Hashed, Error> {
    let d = digest::file_cached(&pin.fd_path(), digest_cache().as_deref()).map_err(|source| {
        Error::Digest {
            path: pin.path().to_path_buf(),
            source,
        }
    })?;
    Ok(Hashed {
        path: pin.path().display().to_string(),
        sha256: d.sha256,
        bytes: d.bytes,
    })
}

/// The `run.start` record: what will boot (with hashes), the policy in
/// force and the run spec. The container image, if any, is the caller's.
pub(crate) fn run_start(
    config: &RunConfig,
    pins: &Pins,
    selection: &engine::Selection,
    run_id: &str,
    key: Option<&SigningKey>,
) -> Result<RunStart, Error> {
    let kernel = hashed(&pins.kernel)?;
    let root = &pins.root;
    let (initrd, root_image, init) = if pins.image_mode {
        // Image mode: the init is /sbin/init inside the image, which the
        // image's hash covers (140 MB hash in about 0.3 s: simply done).
        let init = Init {
            path: Some("/sbin/init".into()),
            sha256: None,
            bytes: None,
            note: Some("inside the root image; root_image.sha256 covers it"),
        };
        (None, Some(hashed(root)?), init)
    } else {
        let initrd = digest::initrd(&root.fd_path()).map_err(|source| Error::Digest {
            path: root.path().to_path_buf(),
            source,
        })?;
        let init = match initrd.init {
            Some((name, d)) => Init {
                path: Some(name),
                sha256: Some(d.sha256),
                bytes: Some(d.bytes),
                note: None,
            },
            None => Init {
                path: None,
                sha256: None,
                bytes: None,
                note: Some(
                    "no init found in the initrd (not an uncompressed newc cpio archive); \
                     initrd.sha256 covers it",
                ),
            },
        };
        let whole = Hashed {
            path: root.path().display().to_string(),
            sha256: initrd.whole.sha256,
            bytes: initrd.whole.bytes,
        };
        (Some(whole), None, init)
    };
    let spec = &config.run_spec;
    let uid = fs::metadata("/proc/self")
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    let boot_words = boot_cmdline(config, pins.image_mode);
    Ok(RunStart {
        airlock_version: env!("CARGO_PKG_VERSION"),
        protocol_version: PROTOCOL_VERSION,
        run_id: run_id.to_owned(),
        kernel,
        initrd,
        root_image,
        init,
        policy: Policy {
            engine: selection.engine.name(),
            engine_requested: engine_name(config.engine),
            engine_reason: selection.reason.clone(),
            timeout_s: config.timeout.as_secs(),
            boot_deadline_s: config.timeout.min(BOOT_DEADLINE).as_secs(),
            max_output_bytes: config.max_output_bytes,
            mem_mib: config.mem_mib,
            cpus: config.cpus,
            network: "none",
            extra_cmdline: config.extra_cmdline.clone(),
            container: pins.image_mode && config.container,
            nested_containers: config.nested,
            command_user: match &config.user {
                Some(user) if pins.image_mode && config.container => {
                    format!("container user {user}")
                }
                _ => command_user(&boot_words, pins.image_mode).to_owned(),
            },
            boot_cmdline: boot_words,
            collect: config.files.collect.clone(),
            audit_max_guest_records: config.audit.limits.max_guest_records,
            audit_max_guest_bytes: config.audit.limits.max_guest_bytes,
            mounts: config
                .mounts
                .iter()
                .map(crate::share::MountSpec::record)
                .collect(),
            model: config.model.fields(),
            egress: config.egress.fields(),
            secrets: config.egress.secrets.as_ref().map(|s| s.fields()),
        },
        spec: Spec {
            argv: spec.argv.clone(),
            env: spec
                .env
                .iter()
                .map(|(name, value)| (name.clone(), Value::String(value.clone())))
                .collect(),
            env_note: "the --env names and values as given: user input, never a secret \
                       (airlock passes nothing else of its environment into the sandbox)",
            cwd: spec.cwd.clone(),
            stdin: spec.stdin,
            timeout_ms: spec.timeout_ms,
        },
        audit: AuditKey {
            public_key: key.map(|k| keys::public_hex(&k.verifying_key())),
        },
        host: Host {
            pid: std::process::id(),
            uid,
        },
        container_image: None,
    })
}

/// The engine choice as the user types it.
pub(crate) fn engine_name(choice: EngineChoice) -> &'static str {
    match choice {
        EngineChoice::Kvm => "kvm",
        EngineChoice::Tcg => "tcg",
        EngineChoice::Auto => "auto",
    }
}
