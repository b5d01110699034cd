//! Model calls without secrets, end to end: a real microVM (the tcg engine,
//! image mode) whose agent talks to the in-guest model endpoint, the host's
//! model proxy (`--model-upstream`) and the scripted local upstream
//! (`airlock-upstream`), which logs every request it gets.
//!
//! What a user sees is checked: the agent's output and files, the API-shaped
//! errors an agent reads, airlock's stderr and exit code, the audit log, and
//! what reached the upstream (the real key, never the guest's). The key
//! never enters the guest: its environment, its file systems and its whole
//! RAM (dumped by the engine after the VM stops) are searched for it.

use std::path::Path;

use airlock_e2e::{
    audit_records as records, bin, build_file, field, fields_of_kind as of_kind, find_bytes, rel,
    root, run_env, scratch, secret_key, test_pki, testbed, Run, Upstream,
};
use serde_json::Value;

/// `airlock run --engine tcg --image-root build/rootfs.img OPTS -- CMD` with
/// `env` added to airlock's environment.
fn tcg(opts: &[&str], cmd: &[&str], env: &[(&str, &str)], timeout_s: u32) -> Run {
    airlock_e2e::tcg_on_image(opts, cmd, env, timeout_s)
}

/// Checks the log with `airlock audit verify`.
fn verify(path: &Path) {
    let airlock = bin("airlock");
    let p = path.to_str().expect("utf-8");
    run_env(&[airlock.as_str(), "audit", "verify", p], &[], 60).expect_code(0);
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Python in the guest: `call(method, path, headers, body)` through the
/// in-guest endpoint with http.client, returning `(status, headers, body)`;
/// `show(name, ...)` prints `name status=… type=… code=…` for the test.
const PY_PRELUDE: &str = r#"
import http.client, json, os, socket, struct, sys, time
BASE = os.environ["ANTHROPIC_BASE_URL"]
HOSTPORT = BASE.split("//", 1)[1].rstrip("/")
def call(method, path, headers=None, body=None, skip_host=False):
    c = http.client.HTTPConnection(HOSTPORT, timeout=120)
    c.putrequest(method, path, skip_host=skip_host, skip_accept_encoding=True)
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    for k, v in (headers or {}).items():
        c.putheader(k, v)
    c.putheader("content-length", str(len(data)))
    c.endheaders(data)
    r = c.getresponse()
    out = r.read()
    c.close()
    return r.status, r.getheaders(), out
def show(name, status, body):
    try:
        e = json.loads(body)
    except ValueError:
        e = {}
    err = e.get("error", {}) if isinstance(e, dict) else {}
    print(f"{name} status={status} type={err.get('type')} code={err.get('code')}", flush=True)
ANTHROPIC = {"content-type": "application/json", "anthropic-version": "2023-06-01",
             "x-api-key": os.environ.get("ANTHROPIC_API_KEY", "")}
MSG = {"model": "claude-scripted-1", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
"#;

/// The reference agent completes the scripted task: it lists the workspace
/// with `bash`, writes `out/summary.txt` with `write_file` and ends; every
/// request reached the upstream with the host's key, and each call is in
/// the audit log with its tokens and the hash of what was sent.
#[test]
fn tcg_reference_agent_completes_the_scripted_task() {
    let dir = scratch("model-agent");
    let key = secret_key("agent");
    let script = root().join("upstream/scripts/demo.json");
    let upstream = Upstream::start(&script, &dir, &["--key", &key]);
    let ws = dir.join("ws");
    let out = dir.join("out");
    std::fs::create_dir_all(&ws).expect("mkdir");
    write(&ws.join("notes.txt"), "some notes\n");
    let audit = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let url = upstream.url();
    let r = tcg(
        &[
            "--model-upstream",
            &url,
            "--workspace",
            &rel(&ws),
            "--out",
            &rel(&out),
            "--audit",
            &rel(&audit),
        ],
        &[
            "airlock-agent",
            "Look at the workspace and write a summary to out/summary.txt",
        ],
        &[("ANTHROPIC_API_KEY", &key)],
        600,
    );
    r.expect_code(0);
    assert!(
        r.stdout
            .contains("Done: I listed the workspace and wrote out/summary.txt."),
        "the agent did not finish\n{r}"
    );
    let demo: Value =
        serde_json::from_str(&std::fs::read_to_string(&script).expect("script")).expect("json");
    let want = demo["turns"][1]["tool"]["input"]["content"]
        .as_str()
        .expect("content");
    let got = std::fs::read_to_string(out.join("summary.txt"))
        .unwrap_or_else(|e| panic!("no summary: {e}\n{r}"));
    assert_eq!(got, want);

    let reqs = upstream.requests();
    let turns: Vec<i64> = reqs.iter().filter_map(|q| q["turn"].as_i64()).collect();
    assert_eq!(turns, [0, 1, 2], "{reqs:?}");
    for q in &reqs {
        assert_eq!(q["path"], "/v1/messages");
        assert_eq!(q["status"], 200, "{q}");
        assert_eq!(
            q["key"],
            key.as_str(),
            "the upstream did not get the host's key"
        );
        let headers = q["headers"].to_string();
        assert!(
            !headers.contains("airlock-placeholder"),
            "the guest's placeholder went upstream: {headers}"
        );
        assert_eq!(headers.matches("x-api-key").count(), 1, "{headers}");
    }

    let recs = records(&audit);
    verify(&audit);
    let calls = of_kind(&recs, "model.call");
    assert_eq!(calls.len(), 3, "{calls:?}");
    for (call, q) in calls.iter().zip(&reqs) {
        assert_eq!(call["status"], 200);
        assert_eq!(call["api"], "anthropic");
        assert_eq!(call["complete"], true);
        assert!(
            call["input_tokens"].as_u64().is_some_and(|n| n > 0),
            "{call}"
        );
        assert!(
            call["output_tokens"].as_u64().is_some_and(|n| n > 0),
            "{call}"
        );
        assert!(call["latency_ms"].is_u64());
        // What the guest sent is what the upstream got.
        assert_eq!(call["request_sha256"], q["body_sha256"], "{call}");
        assert_eq!(
            call["guest_credentials_dropped"],
            serde_json::json!(["x-api-key"])
        );
    }
    let summary = &of_kind(&recs, "model.summary")[0];
    assert_eq!(summary["calls"], 3);
    let text = std::fs::read_to_string(&audit).expect("audit");
    assert!(!text.contains(&key), "the key is in the audit log");
    let start = &of_kind(&recs, "run.start")[0];
    assert_eq!(
        start["policy"]["model"]["anthropic_key_from"],
        "$ANTHROPIC_API_KEY"
    );
}

/// Under `--model-max-tokens` the agent's generous `max_tokens` is lowered
/// to what the run has left, call after call: what the upstream received is
/// what the audit log says was forwarded, and the agent still finishes.
#[test]
fn tcg_the_token_budget_caps_each_calls_output() {
    let dir = scratch("model-budget");
    let key = secret_key("budget");
    let script = root().join("upstream/scripts/demo.json");
    let upstream = Upstream::start(&script, &dir, &["--key", &key]);
    let audit = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let budget: u64 = 50_000;
    let r = tcg(
        &[
            "--model-upstream",
            &upstream.url(),
            "--model-max-tokens",
            &budget.to_string(),
            "--audit",
            &rel(&audit),
        ],
        &["airlock-agent", "--max-tokens", "100000", "Summarize"],
        &[("ANTHROPIC_API_KEY", &key)],
        600,
    );
    r.expect_code(0);
    let reqs = upstream.requests();
    let recs = records(&audit);
    verify(&audit);
    let calls = of_kind(&recs, "model.call");
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    let mut used = 0;
    for (call, q) in calls.iter().zip(&reqs) {
        assert_eq!(
            call["max_tokens_capped"],
            serde_json::json!({"field": "max_tokens", "asked": 100000, "sent": budget - used}),
            "{call}"
        );
        assert_eq!(call["forwarded_sha256"], q["body_sha256"], "{call}\n{q}");
        assert_ne!(call["request_sha256"], q["body_sha256"], "{call}");
        used += call["input_tokens"].as_u64().expect("input tokens")
            + call["output_tokens"].as_u64().expect("output tokens");
    }
    assert!(used < budget, "the task fits the budget: {used}");
}

/// Server-sent events reach the guest as the upstream produces them (the
/// guest sees the first event long before the last, as the upstream spaced
/// them), for both APIs; the OpenAI stream's usage is asked for by the
/// proxy and recorded.
#[test]
fn tcg_streaming_arrives_incrementally() {
    let dir = scratch("model-stream");
    let script = dir.join("script.json");
    write(
        &script,
        r#"{"turns":[
            {"text":"Streaming reply: alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon phi chi psi omega."},
            {"tool":{"name":"bash","input":{"command":"echo hi"}}}
        ]}"#,
    );
    let key = secret_key("stream");
    let upstream = Upstream::start(&script, &dir, &["--delay-ms", "400"]);
    let audit = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let py = format!(
        "{PY_PRELUDE}{}",
        r#"
import urllib.request
def events(url, headers, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    seen = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data:"):
                seen.append((time.monotonic(), line[5:].strip()))
    return seen
a = events(BASE + "/v1/messages", ANTHROPIC, dict(MSG, stream=True))
print(f"anthropic events={len(a)} gap_ms={int((a[-1][0] - a[0][0]) * 1000)}", flush=True)
text = "".join(json.loads(d).get("delta", {}).get("text", "") for _, d in a if b"text_delta" in d)
print("anthropic text=" + text, flush=True)
o = events(os.environ["OPENAI_BASE_URL"] + "/chat/completions",
           {"content-type": "application/json", "authorization": "Bearer " + os.environ["OPENAI_API_KEY"]},
           {"model": "gpt-scripted-1", "stream": True, "stream_options": {"include_usage": True}, "messages": [
               {"role": "user", "content": "go"}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "now"}]})
chunks = [json.loads(d) for _, d in o if d != b"[DONE]"]
args = "".join(tc["function"].get("arguments", "") for c in chunks for ch in c.get("choices", [])
               for tc in ch.get("delta", {}).get("tool_calls", []) or [])
usage = [c["usage"] for c in chunks if c.get("usage")]
print(f"openai events={len(o)} gap_ms={int((o[-1][0] - o[0][0]) * 1000)} done={o[-1][1] == b'[DONE]'}", flush=True)
print("openai args=" + args, flush=True)
print(f"openai usage={usage[-1]['completion_tokens'] if usage else None}", flush=True)
"#
    );
    let url = upstream.url();
    let r = tcg(
        &["--model-upstream", &url, "--audit", &rel(&audit)],
        &["python3", "-c", &py],
        &[("ANTHROPIC_API_KEY", &key), ("OPENAI_API_KEY", &key)],
        600,
    );
    r.expect_code(0);
    assert_eq!(
        field(&r, "anthropic text="),
        "Streaming reply: alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon phi chi psi omega."
    );
    assert_eq!(field(&r, "openai args="), r#"{"command":"echo hi"}"#);
    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    for (api, q) in ["anthropic", "openai"].iter().zip(&reqs) {
        let sent_gap = q["last_event_ms"].as_u64().expect("last")
            - q["first_event_ms"].as_u64().expect("first");
        let events = q["events"].as_u64().expect("events");
        let line = field(&r, &format!("{api} events="));
        let (seen_events, rest) = line.split_once(' ').expect("fields");
        let seen_gap: u64 = rest
            .split_whitespace()
            .find_map(|w| w.strip_prefix("gap_ms="))
            .and_then(|v| v.parse().ok())
            .expect("gap");
        assert_eq!(
            seen_events.parse::<u64>().ok(),
            Some(events),
            "{api}: events lost\n{r}"
        );
        assert!(
            sent_gap + 5 >= 400 * (events - 1),
            "{api}: upstream did not space its events: {q}"
        );
        eprintln!("{api}: the upstream spread {events} events over {sent_gap} ms; the guest saw them over {seen_gap} ms");
        // Relayed at the end, the guest would see them all at once.
        assert!(
            seen_gap * 2 >= sent_gap,
            "{api}: the guest saw its events within {seen_gap} ms; the upstream spread them over {sent_gap} ms\n{r}"
        );
    }
    assert!(field(&r, "openai events=").contains("done=True"), "{r}");
    let completion = field(&r, "openai usage=");
    assert_ne!(
        completion, "None",
        "the OpenAI stream carried no usage\n{r}"
    );
    let recs = records(&audit);
    let calls = of_kind(&recs, "model.call");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1]["api"], "openai");
    // The client asked for the usage chunk (airlock adds nothing).
    assert!(calls[1].get("include_usage_added").is_none());
    assert_eq!(calls[1]["output_tokens"].to_string(), completion);
    assert!(calls[0]["output_tokens"].as_u64().is_some_and(|n| n > 0));
}

