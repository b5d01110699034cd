//! The audit log of `airlock run`, end to end: a real microVM runs, and the
//! log it leaves is checked as a user would check it (`airlock audit verify`
//! and `airlock audit show`) and by reading its records. Each behaviour is
//! checked on the tcg engine on this host; one run goes through our VMM (the
//! kvm engine) inside the nested test bed.
//!
//! The guest's `sh` is busybox, which runs its applets in-process for a bare
//! name (`ls`): the kernel sees no exec then, so the commands name `/bin/ls`
//! and `/bin/true` to make real execs.

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use airlock_e2e::{
    audit_records as records, bin, build_file, rel, root, run, run_env, scratch, sha256_hex,
    testbed, Run,
};
use serde_json::Value;

/// The command of the clean-run tests.
const CLEAN: &str = "echo hi; /bin/ls /";

/// `airlock run --engine tcg [OPTS] -- CMD...` on this host.
fn tcg(opts: &[&str], cmd: &[&str], env: &[(&str, &str)], timeout_s: u32) -> Run {
    let airlock = bin("airlock");
    let mut argv = vec![airlock.as_str(), "run", "--engine", "tcg"];
    argv.extend_from_slice(opts);
    argv.push("--");
    argv.extend_from_slice(cmd);
    run_env(&argv, env, timeout_s)
}

/// `airlock audit ARGS...`.
fn audit(args: &[&str]) -> Run {
    let airlock = bin("airlock");
    let mut argv = vec![airlock.as_str(), "audit"];
    argv.extend_from_slice(args);
    run(&argv, 60)
}

fn kind(r: &Value) -> &str {
    r["kind"].as_str().unwrap_or_default()
}

fn source(r: &Value) -> &str {
    r["source"].as_str().unwrap_or_default()
}

fn show(records: &[Value]) -> String {
    records
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

fn sha256_of(path: &str) -> String {
    let bytes = std::fs::read(root().join(path)).expect("read");
    sha256_hex(&bytes)
}

/// Whether `r` is the guest's record of an exec of `ls`.
fn is_ls_exec(r: &Value) -> bool {
    let fields = &r["fields"];
    let argv0 = fields["argv"]
        .as_str()
        .and_then(|a| a.split_whitespace().next())
        .unwrap_or_default();
    kind(r) == "exec"
        && source(r) == "guest"
        && (argv0.rsplit('/').next() == Some("ls") || fields["comm"] == "ls")
}

/// What every clean run of [`CLEAN`] must have left in its log.
fn check_clean_log(records: &[Value], engine: &str) {
    let all = show(records);
    let first = &records[0];
    assert_eq!(kind(first), "run.start", "{all}");
    assert_eq!(source(first), "host");
    let start = &first["fields"];
    assert_eq!(
        start["kernel"]["sha256"],
        sha256_of(&build_file("vmlinux")),
        "{all}"
    );
    assert_eq!(
        start["initrd"]["sha256"],
        sha256_of(&build_file("initramfs.cpio"))
    );
    assert!(start["init"]["sha256"].is_string(), "{all}");
    assert_eq!(start["policy"]["engine"], engine);
    assert_eq!(
        start["spec"]["argv"],
        serde_json::json!(["sh", "-c", CLEAN])
    );
    assert_eq!(start["spec"]["cwd"], "/");

    let kinds: Vec<(&str, &str)> = records.iter().map(|r| (kind(r), source(r))).collect();
    for want in [
        ("vm.start", "host"),
        ("control.accepted", "host"),
        ("session.hello", "host"),
        ("process.start", "guest"),
        ("process.exit", "guest"),
        ("command.exit", "guest"),
        ("vm.exit", "host"),
    ] {
        assert!(kinds.contains(&want), "no {want:?} record\n{all}");
    }
    assert!(
        records.iter().any(is_ls_exec),
        "no guest exec record for ls\n{all}"
    );
    let exit = records
        .iter()
        .find(|r| kind(r) == "command.exit")
        .expect("command.exit");
    assert_eq!(exit["fields"]["exited"], 0, "{all}");
    let n = records.len();
    let end = &records[n - 2];
    assert_eq!(kind(end), "run.end", "{all}");
    assert_eq!(end["fields"]["how"], "exited");
    assert_eq!(end["fields"]["exit_code"], 0);
    assert_eq!(kind(&records[n - 1]), "run.seal");
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], i, "{all}");
    }
}

