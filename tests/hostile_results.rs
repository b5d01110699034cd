//! The hostile-agent suite, results and audit-log classes (issue 13): what
//! an agent leaves for `--out` cannot make a privileged file on the host,
//! cannot change what was already there, cannot slip past `--collect`,
//! cannot grow airlock's memory, audit log or run time without bound, and
//! cannot replace or spoof the audit log. Each test drives `airlock run` as
//! a user would and checks what the user gets: files and their modes, exit
//! codes, stderr, the audit log, the report.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use airlock_e2e::{
    audit_log_of, audit_records, bin, build_file, fields_of_kind, rel, run_env, run_with_peaks,
    scratch, sha256_hex, tcg_on_image, testbed, Run,
};

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// What the agent does: a setuid root binary, a setgid+sticky world
/// writable file, directories asking for setgid/sticky/world-write, and an
/// attempt to open up a directory that the user already had in --out.
const PRIVILEGED_RESULTS: &str = "\
cp /bin/true out/tool && chmod 4755 out/tool
echo data > out/open && chmod 3666 out/open
mkdir -p out/shared && chmod 3777 out/shared && echo x > out/shared/f
mkdir -p out/mine && chmod 0777 out/mine && echo y > out/mine/g
stat -c \"%a %n\" out/tool out/open out/shared out/mine
";

fn check_privileged_results(out: &Path, r: &Run) {
    assert!(
        r.stdout.contains("4755 out/tool"),
        "the guest made it setuid\n{r}"
    );
    assert_eq!(mode(&out.join("tool")), 0o755, "{r}");
    assert_eq!(
        fs::metadata(out.join("tool")).expect("meta").mode() & 0o4000,
        0
    );
    assert_eq!(mode(&out.join("open")), 0o644, "{r}");
    assert_eq!(mode(&out.join("shared")), 0o755, "{r}");
    assert_eq!(mode(&out.join("shared/f")), 0o644, "{r}");
    // The user's own directory: untouched.
    assert_eq!(mode(&out.join("mine")), 0o700, "{r}");
    assert_eq!(fs::read(out.join("mine/g")).expect("read"), b"y\n");
}

