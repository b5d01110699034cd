//! The sandbox's own certificate authority, made when the sandbox is
//! created: its private key lives in the broker's memory only (never on
//! disk, never in the guest) and dies with it. It signs, on demand, a
//! certificate for each bound host the agent connects to; its name
//! constraints permit only the bound hosts, so even a leaked CA could not
//! vouch for any other name. The guest trusts it through the bundle
//! [`Ca::bundle_pem`] (Mozilla's roots and this CA).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use super::config::HostPattern;

/// Most host certificates kept (more are made again when needed).
const MAX_LEAVES: usize = 256;
/// A host certificate is valid this many days (from yesterday).
const LEAF_DAYS: i64 = 30;
/// The CA is valid this many days (from yesterday).
const CA_DAYS: i64 = 365;

/// The sandbox's CA.
pub struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
    leaves: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ca(sha256 {})", self.sha256())
    }
}

/// Sets `params`' validity: from yesterday for `days`.
fn validity(params: &mut rcgen::CertificateParams, days: i64) {
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs() / 86_400).unwrap_or(0));
    let at = |offset: i64| {
        let (y, m, d) = crate::audit::time::civil_from_days(today + offset);
        rcgen::date_time_ymd(
            i32::try_from(y).unwrap_or(2026),
            u8::try_from(m).unwrap_or(1),
            u8::try_from(d).unwrap_or(1),
        )
    };
    params.not_before = at(-1);
    params.not_after = at(days);
}

/// A name constraint subtree for a bound host.
fn subtree(host: &HostPattern) -> rcgen::GeneralSubtree {
    let name = match host {
        HostPattern::Name(n) | HostPattern::Below(n) => n,
    };
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::from_addr_prefix(
            ip,
            if ip.is_ipv4() { 32 } else { 128 },
        )),
        Err(_) => rcgen::GeneralSubtree::DnsName(name.clone()),
    }
}

/// PEM of one DER certificate.
fn pem(der: &[u8]) -> String {
    let b64 = super::http::base64_encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

impl Ca {
    /// A new CA whose certificates may name only `hosts`.
    pub fn new(hosts: &[HostPattern]) -> Result<Ca, String> {
        let bad = |e: rcgen::Error| format!("cannot make the sandbox's CA: {e}");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(bad)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let mut seen = Vec::new();
        let mut permitted = Vec::new();
        for h in hosts {
            let s = subtree(h);
            let key = format!("{s:?}");
            if !seen.contains(&key) {
                seen.push(key);
                permitted.push(s);
            }
        }
        params.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: permitted,
            excluded_subtrees: Vec::new(),
        });
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            "Airlock sandbox CA (this sandbox only)",
        );
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Airlock");
        validity(&mut params, CA_DAYS);
        let key = rcgen::KeyPair::generate().map_err(bad)?;
        let cert = params.self_signed(&key).map_err(bad)?;
        let der = cert.der().clone();
        Ok(Ca {
            pem: pem(&der),
            der,
            issuer: rcgen::Issuer::new(params, key),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate (PEM).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The SHA-256 of the CA certificate (DER), hex.
    pub fn sha256(&self) -> String {
        crate::audit::record::hex(&Sha256::digest(self.der.as_ref()))
    }

    /// What the guest trusts: Mozilla's roots (as airlock's own client
    /// does) and this CA.
    pub fn bundle_pem(&self) -> String {
        let mut out = String::with_capacity(256 * 1024);
        out.push_str("# Airlock: this sandbox's CA, for the hosts of --secret-bind\n");
        out.push_str(self.pem());
        out.push_str("# Mozilla's root CAs (webpki-root-certs)\n");
        for c in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
            out.push_str(&pem(c.as_ref()));
        }
        out
    }

    /// The TLS server configuration for `host` (a bound host the agent
    /// connected to): a certificate for it, signed by this CA, made once.
    pub fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let host = host.to_ascii_lowercase();
        let mut leaves = self.leaves.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = leaves.get(&host) {
            return Ok(Arc::clone(c));
        }
        let bad = |e: rcgen::Error| format!("cannot make a certificate for {host}: {e}");
        let mut params = rcgen::CertificateParams::new(vec![host.clone()]).map_err(bad)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, host.clone());
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params, LEAF_DAYS);
        let key = rcgen::KeyPair::generate().map_err(bad)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(bad)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone(), self.der.clone()], key_der)
        .map_err(|e| format!("TLS: {e}"))?;
        // HTTP/1.1 only: requests are read and rewritten as HTTP/1.1.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(host, Arc::clone(&config));
        Ok(config)
    }
}
