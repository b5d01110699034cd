//! A hostile agent against the model proxy, end to end: a real microVM
//! (the tcg engine, image mode) whose agent talks to the in-guest model
//! endpoint, the host's proxy and the scripted local upstream
//! (`airlock-upstream`), which logs every request it gets.
//!
//! - Many calls at once cannot spend more than `--model-max-tokens`: each
//!   call in flight holds its output cap (times OpenAI's `n`).
//! - An upstream that reflects the request (`airlock-upstream --reflect`)
//!   never shows the agent the key: the proxy masks it in the headers and
//!   the streamed body.
//! - With both keys set and an Anthropic-only upstream, the OpenAI key
//!   never reaches it and OpenAI calls are refused naming the flag.

use std::path::Path;

use airlock_e2e::{
    audit_records as records, bin, fields_of_kind as of_kind, rel, run_env, scratch, secret_key,
    Run, Upstream,
};

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Checks the log with `airlock audit verify`.
fn verify(path: &Path) {
    let airlock = bin("airlock");
    let p = path.to_str().expect("utf-8");
    run_env(&[airlock.as_str(), "audit", "verify", p], &[], 60).expect_code(0);
}

/// The `prefix` lines of stdout, the prefix removed.
fn lines<'a>(r: &'a Run, prefix: &str) -> Vec<&'a str> {
    r.stdout
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(str::trim_end)
        .collect()
}

/// Python in the guest: `call(method, path, headers, body)` through the
/// in-guest endpoint with http.client, returning `(status, headers, body)`.
const PY_PRELUDE: &str = r#"
import http.client, json, os, sys, threading, time
BASE = os.environ["ANTHROPIC_BASE_URL"]
HOSTPORT = BASE.split("//", 1)[1].rstrip("/")
def call(method, path, headers=None, body=None):
    c = http.client.HTTPConnection(HOSTPORT, timeout=300)
    data = json.dumps(body).encode() if body is not None else b""
    h = dict(headers or {})
    h["content-length"] = str(len(data))
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    out = r.read()
    c.close()
    return r.status, r.getheaders(), out
ANTHROPIC = {"content-type": "application/json", "anthropic-version": "2023-06-01",
             "x-api-key": os.environ.get("ANTHROPIC_API_KEY", "")}
OPENAI = {"content-type": "application/json",
          "authorization": "Bearer " + os.environ.get("OPENAI_API_KEY", "")}
"#;

/// Twelve streamed calls at once under `--model-max-tokens 2000`, eight
/// Anthropic calls asking for 400 tokens and four OpenAI calls asking for
/// 300 with n = 2 (4 400 tokens of output asked in all): the calls overlap
/// at the upstream, yet the output caps it received (times n) add up to no
/// more than the budget, and so does the output it reported; the others
/// get the API's 429, and the audit log records each call's reservation.
#[test]
fn tcg_concurrent_calls_cannot_exceed_the_token_budget() {
    const BUDGET: u64 = 2000;
    let dir = scratch("hostile-budget");
    let script = dir.join("script.json");
    // A long reply (about 1 500 tokens): every call would use its whole cap.
    write(
        &script,
        r#"{"turns":[{"text":"A long reply: ","filler":6000}]}"#,
    );
    let (akey, okey) = (secret_key("ant-budget"), secret_key("oai-budget"));
    // Events 250 ms apart: each call lasts about three seconds, so calls
    // started together overlap even on a slow machine.
    let upstream = Upstream::start(&script, &dir, &["--delay-ms", "250"]);
    let audit = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let py = format!(
        "{PY_PRELUDE}{}",
        r#"
start = threading.Barrier(12)
results = [None] * 12
def worker(i):
    start.wait()
    if i % 3 == 0:
        body = {"model": "gpt-scripted-1", "stream": True, "n": 2, "max_completion_tokens": 300,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"call {i}"}]}
        s, _, b = call("POST", "/v1/chat/completions", OPENAI, body)
    else:
        body = {"model": "claude-scripted-1", "stream": True, "max_tokens": 400,
                "messages": [{"role": "user", "content": f"call {i}"}]}
        s, _, b = call("POST", "/v1/messages", ANTHROPIC, body)
    kind = None
    if s != 200:
        e = json.loads(b).get("error", {})
        kind = e.get("type")
    results[i] = (s, kind)
threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
for t in threads:
    t.start()
for t in threads:
    t.join()
for i, (s, kind) in enumerate(results):
    print(f"call {i} status={s} type={kind}", flush=True)
