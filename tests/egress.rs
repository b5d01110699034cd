//! Egress under host policy: the in-guest proxy (HTTP_PROXY on :3128,
//! SOCKS5 on :1080) and the `--host-port` forwards, each tunnel through the
//! vsock door to the broker, which decides (default deny, deny wins, a
//! wildcard never opens loopback or metadata addresses), connects and
//! audits. Real clients in the guest: curl, Python urllib, git (smart
//! HTTP from `git http-backend`) and pip (from a local index); real
//! servers on the host's loopback (tests/fixtures/egress_server.py).

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use airlock_e2e::{
    audit_records, bin, build_file, field, fields_of_kind, rel, root, scratch, sh_in, tcg_on_image,
    test_pki, testbed, Run,
};

/// The host-side servers (killed on drop): plain and TLS ports.
struct Servers {
    child: Child,
    http: u16,
    https: u16,
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The site the servers serve: a marker page, a pip index with one wheel
/// (pure Python, made here), and a bare git repository.
fn site(dir: &Path) {
    let site = dir.join("site");
    let _ = fs::remove_dir_all(&site);
    fs::create_dir_all(site.join("simple/airlock-probe")).expect("mkdir");
    fs::write(site.join("hello.txt"), "hello-from-the-host-side\n").expect("write");
    let wheel = "airlock_probe-1.0-py3-none-any.whl";
    let py = format!(
        r#"
import base64, hashlib, zipfile
files = {{
    "airlock_probe/__init__.py": "MARK = 'pip-installed-through-the-proxy'\n",
    "airlock_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: airlock-probe\nVersion: 1.0\n",
    "airlock_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: airlock-e2e\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}}
record = []
for name, text in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
    record.append("%s,sha256=%s,%d" % (name, digest, len(text)))
record.append("airlock_probe-1.0.dist-info/RECORD,,")
files["airlock_probe-1.0.dist-info/RECORD"] = "\n".join(record) + "\n"
with zipfile.ZipFile("site/simple/airlock-probe/{wheel}", "w") as z:
    for name, text in files.items():
        z.writestr(name, text)
"#
    );
    sh_in(dir, &format!("python3 -c '{}'", py.replace('\'', "'\\''")));
    fs::write(
        site.join("simple/airlock-probe/index.html"),
        format!("<html><body><a href=\"{wheel}\">{wheel}</a></body></html>\n"),
    )
    .expect("write");
    sh_in(
        dir,
        "set -e; rm -rf work; git init -q work; cd work; echo 'cloned-over-smart-http' > README; \
         git add README; git -c user.name=t -c user.email=t@e commit -q -m one; cd ..; \
         mkdir -p site/git; git clone -q --bare work site/git/repo.git",
    );
}

fn start_servers(dir: &Path, tls: Option<(&Path, &Path)>) -> Servers {
    let mut cmd = Command::new("python3");
    cmd.arg(root().join("tests/fixtures/egress_server.py"))
        .arg(dir.join("site"));
    if let Some((cert, key)) = tls {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            fs::File::create(dir.join("server.log")).expect("log"),
        ))
        .spawn()
        .expect("start the servers");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let (mut http, mut https) = (0, 0);
    for _ in 0..(1 + usize::from(tls.is_some())) {
        let mut line = String::new();
        out.read_line(&mut line).expect("server port");
        let (name, port) = line.trim().split_once('=').expect("name=port");
        let port: u16 = port.parse().expect("port");
        match name {
            "http" => http = port,
            _ => https = port,
        }
    }
    Servers { child, http, https }
}

/// What the guest does in the main test: every client, every path.
const GUEST: &str = r#"
set -u
echo "env=$HTTP_PROXY $HTTPS_PROXY $ALL_PROXY $NO_PROXY"
# NO_PROXY lists 127.0.0.1 (the model endpoint is there): the host's
# loopback servers are reached through the proxy, so not for these.
unset NO_PROXY no_proxy
echo "plain=$(curl -sS http://127.0.0.1:$HP/hello.txt 2>&1)"
echo "tls=$(curl -sS --cacert /workspace/ca.crt https://127.0.0.1:$SP/hello.txt 2>&1)"
echo "named=$(curl -sS http://localhost:$HP/hello.txt 2>&1)"
echo "socks=$(curl -sS --proxy socks5h://127.0.0.1:1080 http://127.0.0.1:$HP/hello.txt 2>&1)"
python3 - <<EOF
import ssl, urllib.request
print("py_plain=" + urllib.request.urlopen("http://127.0.0.1:$HP/echo/x?y=1").read().decode().strip())
ctx = ssl.create_default_context(cafile="/workspace/ca.crt")
print("py_tls=" + urllib.request.urlopen("https://127.0.0.1:$SP/hello.txt", context=ctx).read().decode().strip())
print("py_post=" + urllib.request.urlopen("http://127.0.0.1:$HP/post", data=b"abc").read().decode().strip())
EOF
code=$(curl -sS -o /tmp/d1 -w '%{http_code}' http://blocked.example/x); echo "deny_code=$code"
echo "deny_body=$(cat /tmp/d1)"
code=$(curl -sS -o /tmp/d2 -w '%{http_code}' http://127.0.0.1:9/x); echo "default_code=$code"
echo "default_body=$(cat /tmp/d2)"
curl -sS https://blocked.example/ > /dev/null 2> /tmp/d3; echo "https_deny_rc=$? $(cat /tmp/d3)"
python3 -c '
import errno, socket
s = socket.socket()
try:
    s.connect(("93.184.216.34", 80)); print("direct=connected")
except OSError as e:
    print("direct=" + errno.errorcode.get(e.errno, str(e.errno)))
'
echo "fwd=$(curl -sS --noproxy '*' http://host.docker.internal:18080/hello.txt 2>&1)"
echo "fwd_proxy=$(curl -sS http://host.airlock.internal:18080/hello.txt 2>&1)"
git clone -q http://127.0.0.1:$HP/git/repo.git /tmp/repo 2>&1 | tail -3
echo "git=$(cat /tmp/repo/README 2>&1)"
pip install -q --disable-pip-version-check --no-cache-dir --index-url http://127.0.0.1:$HP/simple \
    --target /tmp/pp airlock-probe 2>&1 | tail -3
python3 -c 'import sys; sys.path.insert(0, "/tmp/pp"); import airlock_probe; print("pip=" + airlock_probe.MARK)' 2>&1
echo done
"#;

fn main_args(dir: &Path, s: &Servers) -> Vec<String> {
    vec![
        "--workspace".into(),
        rel(&dir.join("ws")),
        "--audit".into(),
        rel(&dir.join("audit.jsonl")),
        "--net-allow".into(),
        format!("127.0.0.1:{}", s.http),
        "--net-allow".into(),
        format!("127.0.0.1:{}", s.https),
        "--net-allow".into(),
        format!("localhost:{}", s.http),
        "--net-allow".into(),
        "*.example:*".into(),
        "--net-deny".into(),
        "blocked.example:*".into(),
        "--host-port".into(),
        format!("18080:{}", s.http),
        "-e".into(),
        format!("HP={}", s.http),
        "-e".into(),
        format!("SP={}", s.https),
    ]
}

fn prepare(test: &str) -> (std::path::PathBuf, Servers) {
    let dir = scratch(test);
    site(&dir);
    let (ca, cert, key) = test_pki(&dir);
    fs::create_dir_all(dir.join("ws")).expect("mkdir");
    // Not *.pem: the workspace copy leaves those out (secrets).
    fs::copy(&ca, dir.join("ws/ca.crt")).expect("copy the CA");
    let _ = fs::remove_file(dir.join("audit.jsonl"));
    let servers = start_servers(&dir, Some((&cert, &key)));
    (dir, servers)
}

/// What the main test's guest printed and the audit log holds.
fn check_main(dir: &Path, s: &Servers, r: &Run) {
    r.expect_code(0).expect_stdout_line("done");
    assert_eq!(
        field(r, "env="),
        "http://127.0.0.1:3128 http://127.0.0.1:3128 http://127.0.0.1:3128 localhost,127.0.0.1"
    );
    let hello = "hello-from-the-host-side";
    for key in [
        "plain=",
        "tls=",
        "named=",
        "socks=",
        "py_tls=",
        "fwd=",
        "fwd_proxy=",
    ] {
        assert_eq!(field(r, key), hello, "{key}\n{r}");
    }
    // Plain HTTP went on in origin form, with the client's Host header.
    assert_eq!(
        field(r, "py_plain="),
        format!(
            "method=GET path=/echo/x?y=1 host=127.0.0.1:{} via=-",
            s.http
        )
    );
    assert_eq!(field(r, "py_post="), "posted=abc");
    // A deny rule: 403 and a body that names it.
    assert_eq!(field(r, "deny_code="), "403");
    let body = field(r, "deny_body=");
    assert!(body.contains("--net-deny blocked.example:*"), "{body}");
    // The default: 403, and the flag that would allow it.
    assert_eq!(field(r, "default_code="), "403");
    let body = field(r, "default_body=");
    assert!(
        body.contains("denied by default") && body.contains("--net-allow 127.0.0.1:9"),
        "{body}"
    );
    // curl reports the refused CONNECT (exit 56).
    let https = field(r, "https_deny_rc=");
    assert!(https.starts_with("56 ") && https.contains("403"), "{https}");
    // No network device: a program that ignores the proxy has no route.
    assert_eq!(field(r, "direct="), "ENETUNREACH");
    assert_eq!(field(r, "git="), "cloned-over-smart-http");
    assert_eq!(field(r, "pip="), "pip-installed-through-the-proxy");

    let records = audit_records(&dir.join("audit.jsonl"));
    let start = &fields_of_kind(&records, "run.start")[0];
    let egress = &start["policy"]["egress"];
    assert_eq!(egress["default"], "deny", "{start}");
    assert_eq!(
        egress["rules"].as_array().map(Vec::len),
        Some(5),
        "{egress}"
    );
    assert_eq!(egress["host_ports"][0]["port"], 18080);
    let connects = fields_of_kind(&records, "net.connect");
    let closes = fields_of_kind(&records, "net.close");
    assert_eq!(connects.len(), closes.len(), "{connects:?}\n{closes:?}");
    let plain = connects
        .iter()
        .find(|c| c["kind"] == "http" && c["port"] == s.http)
        .expect("a plain HTTP tunnel");
    assert_eq!(plain["address"], format!("127.0.0.1:{}", s.http));
    assert_eq!(plain["rule"], format!("--net-allow 127.0.0.1:{}", s.http));
    for kind in ["connect", "socks", "forward"] {
        assert!(
            connects.iter().any(|c| c["kind"] == kind),
            "no {kind} tunnel: {connects:?}"
        );
    }
    let fwd = connects
        .iter()
        .find(|c| c["kind"] == "forward")
        .expect("forward");
    assert_eq!(fwd["rule"], format!("--host-port 18080:{}", s.http));
    // Every tunnel closed with its byte counts; the TLS one carried more
    // than the page.
    for c in &closes {
        assert!(c["bytes_up"].as_u64().is_some_and(|n| n > 0), "{c}");
        assert!(c["bytes_down"].as_u64().is_some_and(|n| n > 0), "{c}");
        assert!(c["end"] == "closed", "{c}");
    }
    let denied = fields_of_kind(&records, "net.denied");
    assert!(
        denied.iter().any(|d| d["name"] == "blocked.example"
            && d["reason"] == "policy"
            && d["rule"] == "--net-deny blocked.example:*"),
        "{denied:?}"
    );
    assert!(
        denied
            .iter()
            .any(|d| d["name"] == "127.0.0.1" && d["port"] == 9 && d["rule"] == "default"),
        "{denied:?}"
    );
    let summary = &fields_of_kind(&records, "net.summary")[0];
    assert_eq!(summary["tunnels"].as_u64(), Some(connects.len() as u64));
    assert!(
        summary["bytes_down"].as_u64().is_some_and(|n| n > 1000),
        "{summary}"
    );
}

#[test]
fn tcg_real_clients_reach_allowed_hosts_and_nothing_else() {
    let (dir, servers) = prepare("egress-tcg");
    let args = main_args(&dir, &servers);
    let mut opts: Vec<&str> = args.iter().map(String::as_str).collect();
    opts.extend(["--timeout", "900"]);
    let r = tcg_on_image(&opts, &["bash", "-c", GUEST], &[], 1000);
    check_main(&dir, &servers, &r);
}

/// A wildcard never opens loopback, link-local metadata or private
/// addresses, by IP or through a name that resolves there; the VM's own
/// namespace (`--no-container`) has the same proxy and host names.
#[test]
fn tcg_a_wildcard_does_not_open_loopback_or_metadata() {
    let dir = scratch("egress-wildcard");
    fs::create_dir_all(dir.join("site")).expect("mkdir");
    fs::write(dir.join("site/hello.txt"), "must-not-arrive\n").expect("write");
    let servers = start_servers(&dir, None);
    let log = dir.join("audit.jsonl");
    let _ = fs::remove_file(&log);
    let script = format!(
        "unset NO_PROXY no_proxy
         for u in http://127.0.0.1:{p}/hello.txt http://localhost:{p}/hello.txt \
                  http://169.254.169.254/latest/meta-data/ http://10.0.0.1/ http://[::1]:{p}/; do
             code=$(curl -sS -o /tmp/b -w '%{{http_code}}' \"$u\"); echo \"$u code=$code $(cat /tmp/b)\"
         done
         grep -c host.docker.internal /etc/hosts | sed 's/^/hosts=/'",
        p = servers.http
    );
    let r = tcg_on_image(
        &[
            "--no-container",
            "--audit",
            &rel(&log),
            "--net-allow",
            "*:*",
            "--net-allow",
            "0.0.0.0/0:*",
        ],
        &["sh", "-c", &script],
        &[],
        600,
    );
    r.expect_code(0);
    assert!(!r.stdout.contains("must-not-arrive"), "{r}");
    for (url, why) in [
        ("http://127.0.0.1:", "loopback"),
        ("http://localhost:", "loopback"),
        ("http://169.254.169.254/", "metadata"),
        ("http://10.0.0.1/", "private"),
        ("http://[::1]:", "loopback"),
    ] {
        let line = r
            .stdout
            .lines()
            .find(|l| l.starts_with(url))
            .unwrap_or_else(|| panic!("{url}\n{r}"));
        assert!(line.contains("code=403") && line.contains(why), "{line}");
        assert!(line.contains("never opens"), "{line}");
    }
    assert_eq!(field(&r, "hosts="), "1");
    let records = audit_records(&log);
    assert!(fields_of_kind(&records, "net.connect").is_empty());
    assert_eq!(fields_of_kind(&records, "net.denied").len(), 5);
}

/// A hostile agent: a flood of held CONNECTs, a slowloris head, an
/// oversized head, garbage SOCKS greetings and a tunnel that idles past
/// the idle timeout are bounded, refused and audited, and the proxy still
/// serves afterwards.
/// The hostile clients of the egress proxy, in the guest: a flood, an
/// oversized head, garbage SOCKS, a slowloris, a tunnel to a silent
/// server, then a request that must still be served. `http_port` serves
/// `hello.txt` = `still-serving`; `quiet_port` accepts and never speaks.
fn hostile_clients(http_port: u16, quiet_port: u16) -> String {
    format!(
        r#"
import socket, time
def conn():
    s = socket.create_connection(("127.0.0.1", 3128)); s.settimeout(60); return s
def head(s):
    data = b""
    while b"\r\n\r\n" not in data:
        b = s.recv(4096)
        if not b: break
        data += b
    return data.split(b"\r\n")[0].decode(errors="replace")
# 1. A flood: 80 clients hold CONNECTs to a denied name; the proxy
# serves 64 at once and answers the rest 503.
flood = [conn() for _ in range(80)]
for s in flood:
    s.sendall(b"CONNECT ")
codes = {{}}
for s in flood[64:]:
    line = head(s)
    codes[line] = codes.get(line, 0) + 1
print("flood=" + repr(sorted(codes.items())))
for s in flood:
    s.close()
time.sleep(1)
# 2. Oversized head: 431.
s = conn(); s.sendall(b"GET http://127.0.0.1:{hp}/ HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
print("big=" + head(s)); s.close()
# 3. Garbage SOCKS greetings: closed without a tunnel.
for g in [b"\x04\x01\x00\x50", b"\x05\x00", b"\x05\x01\x00\x05\x09\x00\x01"]:
    s = socket.create_connection(("127.0.0.1", 1080)); s.settimeout(30); s.sendall(g)
    got = b""
    try:
        while True:
            b = s.recv(100)
            if not b: break
            got += b
    except OSError:
        pass  # a reset after a refusal: what arrived before it counts
    print("socks=" + got.hex()); s.close()
# 4. Slowloris: a head that never ends gets 408 within the deadline.
t = time.time(); s = conn(); s.sendall(b"GET http://127.0.0.1:{hp}/ HTTP/1.1\r\n")
line = head(s); print("slow=%s after=%d" % (line, time.time() - t)); s.close()
# 5. A tunnel to a silent server: closed by the host's idle timeout.
t = time.time(); s = conn(); s.sendall(b"CONNECT 127.0.0.1:{qp} HTTP/1.1\r\n\r\n")
print("idle_open=" + head(s))
print("idle_end=%r after=%d" % (s.recv(10), time.time() - t)); s.close()
# 6. Still serving.
s = conn(); s.sendall(b"GET http://127.0.0.1:{hp}/hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
data = b""
while True:
    b = s.recv(4096)
    if not b: break
    data += b
print("after=" + data.decode().split("\r\n\r\n", 1)[1].strip())
"#,
        hp = http_port,
        qp = quiet_port
    )
}

/// What [`hostile_clients`] must have met: each bounded with its status,
/// the idle tunnel closed and audited, the guest's refusals as its claims,
/// the proxy still serving.
fn check_hostile(r: &Run, log: &Path, quiet_port: u16) {
    r.expect_code(0);
    assert_eq!(
        field(r, "flood="),
        "[('HTTP/1.1 503 Service Unavailable', 16)]"
    );
    assert_eq!(
        field(r, "big="),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    let socks: Vec<&str> = r
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("socks="))
        .collect();
    // Not SOCKS5: closed; no method offered: refused (ff); a bad command
    // after the method choice: "command not supported" (7).
    assert_eq!(socks.len(), 3, "{r}");
    assert_eq!(socks[0], "");
    assert_eq!(socks[1], "05ff");
    assert!(socks[2].starts_with("05000507"), "{r}");
    let slow = field(r, "slow=");
    assert!(slow.starts_with("HTTP/1.1 408"), "{slow}");
    assert_eq!(
        field(r, "idle_open="),
        "HTTP/1.1 200 Connection established"
    );
    let idle = field(r, "idle_end=");
    assert!(idle.starts_with("b''"), "{idle}");
    assert_eq!(field(r, "after="), "still-serving");
    let records = audit_records(log);
    let closes = fields_of_kind(&records, "net.close");
    assert!(
        closes
            .iter()
            .any(|c| c["port"] == quiet_port && c["end"] == "idle_timeout"),
        "{closes:?}"
    );
    // What the guest refused itself is in the log too, as its claims.
    let claims = fields_of_kind(&records, "egress.refused");
    for (service, status) in [
        ("http", "503"),
        ("http", "431"),
        ("http", "408"),
        ("socks", "7"),
    ] {
        assert!(
            claims
                .iter()
                .any(|c| c["service"] == service && c["status"] == status),
            "no {service} {status}: {claims:?}"
        );
    }
    assert!(
        records
            .iter()
            .filter(|r| r["kind"] == "egress.refused")
            .all(|r| r["source"] == "guest"),
        "egress.refused is the guest's claim"
    );
}

#[test]
fn tcg_hostile_proxy_clients_are_bounded() {
    let dir = scratch("egress-hostile");
    fs::create_dir_all(dir.join("site")).expect("mkdir");
    fs::write(dir.join("site/hello.txt"), "still-serving\n").expect("write");
    let servers = start_servers(&dir, None);
    // A server that accepts and never speaks: for the idle tunnel.
    let quiet = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let quiet_port = quiet.local_addr().expect("addr").port();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in quiet.incoming().take(1).flatten() {
            conns.push(c);
        }
        std::thread::sleep(std::time::Duration::from_secs(60));
    });
    let log = dir.join("audit.jsonl");
    let _ = fs::remove_file(&log);
    let py = hostile_clients(servers.http, quiet_port);
    let r = tcg_on_image(
        &[
            "--audit",
            &rel(&log),
            "--net-allow",
            &format!("127.0.0.1:{}", servers.http),
            "--net-allow",
            &format!("127.0.0.1:{quiet_port}"),
            "--net-idle-timeout",
            "3",
            "--timeout",
            "600",
        ],
        &["python3", "-c", &py],
        &[],
        700,
    );
    check_hostile(&r, &log, quiet_port);
    drop(held);
}

/// Our VMM in the test bed: curl through the proxy to busybox httpd in L1,
/// a denial, the audit records.
#[test]
fn kvm_egress_through_our_vmm() {
    let dir = scratch("egress-kvm");
    fs::create_dir_all(dir.join("www")).expect("mkdir");
    fs::write(dir.join("www/hello.txt"), "hello-from-l1\n").expect("write");
    let log = dir.join("audit.jsonl");
    let _ = fs::remove_file(&log);
    let guest = "unset NO_PROXY no_proxy; \
                 echo \"got=$(curl -sS http://127.0.0.1:18000/hello.txt)\"; \
                 echo \"fwd=$(curl -sS --noproxy '*' http://host.docker.internal:18001/hello.txt)\"; \
                 code=$(curl -sS -o /tmp/d -w '%{http_code}' http://127.0.0.1:18002/); \
                 echo \"denied=$code $(cat /tmp/d)\"";
    let script = format!(
        "set -e; ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up; \
         busybox httpd -p 127.0.0.1:18000 -h {www}; \
         {airlock} run --engine kvm --mem 1024 --timeout 800 --image-root {image} --audit {log} \
           --net-allow 127.0.0.1:18000 --host-port 18001:18000 -- sh -c \"$GUEST\"",
        www = rel(&dir.join("www")),
        airlock = bin("airlock"),
        image = build_file("rootfs.img"),
        log = rel(&log),
    );
    let r = testbed(
        &["env", &format!("GUEST={guest}"), "sh", "-c", &script],
        900,
    );
    r.expect_code(0).expect_stderr("engine: kvm");
    assert_eq!(field(&r, "got="), "hello-from-l1", "{r}");
    assert_eq!(field(&r, "fwd="), "hello-from-l1", "{r}");
    let denied = field(&r, "denied=");
    assert!(
        denied.starts_with("403 ") && denied.contains("denied by default"),
        "{denied}"
    );
    let records = audit_records(&log);
    let closes = fields_of_kind(&records, "net.close");
    assert_eq!(closes.len(), 2, "{closes:?}");
    assert!(closes
        .iter()
        .all(|c| c["bytes_down"].as_u64().is_some_and(|n| n > 14)));
    assert_eq!(fields_of_kind(&records, "net.denied").len(), 1);
}

/// The same hostile clients against our VMM in the test bed: busybox httpd
/// and a silent listener in L1, airlock's kvm engine.
#[test]
fn kvm_hostile_proxy_clients_are_bounded_in_the_test_bed() {
    let dir = scratch("egress-kvm-hostile");
    fs::create_dir_all(dir.join("www")).expect("mkdir");
    fs::write(dir.join("www/hello.txt"), "still-serving\n").expect("write");
    let log = dir.join("audit.jsonl");
    let _ = fs::remove_file(&log);
    let (http_port, quiet_port) = (18010, 18011);
    let script = format!(
        "set -e; ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up; \
         busybox httpd -p 127.0.0.1:{http_port} -h {www}; \
         (sleep 120 | busybox nc -l -p {quiet_port} >/dev/null 2>&1 &); \
         {airlock} run --engine kvm --mem 1024 --timeout 800 --image-root {image} --audit {log} \
           --net-allow 127.0.0.1:{http_port} --net-allow 127.0.0.1:{quiet_port} \
           --net-idle-timeout 3 -- python3 -c \"$GUEST\"",
        www = rel(&dir.join("www")),
        airlock = bin("airlock"),
        image = build_file("rootfs.img"),
        log = rel(&log),
    );
    let guest = hostile_clients(http_port, quiet_port);
    let r = testbed(
        &["env", &format!("GUEST={guest}"), "sh", "-c", &script],
        900,
    );
    r.expect_code(0).expect_stderr("engine: kvm");
    check_hostile(&r, &log, quiet_port);
}