// ---- tcg engine, on this host ----

#[test]
fn tcg_a_clean_run_leaves_a_log_that_verifies_and_shows() {
    let dir = scratch("audit-clean");
    let log = dir.join("run.jsonl");
    let r = tcg(&["--audit", &rel(&log)], &["sh", "-c", CLEAN], &[], 300);
    r.expect_code(0)
        .expect_stdout_line("hi")
        .expect_stdout_line("bin");
    let last = r.stderr.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        format!("airlock: audit log: {}", log.display()),
        "the audit log is named last\n{r}"
    );
    check_clean_log(&records(&log), "tcg");

    let v = audit(&["verify", &rel(&log)]);
    v.expect_code(0);
    assert!(v.stdout.starts_with("intact: "), "{v}");

    let s = audit(&["show", &rel(&log)]);
    s.expect_code(0);
    let lines: Vec<&str> = s.stdout.lines().collect();
    assert_eq!(lines.len(), records(&log).len(), "{s}");
    assert!(
        lines[0].contains("+0.000s") && lines[0].contains("run.start"),
        "{s}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("guest") && l.contains("exec") && l.contains("ls")),
        "{s}"
    );
    assert!(s.stdout.contains("run.end"), "{s}");
    let j = audit(&["show", "--json", &rel(&log)]);
    j.expect_code(0);
    assert_eq!(
        j.stdout,
        std::fs::read_to_string(&log).expect("read"),
        "--json prints the records as written"
    );
}

#[test]
fn tcg_edits_to_a_log_are_found() {
    let dir = scratch("audit-edit");
    let log = dir.join("run.jsonl");
    tcg(&["--audit", &rel(&log)], &["sh", "-c", "exit 3"], &[], 300).expect_code(3);
    audit(&["verify", &rel(&log)]).expect_code(0);
    let text = std::fs::read_to_string(&log).expect("read");
    let lines: Vec<&str> = text.lines().collect();

    // The guest "exited 3" rewritten as 0.
    let edited = text.replacen("\"exited\":3", "\"exited\":0", 1);
    assert_ne!(edited, text);
    let bad = dir.join("edited.jsonl");
    std::fs::write(&bad, edited).expect("write");
    let v = audit(&["verify", &rel(&bad)]);
    v.expect_code(1);
    assert!(v.stdout.starts_with("NOT INTACT"), "{v}");
    assert!(
        v.stdout.contains("prev does not match sha256 of record"),
        "{v}"
    );

    // A record removed.
    let mut removed = lines.clone();
    removed.remove(2);
    std::fs::write(&bad, removed.join("\n") + "\n").expect("write");
    let v = audit(&["verify", &rel(&bad)]);
    v.expect_code(1);
    assert!(v.stdout.contains("record 2 (line 3): seq is 3"), "{v}");
}

