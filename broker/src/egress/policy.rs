//! The egress policy: rules (`--net-allow`, `--net-deny`, `--net-policy`),
//! the `--host-port` forwards, and the decision for one destination.
//!
//! Default deny; a deny rule wins over any allow rule. The broker resolves
//! names itself and checks every resolved address again: deny rules that
//! name addresses apply to it, and a loopback, private, shared (CGNAT),
//! link-local (cloud metadata), unique-local, multicast or unspecified
//! address is refused unless the rule that allowed it names that host
//! exactly or is an IP/CIDR rule holding the address: a wildcard never
//! opens them. The decision carries the addresses that passed, and the
//! tunnel connects to those (no second resolution, so no rebinding).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

/// The names that reach the `--host-port` forwards.
pub const HOST_NAMES: [&str; 2] = ["host.docker.internal", "host.airlock.internal"];

/// Most rules in all (flags and file).
pub const MAX_RULES: usize = 4096;
/// Most `--host-port` forwards.
pub const MAX_HOST_PORTS: usize = 32;

/// What a rule's host part matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// `*`: every name and address (but never a special address).
    Any,
    /// `*.DOMAIN`: names below DOMAIN (not DOMAIN itself).
    Below(String),
    /// An exact name (case-insensitive).
    Name(String),
    /// An IP address or CIDR block.
    Net { addr: IpAddr, prefix: u8 },
}

/// Which ports a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ports {
    /// No port given: 80 and 443.
    Web,
    /// `:*`.
    Any,
    One(u16),
}

impl Ports {
    fn covers(self, port: u16) -> bool {
        match self {
            Self::Web => port == 80 || port == 443,
            Self::Any => true,
            Self::One(p) => p == port,
        }
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// One rule, with where it came from (for the audit log and the messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub host: Host,
    pub ports: Ports,
    /// As the user wrote it.
    pub text: String,
    /// `--net-allow`, `--net-deny`, or `FILE:LINE`.
    pub source: String,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flag = match self.action {
            Action::Allow => "--net-allow",
            Action::Deny => "--net-deny",
        };
        if self.source.starts_with("--") {
            write!(f, "{flag} {}", self.text)
        } else {
            write!(f, "{} {} ({})", flag, self.text, self.source)
        }
    }
}

/// Parses `RULE` of `--net-allow`/`--net-deny`: `NAME`, `*.DOMAIN`, `*`,
/// `IP`, `CIDR`, each with an optional `:PORT` or `:*` (IPv6 in brackets
/// when a port follows: `[::1]:8080`).
pub fn parse_rule(text: &str, action: Action, source: &str) -> Result<Rule, String> {
    let bad = |why: &str| format!("{source} {text:?}: {why}");
    let t = text.trim();
    if t.is_empty() || t.len() > 300 {
        return Err(bad(
            "a rule is a host name, *.domain, *, an IP or a CIDR, with an optional :PORT",
        ));
    }
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("an IPv6 address in [ ] needs its ]"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| bad("only :PORT may follow [IPv6]"))?,
            ),
        };
        (inner, port)
    } else if t.matches(':').count() >= 2 {
        // A bare IPv6 address or block: no port.
        (t, None)
    } else {
        match t.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (t, None),
        }
    };
    let ports = match port {
        None => Ports::Web,
        Some("*") => Ports::Any,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(bad("the port must be 1-65535 or *")),
            Ok(p) => Ports::One(p),
        },
    };
    let host = parse_host(host).ok_or_else(|| {
        bad("a rule is a host name, *.domain, *, an IP or a CIDR, with an optional :PORT")
    })?;
    Ok(Rule {
        action,
        host,
        ports,
        text: t.to_owned(),
        source: source.to_owned(),
    })
}

fn parse_host(h: &str) -> Option<Host> {
    if h == "*" {
        return Some(Host::Any);
    }
    if let Some((addr, prefix)) = h.split_once('/') {
        let addr: IpAddr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return None;
        }
        return Some(Host::Net {
            addr: mask(addr, prefix),
            prefix,
        });
    }
    if let Ok(addr) = h.parse::<IpAddr>() {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        return Some(Host::Net { addr, prefix });
    }
    let lower = h.trim_end_matches('.').to_ascii_lowercase();
    let (below, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest.to_owned()),
        None => (false, lower),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return None;
    }
    Some(if below {
        Host::Below(name)
    } else {
        Host::Name(name)
    })
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// An IPv4-mapped IPv6 address as its IPv4 address; others as they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    let ip = canonical(ip);
    match (net, ip) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => mask(ip, prefix) == net,
        _ => false,
    }
}