"#
    );
    let url = upstream.url();
    // Two keys, one local gateway serving both APIs: named for both.
    let (for_anthropic, for_openai) = (format!("anthropic={url}"), format!("openai={url}"));
    let r = airlock_e2e::tcg_on_image(
        &[
            "--model-upstream",
            &for_anthropic,
            "--model-upstream",
            &for_openai,
            "--model-max-tokens",
            &BUDGET.to_string(),
            "--audit",
            &rel(&audit),
        ],
        &["python3", "-c", &py],
        &[("ANTHROPIC_API_KEY", &akey), ("OPENAI_API_KEY", &okey)],
        900,
    );
    r.expect_code(0);
    let results = lines(&r, "call ");
    assert_eq!(results.len(), 12, "{r}");
    let ok = results.iter().filter(|l| l.contains("status=200")).count();
    let refused: Vec<&&str> = results
        .iter()
        .filter(|l| !l.contains("status=200"))
        .collect();
    assert!(!refused.is_empty(), "4 400 tokens fit in {BUDGET}?\n{r}");
    for l in &refused {
        assert!(
            l.ends_with("status=429 type=rate_limit_error")
                || l.ends_with("status=429 type=rate_limit_exceeded"),
            "{l}\n{r}"
        );
    }

    let reqs = upstream.requests();
    assert_eq!(reqs.len(), ok, "{reqs:?}");
    // What the upstream was asked for, in all.
    let sent: u64 = reqs
        .iter()
        .map(|q| q["max_tokens"].as_u64().expect("a cap was sent") * q["n"].as_u64().unwrap_or(1))
        .sum();
    assert!(sent <= BUDGET, "{sent} tokens of output asked: {reqs:?}");
    // The calls were in flight together (else this tests nothing new).
    let spans: Vec<(u64, u64)> = reqs
        .iter()
        .map(|q| {
            (
                q["received_ms"].as_u64().expect("received"),
                q["last_event_ms"].as_u64().expect("last event"),
            )
        })
        .collect();
    let overlap = spans
        .iter()
        .map(|(from, _)| spans.iter().filter(|(a, b)| a <= from && from <= b).count())
        .max()
        .unwrap_or(0);
    assert!(overlap >= 2, "the calls did not overlap: {spans:?}");

    let recs = records(&audit);
    verify(&audit);
    let calls = of_kind(&recs, "model.call");
    assert_eq!(calls.len(), ok, "{calls:?}");
    // What the run was charged: the usage reported, or a call's whole
    // reservation where none was.
    let charged: u64 = calls
        .iter()
        .map(|c| c["charged"]["output"].as_u64().expect("charged output"))
        .sum();
    assert!(charged <= BUDGET, "{charged} output tokens charged");
    let output: u64 = calls
        .iter()
        .map(|c| c["output_tokens"].as_u64().unwrap_or(0))
        .sum();
    assert!(output <= BUDGET, "{output} output tokens reported");
    let reserved: u64 = calls
        .iter()
        .map(|c| c["reserved"]["output"].as_u64().expect("reserved"))
        .sum();
    assert_eq!(reserved, sent, "the reservations are what was sent");
    for c in calls.iter().filter(|c| c["api"] == "openai") {
        assert_eq!(c["reserved"]["n"], 2, "{c}");
    }
    let denied = of_kind(&recs, "model.denied");
    assert_eq!(denied.len(), refused.len());
    assert!(
        denied.iter().all(|d| d["reason"] == "token_budget"),
        "{denied:?}"
    );
}

