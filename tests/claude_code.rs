//! The real Claude Code CLI, unmodified, in a sandbox: the native binary from
//! the npm registry (`scripts/build-claude-code-image.sh` puts it in
//! `build/rootfs-claude-code.img`), started the way the README's recipe
//! (`scripts/claude-code`) starts it, against the scripted model API through
//! the model door. No shim: Claude Code sends what it sends
//! (`/v1/messages?beta=true`, its own headers), the proxy lets the API's
//! routes through and keeps the key on the host.

use airlock_e2e::*;
use serde_json::Value;
use std::path::Path;

/// The Claude Code image, or a failure that says how to build it.
fn claude_code_image() -> String {
    let rel = "build/rootfs-claude-code.img";
    assert!(
        root().join(rel).exists(),
        "{rel} is missing: run scripts/build-claude-code-image.sh (scripts/test does)"
    );
    rel.to_owned()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A two-turn script: Claude Code's Bash tool runs `command`, then the model
/// ends its turn with `done`.
fn bash_then_text(dir: &Path, command: &str, done: &str) -> std::path::PathBuf {
    let script = dir.join("script.json");
    let turns = serde_json::json!({"turns": [
        {"tool": {"name": "Bash", "input": {"command": command, "description": "do the task"}}},
        {"text": done},
    ]});
    write(&script, &turns.to_string());
    script
}

/// The header `name` of a logged upstream request.
fn header<'a>(req: &'a Value, name: &str) -> Option<&'a str> {
    req["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .and_then(|h| h[1].as_str())
}

/// `claude -p` with a tool: through `scripts/claude-code` (the README's
/// recipe), Claude Code runs its Bash tool in the sandbox on the workspace,
/// the result comes back with --out, every call is audited, and the key is
/// only upstream.
#[test]
fn tcg_claude_code_completes_a_tool_task() {
    let image = claude_code_image();
    let dir = scratch("claude-code-task");
    let tmp = TempDir::new("cc-task");
    let key = secret_key("claude-code");
    let ws = dir.join("ws");
    std::fs::create_dir_all(&ws).expect("workspace");
    write(&ws.join("notes.txt"), "one\ntwo\nthree\n");
    let out = dir.join("out");
    let report = dir.join("report.json");
    let script = bash_then_text(
        &dir,
        "mkdir -p out && wc -l < notes.txt > out/lines.txt && env > out/env.txt \
         && cat /proc/cmdline > out/cmdline.txt",
        "Done: counted the lines into out/lines.txt",
    );
    let up = Upstream::start(&script, &dir, &["--key", &key]);
    let url = up.url();
    let r = run_env(
        &[
            "scripts/claude-code",
            "--engine",
            "tcg",
            "--image-root",
            &image,
            "--mem",
            "1536",
            "--timeout",
            "600",
            "--model-upstream",
            &url,
            "--workspace",
            &rel(&ws),
            "--out",
            &rel(&out),
            "--report",
            &rel(&report),
            "--",
            "-p",
            "Count the lines of notes.txt into out/lines.txt",
        ],
        &[("ANTHROPIC_API_KEY", &key), ("TMPDIR", tmp.as_str())],
        700,
    );
    r.expect_code(0);
    assert!(
        r.stdout
            .contains("Done: counted the lines into out/lines.txt"),
        "Claude Code's answer is not on stdout\n{r}"
    );
    // The tool ran in the sandbox, on the workspace, and its result came back.
    assert_eq!(read(&out.join("lines.txt")).trim(), "3", "{r}");
    let env = read(&out.join("env.txt"));
    let cmdline = read(&out.join("cmdline.txt"));
    assert!(env.contains("IS_SANDBOX=1"), "{env}");
    assert!(
        env.lines()
            .any(|l| l.starts_with("ANTHROPIC_BASE_URL=http://127.0.0.1:")),
        "Claude Code was not pointed at the in-guest endpoint\n{env}"
    );
    for (what, text) in [("env", &env), ("cmdline", &cmdline), ("stdout", &r.stdout)] {
        assert!(!text.contains(&key), "the key reached the guest's {what}");
    }
    // Claude Code's own requests, unchanged: the beta client's query string,
    // its own headers; the real key added on the host.
    let reqs = up.requests();
    let calls: Vec<&Value> = reqs
        .iter()
        .filter(|q| q["path"] == "/v1/messages")
        .collect();
    assert_eq!(calls.len(), 2, "{reqs:#?}");
    for q in &calls {
        assert_eq!(q["target"], "/v1/messages?beta=true", "{q}");
        assert_eq!(q["status"], 200, "{q}");
        assert_eq!(q["key"], key.as_str(), "{q}");
        assert_eq!(header(q, "x-app"), Some("cli"), "{q}");
        assert!(
            header(q, "user-agent").is_some_and(|u| u.starts_with("claude-cli/")),
            "{q}"
        );
    }
    // The audit log holds each call and no refusal.
    let log: Value = serde_json::from_str(&read(&report)).expect("report JSON");
    let records = audit_records(Path::new(
        log["audit_log"]["path"].as_str().expect("audit_log.path"),
    ));
    let audited = fields_of_kind(&records, "model.call");
    assert_eq!(audited.len(), reqs.len(), "{audited:#?}\n{reqs:#?}");
    assert!(fields_of_kind(&records, "model.denied").is_empty(), "{r}");
    assert!(!r.stderr.contains("airlock: model: refused"), "{r}");
}