/// Why an address is special (refused unless named explicitly), if it is.
pub fn special(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(a) => {
            let o = a.octets();
            if a == Ipv4Addr::new(169, 254, 169, 254) || a == Ipv4Addr::new(100, 100, 100, 200) {
                Some("a cloud metadata address")
            } else if a.is_loopback() {
                Some("a loopback address")
            } else if a.is_private() {
                Some("a private address")
            } else if a.is_link_local() {
                Some("a link-local address")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("a shared (CGNAT) address")
            } else if a.is_unspecified() || o[0] == 0 {
                Some("an unspecified address")
            } else if a.is_multicast() || a.is_broadcast() || o[0] >= 240 {
                Some("a multicast or reserved address")
            } else if (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
            {
                Some("a reserved address")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if a.is_loopback() {
                Some("a loopback address")
            } else if a.is_unspecified() {
                Some("an unspecified address")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("a unique-local (private) address")
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("a link-local address")
            } else if a.is_multicast() {
                Some("a multicast address")
            } else if s[0] == 0x64 && s[1] == 0xff9b {
                // NAT64: judge the IPv4 address inside.
                let v4 = Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    (s[6] & 0xff) as u8,
                    (s[7] >> 8) as u8,
                    (s[7] & 0xff) as u8,
                );
                special(IpAddr::V4(v4))
            } else {
                None
            }
        }
    }
}

/// The egress policy of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    pub rules: Vec<Rule>,
    /// `--host-port PORT[:HOSTPORT]`: (guest port, host port).
    pub host_ports: Vec<(u16, u16)>,
}

/// The policy's verdict on one destination, before connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Connect to these addresses, in order; `rule` is what allowed it.
    Allow {
        addrs: Vec<SocketAddr>,
        rule: String,
    },
    /// Refused by the policy: `rule` is the deny rule, or `default`;
    /// `message` tells the agent why and what would allow it.
    Deny { rule: String, message: String },
    /// The name does not resolve.
    NoSuchHost(String),
}

/// Lower case, without a final dot, IPv6 brackets removed.
fn normalize(name: &str) -> String {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    n.strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .map_or_else(|| n.clone(), str::to_owned)
}

impl Policy {
    /// Whether `rule` matches `name` (or the IP literal `ip`) by name.
    fn matches_name(rule: &Rule, name: &str, ip: Option<IpAddr>) -> bool {
        match &rule.host {
            Host::Any => true,
            Host::Below(d) => {
                ip.is_none() && name.len() > d.len() + 1 && name.ends_with(&format!(".{d}"))
            }
            Host::Name(n) => ip.is_none() && n == name,
            Host::Net { addr, prefix } => ip.is_some_and(|ip| contains(*addr, *prefix, ip)),
        }
    }

    /// The forward of guest port `port`, if any.
    pub fn forward(&self, port: u16) -> Option<u16> {
        self.host_ports
            .iter()
            .find(|(g, _)| *g == port)
            .map(|(_, h)| *h)
    }