#[test]
fn tcg_a_guest_flood_cannot_grow_the_log_beyond_the_cap() {
    let dir = scratch("audit-flood");
    let log = dir.join("run.jsonl");
    let r = tcg(
        &["--audit", &rel(&log), "--audit-max-guest-events", "50"],
        &[
            "sh",
            "-c",
            "for i in $(seq 1 2000); do /bin/true; done; echo done",
        ],
        &[],
        600,
    );
    r.expect_code(0).expect_stdout_line("done");
    let records = records(&log);
    let all = show(&records);
    // The guest's AuditEvents (not the protocol's exit status).
    let events = records
        .iter()
        .filter(|r| source(r) == "guest" && !kind(r).starts_with("command."))
        .count();
    assert!(events <= 50, "{events} guest records\n{all}");
    let overflow: Vec<&Value> = records
        .iter()
        .filter(|r| kind(r) == "audit.overflow")
        .collect();
    assert_eq!(overflow.len(), 1, "{all}");
    assert_eq!(source(overflow[0]), "host");
    assert!(
        overflow[0]["fields"]["dropped_records"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{all}"
    );
    // Bounded: a few dozen lines, not thousands.
    assert!(records.len() < 80, "{} records\n{all}", records.len());
    audit(&["verify", &rel(&log)]).expect_code(0);
}

#[test]
fn tcg_a_killed_run_leaves_a_log_that_verifies_up_to_its_last_record() {
    let dir = scratch("audit-kill");
    let log = dir.join("run.jsonl");
    let mut child = Command::new(root().join(bin("airlock")))
        .args(["run", "--engine", "tcg", "--timeout", "120", "--audit"])
        .arg(&log)
        .args(["--", "sh", "-c", "sleep 1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn airlock");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let lines = std::fs::read_to_string(&log)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the log never had 2 records");
        thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");

    let complete = records(&log);
    let v = audit(&["verify", &rel(&log)]);
    v.expect_code(1);
    assert!(v.stdout.contains("truncated: no run.end record"), "{v}");
    let good = complete.len() - 1;
    assert!(
        v.stdout.contains(&format!(
            "intact through record {good} (line {}, {})",
            good + 1,
            kind(&complete[good])
        )),
        "{v}\n{}",
        show(&complete)
    );
}

#[test]
fn tcg_a_signed_log_verifies_only_with_its_key() {
    let dir = scratch("audit-key");
    let key = dir.join("audit.key");
    let other = dir.join("other.key");
    audit(&["keygen", &rel(&key)]).expect_code(0);
    audit(&["keygen", &rel(&other)]).expect_code(0);
    // Never overwritten.
    audit(&["keygen", &rel(&key)]).expect_code(2);
    let log = dir.join("run.jsonl");
    tcg(
        &["--audit", &rel(&log), "--audit-key", &rel(&key)],
        &["true"],
        &[],
        300,
    )
    .expect_code(0);
    let v = audit(&["verify", &rel(&log), "--key", &format!("{}.pub", rel(&key))]);
    v.expect_code(0);
    assert!(
        v.stdout.contains("signature: valid, by the --key given"),
        "{v}"
    );
    let v = audit(&[
        "verify",
        &rel(&log),
        "--key",
        &format!("{}.pub", rel(&other)),
    ]);
    v.expect_code(1);
    assert!(v.stdout.contains("signature invalid"), "{v}");
}

#[test]
fn tcg_the_default_log_goes_under_the_state_directory() {
    let dir = scratch("audit-default");
    let state = dir.join("state");
    let r = tcg(
        &[],
        &["true"],
        &[("XDG_STATE_HOME", state.to_str().expect("utf-8"))],
        300,
    );
    r.expect_code(0);
    let logs: Vec<_> = std::fs::read_dir(state.join("airlock/audit"))
        .expect("the audit directory")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let name = logs[0].file_name().and_then(|n| n.to_str()).unwrap_or("");
    assert!(name.ends_with(".jsonl"), "{name}");
    r.expect_stderr(&format!("airlock: audit log: {}", logs[0].display()));
    audit(&["verify", &logs[0].display().to_string()]).expect_code(0);
}

#[test]
fn audit_usage_errors() {
    let dir = scratch("audit-usage");
    audit(&["verify", &rel(&dir.join("missing.jsonl"))])
        .expect_code(2)
        .expect_stderr("cannot read the audit log");
    audit(&["verify"]).expect_code(2);
    // An existing file is never written over, and nothing starts.
    let existing = dir.join("existing.jsonl");
    std::fs::write(&existing, "keep me\n").expect("write");
    let airlock = bin("airlock");
    run(
        &[
            &airlock,
            "run",
            "--engine",
            "tcg",
            "--audit",
            &rel(&existing),
            "--",
            "true",
        ],
        60,
    )
    .expect_code(2)
    .expect_stderr("cannot create the audit log");
    assert_eq!(
        std::fs::read_to_string(&existing).expect("read"),
        "keep me\n"
    );
}

// ---- kvm engine (our VMM), in the nested test bed ----

#[test]
fn kvm_a_clean_run_leaves_a_log_that_verifies() {
    let dir = scratch("audit-kvm");
    let log = rel(&dir.join("run.jsonl"));
    let airlock = bin("airlock");
    let script = format!(
        "{airlock} run --engine kvm --audit {log} -- sh -c '{CLEAN}' && {airlock} audit verify {log}"
    );
    let r = testbed(&["sh", "-c", &script], 600);
    r.expect_code(0)
        .expect_stdout_line("hi")
        .expect_stderr("engine: kvm");
    assert!(r.stdout.contains("intact: "), "{r}");
    check_clean_log(&records(&root().join(&log)), "kvm");
}
