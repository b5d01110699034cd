//! `airlock run` in image mode: the guest boots from the read-only erofs
//! root image (`build/rootfs.img`, built by `AIRLOCK_IMAGE=1
//! scripts/build.sh`) and, by default, runs the command in a podman
//! container on it. Checked on the tcg engine on this host and through our
//! VMM (the kvm engine) inside the nested test bed.

use airlock_e2e::{audit_records, bin, build_file, field, root, run_env, sha256_hex, testbed, Run};

/// Prints the distribution, the shell's PID and the PID 1's command line.
const WHERE_AM_I: &str =
    "grep PRETTY_NAME /etc/os-release; echo pid=$$; printf 'init='; tr '\\0' ' ' < /proc/1/cmdline; echo; hostname";

/// `airlock run --engine tcg --image-root build/rootfs.img [OPTS] -- CMD...`.
fn tcg(opts: &[&str], cmd: &[&str], timeout_s: u32) -> Run {
    airlock_e2e::tcg_on_image(opts, cmd, &[], timeout_s)
}

fn image_sha() -> String {
    let bytes = std::fs::read(root().join(build_file("rootfs.img"))).expect("read the image");
    sha256_hex(&bytes)
}

#[test]
fn tcg_runs_in_a_debian_container_of_its_own() {
    let r = tcg(&[], &["sh", "-c", WHERE_AM_I], 300);
    r.expect_code(0)
        .expect_stdout_line("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"")
        .expect_stdout_line("airlock");
    // Its own PID namespace: PID 1 is the container's init (catatonit, as
    // /run/podman-init) running the command, not airlock-init.
    let init = field(&r, "init=");
    assert!(init.contains("podman-init"), "PID 1 is {init:?}\n{r}");
    assert!(init.contains("grep PRETTY_NAME"), "PID 1 is {init:?}\n{r}");
    assert_ne!(field(&r, "pid="), "1", "the shell is PID 1\n{r}");
}

#[test]
fn tcg_the_container_has_memory_and_pids_limits() {
    // 512 MiB VM: the agent gets what the kernel reports as MemTotal (a
    // little under 512 MiB) less the VM's reserve (a quarter of it).
    let script =
        "echo mem=$(cat /sys/fs/cgroup/memory.max); echo pids=$(cat /sys/fs/cgroup/pids.max)";
    let r = tcg(&["--mem", "512"], &["sh", "-c", script], 300);
    r.expect_code(0).expect_stdout_line("pids=4096");
    let mem: u64 = field(&r, "mem=")
        .parse()
        .unwrap_or_else(|_| panic!("memory.max is not a limit\n{r}"));
    assert!(
        (256 << 20..=384 << 20).contains(&mem),
        "memory.max {mem}\n{r}"
    );
}

#[test]
fn tcg_the_built_image_is_the_default() {
    // No --image-root, no initrd asked for: build/rootfs.img boots.
    let airlock = bin("airlock");
    let r = run_env(
        &[
            &airlock, "run", "--engine", "tcg", "--", "sh", "-c", WHERE_AM_I,
        ],
        &[("AIRLOCK_INITRD", "")],
        300,
    );
    r.expect_code(0)
        .expect_stdout_line("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"");
    assert!(field(&r, "init=").contains("podman-init"), "{r}");
}

#[test]
fn tcg_exit_codes_and_signals_come_through_the_container() {
    tcg(&[], &["sh", "-c", "echo out; echo err >&2; exit 7"], 300)
        .expect_code(7)
        .expect_stdout_line("out")
        .expect_stderr("err\n");
    // As without a container: 128 + the signal.
    tcg(&[], &["sh", "-c", "kill -9 $$"], 300).expect_code(137);
    tcg(&["--no-container"], &["sh", "-c", "kill -9 $$"], 300).expect_code(137);
}

#[test]
fn tcg_env_and_cwd_reach_the_container() {
    let r = tcg(
        &["-e", "GREETING=a b", "-e", "EMPTY="],
        &["sh", "-c", "echo \"g=$GREETING\"; echo \"e=[$EMPTY]\"; pwd"],
        300,
    );
    r.expect_code(0)
        .expect_stdout_line("g=a b")
        .expect_stdout_line("e=[]")
        .expect_stdout_line("/");
}

#[test]
fn tcg_no_container_runs_directly_in_the_vm() {
    let r = tcg(&["--no-container"], &["sh", "-c", WHERE_AM_I], 300);
    r.expect_code(0)
        .expect_stdout_line("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"")
        .expect_stdout_line("init=/sbin/init")
        .expect_stdout_line("airlock");
}

#[test]
fn tcg_writes_never_reach_the_image() {
    let before = image_sha();
    // Inside the container (overlay on the image) and directly in the VM
    // (the root is read-only; /tmp and /workspace are tmpfs).
    tcg(
        &[],
        &["sh", "-c", "echo x > /etc/airlock-test && cat /etc/airlock-test; rm -rf /usr/bin/git; echo y > /workspace/f"],
        300,
    )
    .expect_code(0)
    .expect_stdout_line("x");
    let r = tcg(
        &["--no-container"],
        &[
            "sh",
            "-c",
            "echo x > /etc/airlock-test; echo y > /workspace/f && echo ok",
        ],
        300,
    );
    r.expect_code(0)
        .expect_stdout_line("ok")
        .expect_stderr("Read-only file system");
    assert_eq!(image_sha(), before, "the image changed");
}

#[test]
fn tcg_audit_names_the_image() {
    let dir = airlock_e2e::TempDir::new("image-audit");
    let log = dir.path().join("a.jsonl");
    let log_str = log.to_str().expect("utf-8");
    tcg(&["--audit", log_str], &["true"], 300).expect_code(0);
    let records = audit_records(&log);
    let fields = &records.first().expect("a record")["fields"];
    assert_eq!(records[0]["kind"], "run.start");
    assert_eq!(
        fields["root_image"]["sha256"].as_str(),
        Some(image_sha().as_str()),
        "{fields}"
    );
    assert!(fields["initrd"].is_null(), "{fields}");
    assert_eq!(fields["policy"]["container"], true, "{fields}");
}

#[test]
fn tcg_podman_inside_the_container_is_optional() {
    // Nested podman is not promised; this only shows it does not hang or
    // break the run: whatever it does, the outer run ends with its code.
    let r = tcg(
        &["--mem", "1024"],
        &[
            "sh",
            "-c",
            "podman run --rm --network none --rootfs /:O true; echo nested=$?",
        ],
        300,
    );
    r.expect_code(0);
    eprintln!("nested podman: {}", field(&r, "nested="));
}

// ---- kvm engine (our VMM), in the test bed ----

#[test]
fn kvm_runs_in_a_debian_container_and_exits_with_the_code() {
    let script = format!(
        "{} run --engine kvm --mem 1024 --image-root {} -- sh -c '{}; exit 7'",
        bin("airlock"),
        build_file("rootfs.img"),
        WHERE_AM_I.replace('\'', "'\\''")
    );
    let r = testbed(&["sh", "-c", &script], 600);
    r.expect_code(7)
        .expect_stdout_line("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"")
        .expect_stderr("engine: kvm");
    assert!(field(&r, "init=").contains("podman-init"), "{r}");
}

#[test]
fn tcg_the_workspace_reaches_the_container_and_results_come_back() {
    let dir = airlock_e2e::scratch("image-files");
    let ws = dir.join("ws");
    let out = dir.join("out");
    std::fs::create_dir_all(ws.join("sub")).expect("mkdir");
    std::fs::write(ws.join("sub/a.txt"), b"in the container\n").expect("write");
    std::fs::write(ws.join("id_rsa"), b"KEY\n").expect("write");
    let (ws_s, out_s) = (ws.display().to_string(), out.display().to_string());
    let r = tcg(
        &["--workspace", &ws_s, "--out", &out_s],
        &[
            "sh",
            "-c",
            "cat /workspace/sub/a.txt; test -e /workspace/id_rsa || echo no-key; \
             cp /workspace/sub/a.txt /workspace/out/b.txt",
        ],
        300,
    );
    r.expect_code(0)
        .expect_stdout_line("in the container")
        .expect_stdout_line("no-key");
    assert_eq!(
        std::fs::read(out.join("b.txt")).expect("read"),
        b"in the container\n",
        "{r}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- the in-guest model endpoint (guest side; the proxy is tests/model.rs) ----

/// Run in the agent's view: what the model endpoint looks like from there.
/// Prints the variables the init set, the network interfaces, whether a
/// connection out of the VM gets anywhere, and the status and shape of an
/// answer from the endpoint (with no upstream configured it is an
/// API-shaped refusal: the host's 403, or the init's own 502 when the host
/// does not relay).
const MODEL_PROBE: &str = r#"
import errno, json, os, socket, urllib.error, urllib.request
for name in ("ANTHROPIC_BASE_URL", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "OPENAI_API_KEY"):
    print(name + "=" + os.environ.get(name, "<unset>"))
import fcntl, struct
lines = open("/proc/net/dev").read().splitlines()[2:]
names = sorted(l.split(":")[0].strip() for l in lines)
q = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
def up(name):  # SIOCGIFFLAGS & IFF_UP
    req = struct.pack("16sH", name.encode(), 0).ljust(40, b"\0")
    return struct.unpack("16sH", fcntl.ioctl(q.fileno(), 0x8913, req)[:18])[1] & 1
print("ifaces=" + ",".join("%s:%s" % (n, "up" if up(n) else "down") for n in names))
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("10.0.2.2", 80))
    print("egress=open")
except OSError as e:
    print("egress=" + (errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__))
base = os.environ.get("AIRLOCK_PROBE_URL", "http://127.0.0.1:8088")
req = urllib.request.Request(base + "/v1/messages", data=b'{"model":"m","max_tokens":1,"messages":[]}',
                             headers={"content-type": "application/json"})
try:
    r = urllib.request.urlopen(req, timeout=120)
    status, body = r.status, r.read()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read()
print("status=%d" % status)
err = json.loads(body)
print("shape=%s/%s" % (err.get("type"), bool(err.get("error", {}).get("message"))))
raw = socket.create_connection(("127.0.0.1", 8088), timeout=60)
raw.sendall(b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\n\r\n")
print("absolute=" + raw.recv(4096).split(b"\r\n")[0].decode())
"#;

/// Keys set in the environment of `airlock` itself: they must never reach
/// the guest.
const HOST_KEYS: [(&str, &str); 2] = [
    ("ANTHROPIC_API_KEY", "sk-ant-host-secret-e2e-0123456789"),
    ("OPENAI_API_KEY", "sk-openai-host-secret-e2e-0123456789"),
];

fn tcg_model_probe(opts: &[&str]) -> Run {
    let r = airlock_e2e::tcg_on_image(opts, &["python3", "-c", MODEL_PROBE], &HOST_KEYS, 300);
    for (_, secret) in HOST_KEYS {
        assert!(
            !r.stdout.contains(secret) && !r.stderr.contains(secret),
            "a host key reached the guest\n{r}"
        );
    }
    r
}

/// The shared facts of [`MODEL_PROBE`]'s output: the endpoint's variables
/// and placeholder keys, loopback only, no way out, an API-shaped answer.
fn expect_model_endpoint(r: &Run) {
    r.expect_code(0)
        .expect_stdout_line("ANTHROPIC_API_KEY=airlock-placeholder")
        .expect_stdout_line("OPENAI_API_KEY=airlock-placeholder")
        .expect_stdout_line("egress=ENETUNREACH")
        .expect_stdout_line("shape=error/True")
        .expect_stdout_line("absolute=HTTP/1.1 400 Bad Request");
    // Loopback, up, and nothing else: no network device (and no IPv6, so
    // no `sit0` tunnel device either).
    let ifaces: Vec<&str> = field(r, "ifaces=").split(',').collect();
    assert_eq!(ifaces, ["lo:up"], "an interface besides lo\n{r}");
    let status: u16 = field(r, "status=").parse().expect("a status");
    assert!((400..600).contains(&status), "status {status}\n{r}");
}

#[test]
fn tcg_the_container_reaches_the_model_endpoint_and_has_no_other_interface() {
    let dir = airlock_e2e::TempDir::new("model-endpoint");
    let log = dir.path().join("a.jsonl");
    let log_str = log.to_str().expect("utf-8");
    // The user's own base URL wins over the init's.
    let r = tcg_model_probe(&[
        "--audit",
        log_str,
        "-e",
        "OPENAI_BASE_URL=http://elsewhere.invalid/v1",
    ]);
    expect_model_endpoint(&r);
    // The absolute URL never left the VM; the init says so in the audit
    // log (a guest claim).
    let records = audit_records(&log);
    let refused: Vec<&serde_json::Value> = records
        .iter()
        .filter(|v| v["kind"] == "model.refused")
        .collect();
    assert_eq!(refused.len(), 1, "{records:#?}");
    assert_eq!(refused[0]["source"], "guest", "{records:#?}");
    assert_eq!(refused[0]["fields"]["status"], "400", "{records:#?}");
    assert_eq!(
        refused[0]["fields"]["request"], "GET http://evil.example/v1/models",
        "{records:#?}"
    );
    r.expect_stdout_line("ANTHROPIC_BASE_URL=http://127.0.0.1:8088")
        .expect_stdout_line("OPENAI_BASE_URL=http://elsewhere.invalid/v1");
}

#[test]
fn tcg_without_a_container_the_endpoint_is_in_the_vm() {
    let r = tcg_model_probe(&["--no-container"]);
    expect_model_endpoint(&r);
    r.expect_stdout_line("ANTHROPIC_BASE_URL=http://127.0.0.1:8088")
        .expect_stdout_line("OPENAI_BASE_URL=http://127.0.0.1:8088/v1");
}

#[test]
fn tcg_initramfs_mode_serves_the_endpoint_too() {
    // The initramfs has busybox, not python: wget prints the status line of
    // the endpoint's (refusing) answer, which proves an HTTP server is there.
    let airlock = bin("airlock");
    let r = run_env(
        &[
            &airlock,
            "run",
            "--engine",
            "tcg",
            "--",
            "sh",
            "-c",
            "echo \"base=$ANTHROPIC_BASE_URL\"; wget -q -O - http://127.0.0.1:8088/v1/models; echo wget=$?",
        ],
        &HOST_KEYS,
        300,
    );
    r.expect_code(0)
        .expect_stdout_line("base=http://127.0.0.1:8088")
        .expect_stdout_line("wget=1");
    assert!(
        r.stderr.contains("server returned error: HTTP/1.1 4")
            || r.stderr.contains("server returned error: HTTP/1.1 5"),
        "no HTTP answer from the endpoint\n{r}"
    );
    for (_, secret) in HOST_KEYS {
        assert!(
            !r.stdout.contains(secret) && !r.stderr.contains(secret),
            "{r}"
        );
    }
}
