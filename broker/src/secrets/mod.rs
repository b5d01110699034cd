//! Credentials for any service, never in the guest: host-side injection
//! on the egress door (docs/SECRETS.md).
//!
//! `--secret NAME=SOURCE` names a value the host holds (`env:`, `file:`,
//! `cmd:`, [`source`]); the guest gets only a placeholder
//! (`AIRLOCK_SECRET_<NAME>=airlock-ph-<32 hex, random per sandbox>`).
//! `--secret-bind NAME=HOSTS` lets the broker put the value in requests to
//! those hosts: the egress door terminates TLS for a bound host with the
//! sandbox's own CA ([`ca`]), reads each HTTP/1.1 request ([`http`]),
//! replaces the placeholder in its headers (inside `Basic` credentials
//! too) or sets the header the binding names, connects onward verifying
//! the real server, and masks the value in what the server answers
//! ([`intercept`]). Everything else stays an end-to-end tunnel; a
//! placeholder seen in clear text going anywhere else is cut off before it
//! leaves (`secret.refused`).

pub mod answer;
pub mod ca;
pub mod config;
pub mod http;
pub mod intercept;
pub mod source;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

pub use config::Flags;

use crate::model::scrub::Scrubber;

/// Every placeholder starts so.
pub const PLACEHOLDER_PREFIX: &str = "airlock-ph-";
/// Where the guest finds the CA bundle (mounted read-only over the
/// distribution's bundle, so that clients that read it by default trust
/// the sandbox's CA too).
pub const GUEST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The variables that point the usual clients at [`GUEST_BUNDLE`].
pub const BUNDLE_ENV: [&str; 5] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
];

/// One secret of a sandbox.
#[derive(Debug)]
pub struct Entry {
    pub spec: config::SecretSpec,
    pub placeholder: String,
    pub value: source::Cached,
}

/// The secrets of a sandbox, its CA and the onward TLS client.
pub struct Secrets {
    pub entries: Vec<Entry>,
    pub binds: Vec<config::Bind>,
    pub ca: Option<ca::Ca>,
    pub client: Arc<rustls::ClientConfig>,
    extra_ca: Option<crate::model::config::CaFile>,
    /// The directory holding the guest's CA bundle (removed on drop).
    bundle_dir: Option<PathBuf>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field(
                "names",
                &self
                    .entries
                    .iter()
                    .map(|e| &e.spec.name)
                    .collect::<Vec<_>>(),
            )
            .field("binds", &self.binds.len())
            .finish_non_exhaustive()
    }
}

impl PartialEq for Secrets {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for Secrets {}

impl Drop for Secrets {
    fn drop(&mut self) {
        if let Some(dir) = self.bundle_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// 16 random bytes as hex.
fn random_hex() -> Result<String, String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("cannot read /dev/urandom for the placeholders: {e}"))?;
    Ok(crate::audit::record::hex(&b))
}

impl Secrets {
    /// Fetches every value (a source that fails stops the sandbox before
    /// it boots), makes the placeholders and, when a host is bound, the
    /// sandbox's CA and the guest's bundle file.
    pub fn new(flags: Flags, env: &dyn Fn(&str) -> Option<String>) -> Result<Secrets, String> {
        let mut entries = Vec::new();
        for spec in flags.secrets {
            let value = source::Cached::new(spec.source.clone(), env)
                .map_err(|e| format!("--secret {}: {e}", spec.name))?;
            entries.push(Entry {
                placeholder: format!("{PLACEHOLDER_PREFIX}{}", random_hex()?),
                spec,
                value,
            });
        }
        let extra_ca = match &flags.ca_file {
            Some(p) => Some(
                crate::model::config::CaFile::load(p)
                    .map_err(|e| e.to_string().replace("--model-ca", "--secret-ca"))?,
            ),
            None => None,
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
        if let Some(ca) = &extra_ca {
            roots.add_parsable_certificates(
                ca.certs
                    .iter()
                    .map(|d| rustls::pki_types::CertificateDer::from(d.clone())),
            );
        }
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let (ca, bundle_dir) = if flags.binds.is_empty() {
            (None, None)
        } else {
            let hosts: Vec<config::HostPattern> =
                flags.binds.iter().flat_map(|b| b.hosts.clone()).collect();
            let ca = ca::Ca::new(&hosts)?;
            let dir = write_bundle(&ca.bundle_pem())
                .map_err(|e| format!("cannot write the guest's CA bundle: {e}"))?;
            (Some(ca), Some(dir))
        };
        Ok(Secrets {
            entries,
            binds: flags.binds,
            ca,
            client: Arc::new(client),
            extra_ca,
            bundle_dir,
        })
    }

    /// The host file of the guest's CA bundle, when a host is bound.
    pub fn bundle_file(&self) -> Option<PathBuf> {
        self.bundle_dir.as_ref().map(|d| d.join(BUNDLE_NAME))
    }

    /// What the guest's environment gets: each placeholder under its
    /// variables, and (when a host is bound) the bundle's variables.
    pub fn guest_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for e in &self.entries {
            for var in &e.spec.env {
                env.push((var.clone(), e.placeholder.clone()));
            }
        }
        if self.ca.is_some() {
            for var in BUNDLE_ENV {
                env.push((var.to_owned(), GUEST_BUNDLE.to_owned()));
            }
        }
        env
    }