    /// Decides on `name:port`, resolving with `resolve` (the system's
    /// resolver in production).
    pub fn decide_with(
        &self,
        name: &str,
        port: u16,
        resolve: impl Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>>,
    ) -> Decision {
        let name = normalize(name);
        let ip: Option<IpAddr> = name.parse().ok();
        let hint = |what: &str| match ip {
            Some(IpAddr::V6(_)) => format!("--net-allow [{what}]:{port}"),
            _ => format!("--net-allow {what}:{port}"),
        };
        let deny = |rule: &Rule, what: &str| Decision::Deny {
            rule: rule.to_string(),
            message: format!(
                "airlock: egress to {name}:{port} is denied by {rule}{what}. Only the user who \
                 starts the sandbox can change its network policy."
            ),
        };
        for rule in &self.rules {
            if rule.action == Action::Deny
                && rule.ports.covers(port)
                && Self::matches_name(rule, &name, ip)
            {
                return deny(rule, "");
            }
        }
        if HOST_NAMES.contains(&name.as_str()) {
            return match self.forward(port) {
                Some(host_port) => Decision::Allow {
                    addrs: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, host_port))],
                    rule: format!("--host-port {port}:{host_port}"),
                },
                None => Decision::Deny {
                    rule: "default".into(),
                    message: format!(
                        "airlock: {name}:{port} is not forwarded to the host. To reach the \
                         host's 127.0.0.1:{port}, the user can start the sandbox with \
                         --host-port {port}."
                    ),
                },
            };
        }
        let Some(allow) = self.rules.iter().find(|r| {
            r.action == Action::Allow && r.ports.covers(port) && Self::matches_name(r, &name, ip)
        }) else {
            return Decision::Deny {
                rule: "default".into(),
                message: format!(
                    "airlock: egress to {name}:{port} is denied by default (no --net-allow rule \
                     matches). To allow it, the user can start the sandbox with {}.",
                    hint(&name)
                ),
            };
        };
        let addrs = match ip {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => match resolve(&name, port) {
                Ok(a) if !a.is_empty() => a,
                Ok(_) => return Decision::NoSuchHost(format!("{name} has no address")),
                Err(e) => {
                    return Decision::NoSuchHost(format!("{name} does not resolve: {e}"));
                }
            },
        };
        let mut passed = Vec::new();
        let mut refusal = None;
        for addr in addrs {
            let a = addr.ip();
            if let Some(rule) = self.rules.iter().find(|r| {
                r.action == Action::Deny
                    && r.ports.covers(port)
                    && matches!(r.host, Host::Net { addr: n, prefix } if contains(n, prefix, a))
            }) {
                refusal.get_or_insert_with(|| deny(rule, &format!(" (it resolves to {a})")));
                continue;
            }
            if let Some(why) = special(a) {
                // Named exactly, or held by an IP/CIDR rule (a /0 block is
                // a wildcard too).
                let explicit = matches!(allow.host, Host::Name(_))
                    || self.rules.iter().any(|r| {
                        r.action == Action::Allow
                            && r.ports.covers(port)
                            && matches!(r.host, Host::Net { addr: n, prefix }
                                if prefix > 0 && contains(n, prefix, a))
                    });
                if !explicit {
                    refusal.get_or_insert_with(|| Decision::Deny {
                        rule: allow.to_string(),
                        message: format!(
                            "airlock: egress to {name}:{port} is denied: it resolves to {a}, {why}, \
                             which a wildcard rule ({allow}) never opens. To allow it, the user \
                             can name it: {} or {}.",
                            hint(&name),
                            if a.is_ipv6() {
                                format!("--net-allow [{a}]:{port}")
                            } else {
                                format!("--net-allow {a}:{port}")
                            }
                        ),
                    });
                    continue;
                }
            }
            passed.push(addr);
        }
        if passed.is_empty() {
            return refusal
                .unwrap_or_else(|| Decision::NoSuchHost(format!("{name} has no address")));
        }
        Decision::Allow {
            addrs: passed,
            rule: allow.to_string(),
        }
    }

    /// [`Self::decide_with`] the system's resolver.
    pub fn decide(&self, name: &str, port: u16) -> Decision {
        self.decide_with(name, port, |n, p| {
            (n, p).to_socket_addrs().map(Iterator::collect)
        })
    }
}

/// Parses a `--net-policy` file: one rule per line, `allow RULE` or
/// `deny RULE`; blank lines and `#` comments skipped.
pub fn parse_policy_file(text: &str, file: &str) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let source = format!("{file}:{}", n + 1);
        let (verb, rule) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("{source}: a line is `allow RULE` or `deny RULE`"))?;
        let action = match verb {
            "allow" => Action::Allow,
            "deny" => Action::Deny,
            _ => {
                return Err(format!(
                    "{source}: a line is `allow RULE` or `deny RULE`, not {verb:?}"
                ))
            }
        };
        rules.push(parse_rule(rule.trim(), action, &source)?);
        if rules.len() > MAX_RULES {
            return Err(format!("{file}: more than {MAX_RULES} rules"));
        }
    }
    Ok(rules)
}

/// Parses `--host-port PORT[:HOSTPORT]`.
pub fn parse_host_port(text: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!(
            "--host-port {text:?}: ports are 1-65535 (PORT[:HOSTPORT])"
        )),
        Ok(p) => Ok(p),
    };
    match text.split_once(':') {
        Some((g, h)) => Ok((port(g)?, port(h)?)),
        None => {
            let p = port(text)?;
            Ok((p, p))
        }
    }
}
