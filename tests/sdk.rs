//! The official Anthropic and OpenAI Python SDKs (the wheels from the
//! package index pinned in tests/fixtures/python-sdks.txt, unmodified;
//! `scripts/fetch-python-sdks.sh` puts them in build/python-sdks) inside a
//! sandbox, through the model door, against the scripted model API: plain,
//! streaming, a tool round trip, count_tokens, the beta client, model lists,
//! OpenAI chat (plain and the `chunk.choices[0]` streaming loop) and
//! Responses. Each call succeeds; the key is only upstream.

use airlock_e2e::*;
use std::path::Path;

/// build/python-sdks, or a failure that says how to make it.
fn sdks() -> std::path::PathBuf {
    let dir = root().join("build/python-sdks");
    assert!(
        dir.join("anthropic").is_dir() && dir.join("openai").is_dir(),
        "build/python-sdks is missing: run scripts/fetch-python-sdks.sh (scripts/test does)"
    );
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let path = entry.path();
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            copy_tree(&path, &to.join(entry.file_name()));
        } else if kind.is_file() {
            std::fs::copy(&path, to.join(entry.file_name())).expect("copy");
        }
    }
}

#[test]
fn tcg_the_official_python_sdks_work_through_the_door() {
    let site = sdks();
    let dir = scratch("sdk");
    let tmp = TempDir::new("sdk");
    let key = secret_key("sdk");
    let ws = dir.join("ws");
    let _ = std::fs::remove_dir_all(&ws);
    copy_tree(&site, &ws.join("site"));
    std::fs::copy(
        root().join("tests/fixtures/sdk_calls.py"),
        ws.join("sdk_calls.py"),
    )
    .expect("copy the script");
    let up = Upstream::start(
        &root().join("upstream/scripts/sdk.json"),
        &dir,
        &["--key", &key],
    );
    let url = up.url();
    let r = tcg_on_image(
        &[
            "--mem",
            "1024",
            "--timeout",
            "400",
            "--workspace",
            &rel(&ws),
            "--model-upstream",
            &url,
            "--env",
            "PYTHONPATH=/workspace/site",
            "--env",
            "PYTHONDONTWRITEBYTECODE=1",
        ],
        &["sh", "-c", "python3 sdk_calls.py; code=$?; env; exit $code"],
        &[
            ("ANTHROPIC_API_KEY", &key),
            ("OPENAI_API_KEY", &key),
            ("TMPDIR", tmp.as_str()),
        ],
        500,
    );
    r.expect_code(0);
    for line in [
        "anthropic versions: 2.16.0 3.60.0",
        "anthropic create: tool_use text='Let me check.' tool_use=get_weather({'city': 'Paris'})",
        "anthropic tool round trip: end_turn text='It is sunny in Paris.'",
        "anthropic stream: 'It is sunny in Paris.' end_turn",
        "anthropic count_tokens: True",
        "anthropic beta create: text='It is sunny in Paris.'",
        "anthropic models.list: True",
        "anthropic models.retrieve: claude-scripted-1",
        "openai create: tool_calls 'Let me check.' ['get_weather({\"city\":\"Paris\"})']",
        "openai stream: 'Let me check.'",
        "openai responses: 'Let me check.'",
        "openai models.list: True",
        "openai models.retrieve: gpt-scripted-1",
    ] {
        assert!(r.stdout.contains(line), "missing {line:?}\n{r}");
    }
    // The guest's environment (printed last) has placeholders, not the key.
    assert!(
        r.stdout.contains("ANTHROPIC_API_KEY=airlock-placeholder"),
        "{r}"
    );
    assert!(!r.stdout.contains(&key) && !r.stderr.contains(&key), "{r}");
    // Each call reached the upstream, with the real key added on the host.
    let reqs = up.requests();
    let seen: Vec<String> = reqs
        .iter()
        .map(|q| {
            format!(
                "{} {}",
                q["method"].as_str().unwrap_or(""),
                q["target"].as_str().unwrap_or("")
            )
        })
        .collect();
    for want in [
        "POST /v1/messages",
        "POST /v1/messages/count_tokens",
        "GET /v1/models",
        "GET /v1/models/claude-scripted-1",
        "POST /v1/chat/completions",
        "POST /v1/responses",
        "GET /v1/models/gpt-scripted-1",
    ] {
        assert!(
            seen.iter().any(|s| s == want),
            "no {want} upstream: {seen:#?}"
        );
    }
    assert_eq!(reqs.len(), 12, "{seen:#?}");
    assert!(reqs.iter().all(|q| q["status"] == 200), "{reqs:#?}");
    assert!(reqs.iter().all(|q| q["key"] == key.as_str()), "{reqs:#?}");
    // The beta call kept its anthropic-beta header.
    assert!(
        reqs.iter()
            .any(|q| q["headers"].as_array().is_some_and(|h| h
                .iter()
                .any(|h| h[0] == "anthropic-beta" && h[1] == "context-management-2025-06-27"))),
        "{reqs:#?}"
    );
    // Every call is in the audit log, none refused.
    let records = audit_records(&audit_log_of(&r));
    let calls = fields_of_kind(&records, "model.call");
    assert_eq!(calls.len(), 12, "{calls:#?}");
    assert!(fields_of_kind(&records, "model.denied").is_empty(), "{r}");
}