/// The upstream gets the host's key; the guest never does: after a model
/// call, nothing in any process's environment, in any writable file system
/// (the guest streams them to us; the read-only root image is read here) or
/// anywhere in the VM's RAM (dumped by the engine after the VM stopped)
/// holds the key. A marker the guest made at
/// run time is found in the RAM dump, so the dump is the guest's memory.
#[test]
fn tcg_the_key_never_enters_the_guest() {
    let dir = scratch("model-key");
    let key = secret_key("scan");
    let script = root().join("upstream/scripts/demo.json");
    let upstream = Upstream::start(&script, &dir, &["--key", &key]);
    let dump = dir.join("guest.ram");
    let _ = std::fs::remove_file(&dump);
    // The marker is assembled in the guest: its whole text exists only there.
    let cmd = format!(
        "{PY_PRELUDE}{}",
        r#"
status, _, body = call("POST", "/v1/messages", ANTHROPIC, MSG)
print(f"call status={status}", file=sys.stderr, flush=True)
marker = "airlock-ram-" + "marker-" + str(7 * 191 * 1009)
open("/tmp/marker", "w").write(marker * 100)
import subprocess
# Every process's environment, then every file system but proc, sys and dev.
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            sys.stdout.buffer.write(open(f"/proc/{pid}/environ", "rb").read() + b"\n")
            sys.stdout.buffer.write(open(f"/proc/{pid}/cmdline", "rb").read() + b"\n")
        except OSError:
            pass
sys.stdout.flush()
# Every writable file system (the read-only root image is scanned on the host).
skip = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "mqueue", "securityfs",
        "debugfs", "tracefs", "bpf", "pstore", "configfs", "fusectl", "hugetlbfs"}
mounts = [m.split()[1] for m in open("/proc/mounts")
          if m.split()[2] not in skip and "rw" in m.split()[3].split(",")]
print("writable: " + " ".join(mounts), file=sys.stderr, flush=True)
subprocess.run(["tar", "-c", "--one-file-system", "-C", "/"] + [m.lstrip("/") or "." for m in mounts],
               stderr=subprocess.DEVNULL)
"#
    );
    let image = build_file("rootfs.img");
    let url = upstream.url();
    let raw = airlock_e2e::tcg_on_image_raw(
        &[
            "--no-container",
            // Root in the VM: the scan reads every process and file.
            "--vm-root",
            "--model-upstream",
            &url,
            "--debug-dump-guest-memory",
            &rel(&dump),
            "--timeout",
            "1500",
        ],
        &["python3", "-c", &cmd],
        &[("ANTHROPIC_API_KEY", &key)],
        1700,
    );
    assert_eq!(raw.code, Some(0), "{}", raw.stderr);
    assert!(raw.stderr.contains("call status=200"), "{}", raw.stderr);
    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0]["key"], key.as_str());
    // The writable file systems came back, /tmp with the marker among them.
    let writable = raw
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("writable: "))
        .unwrap_or_else(|| panic!("no list of file systems\n{}", raw.stderr));
    assert!(writable.split(' ').any(|m| m == "/tmp"), "{writable}");
    let marker = format!("airlock-ram-marker-{}", 7 * 191 * 1009);
    assert!(
        find_bytes(&raw.stdout, marker.as_bytes()).is_some(),
        "the file systems did not come back"
    );
    assert!(
        find_bytes(&raw.stdout, b"ANTHROPIC_API_KEY=airlock-placeholder").is_some(),
        "the scan missed the environment"
    );
    assert!(
        find_bytes(&raw.stdout, key.as_bytes()).is_none(),
        "the key is in the guest's environment or files"
    );
    let root_image = std::fs::read(root().join(&image)).expect("read the root image");
    assert!(
        find_bytes(&root_image, key.as_bytes()).is_none(),
        "the key is in the root image"
    );
    let size = scan_ram_dump(&dump, marker.as_bytes(), &key);
    assert!(size >= 200 << 20, "dump of {size} bytes");
}

