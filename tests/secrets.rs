//! Secrets injected on the egress door, end to end (docs/SECRETS.md): the
//! guest holds only placeholders (`--secret`); the broker terminates TLS
//! for the hosts a secret is bound to (`--secret-bind`), puts the value in
//! (the placeholder replaced in a header, inside `Basic` credentials too,
//! or a header set), verifies the real server (`--secret-ca`) and masks the
//! value in what comes back. Real clients in the guest (git clone and push,
//! curl, Python urllib, a hand-made TLS client) against a real server on
//! the host's loopback (tests/fixtures/secret_server.py), which logs every
//! request it gets and accepts only the real tokens.
//!
//! What is checked: what the guest printed, what the server received (the
//! value, only from the bound host's requests; a placeholder wherever
//! airlock must not replace it; nothing at all where airlock must refuse),
//! the audit log (`secret.used`, `secret.refused`, never a value), the
//! guest's environment and files, and its whole RAM, dumped by the engine
//! after the VM stopped: no value anywhere in the guest.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use airlock_e2e::{
    audit_records, bin, build_file, field, fields_of_kind, find_bytes, rel, root, run_env, scratch,
    secret_key, sh_in, tcg_on_image_raw, test_pki, test_pki_for, testbed, utc_now, Run,
};
use serde_json::Value;

/// The fixture server (killed on drop): its ports and request log.
struct Server {
    child: Child,
    https: u16,
    http: u16,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `secret_server.py DIR/site` with the test PKI, accepting
    /// the tokens listed in `tokens`.
    fn start(dir: &Path, cert: &Path, key: &Path, tokens: &Path) -> Server {
        let log = dir.join("server.jsonl");
        let _ = fs::remove_file(&log);
        let mut child = Command::new("python3")
            .arg(root().join("tests/fixtures/secret_server.py"))
            .arg(dir.join("site"))
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg("--tokens")
            .arg(tokens)
            .arg("--log")
            .arg(&log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                fs::File::create(dir.join("server.err")).expect("create server.err"),
            ))
            .spawn()
            .expect("start the secret server");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let (mut https, mut http) = (0, 0);
        for _ in 0..2 {
            let mut line = String::new();
            out.read_line(&mut line).expect("read a server port");
            let (name, port) = line
                .trim()
                .split_once('=')
                .unwrap_or_else(|| panic!("the server printed {line:?}"));
            let port: u16 = port.parse().expect("a port number");
            match name {
                "https" => https = port,
                "http" => http = port,
                _ => panic!("the server printed {line:?}"),
            }
        }
        assert!(https > 0 && http > 0, "the server did not name both ports");
        Server {
            child,
            https,
            http,
            log,
        }
    }

    /// The requests it logged, in order.
    fn requests(&self) -> Vec<Value> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line in the server log"))
            .collect()
    }
}

/// The value of header `name` (any case) of a logged request.
fn header<'a>(req: &'a Value, name: &str) -> Option<&'a str> {
    req["headers"].as_object().and_then(|h| {
        h.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_str())
    })
}

/// The logged requests whose path starts with `prefix`.
fn with_path<'a>(reqs: &'a [Value], prefix: &str) -> Vec<&'a Value> {
    reqs.iter()
        .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
        .collect()
}