/// A spent budget ends Claude Code's task at once: the refused call carries
/// `x-should-retry: false`, so the CLI makes it once and stops, and airlock
/// says on stderr which limit and which flag. The same run authenticates
/// with an OAuth token: it reaches the upstream as a bearer token and never
/// the guest.
#[test]
fn tcg_claude_code_stops_at_a_spent_budget_and_keeps_an_oauth_token() {
    let image = claude_code_image();
    let dir = scratch("claude-code-budget");
    let tmp = TempDir::new("cc-budget");
    let token = format!("sk-ant-oat01-{}", secret_key("oauth"));
    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    let script = bash_then_text(
        &dir,
        "mkdir -p out && env > out/env.txt && cat /proc/cmdline > out/cmdline.txt",
        "Done: never sent",
    );
    let up = Upstream::start(&script, &dir, &[]);
    let url = up.url();
    let airlock = bin("airlock");
    let r = run_env(
        &[
            &airlock,
            "run",
            "--engine",
            "tcg",
            "--image-root",
            &image,
            "--mem",
            "1536",
            "--timeout",
            "600",
            "--model-upstream",
            &url,
            "--model-auth",
            "bearer",
            "--model-max-requests",
            "1",
            "--out",
            &rel(&out),
            "--env",
            "IS_SANDBOX=1",
            "--env",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
            "--",
            "claude",
            "--dangerously-skip-permissions",
            "-p",
            "Record the environment",
        ],
        &[
            ("CLAUDE_CODE_OAUTH_TOKEN", &token),
            ("TMPDIR", tmp.as_str()),
        ],
        700,
    );
    assert_ne!(
        r.code,
        Some(0),
        "the task cannot finish without its second call\n{r}"
    );
    // The first call went upstream with the token as a bearer token.
    let reqs = up.requests();
    assert_eq!(
        reqs.len(),
        1,
        "only the first call may go upstream\n{reqs:#?}\n{r}"
    );
    let expect = format!("Bearer {token}");
    assert_eq!(
        header(&reqs[0], "authorization"),
        Some(expect.as_str()),
        "{reqs:#?}"
    );
    assert_eq!(header(&reqs[0], "x-api-key"), None, "{reqs:#?}");
    // The tool ran; the token is not in the guest.
    let env = read(&out.join("env.txt"));
    let cmdline = read(&out.join("cmdline.txt"));
    for (what, text) in [
        ("env", &env),
        ("cmdline", &cmdline),
        ("stdout", &r.stdout),
        ("stderr", &r.stderr),
    ] {
        assert!(
            !text.contains(&token),
            "the OAuth token reached the guest's {what}"
        );
    }
    // The second call was refused once: no retry storm.
    let records = audit_records(&audit_log_of(&r));
    let denied = fields_of_kind(&records, "model.denied");
    assert_eq!(
        denied.len(),
        1,
        "Claude Code retried a refusal\n{denied:#?}\n{r}"
    );
    assert_eq!(denied[0]["reason"], "request_budget", "{denied:#?}");
    assert_eq!(fields_of_kind(&records, "model.call").len(), 1, "{r}");
    let lines: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("airlock: model: refused"))
        .collect();
    assert_eq!(lines.len(), 1, "{r}");
    assert!(lines[0].contains("--model-max-requests"), "{r}");
}

/// The same task through our VMM: `--engine kvm` in the nested test bed
/// (L1 with a real `kvm_amd`), the upstream running in L1 beside airlock.
#[test]
fn kvm_claude_code_in_the_test_bed() {
    let image = claude_code_image();
    let dir = scratch("claude-code-kvm");
    let key = secret_key("claude-kvm");
    let ws = dir.join("ws");
    std::fs::create_dir_all(&ws).expect("workspace");
    write(&ws.join("notes.txt"), "alpha\nbeta\n");
    let out = dir.join("out");
    let script = bash_then_text(
        &dir,
        "mkdir -p out && wc -l < notes.txt > out/lines.txt && env > out/env.txt",
        "Done: counted the lines into out/lines.txt",
    );
    let s = format!(
        "set -e; ifconfig lo 127.0.0.1 up 2>/dev/null || ip link set lo up; \
         {up} --script {script} --log {log} --key {key} > {addr} & \
         for i in $(seq 100); do [ -s {addr} ] && break; sleep 0.1; done; \
         ANTHROPIC_API_KEY={key} {airlock} run --engine kvm --mem 1024 --timeout 800 \
         --image-root {image} --model-upstream http://$(head -1 {addr}) \
         --workspace {ws} --out {out} --env IS_SANDBOX=1 \
         --env CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 -- \
         claude --dangerously-skip-permissions -p 'Count the lines of notes.txt'",
        up = bin("airlock-upstream"),
        airlock = bin("airlock"),
        script = rel(&script),
        log = rel(&dir.join("upstream.jsonl")),
        addr = rel(&dir.join("addr")),
        ws = rel(&ws),
        out = rel(&out),
    );
    let r = testbed_script(3072, 900, &s);
    r.expect_code(0).expect_stderr("engine: kvm");
    assert!(
        r.stdout
            .contains("Done: counted the lines into out/lines.txt"),
        "{r}"
    );
    assert_eq!(read(&out.join("lines.txt")).trim(), "2", "{r}");
    let env = read(&out.join("env.txt"));
    assert!(!env.contains(&key), "the key reached the guest's env");
    assert!(
        env.contains("ANTHROPIC_API_KEY=airlock-placeholder"),
        "{env}"
    );
    let log = read(&dir.join("upstream.jsonl"));
    let reqs: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(reqs.len(), 2, "{log}");
    for q in &reqs {
        assert_eq!(q["target"], "/v1/messages?beta=true", "{q}");
        assert_eq!(q["key"], key.as_str(), "{q}");
    }
}