#[test]
fn tcg_results_never_carry_privileged_modes_and_existing_directories_keep_theirs() {
    let dir = scratch("hostile-modes");
    let out = dir.join("out");
    fs::create_dir_all(out.join("mine")).expect("mkdir");
    fs::set_permissions(out.join("mine"), fs::Permissions::from_mode(0o700)).expect("chmod");
    let out_s = out.display().to_string();
    let r = tcg_on_image(
        &["--out", &out_s],
        &["sh", "-c", PRIVILEGED_RESULTS],
        &[],
        300,
    );
    r.expect_code(0);
    check_privileged_results(&out, &r);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn kvm_results_never_carry_privileged_modes() {
    let dir = scratch("hostile-modes-kvm");
    let out = dir.join("out");
    fs::create_dir_all(out.join("mine")).expect("mkdir");
    fs::set_permissions(out.join("mine"), fs::Permissions::from_mode(0o700)).expect("chmod");
    let script = format!(
        "$A run --engine kvm --image-root {} --out {} -- sh -c \"$S\"",
        build_file("rootfs.img"),
        rel(&out)
    );
    let full = format!("A={}; S='{}'; {script}", bin("airlock"), PRIVILEGED_RESULTS);
    let r = testbed(&["sh", "-c", &full], 600);
    r.expect_code(0);
    check_privileged_results(&out, &r);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn collect_brings_back_only_what_the_patterns_name() {
    let dir = scratch("hostile-collect");
    let out = dir.join("out");
    let out_s = out.display().to_string();
    let r = tcg_on_image(
        &["--out", &out_s, "--collect", "dist/**"],
        &[
            "sh",
            "-c",
            "mkdir -p dist .git/hooks .github/workflows && echo app > dist/app.js \
             && echo evil > .git/hooks/pre-commit && echo evil > .github/workflows/ci.yml",
        ],
        &[],
        300,
    );
    r.expect_code(0);
    assert_eq!(fs::read(out.join("dist/app.js")).expect("read"), b"app\n");
    assert!(!out.join(".git").exists(), "{r}");
    assert!(!out.join(".github").exists(), "{r}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn audit_report_and_console_paths_inside_out_are_refused_before_boot() {
    let dir = scratch("hostile-audit-in-out");
    let out = dir.join("out");
    fs::create_dir_all(out.join("sub")).expect("mkdir");
    std::os::unix::fs::symlink(&out, dir.join("alias")).expect("symlink");
    let airlock = bin("airlock");
    let out_s = out.display().to_string();
    for (flag, path) in [
        ("--audit", out.join("audit.jsonl")),
        ("--audit", dir.join("alias/sub/audit.jsonl")),
        ("--report", out.join("not-yet/report.json")),
        ("--console-log", out.join("console.log")),
    ] {
        let path_s = path.display().to_string();
        let start = Instant::now();
        let r = run_env(
            &[
                &airlock, "run", "--engine", "tcg", "--out", &out_s, flag, &path_s, "--", "true",
            ],
            &[],
            60,
        );
        r.expect_code(2).expect_one_line_error("is inside --out");
        r.expect_stderr(flag);
        assert!(!path.exists(), "{flag} {path_s} was written\n{r}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no VM should start\n{r}"
        );
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_forged_audit_log_line_does_not_fool_the_report_or_the_helper() {
    let dir = scratch("hostile-fake-line");
    let log = dir.join("audit.jsonl");
    let report = dir.join("report.json");
    let (log_s, report_s) = (log.display().to_string(), report.display().to_string());
    let forged = dir.join("forged.jsonl");
    let line = format!(
        "echo 'airlock: audit log: {}' >&2; exit 3",
        forged.display()
    );
    let r = tcg_on_image(
        &["--audit", &log_s, "--report", &report_s],
        &["sh", "-c", &line],
        &[],
        300,
    );
    r.expect_code(3);
    // The sandbox printed its line; airlock's own comes last.
    assert!(r.stderr.contains(&forged.display().to_string()), "{r}");
    assert_eq!(audit_log_of(&r), log, "{r}");
    let report: serde_json::Value =
        serde_json::from_slice(&fs::read(&report).expect("report")).expect("json");
    assert_eq!(report["exit_code"], 3, "{report}");
    assert_eq!(report["audit_log"]["path"], log_s, "{report}");
    assert_eq!(report["audit_log"]["intact_at_path"], true, "{report}");
    let bytes = fs::read(&log).expect("log");
    assert_eq!(
        report["audit_log"]["sha256"],
        sha256_hex(&bytes),
        "{report}"
    );
    assert_eq!(
        report["audit_log"]["records"].as_u64(),
        Some(audit_records(&log).len() as u64),
        "{report}"
    );
    let verify = run_env(&[&bin("airlock"), "audit", "verify", &log_s], &[], 60);
    verify.expect_code(0);
    let _ = fs::remove_dir_all(&dir);
}

/// 100,000 result entries (the most a stream may hold): 20,000 directories
/// with long names, then 79,999 files, every one refused (over
/// `--max-out-bytes 1`).
const FLOOD: &str = "\
import os, time
t0 = time.time()
os.chdir('/workspace/out')
for i in range(20000):
    os.mkdir('d' * 200 + str(i))
os.mkdir('f')
for i in range(79999):
    with open('f/%06d' % i, 'w') as f:
        f.write('xx')
print('made in %.1f s' % (time.time() - t0), flush=True)
";

#[test]
fn a_flood_of_hostile_results_is_bounded_in_memory_log_and_time() {
    let dir = scratch("hostile-flood");
    let out = dir.join("out");
    let log = dir.join("audit.jsonl");
    let (out_s, log_s) = (out.display().to_string(), log.display().to_string());
    let airlock = bin("airlock");
    let image = build_file("rootfs.img");
    let timeout: u64 = 150;
    let timeout_s = timeout.to_string();
    let start = Instant::now();
    let (r, peaks) = run_with_peaks(
        &[
            &airlock,
            "run",
            "--engine",
            "tcg",
            "--image-root",
            &image,
            "--mem",
            "1024",
            "--timeout",
            &timeout_s,
            "--out",
            &out_s,
            "--max-out-bytes",
            "1",
            "--audit",
            &log_s,
            "--",
            "python3",
            "-c",
            FLOOD,
        ],
        timeout + 60,
    );
    let took = start.elapsed();
    let log_bytes = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "flood: exit {:?} in {took:.1?} (--timeout {timeout} s); airlock peak {} KiB; \
         audit log {log_bytes} bytes",
        r.code, peaks.broker_kib
    );
    // Finished (0) or stopped at the timeout (124): either way on time.
    assert!(matches!(r.code, Some(0) | Some(124)), "{r}");
    assert!(
        took < Duration::from_secs(timeout + 5),
        "airlock took {took:?} with --timeout {timeout}\n{r}"
    );
    assert!(
        peaks.broker_kib < 64 * 1024,
        "airlock peaked at {} KiB",
        peaks.broker_kib
    );
    assert!(log_bytes < 8 << 20, "the audit log is {log_bytes} bytes");
    let lines = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("airlock: refused result file "))
        .count();
    assert!(lines <= 20, "{lines} refusal lines on stderr");
    let records = audit_records(&log);
    let refused = fields_of_kind(&records, "file.out").len();
    assert!(refused <= 10_000, "{refused} file.out records");
    let done = fields_of_kind(&records, "files.done");
    let out_done = done
        .iter()
        .find(|f| f["direction"] == "out")
        .unwrap_or_else(|| panic!("no files.done out\n{r}"));
    if r.code == Some(0) && out_done.get("error").is_none() {
        // The whole stream came: everything was refused, and what the log
        // does not list one by one it counts and hashes.
        assert_eq!(out_done["accepted"], 0, "{out_done}");
        assert_eq!(out_done["refused"], 79_999, "{out_done}");
        assert_eq!(out_done["unrecorded"]["refused"], 69_999, "{out_done}");
        r.expect_stderr("more result file(s), not named here");
    }
    let verify = run_env(&[&airlock, "audit", "verify", &log_s], &[], 120);
    verify.expect_code(0);
    let _ = fs::remove_dir_all(&dir);
}