/// Scans the guest RAM dump at `dump` and removes it: `marker`, which the
/// guest made, must be there (so the scan is real), the key and either
/// half of it must not. Returns the dump's size.
fn scan_ram_dump(dump: &Path, marker: &[u8], key: &str) -> usize {
    let ram =
        std::fs::read(dump).unwrap_or_else(|e| panic!("no RAM dump at {}: {e}", dump.display()));
    assert!(
        find_bytes(&ram, marker).is_some(),
        "the dump is not the guest's RAM"
    );
    assert!(
        find_bytes(&ram, key.as_bytes()).is_none(),
        "the key is in the guest's RAM"
    );
    let half = key.len() / 2;
    for part in [&key.as_bytes()[..half], &key.as_bytes()[half..]] {
        assert!(
            find_bytes(&ram, part).is_none(),
            "part of the key is in the guest's RAM"
        );
    }
    let _ = std::fs::remove_file(dump);
    ram.len()
}

/// A hostile agent, through the in-guest endpoint: a path outside the
/// allow list, an oversize body, its own `Authorization` / `x-api-key`, an
/// absolute-URL target, a `Host` naming another host, a flood past the
/// request budget. And a hostile guest on the raw model port (root in the
/// VM, AF_VSOCK): a `Host` header, an absolute target, garbage. Each is
/// refused (API-shaped) or neutralised, audited, and the broker carries on
/// and ends the run normally.
#[test]
fn tcg_hostile_model_calls_are_refused_and_audited() {
    let dir = scratch("model-hostile");
    let key = secret_key("hostile");
    let script = root().join("upstream/scripts/demo.json");
    let upstream = Upstream::start(&script, &dir, &["--key", &key]);
    let audit = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let py = format!(
        "{PY_PRELUDE}{}",
        r#"
s, _, b = call("POST", "/v1/complete", ANTHROPIC, MSG); show("path", s, b)
s, _, b = call("GET", "/v1/messages", ANTHROPIC); show("method", s, b)
s, _, b = call("POST", "/v1/messages", ANTHROPIC, b"x" * 5000); show("oversize", s, b)
h = dict(ANTHROPIC, **{"x-api-key": "sk-guest-own-key", "authorization": "Bearer sk-guest-bearer", "cookie": "s=1"})
s, _, b = call("POST", "/v1/messages", h, MSG); show("own_key", s, b)
s, _, b = call("POST", "http://evil.example/v1/messages", ANTHROPIC, MSG); show("absolute", s, b)
s, _, b = call("POST", "/v1/messages", dict(ANTHROPIC, Host="evil.example"), MSG, skip_host=True); show("host", s, b)
# The raw model port, as a compromised init would use it.
def frame(tag, payload):
    return struct.pack("<I", len(payload) + 1) + bytes([tag]) + payload
def string(s):
    b = s.encode()
    return struct.pack("<I", len(b)) + b
def request(method, target, headers, body):
    p = string(method) + string(target) + struct.pack("<I", len(headers))
    for k, v in headers:
        p += string(k) + string(v)
    out = frame(14, p)
    if body:
        out += frame(16, struct.pack("<I", len(body)) + body)
    return out + frame(17, b"")
def raw(data):
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect((2, 1027))
    s.sendall(data)
    got = b""
    while True:
        try:
            c = s.recv(65536)
        except OSError:
            break
        if not c:
            break
        got += c
    s.close()
    return got
def raw_status(got):
    if len(got) < 7 or got[4] != 15:
        return None
    return struct.unpack("<H", got[5:7])[0]
body = json.dumps(MSG).encode()
print("raw_host", raw_status(raw(request("POST", "/v1/messages", [("host", "api.evil.example")], body))), flush=True)
print("raw_absolute", len(raw(request("POST", "http://evil.example/v1/messages", [], body))), flush=True)
print("raw_garbage", len(raw(b"\xff" * 64)), flush=True)
print("raw_ok", raw_status(raw(request("POST", "/v1/messages", [("anthropic-version", "2023-06-01")], body))), flush=True)
# The flood: the budget is 6 requests, three of them already used above.
statuses = [call("POST", "/v1/messages", ANTHROPIC, MSG)[0] for _ in range(12)]
print("flood", " ".join(map(str, statuses)), flush=True)
s, _, b = call("POST", "/v1/messages", ANTHROPIC, MSG); show("after_flood", s, b)
"#
    );
    let url = upstream.url();
    let r = tcg(
        &[
            "--no-container",
            // Root in the VM: the raw model port needs AF_VSOCK.
            "--vm-root",
            "--model-upstream",
            &url,
            "--model-max-request-bytes",
            "1000",
            "--model-max-requests",
            "6",
            "--audit",
            &rel(&audit),
        ],
        &["python3", "-c", &py],
        &[("ANTHROPIC_API_KEY", &key)],
        600,
    );
    r.expect_code(0);
    assert_eq!(
        field(&r, "path "),
        "status=404 type=not_found_error code=None"
    );
    assert_eq!(
        field(&r, "method "),
        "status=405 type=invalid_request_error code=None"
    );
    assert_eq!(
        field(&r, "oversize "),
        "status=413 type=request_too_large code=None"
    );
    assert_eq!(field(&r, "own_key "), "status=200 type=None code=None");
    // The in-guest endpoint refuses an absolute URL itself: it never leaves the VM.
    assert!(field(&r, "absolute ").starts_with("status=400"), "{r}");
    // It drops the Host header; the call goes to the configured upstream only.
    assert_eq!(field(&r, "host "), "status=200 type=None code=None");
    assert_eq!(field(&r, "raw_host "), "403");
    assert_eq!(
        field(&r, "raw_absolute "),
        "0",
        "an undecodable request got an answer"
    );
    assert_eq!(field(&r, "raw_garbage "), "0");
    assert_eq!(field(&r, "raw_ok "), "200");
    // own_key, host and raw_ok used 3 of the 6 requests.
    assert_eq!(
        field(&r, "flood "),
        "200 200 200 429 429 429 429 429 429 429 429 429"
    );
    assert_eq!(
        field(&r, "after_flood "),
        "status=429 type=rate_limit_error code=None"
    );

    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 6, "{reqs:?}");
    for q in &reqs {
        assert_eq!(q["key"], key.as_str());
        assert_eq!(q["path"], "/v1/messages");
        let headers = q["headers"].to_string();
        for bad in [
            "sk-guest",
            "evil.example",
            "cookie",
            "airlock-placeholder",
            "authorization",
        ] {
            assert!(
                !headers.contains(bad),
                "{bad} reached the upstream: {headers}"
            );
        }
        let host = q["headers"]
            .as_array()
            .and_then(|h| h.iter().find(|p| p[0] == "host"))
            .map(|p| p[1].clone());
        assert_eq!(host, Some(Value::String(upstream.addr.clone())));
    }

    let recs = records(&audit);
    verify(&audit);
    let denied = of_kind(&recs, "model.denied");
    let reasons: Vec<&str> = denied.iter().filter_map(|d| d["reason"].as_str()).collect();
    // The oversize body never left the VM: the in-guest endpoint holds
    // the host's --model-max-request-bytes (airlock.model_max_body) and
    // refuses it itself, a guest claim.
    let mut want = vec!["path_not_allowed", "method_not_allowed", "other_host"];
    want.extend(["request_budget"; 10]);
    assert_eq!(reasons, want, "{denied:?}");
    assert!(
        of_kind(&recs, "model.refused")
            .iter()
            .any(|r| r["status"] == "413"),
        "{recs:?}"
    );
    let calls = of_kind(&recs, "model.call");
    assert_eq!(calls.len(), 6);
    let own = &calls[0];
    assert_eq!(
        own["guest_credentials_dropped"],
        serde_json::json!(["x-api-key", "authorization", "cookie"])
    );
    assert_eq!(of_kind(&recs, "model.protocol_error").len(), 2, "{recs:?}");
    let summary = &of_kind(&recs, "model.summary")[0];
    assert_eq!(
        (summary["calls"].as_u64(), summary["denied"].as_u64()),
        (Some(6), Some(13))
    );
    assert_eq!(of_kind(&recs, "run.end")[0]["how"], "exited");
}