/// An upstream that reflects the request (`airlock-upstream --reflect`,
/// reached as `--model-upstream anthropic=URL` with both keys set): the
/// agent reads every response header and the whole streamed and whole
/// JSON body, and finds the mask where the key was, never the key; the
/// user is warned and the audit log counts the scrub. The OpenAI key never
/// reaches this Anthropic-only upstream: OpenAI calls get a 403 naming
/// the flag that would route them.
#[test]
fn tcg_a_reflecting_upstream_never_shows_the_key_to_the_guest() {
    let dir = scratch("hostile-reflect");
    let script = dir.join("script.json");
    write(&script, r#"{"turns":[{"text":"Here is what you sent."}]}"#);
    let (akey, okey) = (secret_key("ant-reflect"), secret_key("oai-reflect"));
    let upstream = Upstream::start(&script, &dir, &["--reflect", "--key", &akey]);
    let audit = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let py = format!(
        "{PY_PRELUDE}{}",
        r#"
MSG = {"model": "claude-scripted-1", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
for name, body in [("stream", dict(MSG, stream=True)), ("whole", MSG)]:
    s, headers, b = call("POST", "/v1/messages", ANTHROPIC, body)
    print(f"{name} status={s}", flush=True)
    for k, v in headers:
        print(f"{name} header {k}: {v}", flush=True)
    # repr: one line, printable ASCII (a key among it) as it is.
    print(f"{name} body {b!r}", flush=True)
    if name == "stream":
        text = ""
        for line in b.split(b"\n"):
            if line.startswith(b"data:"):
                text += json.loads(line[5:]).get("delta", {}).get("text", "")
        print("stream text " + json.dumps(text), flush=True)
s, _, b = call("POST", "/v1/chat/completions", OPENAI,
               {"model": "gpt-scripted-1", "messages": [{"role": "user", "content": "hi"}]})
e = json.loads(b)["error"]
print(f"openai status={s} code={e.get('code')}", flush=True)
print("openai message=" + e["message"], flush=True)
s, _, b = call("GET", "/v1/models", OPENAI)
print(f"models status={s}", flush=True)
"#
    );
    let url = upstream.url();
    let anthropic_only = format!("anthropic={url}");
    let r = airlock_e2e::tcg_on_image(
        &["--model-upstream", &anthropic_only, "--audit", &rel(&audit)],
        &["python3", "-c", &py],
        &[("ANTHROPIC_API_KEY", &akey), ("OPENAI_API_KEY", &okey)],
        900,
    );
    r.expect_code(0);
    for key in [&akey, &okey] {
        let lower = key.to_ascii_lowercase();
        assert!(
            !r.stdout.to_ascii_lowercase().contains(&lower),
            "the guest saw a key\n{r}"
        );
        assert!(!r.stderr.contains(key.as_str()), "{r}");
    }
    let mask = "AIRLOCK-SCRUBBED-";
    for name in ["stream", "whole"] {
        assert_eq!(lines(&r, &format!("{name} status=")), ["200"], "{r}");
        let echoed: Vec<&str> = lines(&r, &format!("{name} header "))
            .into_iter()
            .filter(|h| {
                h.to_ascii_lowercase()
                    .starts_with("anthropic-echo-x-api-key: ")
            })
            .collect();
        assert_eq!(echoed.len(), 1, "the key header was not echoed\n{r}");
        assert!(echoed[0].contains(mask), "{}", echoed[0]);
        let body = lines(&r, &format!("{name} body ")).join("\n");
        assert!(body.contains("You sent: POST /v1/messages"), "{r}");
        assert!(body.contains(mask), "no mask in the {name} body\n{r}");
    }
    // The streamed text, put together as the agent would, shows the mask
    // exactly where the key was.
    let text: String = lines(&r, "stream text ")
        .first()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_else(|| panic!("no stream text\n{r}"));
    let want: String = mask.chars().cycle().take(akey.len()).collect();
    assert!(
        text.contains(&format!("x-api-key: {want}\n")),
        "{text}\n{r}"
    );
    assert_eq!(
        lines(&r, "openai status="),
        ["403 code=no_upstream_for_api"],
        "{r}"
    );
    let message = lines(&r, "openai message=").join("");
    assert!(message.contains("--model-upstream openai=URL"), "{r}");
    assert_eq!(lines(&r, "models status="), ["403"], "{r}");
    r.expect_stderr("the upstream sent an API key back");

    // What reached the upstream: the Anthropic calls alone, each with the
    // Anthropic key; the OpenAI key nowhere.
    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    for q in &reqs {
        assert_eq!(q["path"], "/v1/messages");
        assert_eq!(q["key"], akey.as_str());
        assert_eq!(q["status"], 200);
    }
    let log = std::fs::read_to_string(&upstream.log).expect("upstream log");
    assert!(!log.contains(&okey), "the OpenAI key reached the upstream");

    let recs = records(&audit);
    verify(&audit);
    let calls = of_kind(&recs, "model.call");
    assert_eq!(calls.len(), 2, "{calls:?}");
    for c in &calls {
        let scrubbed = &c["scrubbed"];
        assert!(
            scrubbed["headers"].as_u64().is_some_and(|n| n >= 1)
                && scrubbed["body"].as_u64().is_some_and(|n| n >= 1),
            "{c}"
        );
    }
    let denied = of_kind(&recs, "model.denied");
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert!(denied
        .iter()
        .all(|d| d["reason"] == "no_upstream_for_api" && d["api"] == "openai"));
    let model = &of_kind(&recs, "run.start")[0]["policy"]["model"];
    assert_eq!(model["anthropic_upstream"], url.as_str(), "{model}");
    assert!(model["openai_upstream"].is_null(), "{model}");
    let text = std::fs::read_to_string(&audit).expect("audit");
    assert!(!text.contains(&akey) && !text.contains(&okey));
}