/// `n` random bytes as lowercase hex.
fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Standard base64 with padding (what `Authorization: Basic` carries).
fn base64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(c.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(c.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(A[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The mask airlock puts over a value of `len` bytes in an answer.
fn mask(len: usize) -> String {
    "AIRLOCK-SCRUBBED-".chars().cycle().take(len).collect()
}

/// Panics if any of `values` (or, for the first, either half of it) is in
/// `hay`; `what` names the haystack.
fn assert_absent(hay: &[u8], values: &[String], what: &str) {
    for (i, v) in values.iter().enumerate() {
        assert!(
            find_bytes(hay, v.as_bytes()).is_none(),
            "a secret value (#{i}, {} bytes) is in {what}",
            v.len()
        );
    }
    if let Some(first) = values.first() {
        let half = first.len() / 2;
        for part in [&first.as_bytes()[..half], &first.as_bytes()[half..]] {
            assert!(
                find_bytes(hay, part).is_none(),
                "half of the token is in {what}"
            );
        }
    }
}

/// A bare repository with one commit (README) at `DIR/site/git/repo.git`.
fn site(dir: &Path) {
    let _ = fs::remove_dir_all(dir.join("site"));
    sh_in(
        dir,
        "set -e; rm -rf work; git init -q work; cd work; echo 'cloned-with-an-injected-token' > README; \
         git add README; git -c user.name=t -c user.email=t@e commit -q -m one; cd ..; \
         mkdir -p site/git; git clone -q --bare work site/git/repo.git",
    );
}

/// The host program behind `--secret API=cmd:...`: each run makes a new
/// token, adds it to the server's accepted tokens and to `api.tokens` (the
/// test's list), and says it expires in a second.
fn api_command(dir: &Path) -> String {
    let list = dir.join("api.tokens");
    let tokens = dir.join("tokens");
    format!(
        r#"t=api_$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n'); echo "$t" >> '{}'; echo "$t" >> '{}'; printf '{{"value": "%s", "expires_in": 1}}' "$t""#,
        list.display(),
        tokens.display()
    )
}

/// What the guest does: every client, every path, one `key=value` line
/// each; then, after `=== scan ===`, every environment it can read and a
/// tar of its writable trees, for the host to search.
const GUEST: &str = r#"
set -u
# NO_PROXY lists localhost and 127.0.0.1 (the model endpoint is there): the
# host's loopback servers are reached through the proxy, so not for these.
unset NO_PROXY no_proxy
PH=${AIRLOCK_SECRET_GH-unset}
B=https://localhost:$SP
echo "ph=$PH"
echo "ph_api=${AIRLOCK_SECRET_API-unset}"
echo "ph_other=${AIRLOCK_SECRET_OTHER-unset}"
echo "secret_env=${GITHUB_TOKEN-unset}"
echo "bundle_env=${SSL_CERT_FILE-} ${REQUESTS_CA_BUNDLE-} ${CURL_CA_BUNDLE-} ${GIT_SSL_CAINFO-} ${NODE_EXTRA_CA_CERTS-}"
echo "bundle_certs=$(grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt)"
if (echo x >> /etc/ssl/certs/ca-certificates.crt) 2>/dev/null; then echo bundle_write=written; else echo bundle_write=refused; fi
python3 -c '
import hashlib, ssl
pem = open("/etc/ssl/certs/ca-certificates.crt").read()
first = pem[pem.index("-----BEGIN CERTIFICATE-----"):pem.index("-----END CERTIFICATE-----") + 25]
print("bundle_ca_sha256=" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest())
'
echo "env_placeholders=$(env | grep -c airlock-ph-)"

# 1. git over HTTPS with the placeholder as the URL's password (git sends
# it as Basic credentials after the server's 401): clone, commit, push.
git clone -q "https://x-access-token:$PH@localhost:$SP/git/repo.git" /tmp/repo > /tmp/clone.out 2>&1
echo "git_clone_rc=$? $(tail -1 /tmp/clone.out)"
echo "git_clone=$(cat /tmp/repo/README 2>&1)"
(
    cd /tmp/repo &&
    echo pushed-from-the-guest > pushed.txt &&
    git add pushed.txt &&
    git -c user.name=agent -c user.email=agent@sandbox.invalid commit -q -m 'pushed through the airlock' &&
    git push -q origin HEAD
) > /tmp/push.out 2>&1
echo "git_push_rc=$? $(tail -1 /tmp/push.out)"

# 2. A header the binding sets (x-api-key, from a host program whose value
# expires after a second), twice; 3. the placeholder as a bearer token.
python3 - <<EOF
import time, urllib.error, urllib.request
def get(path, headers={}):
    req = urllib.request.Request("https://localhost:$SP" + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return "%d %s" % (r.status, r.read().decode().strip())
    except urllib.error.HTTPError as e:
        return "%d %s" % (e.code, e.read().decode().strip())
    except Exception as e:
        return "error %r" % e
print("api1=" + get("/api/whoami?probe=api1"), flush=True)
time.sleep(2)
print("api2=" + get("/api/whoami?probe=api2"), flush=True)
print("bearer=" + get("/api/whoami?probe=bearer", {"Authorization": "Bearer $PH"}), flush=True)
EOF

# 4. A server that reflects the request: the value comes back masked.
curl -sS -H "Authorization: Bearer $PH" "$B/echo?probe=reflect" > /tmp/echo.out 2>&1
echo "echo_auth=$(awk 'tolower($1) == "authorization:" { sub(/^[^:]*: /, ""); print }' /tmp/echo.out)"
echo "echo_key=$(awk 'tolower($1) == "x-api-key:" { sub(/^[^:]*: /, ""); print }' /tmp/echo.out)"

# 5. The placeholder in the query and the body: passed on as it is.
code=$(curl -sS -o /dev/null -w '%{http_code}' --data "tok=$PH" "$B/echo?probe=query&tok=$PH"); echo "query_code=$code"
# 6. Upper-cased, it is no placeholder: passed on as it is.
UP=$(printf %s "$PH" | tr a-z A-Z)
echo "upper=$UP"
code=$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $UP" "$B/echo?probe=upper"); echo "upper_code=$code"

# 7. Plain HTTP to an allowed, unbound host: fine without a placeholder;
# with one (in a header, in the path) cut before it is sent.
echo "plain_control=$(curl -sS http://127.0.0.1:$HP/control 2>&1)"
code=$(curl -sS -o /tmp/p1.out -w '%{http_code}' -H "Authorization: Bearer $PH" "http://127.0.0.1:$HP/leak" 2>/dev/null); echo "plain_code=$code"
echo "plain_body=$(head -1 /tmp/p1.out)"
code=$(curl -sS -o /tmp/p2.out -w '%{http_code}' "http://127.0.0.1:$HP/leak-in-path?t=$PH" 2>/dev/null); echo "plain_path_code=$code"
# TLS to an allowed, unbound name of the same server: an end-to-end tunnel
# (the server's own certificate, from the test CA), nothing replaced.
code=$(curl -sS -o /tmp/u.out -w '%{http_code}' --cacert /workspace/ca.crt -H "Authorization: Bearer $PH" "https://127.0.0.1:$SP/echo?probe=unbound"); echo "unbound_code=$code"
echo "unbound_auth=$(awk 'tolower($1) == "authorization:" { sub(/^[^:]*: /, ""); print }' /tmp/u.out)"

# 8. A Host header naming another host; another secret's placeholder.
code=$(curl -sS -o /tmp/h.out -w '%{http_code}' -H 'Host: evil.example' "$B/echo?probe=host"); echo "host_code=$code"
echo "host_body=$(head -1 /tmp/h.out)"
code=$(curl -sS -o /tmp/o.out -w '%{http_code}' -H "X-Other: ${AIRLOCK_SECRET_OTHER-}" "$B/echo?probe=other"); echo "other_code=$code"
echo "other_body=$(head -1 /tmp/o.out)"

# 9. A spoofed SNI and 10. HTTP/2, over CONNECT tunnels made by hand.
python3 - <<EOF
import socket, ssl
SP = $SP
def attempt(sni, probe, alpn=None, raw=None):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=60)
    s.sendall(b"CONNECT localhost:%d HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % (SP, SP))
    head = b""
    while b"\r\n\r\n" not in head:
        b = s.recv(1)
        if not b:
            break
        head += b
    line = head.split(b"\r\n")[0].decode(errors="replace")
    if " 200 " not in line + " ":
        return "connect_failed " + line
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    try:
        t = ctx.wrap_socket(s, server_hostname=sni)
    except (ssl.SSLError, OSError) as e:
        return "handshake_failed " + type(e).__name__
    proto = t.selected_alpn_protocol()
    data = b""
    try:
        t.sendall(raw or b"GET /api/whoami?probe=%s HTTP/1.1\r\nHost: localhost:%d\r\nConnection: close\r\n\r\n" % (probe.encode(), SP))
        while True:
            b = t.recv(4096)
            if not b:
                break
            data += b
    except (ssl.SSLError, OSError) as e:
        data += b" [" + type(e).__name__.encode() + b"]"
    status = data.splitlines()[0].decode(errors="replace") if data else ""
    return "alpn=%s answer=%s" % (proto, status or "none")
print("sni_control=" + attempt("localhost", "sni-control"), flush=True)
r = attempt("evil.example", "sni-spoof")
print("sni_spoof=" + ("answered " + r if "HTTP/" in r else "refused " + r), flush=True)
print("h2_alpn=" + attempt("localhost", "h2-alpn", alpn=["h2"]), flush=True)
print("h2_preface=" + attempt("localhost", "h2-preface", raw=b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), flush=True)
EOF
if curl -V | grep -qw HTTP2; then
    echo "curl_h2=$(curl -sS --http2 -o /dev/null -w '%{http_version} %{http_code}' "$B/echo?probe=curl-h2" 2>&1)"
else
    echo "curl_h2=unsupported"
fi

# 11. A marker for the RAM scan, made here: its whole text exists only in
# the guest.
m=airlock-ram-; m="${m}marker-$((7 * 191 * 1009))"
for i in $(seq 100); do echo "$m"; done > /tmp/marker
echo done
echo '=== scan ==='
cat /proc/[0-9]*/environ 2>/dev/null
tar -c /etc /tmp /workspace "${HOME:-/root}" 2>/dev/null
true
"#;

/// The marker [`GUEST`] writes.
fn marker() -> String {
    format!("airlock-ram-marker-{}", 7 * 191 * 1009)
}

/// One VM: git clone and push with an injected token, a header set from a
/// refreshed host program, reflection masked, placeholders passed on where
/// they must not be replaced and cut off where they must not go, a Host
/// header, SNI and HTTP/2 refused; then the server's log, the audit log,
/// the guest's files and its RAM are searched for the values.
#[test]
fn tcg_secrets_reach_only_their_bound_host() {
    let dir = scratch("secrets-tcg");
    site(&dir);
    let (ca, cert, key) = test_pki(&dir);
    fs::create_dir_all(dir.join("ws")).expect("mkdir ws");
    // Not *.pem: the workspace copy leaves those out.
    fs::copy(&ca, dir.join("ws/ca.crt")).expect("copy the CA");
    let token = format!("ghp_{}", random_hex(18));
    let other = format!("other_{}", random_hex(16));
    fs::write(dir.join("tokens"), format!("{token}\n")).expect("write the tokens");
    fs::write(dir.join("other.txt"), format!("{other}\n")).expect("write the other secret");
    let _ = fs::remove_file(dir.join("api.tokens"));
    let audit = dir.join("audit.jsonl");
    let _ = fs::remove_file(&audit);
    let dump = dir.join("guest.ram");
    let _ = fs::remove_file(&dump);
    let server = Server::start(&dir, &cert, &key, &dir.join("tokens"));
    let (sp, hp) = (server.https, server.http);

    let opts: Vec<String> = vec![
        "--workspace".into(),
        rel(&dir.join("ws")),
        "--audit".into(),
        rel(&audit),
        "--net-allow".into(),
        format!("localhost:{sp}"),
        "--net-allow".into(),
        format!("127.0.0.1:{sp}"),
        "--net-allow".into(),
        format!("127.0.0.1:{hp}"),
        "--secret".into(),
        "GH=env:E2E_GH_TOKEN".into(),
        "--secret-env".into(),
        "GH=GITHUB_TOKEN".into(),
        "--secret-bind".into(),
        "GH=localhost".into(),
        "--secret".into(),
        format!("API=cmd:{}", api_command(&dir)),
        "--secret-bind".into(),
        "API=localhost:header=x-api-key:raw".into(),
        "--secret".into(),
        format!("OTHER=file:{}", dir.join("other.txt").display()),
        "--secret-bind".into(),
        "OTHER=other.example".into(),
        "--secret-ca".into(),
        rel(&ca),
        "-e".into(),
        format!("SP={sp}"),
        "-e".into(),
        format!("HP={hp}"),
        "--debug-dump-guest-memory".into(),
        rel(&dump),
        "--timeout".into(),
        "600".into(),
    ];
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let raw = tcg_on_image_raw(
        &opts,
        &["bash", "-c", GUEST],
        &[("E2E_GH_TOKEN", &token)],
        700,
    );
    let sep = b"\n=== scan ===\n";
    let at = find_bytes(&raw.stdout, sep).unwrap_or(raw.stdout.len());
    let scan = raw
        .stdout
        .get(at + sep.len()..)
        .unwrap_or_default()
        .to_vec();
    let r = Run {
        code: raw.code,
        stdout: String::from_utf8_lossy(&raw.stdout[..at]).into_owned(),
        stderr: raw.stderr.clone(),
    };
    r.expect_code(0).expect_stdout_line("done");
    let api_tokens: Vec<String> = fs::read_to_string(dir.join("api.tokens"))
        .expect("the API program ran")
        .lines()
        .map(str::to_owned)
        .collect();
    // Every value that must stay out of the guest, the token first, and
    // the token as git's Basic credentials carry it.
    let basic = base64(format!("x-access-token:{token}").as_bytes());
    let mut values = vec![token.clone(), other.clone(), basic.clone()];
    values.extend(api_tokens.iter().cloned());

    check_guest(&r, &token, &api_tokens);
    let ph = field(&r, "ph=").to_owned();
    check_server(&server, &r, &ph, &token, &basic, &api_tokens, &other);
    check_audit(&r, &audit, &server, &token, &api_tokens, &values);

    // The push arrived.
    let git_dir = dir.join("site/git/repo.git");
    let git = |args: &str| {
        sh_in(
            &dir,
            &format!("git --git-dir '{}' {args}", git_dir.display()),
        )
    };
    assert_eq!(
        git("log -1 --format=%s").trim(),
        "pushed through the airlock"
    );
    assert_eq!(git("show HEAD:pushed.txt").trim(), "pushed-from-the-guest");

    // The guest's environments and files: the placeholders, no value.
    assert!(
        find_bytes(&scan, format!("AIRLOCK_SECRET_GH={ph}").as_bytes()).is_some(),
        "the scan missed the environment ({} bytes)",
        scan.len()
    );
    assert!(
        find_bytes(&scan, marker().as_bytes()).is_some()
            && find_bytes(&scan, b"pushed-from-the-guest").is_some(),
        "the scan missed /tmp ({} bytes)",
        scan.len()
    );
    assert_absent(&scan, &values, "the guest's environment or files");
    assert_absent(&raw.stdout, &values, "the guest's output");
    assert!(
        find_bytes(raw.stderr.as_bytes(), token.as_bytes()).is_none(),
        "the token is on airlock's stderr"
    );

    // The guest's RAM: the marker is there (the dump is its memory), no value.
    let ram = fs::read(&dump).unwrap_or_else(|e| panic!("no RAM dump at {}: {e}", dump.display()));
    assert!(ram.len() >= 200 << 20, "a dump of {} bytes", ram.len());
    assert!(
        find_bytes(&ram, marker().as_bytes()).is_some(),
        "the dump is not the guest's RAM"
    );
    assert_absent(&ram, &values, "the guest's RAM");
    drop(ram);
    let _ = fs::remove_file(&dump);
}

/// What the guest printed.
fn check_guest(r: &Run, token: &str, api_tokens: &[String]) {
    // Placeholders: the form, one per secret, random; under --secret-env too.
    let ph = field(r, "ph=");
    for p in [ph, field(r, "ph_api="), field(r, "ph_other=")] {
        let hex = p.strip_prefix("airlock-ph-").unwrap_or_default();
        assert!(
            hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "not a placeholder: {p:?}\n{r}"
        );
    }
    assert_ne!(ph, field(r, "ph_api="));
    assert_ne!(ph, field(r, "ph_other="));
    assert_eq!(field(r, "secret_env="), ph);
    let env_count: u32 = field(r, "env_placeholders=").parse().expect("a count");
    assert!(env_count >= 4, "{r}");
    // The CA bundle: every client pointed at it, Mozilla's roots and the
    // sandbox's CA in it, read-only.
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    assert_eq!(field(r, "bundle_env="), [bundle; 5].join(" "));
    let certs: u32 = field(r, "bundle_certs=").parse().expect("a count");
    assert!(certs > 100, "{certs} certificates in the bundle\n{r}");
    assert_eq!(field(r, "bundle_write="), "refused");

    // 1. git.
    assert!(field(r, "git_clone_rc=").starts_with('0'), "{r}");
    assert_eq!(field(r, "git_clone="), "cloned-with-an-injected-token");
    assert!(field(r, "git_push_rc=").starts_with('0'), "{r}");

    // 2. The set header: the program's token, a newer one after it expired.
    let api_index = |key: &str| -> usize {
        let v = field(r, key);
        v.strip_prefix("200 ok ")
            .and_then(|rest| rest.strip_suffix(" x-api-key"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{key}{v}\n{r}"))
    };
    let (i1, i2) = (api_index("api1="), api_index("api2="));
    assert!(
        i1 >= 1 && i2 > i1,
        "api1 {i1}, api2 {i2}: not refreshed\n{r}"
    );
    assert!(
        api_tokens.len() >= 3,
        "the API program ran {} times",
        api_tokens.len()
    );
    // 3. The placeholder as a bearer token: the GH token (line 0) arrived.
    assert_eq!(field(r, "bearer="), "200 ok 0 authorization");

    // 4. Reflected: masked, same length.
    assert_eq!(
        field(r, "echo_auth="),
        format!("Bearer {}", mask(token.len()))
    );
    assert_eq!(field(r, "echo_key="), mask(api_tokens[0].len()));
    assert!(r.stdout.contains("AIRLOCK-SCRUBBED-"), "{r}");

    // 5, 6. Passed on.
    assert_eq!(field(r, "query_code="), "200");
    assert_eq!(field(r, "upper="), ph.to_ascii_uppercase());
    assert_eq!(field(r, "upper_code="), "200");

    // 7. Plain HTTP: served without a placeholder, cut with one.
    assert_eq!(field(r, "plain_control="), "plain-ok");
    assert_eq!(field(r, "plain_code="), "403");
    let body = field(r, "plain_body=");
    assert!(
        body.contains("secret GH") && body.contains("clear text"),
        "{body}"
    );
    assert_eq!(field(r, "plain_path_code="), "403");
    // TLS to an unbound name: end to end, the placeholder left as it is.
    assert_eq!(field(r, "unbound_code="), "200");
    assert_eq!(field(r, "unbound_auth="), format!("Bearer {ph}"));

    // 8. Another Host; another secret's placeholder.
    assert_eq!(field(r, "host_code="), "403");
    assert!(field(r, "host_body=").contains("evil.example"), "{r}");
    assert_eq!(field(r, "other_code="), "403");
    assert!(field(r, "other_body=").contains("secret OTHER"), "{r}");

    // 9. SNI: the right name is served; another is refused.
    assert_eq!(field(r, "sni_control="), "alpn=None answer=HTTP/1.1 200 OK");
    assert!(field(r, "sni_spoof=").starts_with("refused "), "{r}");
    // 10. HTTP/2: not negotiated (the handshake fails or picks nothing);
    // its preface gets 505; a client that offers both gets HTTP/1.1.
    let h2 = field(r, "h2_alpn=");
    assert!(
        h2.starts_with("handshake_failed") || h2 == "alpn=None answer=HTTP/1.1 200 OK",
        "{h2}"
    );
    assert!(
        field(r, "h2_preface=").starts_with("alpn=None answer=HTTP/1.1 505"),
        "{r}"
    );
    let curl_h2 = field(r, "curl_h2=");
    assert!(curl_h2 == "1.1 200" || curl_h2 == "unsupported", "{r}");
}

/// What the server received: the value only in requests to the bound
/// name, where airlock put it; the placeholder where it must be left; no
/// request at all where airlock had to refuse.
fn check_server(
    s: &Server,
    r: &Run,
    ph: &str,
    token: &str,
    basic: &str,
    api_tokens: &[String],
    other: &str,
) {
    let reqs = s.requests();
    let bound_host = format!("localhost:{}", s.https);
    let intercepted: Vec<&Value> = reqs
        .iter()
        .filter(|q| header(q, "host") == Some(bound_host.as_str()))
        .collect();
    assert!(intercepted.len() >= 10, "{reqs:#?}");
    for q in &intercepted {
        // The broker connected onward naming the host, and set x-api-key
        // (the program's token) on every request.
        assert_eq!(q["kind"], "https", "{q}");
        assert_eq!(q["sni"], "localhost", "{q}");
        let k = header(q, "x-api-key").unwrap_or_else(|| panic!("no x-api-key: {q}"));
        assert!(api_tokens.iter().any(|t| t == k), "{q}");
        assert_eq!(header(q, "accept-encoding"), Some("identity"), "{q}");
    }
    // The token went only there.
    for q in &reqs {
        let text = q.to_string();
        if text.contains(token) || text.contains(basic) {
            assert_eq!(header(q, "host"), Some(bound_host.as_str()), "{q}");
        }
        assert!(!text.contains(other), "the other secret's value: {q}");
    }
    // git: every authenticated request carried the token, as git's Basic
    // credentials; the push went through.
    let git = with_path(&reqs, "/git/");
    let authed: Vec<&&Value> = git.iter().filter(|q| !q["auth"].is_null()).collect();
    assert!(authed.len() >= 4, "{git:#?}");
    for q in &authed {
        assert_eq!(
            header(q, "authorization"),
            Some(format!("Basic {basic}").as_str()),
            "{q}"
        );
    }
    assert!(
        authed.iter().any(|q| q["method"] == "POST"
            && q["path"] == "/git/repo.git/git-receive-pack"
            && q["status"] == 200),
        "no push: {git:#?}"
    );
    // The bearer and the reflected request carried the token.
    for probe in ["/api/whoami?probe=bearer", "/echo?probe=reflect"] {
        let q = with_path(&reqs, probe);
        assert_eq!(q.len(), 1, "{probe}: {reqs:#?}");
        assert_eq!(
            header(q[0], "authorization"),
            Some(format!("Bearer {token}").as_str()),
            "{probe}"
        );
    }
    // The placeholder in the query and body, and upper-cased in a header,
    // and over the unbound name: passed on as it is.
    let q = with_path(&reqs, "/echo?probe=query");
    assert_eq!(q.len(), 1, "{reqs:#?}");
    assert_eq!(q[0]["path"], format!("/echo?probe=query&tok={ph}"));
    assert_eq!(q[0]["body"], format!("tok={ph}"));
    let q = with_path(&reqs, "/echo?probe=upper");
    assert_eq!(q.len(), 1, "{reqs:#?}");
    assert_eq!(
        header(q[0], "authorization"),
        Some(format!("Bearer {}", ph.to_ascii_uppercase()).as_str())
    );
    let q = with_path(&reqs, "/echo?probe=unbound");
    assert_eq!(q.len(), 1, "{reqs:#?}");
    assert_eq!(
        header(q[0], "authorization"),
        Some(format!("Bearer {ph}").as_str())
    );
    assert_eq!(
        header(q[0], "host"),
        Some(format!("127.0.0.1:{}", s.https).as_str())
    );
    assert!(
        q[0]["sni"].is_null() && header(q[0], "x-api-key").is_none(),
        "{}",
        q[0]
    );
    // Both whoami calls arrived; the SNI control did, the spoof did not.
    for probe in ["api1", "api2", "sni-control"] {
        assert_eq!(
            with_path(&reqs, &format!("/api/whoami?probe={probe}")).len(),
            1,
            "{probe}: {reqs:#?}"
        );
    }
    // Refused: never sent. Inside TLS the broker refuses a whole head; in
    // clear text what came before the placeholder may have gone on, never
    // a whole request.
    for probe in [
        "/echo?probe=host",
        "/echo?probe=other",
        "/api/whoami?probe=sni-spoof",
    ] {
        assert!(with_path(&reqs, probe).is_empty(), "{probe} arrived\n{r}");
    }
    assert!(
        with_path(&reqs, "/leak")
            .iter()
            .all(|q| q["truncated"] == true),
        "a whole request with a placeholder arrived: {reqs:#?}"
    );
    assert!(
        intercepted.iter().all(|q| q["truncated"] == false),
        "{reqs:#?}"
    );
    // A client offering only h2 either fails the handshake or, given
    // HTTP/1.1, is served.
    let h2_served = usize::from(!field(r, "h2_alpn=").starts_with("handshake_failed"));
    assert_eq!(
        with_path(&reqs, "/api/whoami?probe=h2-alpn").len(),
        h2_served,
        "{reqs:#?}"
    );
    assert!(
        reqs.iter()
            .all(|q| header(q, "host") != Some("evil.example")),
        "{reqs:#?}"
    );
    // The plain port: the control arrived; nothing with a placeholder.
    let plain: Vec<&Value> = reqs.iter().filter(|q| q["port"] == s.http).collect();
    assert!(plain.iter().any(|q| q["path"] == "/control"), "{reqs:#?}");
    for q in &plain {
        let text = q.to_string();
        assert!(
            !text.contains("airlock-ph-") && !text.contains(token),
            "{q}"
        );
    }
}

/// The audit log: the secrets' policy, each use and each refusal, and no
/// value anywhere in it.
fn check_audit(
    r: &Run,
    audit: &Path,
    s: &Server,
    token: &str,
    api_tokens: &[String],
    values: &[String],
) {
    let bytes = fs::read(audit).expect("read the audit log");
    assert_absent(&bytes, values, "the audit log");
    let airlock = bin("airlock");
    run_env(&[airlock.as_str(), "audit", "verify", &rel(audit)], &[], 60).expect_code(0);
    let records = audit_records(audit);
    let start = &fields_of_kind(&records, "run.start")[0];
    let policy = &start["policy"]["secrets"];
    let names: Vec<&str> = policy["secrets"]
        .as_array()
        .unwrap_or_else(|| panic!("no policy.secrets: {start}"))
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["GH", "API", "OTHER"], "{policy}");
    assert_eq!(
        policy["secrets"][0]["source"],
        serde_json::json!({"kind": "env", "var": "E2E_GH_TOKEN"})
    );
    assert_eq!(policy["secrets"][1]["source"]["kind"], "cmd");
    assert!(
        policy["secrets"][0]["env"]
            .as_array()
            .is_some_and(|e| e.iter().any(|v| v == "GITHUB_TOKEN")),
        "{policy}"
    );
    assert_eq!(
        policy["binds"].as_array().map(Vec::len),
        Some(3),
        "{policy}"
    );
    // The guest's bundle starts with the sandbox's CA, the one recorded.
    assert_eq!(
        policy["ca_sha256"].as_str(),
        Some(field(r, "bundle_ca_sha256=")),
        "{policy}"
    );

    // One secret.used per request that got a value: as many as the server
    // logged with it.
    let reqs = s.requests();
    let basic = format!(
        "Basic {}",
        base64(format!("x-access-token:{token}").as_bytes())
    );
    let with_token = reqs
        .iter()
        .filter(|q| {
            header(q, "authorization").is_some_and(|a| a == basic || a == format!("Bearer {token}"))
        })
        .count();
    let with_key = reqs
        .iter()
        .filter(|q| header(q, "x-api-key").is_some_and(|k| api_tokens.iter().any(|t| t == k)))
        .count();
    let used = fields_of_kind(&records, "secret.used");
    let used_by =
        |name: &str| -> Vec<&Value> { used.iter().filter(|u| u["name"] == name).collect() };
    assert_eq!(used_by("GH").len(), with_token, "{used:#?}");
    assert_eq!(used_by("API").len(), with_key, "{used:#?}");
    assert!(used_by("OTHER").is_empty(), "{used:#?}");
    for u in &used {
        assert_eq!(u["host"], "localhost", "{u}");
        assert_eq!(u["port"], s.https, "{u}");
        assert!(
            u["request_sha256"].as_str().is_some_and(|h| h.len() == 64),
            "{u}"
        );
    }
    assert!(used_by("GH").iter().all(|u| u["header"] == "authorization"));
    assert!(used_by("API").iter().all(|u| u["header"] == "x-api-key"));

    let refused = fields_of_kind(&records, "secret.refused");
    let count = |reason: &str, name: Option<&str>, host: &str, port: u16| {
        refused
            .iter()
            .filter(|f| {
                f["reason"] == reason
                    && name.map_or_else(|| f["name"].is_null(), |n| f["name"] == n)
                    && f["host"] == host
                    && f["port"] == port
            })
            .count()
    };
    assert_eq!(
        count("placeholder_in_clear_text", Some("GH"), "127.0.0.1", s.http),
        2,
        "{refused:#?}"
    );
    assert_eq!(
        count("host_mismatch", None, "localhost", s.https),
        1,
        "{refused:#?}"
    );
    assert_eq!(
        count(
            "placeholder_for_other_host",
            Some("OTHER"),
            "localhost",
            s.https
        ),
        1,
        "{refused:#?}"
    );
    assert_eq!(
        count("sni_mismatch", None, "localhost", s.https),
        1,
        "{refused:#?}"
    );
    assert_eq!(
        count("http2", None, "localhost", s.https),
        1,
        "{refused:#?}"
    );
    assert_eq!(refused.len(), 6, "{refused:#?}");
}

/// Bad secret flags are usage errors (exit 2, one line naming the flag),
/// found before any VM starts.
#[test]
fn secret_flags_are_checked_before_any_vm() {
    let dir = scratch("secrets-flags");
    let airlock = bin("airlock");
    let missing = dir.join("no-such-file");
    let _ = fs::remove_file(&missing);
    let missing_file = format!("GH=file:{}", missing.display());
    let missing_ca = rel(&missing);
    let env = [
        ("E2E_SET", "a-value"),
        (
            "E2E_PLACEHOLDER",
            "airlock-ph-00000000000000000000000000000000",
        ),
        ("E2E_TWO_LINES", "one\ntwo"),
    ];
    let cases: &[(&[&str], &str)] = &[
        (&["--secret", "1GH=env:E2E_SET"], "--secret 1GH=env:E2E_SET"),
        (&["--secret", "G-H=env:E2E_SET"], "--secret G-H=env:E2E_SET"),
        (&["--secret", "GH"], "--secret GH"),
        (&["--secret", "GH=foo:x"], "--secret GH=foo:x"),
        (
            &["--secret", "GH=env:E2E_SET", "--secret", "GH=env:E2E_SET"],
            "given twice",
        ),
        (
            &[
                "--secret",
                "GH=env:E2E_SET",
                "--secret-bind",
                "NOPE=localhost",
            ],
            "--secret-bind NOPE=localhost",
        ),
        (
            &["--secret", "GH=env:AIRLOCK_E2E_SURELY_UNSET"],
            "AIRLOCK_E2E_SURELY_UNSET",
        ),
        (&["--secret", &missing_file], "--secret GH: file:"),
        (&["--secret", "GH=env:E2E_PLACEHOLDER"], "placeholder"),
        (&["--secret", "GH=env:E2E_TWO_LINES"], "--secret GH"),
        (&["--secret", "GH=cmd:exit 3"], "--secret GH: cmd:exit 3"),
        (
            &[
                "--secret",
                "GH=env:E2E_SET",
                "--secret-bind",
                "GH=@nosuchpreset",
            ],
            "nosuchpreset",
        ),
        (
            &[
                "--secret",
                "GH=env:E2E_SET",
                "--secret-bind",
                "GH=localhost:bogus",
            ],
            "--secret-bind GH=localhost:bogus",
        ),
        (
            &[
                "--secret",
                "GH=env:E2E_SET",
                "--secret-bind",
                "GH=localhost:header=Host",
            ],
            "--secret-bind GH=localhost:header=Host",
        ),
        (
            &[
                "--secret",
                "GH=env:E2E_SET",
                "--secret-bind",
                "GH=localhost",
                "--no-container",
            ],
            "--no-container",
        ),
        (&["--secret-env", "GH=GITHUB_TOKEN"], "--secret"),
        (
            &["--secret", "GH=env:E2E_SET", "--secret-env", "NOPE=X"],
            "--secret-env NOPE=X",
        ),
        (
            &["--secret", "GH=env:E2E_SET", "--secret-ca", &missing_ca],
            "--secret-ca",
        ),
        (
            &[
                "--secret",
                "GH=env:E2E_SET",
                "--secret-bind",
                "GH=localhost",
                "--secret-ca",
                &missing_ca,
            ],
            "--secret-ca",
        ),
    ];
    for (flags, text) in cases {
        let mut argv = vec![airlock.as_str(), "run"];
        argv.extend_from_slice(flags);
        argv.extend(["--", "true"]);
        let r = run_env(&argv, &env, 60);
        assert_eq!(r.code, Some(2), "{flags:?}: unexpected exit status\n{r}");
        r.expect_one_line_error(text);
        assert!(
            r.stderr.contains("--secret"),
            "{flags:?}: the error does not name the flag\n{r}"
        );
        assert!(!r.stderr.contains("a-value"), "a value in the error\n{r}");
    }
    // `airlock create` takes the same flags and checks them the same way.
    run_env(
        &[airlock.as_str(), "create", "--secret", "1GH=env:E2E_SET"],
        &env,
        60,
    )
    .expect_code(2)
    .expect_one_line_error("--secret 1GH=env:E2E_SET");
}

/// Our VMM in the nested test bed: a bound HTTPS host in L1, bound by its
/// address (`airlock-upstream` with a test CA's certificate for 127.0.0.1, the
/// key it demands, reflecting every header back), the agent sending only
/// the placeholder: the upstream gets the real key, the agent gets the
/// answer with the key masked; audited.
#[test]
fn kvm_secret_injected_through_our_vmm_in_the_test_bed() {
    let dir = scratch("secrets-kvm");
    let key = secret_key("secrets-kvm");
    let (ca, cert, tls_key) = test_pki_for(&dir, &["127.0.0.1"], ["ca.crt", "srv.crt", "srv.key"]);
    let log = dir.join("audit.jsonl");
    let up_log = dir.join("upstream.jsonl");
    let _ = fs::remove_file(&log);
    let _ = fs::remove_file(&up_log);
    let guest = r#"unset NO_PROXY no_proxy
python3 - <<'EOF2'
import json, os, urllib.request
port = os.environ["UP"]
ph = os.environ["AIRLOCK_SECRET_K"]
body = json.dumps({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).encode()
req = urllib.request.Request("https://127.0.0.1:%s/v1/messages" % port, data=body, method="POST",
    headers={"x-api-key": ph, "content-type": "application/json", "anthropic-version": "2023-06-01"})
print("answer=" + urllib.request.urlopen(req).read().decode().replace("\n", " "))
print("placeholder=" + ph)
EOF2
env | sed 's/^/env: /' "#;
    let script = format!(
        "set -e; ifconfig lo 127.0.0.1 up 2>/dev/null || ip link set lo up; \
         date -u -s '{now}' > /dev/null; \
         {up} --script {script} --log {up_log} --key {key} --reflect \
           --tls-cert {cert} --tls-key {tls_key} > {addr} & \
         for i in $(seq 100); do [ -s {addr} ] && break; sleep 0.1; done; \
         UP=$(head -1 {addr} | cut -d: -f2); \
         E2E_KEY={key} {airlock} run --engine kvm --mem 1024 --timeout 800 --image-root {image} \
           --audit {log} --net-allow 127.0.0.1:$UP --secret K=env:E2E_KEY --secret-bind K=127.0.0.1 \
           --secret-ca {ca} -e UP=$UP -- sh -c \"$GUEST\"",
        // L1 boots at the epoch: certificates are checked against the clock.
        now = utc_now(),
        up = bin("airlock-upstream"),
        airlock = bin("airlock"),
        script = rel(&root().join("upstream/scripts/demo.json")),
        up_log = rel(&up_log),
        cert = rel(&cert),
        tls_key = rel(&tls_key),
        ca = rel(&ca),
        addr = rel(&dir.join("addr")),
        image = build_file("rootfs.img"),
        log = rel(&log),
    );
    let r = testbed(
        &["env", &format!("GUEST={guest}"), "sh", "-c", &script],
        900,
    );
    r.expect_code(0).expect_stderr("engine: kvm");
    let answer = field(&r, "answer=");
    assert!(
        answer.contains("AIRLOCK-SCRUBBED"),
        "the reflected key is masked: {answer}"
    );
    assert!(!r.stdout.contains(&key) && !r.stderr.contains(&key), "{r}");
    assert!(
        r.stdout.contains("env: AIRLOCK_SECRET_K=airlock-ph-"),
        "{r}"
    );
    let placeholder = field(&r, "placeholder=");
    assert!(placeholder.starts_with("airlock-ph-"), "{placeholder}");
    let reqs: Vec<serde_json::Value> = fs::read_to_string(&up_log)
        .expect("upstream log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0]["key"], key.as_str(), "the bound host got the value");
    let records = audit_records(&log);
    let used = fields_of_kind(&records, "secret.used");
    assert_eq!(used.len(), 1, "{used:?}");
    assert_eq!(used[0]["name"], "K");
    assert_eq!(used[0]["header"], "x-api-key");
    let audit = fs::read_to_string(&log).expect("audit");
    assert!(!audit.contains(&key), "the value is never in the audit log");
}
