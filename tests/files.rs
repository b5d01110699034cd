//! `airlock run --workspace DIR --out DIR`: the workspace goes into the
//! guest's /workspace (minus the deny list), and what the command leaves in
//! /workspace/out comes back, byte for byte with its modes; a hostile guest's
//! own connection to the results port is refused and nothing lands outside
//! --out.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use airlock_e2e::{audit_records, bin, fields_of_kind, rel, run_env, scratch, testbed, Run};

/// `airlock run --engine tcg [OPTS] -- CMD...` on this host.
fn tcg(opts: &[&str], cmd: &[&str]) -> Run {
    let airlock = bin("airlock");
    let mut argv = vec![airlock.as_str(), "run", "--engine", "tcg"];
    argv.extend_from_slice(opts);
    argv.push("--");
    argv.extend_from_slice(cmd);
    run_env(&argv, &[], 300)
}

fn write(path: &Path, data: &[u8], mode: u32) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir");
    }
    fs::write(path, data).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o7777
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

const GUEST_SCRIPT: &str = "\
ls -la /workspace /workspace/sub
/workspace/run.sh
cat /workspace/hello.txt
test -e /workspace/.env || echo no-env-here
mkdir -p /workspace/out/sub
echo result > /workspace/out/r.txt
echo deep > /workspace/out/sub/d.txt
printf '#!/bin/sh\\necho x\\n' > /workspace/out/x.sh
chmod 755 /workspace/out/x.sh
chmod 640 /workspace/out/r.txt
";