    /// The bindings that cover `host`.
    pub fn binds_for<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a config::Bind> + 'a {
        self.binds
            .iter()
            .filter(move |b| b.hosts.iter().any(|h| h.matches(host)))
    }

    /// Whether the broker terminates TLS for `host`.
    pub fn is_bound(&self, host: &str) -> bool {
        self.binds_for(host).next().is_some()
    }

    /// The secret named `name`.
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.spec.name == name)
    }

    /// The secret whose placeholder `data` holds, if any.
    pub fn placeholder_in(&self, data: &[u8]) -> Option<&Entry> {
        let mut from = 0;
        while let Some(i) = http::find(&data[from..], PLACEHOLDER_PREFIX.as_bytes()) {
            let at = &data[from + i..];
            if let Some(e) = self
                .entries
                .iter()
                .find(|e| at.starts_with(e.placeholder.as_bytes()))
            {
                return Some(e);
            }
            from += i + 1;
        }
        None
    }

    /// Where a placeholder may begin at the end of `data` (its prefix and
    /// part of its random part, not all of it), if one may.
    pub fn partial_at_end(&self, data: &[u8]) -> Option<usize> {
        let window = data.len().saturating_sub(self.placeholder_len());
        let prefix = PLACEHOLDER_PREFIX.as_bytes();
        let mut from = window;
        let mut found = None;
        while let Some(i) = http::find(&data[from..], prefix) {
            let at = from + i;
            let rest = &data[at..];
            if self.entries.iter().any(|e| {
                rest.len() < e.placeholder.len() && e.placeholder.as_bytes().starts_with(rest)
            }) {
                found.get_or_insert(at);
            }
            from = at + 1;
        }
        found
    }

    /// Longest placeholder (a scan keeps this much less one across reads).
    pub fn placeholder_len(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.placeholder.len())
            .max()
            .unwrap_or(0)
    }

    /// A scrubber masking every value any secret has held, as it is, as
    /// JSON holds it, and in base64 at any alignment (so `Basic`
    /// credentials with any user name are caught too).
    pub fn scrubber(&self) -> Scrubber {
        let values: Vec<source::Value> = self.entries.iter().flat_map(|e| e.value.seen()).collect();
        Scrubber::with_base64(values.iter().map(source::Value::expose))
    }

    /// What `run.start` records: names, sources, bindings, the CA's
    /// fingerprint; never a value or a placeholder.
    pub fn fields(&self) -> Value {
        json!({
            "secrets": self.entries.iter().map(|e| json!({
                "name": e.spec.name,
                "source": e.spec.source.fields(),
                "env": e.spec.env,
            })).collect::<Vec<_>>(),
            "binds": self.binds.iter().map(config::Bind::fields).collect::<Vec<_>>(),
            "ca_sha256": self.ca.as_ref().map(ca::Ca::sha256),
            "extra_ca": self.extra_ca.as_ref().map(crate::model::config::CaFile::fields),
            "guest_bundle": self.ca.as_ref().map(|_| GUEST_BUNDLE),
        })
    }
}

/// The bundle's file name on the host (not `*.pem`: live mounts hide those).
const BUNDLE_NAME: &str = "ca-bundle.crt";

/// Writes the bundle into a new private directory (mode 0755, a random
/// name, made exclusively): only certificates, nothing secret.
fn write_bundle(pem: &str) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    reap_stale(&base);
    let dir = base.join(format!(
        "airlock-ca-{}-{}",
        std::process::id(),
        random_hex().map_err(std::io::Error::other)?
    ));
    std::fs::DirBuilder::new().mode(0o755).create(&dir)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(BUNDLE_NAME))?;
    f.write_all(pem.as_bytes())?;
    Ok(dir)
}

/// Removes the bundle directories of airlock processes that are gone
/// (killed before they could remove their own): `airlock-ca-PID-RANDOM`
/// whose PID no longer runs, owned by us.
fn reap_stale(base: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("airlock-ca-")) else {
            continue;
        };
        let Some(pid) = rest
            .split_once('-')
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        let ours = std::fs::symlink_metadata(e.path()).is_ok_and(|m| m.is_dir() && m.uid() == me);
        if ours && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The mount of the guest's bundle, for `--mount`'s list.
pub fn bundle_mount(file: &Path) -> Result<crate::share::MountSpec, String> {
    crate::share::spec::parse_volume(&format!("{}:{GUEST_BUNDLE}:ro", file.display()))
}

#[cfg(test)]
mod tests;