/// Without `--model-upstream`, a call gets an API-shaped 403 that says why;
/// with an upstream nobody answers on, a 502 the agent can act on, and the
/// user reads a clear line on stderr. The run itself succeeds.
#[test]
fn tcg_no_upstream_and_unreachable_upstream() {
    let py = format!(
        "{PY_PRELUDE}{}",
        r#"
s, _, b = call("POST", "/v1/messages", ANTHROPIC, MSG); show("anthropic", s, b)
print("message", json.loads(b)["error"]["message"], flush=True)
s, _, b = call("POST", "/v1/chat/completions", {"content-type": "application/json"}, {"model": "m", "messages": []}); show("openai", s, b)
"#
    );
    let r = tcg(&[], &["python3", "-c", &py], &[], 600);
    r.expect_code(0);
    assert_eq!(
        field(&r, "anthropic "),
        "status=403 type=permission_error code=None"
    );
    assert!(field(&r, "message ").contains("--model-upstream"), "{r}");
    assert_eq!(
        field(&r, "openai "),
        "status=403 type=invalid_request_error code=no_upstream"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let url = format!("http://127.0.0.1:{port}");
    // Two keys, one gateway: it is named for both providers.
    let (for_anthropic, for_openai) = (format!("anthropic={url}"), format!("openai={url}"));
    let r = tcg(
        &[
            "--model-upstream",
            &for_anthropic,
            "--model-upstream",
            &for_openai,
        ],
        &["python3", "-c", &py],
        &[("ANTHROPIC_API_KEY", "sk-x"), ("OPENAI_API_KEY", "sk-y")],
        600,
    );
    r.expect_code(0);
    assert_eq!(
        field(&r, "anthropic "),
        "status=502 type=api_error code=None"
    );
    assert_eq!(
        field(&r, "openai "),
        "status=502 type=api_error code=upstream_unreachable"
    );
    r.expect_stderr(&format!("airlock: model upstream {url} unreachable:"));
}

/// Bad input is found before any VM starts: an upstream without a key, a
/// key variable that is not set, a malformed policy file, a bad URL.
#[test]
fn model_bad_input_is_a_usage_error() {
    let dir = scratch("model-usage");
    let airlock = bin("airlock");
    let policy = dir.join("policy.json");
    write(&policy, r#"{"max_requests": "many"}"#);
    let policy_arg = rel(&policy);
    let cases: [(&[&str], &str); 4] = [
        (
            &["--model-upstream", "https://api.anthropic.com"],
            "no API key",
        ),
        (
            &[
                "--model-upstream",
                "https://api.anthropic.com",
                "--model-key-env",
                "AIRLOCK_TEST_NO_SUCH_VAR",
            ],
            "AIRLOCK_TEST_NO_SUCH_VAR",
        ),
        (&["--model-policy", &policy_arg], &policy_arg),
        (&["--model-upstream", "ftp://x"], "--model-upstream"),
    ];
    for (opts, text) in cases {
        let mut argv = vec![airlock.as_str(), "run", "--engine", "tcg"];
        argv.extend_from_slice(opts);
        argv.extend(["--", "true"]);
        let r = run_env(
            &argv,
            &[("ANTHROPIC_API_KEY", ""), ("OPENAI_API_KEY", "")],
            60,
        );
        r.expect_code(2).expect_one_line_error(text);
    }
}

/// Our own VMM (the kvm engine) in the nested test bed: the reference agent
/// completes the scripted task through the model proxy, and the guest's RAM,
/// dumped by the VMM after the guest stopped, holds the file the agent wrote
/// (in the guest's tmpfs) but not the key.
///
/// This run once stalled intermittently: when the guest's endpoint closed a
/// vsock connection before the broker did, the VMM closed the host socket
/// while epoll still watched it, so the next connection's socket (same fd
/// number) was never watched and its response waited forever. Regression-tested in the
/// VMM by `host_data_wakes_the_device_for_every_connection_in_turn`.
#[test]
fn kvm_reference_agent_in_the_test_bed() {
    let dir = scratch("model-kvm");
    let key = secret_key("kvm");
    let script = root().join("upstream/scripts/demo.json");
    let upstream_bin = bin("airlock-upstream");
    let airlock = bin("airlock");
    let image = build_file("rootfs.img");
    let out = dir.join("out");
    let dump = dir.join("guest.ram");
    let _ = std::fs::remove_file(&dump);
    let s = format!(
        "set -e; ifconfig lo 127.0.0.1 up 2>/dev/null || ip link set lo up; \
         {up} --script {script} --log {log} --key {key} > {addr} & \
         for i in $(seq 100); do [ -s {addr} ] && break; sleep 0.1; done; \
         ANTHROPIC_API_KEY={key} {airlock} run --engine kvm --mem 512 --timeout 800 \
         --image-root {image} \
         --model-upstream http://$(head -1 {addr}) --out {out} --debug-dump-guest-memory {dump} -- \
         airlock-agent 'Look at the workspace and write a summary'",
        up = upstream_bin,
        script = rel(&script),
        log = rel(&dir.join("upstream.jsonl")),
        addr = rel(&dir.join("addr")),
        out = rel(&out),
        dump = rel(&dump),
    );
    let r = testbed(&["sh", "-c", &s], 900);
    r.expect_code(0).expect_stderr("engine: kvm");
    assert!(r.stdout.contains("Done: I listed the workspace"), "{r}");
    assert!(out.join("summary.txt").exists(), "{r}");
    let log = std::fs::read_to_string(dir.join("upstream.jsonl")).expect("upstream log");
    let reqs: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(reqs.len(), 3, "{log}");
    assert!(reqs.iter().all(|q| q["key"] == key.as_str()), "{log}");
    let size = scan_ram_dump(&dump, b"Summary written by the scripted model", &key);
    assert_eq!(size, 512 << 20, "{r}");
}

/// An HTTPS upstream with a private CA (airlock-upstream --tls-cert):
/// with `--model-ca`, a streamed call from inside the sandbox completes
/// over TLS, the upstream gets the host's key and the guest never holds it
/// (its environment, its output and its RAM); run.start records which CA
/// file was trusted (path and sha256).
#[test]
fn tcg_https_upstream_with_model_ca() {
    let dir = scratch("model-https");
    let (ca, cert, tls_key) = test_pki(&dir);
    let key = secret_key("https");
    let script = dir.join("script.json");
    write(
        &script,
        r#"{"turns":[{"text":"Hello over TLS through the airlock, in several pieces."}]}"#,
    );
    let upstream = Upstream::start(
        &script,
        &dir,
        &[
            "--key",
            &key,
            "--tls-cert",
            cert.to_str().expect("utf-8"),
            "--tls-key",
            tls_key.to_str().expect("utf-8"),
        ],
    );
    let url = format!("https://{}", upstream.addr);
    let audit = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let dump = dir.join("guest.ram");
    let _ = std::fs::remove_file(&dump);
    let py = format!(
        "{PY_PRELUDE}{}",
        r#"
import urllib.request
req = urllib.request.Request(BASE + "/v1/messages", data=json.dumps(dict(MSG, stream=True)).encode(),
                             headers=ANTHROPIC, method="POST")
events = []
with urllib.request.urlopen(req, timeout=300) as r:
    print(f"status={r.status}", flush=True)
    for line in r:
        if line.startswith(b"data:"):
            events.append(json.loads(line[5:]))
text = "".join(e.get("delta", {}).get("text", "") for e in events if e.get("type") == "content_block_delta")
print(f"events={len(events)} last={events[-1]['type']}", flush=True)
print("text=" + text, flush=True)
# Kept in the guest's RAM for the dump scan: the process's own copies are
# freed and may be overwritten before the VM stops, and so may the
# container's /tmp (removed with the container, before the dump: a CI run
# missed the text there). /workspace is the VM's own tmpfs, kept to the end.
open("/workspace/answer.txt", "w").write(text)
print("guest_key=" + os.environ.get("ANTHROPIC_API_KEY", ""), flush=True)
"#
    );
    let r = tcg(
        &[
            "--model-upstream",
            &url,
            "--model-ca",
            &rel(&ca),
            "--audit",
            &rel(&audit),
            "--debug-dump-guest-memory",
            &rel(&dump),
        ],
        &["python3", "-c", &py],
        &[("ANTHROPIC_API_KEY", &key)],
        600,
    );
    r.expect_code(0);
    assert_eq!(field(&r, "status="), "200", "{r}");
    assert_eq!(
        field(&r, "text="),
        "Hello over TLS through the airlock, in several pieces."
    );
    let events = field(&r, "events=");
    assert!(events.ends_with("last=message_stop"), "{events}");
    assert!(
        field(&r, "guest_key=").starts_with("airlock-placeholder"),
        "{r}"
    );
    assert!(!r.stdout.contains(&key) && !r.stderr.contains(&key), "{r}");
    assert!(!r.stderr.contains("unreachable"), "{r}");

    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(
        reqs[0]["key"],
        key.as_str(),
        "the upstream did not get the host's key"
    );
    assert_eq!(
        (reqs[0]["status"].as_u64(), reqs[0]["stream"].as_bool()),
        (Some(200), Some(true))
    );
    assert!(
        reqs[0]["events"].as_u64().is_some_and(|n| n > 3),
        "{}",
        reqs[0]
    );

    let recs = records(&audit);
    verify(&audit);
    let calls = of_kind(&recs, "model.call");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["status"], 200);
    assert_eq!(calls[0]["complete"], true);
    assert!(calls[0]["error"].is_null(), "{}", calls[0]);
    assert_eq!(calls[0]["request_sha256"], reqs[0]["body_sha256"]);
    let start = &of_kind(&recs, "run.start")[0];
    let trusted = &start["policy"]["model"]["ca_file"];
    assert_eq!(trusted["path"], rel(&ca), "{start}");
    let ca_bytes = std::fs::read(&ca).expect("ca");
    let want: String = <sha2::Sha256 as sha2::Digest>::digest(&ca_bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(trusted["sha256"], want.as_str());
    assert_eq!(trusted["certificates"], 1);
    let text = std::fs::read_to_string(&audit).expect("audit");
    assert!(!text.contains(&key), "the key is in the audit log");

    let size = scan_ram_dump(&dump, b"Hello over TLS through the airlock", &key);
    assert!(size >= 200 << 20, "dump of {size} bytes");

    // Without --model-ca the same upstream is not trusted: the agent gets
    // an API-shaped 502 naming the TLS failure, the user is told on stderr
    // (with the way out), nothing reached the upstream.
    let py = format!(
        "{PY_PRELUDE}{}",
        r#"
status, _, body = call("POST", "/v1/messages", ANTHROPIC, MSG)
show("untrusted", status, body)
print("message=" + json.loads(body)["error"]["message"], flush=True)
"#
    );
    let r = tcg(
        &["--model-upstream", &url],
        &["python3", "-c", &py],
        &[("ANTHROPIC_API_KEY", &key)],
        600,
    );
    r.expect_code(0);
    assert_eq!(
        field(&r, "untrusted "),
        "status=502 type=api_error code=None"
    );
    let message = field(&r, "message=");
    assert!(
        message.contains("TLS handshake failed") && message.contains("UnknownIssuer"),
        "{message}"
    );
    r.expect_stderr(&format!(
        "airlock: model upstream {url} unreachable: TLS handshake failed"
    ))
    .expect_stderr("pass it with --model-ca FILE");
    assert_eq!(
        upstream.requests().len(),
        1,
        "an untrusted call reached the upstream"
    );
}

/// A bad --model-ca is found before any VM starts, in one line naming the
/// file: missing, no certificate in it, malformed PEM, or given for a
/// plain http:// upstream (there is nothing to verify: refused rather than
/// silently ignored).
#[test]
fn model_ca_bad_input_is_a_usage_error() {
    let dir = scratch("model-ca-usage");
    let airlock = bin("airlock");
    let (good, _, _) = test_pki(&dir);
    let missing = rel(&dir.join("missing.pem"));
    let empty = dir.join("empty.pem");
    write(
        &empty,
        "these are not the certificates you are looking for\n",
    );
    let malformed = dir.join("malformed.pem");
    write(
        &malformed,
        "-----BEGIN CERTIFICATE-----\n!!! not base64 !!!\n-----END CERTIFICATE-----\n",
    );
    let (empty, malformed, good) = (rel(&empty), rel(&malformed), rel(&good));
    let https = "https://127.0.0.1:9";
    let cases: [(&[&str], Vec<&str>); 4] = [
        (&[https, &missing], vec![missing.as_str(), "cannot read it"]),
        (&[https, &empty], vec![empty.as_str(), "no certificate"]),
        (
            &[https, &malformed],
            vec![malformed.as_str(), "malformed PEM"],
        ),
        (
            &["http://127.0.0.1:9", &good],
            vec![good.as_str(), "plain http"],
        ),
    ];
    for (opts, texts) in cases {
        let argv = [
            airlock.as_str(),
            "run",
            "--engine",
            "tcg",
            "--model-upstream",
            opts[0],
            "--model-ca",
            opts[1],
            "--",
            "true",
        ];
        let r = run_env(&argv, &[("ANTHROPIC_API_KEY", "sk-test")], 60);
        r.expect_code(2);
        for text in texts {
            r.expect_one_line_error(text);
        }
        assert!(r.stderr.contains("--model-ca"), "{r}");
    }
}