#[test]
fn tcg_workspace_goes_in_and_results_come_back() {
    let dir = scratch("files-tcg");
    let ws = dir.join("ws");
    let out = dir.join("out");
    write(&ws.join("hello.txt"), b"hello world\n", 0o644);
    write(&ws.join("sub/data.txt"), b"data\n", 0o600);
    write(&ws.join("run.sh"), b"#!/bin/sh\necho script ran\n", 0o755);
    write(&ws.join(".env"), b"SECRET=do-not-leak\n", 0o600);
    let (ws_s, out_s) = (ws.display().to_string(), out.display().to_string());
    let log = dir.join("audit.jsonl");
    let log_s = log.display().to_string();
    let r = tcg(
        &["--workspace", &ws_s, "--out", &out_s, "--audit", &log_s],
        &["sh", "-c", GUEST_SCRIPT],
    );
    r.expect_code(0)
        .expect_stdout_line("script ran")
        .expect_stdout_line("hello world")
        .expect_stdout_line("no-env-here");
    assert!(r.stdout.contains("hello.txt"), "{r}");
    assert!(r.stdout.contains("data.txt"), "{r}");
    assert!(
        r.stdout.contains("-rwxr-xr-x") && r.stdout.contains("run.sh"),
        "{r}"
    );
    assert!(!r.stdout.contains(".env"), "the .env went in\n{r}");
    assert!(!r.stderr.contains("refused"), "{r}");
    assert_eq!(read(&out.join("r.txt")), b"result\n");
    // The host decides results' modes: 0640 in the guest is 0644 here.
    assert_eq!(mode(&out.join("r.txt")), 0o644);
    assert_eq!(read(&out.join("sub/d.txt")), b"deep\n");
    assert_eq!(read(&out.join("x.sh")), b"#!/bin/sh\necho x\n");
    assert_eq!(mode(&out.join("x.sh")), 0o755);
    // The host's record of both transfers: three files and a directory
    // in (the .env denied), three results out, nothing refused.
    let records = audit_records(&log);
    let done = fields_of_kind(&records, "files.done");
    let find = |direction: &str| {
        done.iter()
            .find(|f| f["direction"] == direction)
            .unwrap_or_else(|| panic!("no files.done {direction} in {records:#?}"))
    };
    let sent = find("in");
    assert_eq!(
        (sent["entries"].as_u64(), sent["denied"].as_u64()),
        (Some(4), Some(1)),
        "{sent}"
    );
    assert_eq!(sent["bytes"].as_u64(), Some(12 + 5 + 26), "{sent}");
    let got = find("out");
    assert_eq!(
        (got["accepted"].as_u64(), got["refused"].as_u64()),
        (Some(3), Some(0)),
        "{got}"
    );
    let ports: Vec<u64> = fields_of_kind(&records, "control.accepted")
        .iter()
        .filter_map(|f| f["port"].as_u64())
        .collect();
    assert!(ports.contains(&1025) && ports.contains(&1026), "{ports:?}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn an_unreadable_workspace_is_a_usage_error_before_any_vm() {
    let dir = scratch("files-missing");
    let missing = dir.join("nope").display().to_string();
    tcg(&["--workspace", &missing], &["true"])
        .expect_code(2)
        .expect_stderr("cannot read the workspace");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn an_unreadable_workspace_file_is_a_usage_error_before_any_vm() {
    let dir = scratch("files-unreadable");
    let ws = dir.join("ws");
    write(&ws.join("fine.txt"), b"ok\n", 0o644);
    write(&ws.join("deep/locked.txt"), b"no\n", 0o000);
    let ws_s = ws.display().to_string();
    // airlock without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: even as root
    // it honours the file's mode 000, as any other user's airlock would.
    let airlock = bin("airlock");
    let argv = [
        "setpriv",
        "--bounding-set",
        "-dac_override,-dac_read_search",
        airlock.as_str(),
        "run",
        "--engine",
        "tcg",
        "--workspace",
        &ws_s,
        "--",
        "true",
    ];
    let r = run_env(&argv, &[], 120);
    r.expect_code(2)
        .expect_one_line_error("deep/locked.txt")
        .expect_stderr("Permission denied");
    assert_eq!(
        airlock_e2e::processes_mentioning(&ws_s),
        "",
        "a VM was left running"
    );
    let _ = fs::remove_dir_all(&dir);
}

/// A compromised VM (root in it: `--vm-root`) opens its own connection to
/// the results port and sends hostile files on it. The init opened the
/// results connection before the command started, so the host refuses the
/// forged one (audited, named on stderr) without reading a byte of it, and
/// the command's real result still arrives. (Hostile files on the real
/// stream are refused file by file: the broker's unit tests in
/// broker/src/door/files.rs.)
#[test]
fn tcg_hostile_results_are_refused_and_nothing_escapes_out() {
    let dir = scratch("files-hostile");
    let out = dir.join("out");
    let outside = dir.join("outside");
    fs::create_dir_all(&out).expect("mkdir");
    fs::create_dir_all(&outside).expect("mkdir");
    write(&out.join("keep.txt"), b"original\n", 0o644);
    std::os::unix::fs::symlink(&outside, out.join("out-link")).expect("symlink");
    let passwd_before = read(Path::new("/etc/passwd"));
    let initrd = airlock_e2e::build_file("initramfs-test.cpio");
    let out_s = out.display().to_string();
    let log = dir.join("audit.jsonl");
    let log_s = log.display().to_string();
    let r = tcg(
        &[
            "--initrd",
            &initrd,
            "--vm-root",
            "--out",
            &out_s,
            "--max-out-bytes",
            "1000",
            "--audit",
            &log_s,
        ],
        &["airlock-hostile", "results"],
    );
    r.expect_code(0)
        .expect_stdout_line("hostile: results sent")
        .expect_stderr("airlock: refused extra connection 1 to file port 1026");
    // Not a byte of the forged stream was read: no file of it was even
    // looked at.
    assert!(!r.stderr.contains("refused result file"), "{r}");
    let records = audit_records(&log);
    let refused: Vec<_> = fields_of_kind(&records, "control.refused")
        .into_iter()
        .filter(|f| f["port"] == 1026)
        .collect();
    assert_eq!(refused.len(), 1, "{records:#?}");
    let accepted = fields_of_kind(&records, "control.accepted")
        .into_iter()
        .filter(|f| f["port"] == 1026)
        .count();
    assert_eq!(accepted, 1, "{records:#?}");
    // The real results: the one file the command wrote, and nothing else.
    let done = fields_of_kind(&records, "files.done");
    let got = done
        .iter()
        .find(|f| f["direction"] == "out")
        .unwrap_or_else(|| panic!("no files.done out in {records:#?}"));
    assert_eq!(
        (got["accepted"].as_u64(), got["refused"].as_u64()),
        (Some(1), Some(0)),
        "{got}"
    );
    assert_eq!(read(&out.join("real.txt")), b"real result\n");
    assert_eq!(read(&out.join("keep.txt")), b"original\n");
    assert_eq!(read(Path::new("/etc/passwd")), passwd_before);
    assert_eq!(fs::read_dir(&outside).expect("ls").count(), 0, "{r}");
    // Nothing next to --out but what the test made.
    let mut beside: Vec<_> = fs::read_dir(&dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert_eq!(beside, ["audit.jsonl", "out", "outside"], "{r}");
    // Inside --out: the real result, the untouched ones, no temporaries,
    // nothing of the forged stream (good.txt).
    let mut inside: Vec<_> = fs::read_dir(&out)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    inside.sort();
    assert_eq!(inside, ["keep.txt", "out-link", "real.txt"], "{r}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn kvm_workspace_in_and_results_out() {
    let dir = scratch("files-kvm");
    let ws = dir.join("ws");
    let out = dir.join("out");
    write(&ws.join("a.txt"), b"through kvm\n", 0o644);
    let script = format!(
        "$A run --engine kvm --workspace {} --out {} -- sh -c \
         'cat /workspace/a.txt; cp /workspace/a.txt /workspace/out/b.txt'",
        rel(&ws),
        rel(&out)
    );
    let full = format!("A={}; {script}", bin("airlock"));
    let r = testbed(&["sh", "-c", &full], 600);
    r.expect_code(0).expect_stdout_line("through kvm");
    assert_eq!(read(&out.join("b.txt")), b"through kvm\n", "{r}");
    let _ = fs::remove_dir_all(&dir);
}
