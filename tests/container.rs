//! The agent's container beyond the default one: `--image FILE` (an OCI or
//! docker image archive loaded offline in the VM), `--nested` (podman
//! inside the agent's container), `--collect PATTERN` (results chosen by
//! pattern), and the bad input around them. On the tcg engine on this host
//! and, for the image archive, through our own VMM's two virtio-blk disks in
//! the nested test bed.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use airlock_e2e::{
    audit_log_of, audit_records, bin, build_file, fields_of_kind, processes_mentioning, rel, root,
    scratch, sha256_hex, testbed, Run,
};

/// `airlock run --engine tcg --image-root build/rootfs.img [OPTS] -- CMD...`.
fn tcg(opts: &[&str], cmd: &[&str]) -> Run {
    airlock_e2e::tcg_on_image(opts, cmd, &[], 300)
}

/// A tiny root filesystem: Debian's static busybox as /bin/sh and friends,
/// and a marker file /hello.
fn busybox_rootfs(dir: &Path, marker: &str) -> PathBuf {
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(rootfs.join("bin")).expect("mkdir");
    fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
    for applet in ["sh", "cat", "echo", "ls", "test", "id"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).expect("symlink");
    }
    fs::write(rootfs.join("hello"), format!("{marker}\n")).expect("write");
    rootfs
}

/// A docker archive of `rootfs` tagged `tag` (tests/fixtures/image_archive.py).
fn image_archive(rootfs: &Path, tag: &str, out: &Path) {
    let status = Command::new("python3")
        .arg(root().join("tests/fixtures/image_archive.py"))
        .args([rootfs.as_os_str(), tag.as_ref(), out.as_os_str()])
        .status()
        .expect("run image_archive.py");
    assert!(status.success(), "image_archive.py failed");
}

/// The `run.start` record of the audit log named on `r`'s stderr.
fn run_start(r: &Run) -> serde_json::Value {
    let path = audit_log_of(r);
    fields_of_kind(&audit_records(&path), "run.start")
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no run.start record in {}", path.display()))
}

#[test]
fn tcg_the_command_runs_in_the_image_from_the_archive() {
    let dir = scratch("container-archive");
    let rootfs = busybox_rootfs(&dir, "from the archive");
    let archive = dir.join("agent.tar");
    image_archive(&rootfs, "localhost/agent:1", &archive);
    let ws = dir.join("ws");
    fs::create_dir_all(&ws).expect("mkdir");
    fs::write(ws.join("in.txt"), b"workspace file\n").expect("write");
    let (archive_s, ws_s) = (archive.display().to_string(), ws.display().to_string());
    // The image's own entrypoint is /bin/false: the command runs as given.
    let r = tcg(
        &["--image", &archive_s, "--workspace", &ws_s],
        &[
            "sh",
            "-c",
            "cat /hello; cat /workspace/in.txt; test -e /usr/bin/podman || echo no-podman-here; \
             test -e /etc/debian_version || echo not-debian; exit 3",
        ],
    );
    r.expect_code(3)
        .expect_stdout_line("from the archive")
        .expect_stdout_line("workspace file")
        .expect_stdout_line("no-podman-here")
        .expect_stdout_line("not-debian");
    let start = run_start(&r);
    let image = &start["container_image"];
    assert_eq!(image["format"], "docker-archive", "{start}");
    assert_eq!(
        image["sha256"].as_str(),
        Some(sha256_hex(&fs::read(&archive).expect("read")).as_str()),
        "{start}"
    );
    assert_eq!(
        start["policy"]["boot_cmdline"]
            .as_array()
            .map(|w| w.iter().any(|w| w == "airlock.archive=1")),
        Some(true),
        "{start}"
    );
}

#[test]
fn tcg_podman_runs_a_locally_imported_image_inside_the_agent_container() {
    let dir = scratch("container-nested");
    let rootfs = busybox_rootfs(&dir, "hello from the nested container");
    let ws = dir.join("ws");
    fs::create_dir_all(&ws).expect("mkdir");
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(ws.join("rootfs.tar"))
        .arg(".")
        .status()
        .expect("tar");
    assert!(tar.success());
    let ws_s = ws.display().to_string();
    let script = "podman import -q /workspace/rootfs.tar localhost/inner >/dev/null \
                  && podman run --rm localhost/inner cat /hello; echo podman-exit=$?";
    let r = tcg(&["--nested", "--workspace", &ws_s], &["sh", "-c", script]);
    r.expect_code(0)
        .expect_stdout_line("hello from the nested container")
        .expect_stdout_line("podman-exit=0");
    // Without --nested the agent's container confines it: no nested podman.
    let r = tcg(&["--workspace", &ws_s], &["sh", "-c", script]);
    r.expect_code(0);
    assert!(
        !r.stdout.contains("hello from the nested container"),
        "podman ran nested without --nested\n{r}"
    );
    assert!(!r.stdout.contains("podman-exit=0"), "{r}");
}

#[test]
fn tcg_collect_brings_back_the_matching_files_with_their_times() {
    let dir = scratch("container-collect");
    let ws = dir.join("ws");
    let out = dir.join("out");
    fs::create_dir_all(&ws).expect("mkdir");
    let (ws_s, out_s) = (ws.display().to_string(), out.display().to_string());
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let script = "cd /workspace && mkdir -p build/logs dist/bin src \
                  && echo a > build/logs/a.log && echo b > b.log && echo ignored > src/x.rs \
                  && printf '#!/bin/sh\\necho hi\\n' > dist/bin/tool && chmod 755 dist/bin/tool \
                  && echo not-out > out/nope \
                  && touch -d @1500000000 dist/bin && touch -d @1600000000 b.log";
    let r = tcg(
        &[
            "--workspace",
            &ws_s,
            "--out",
            &out_s,
            "--collect",
            "**/*.log",
            "--collect",
            "dist",
        ],
        &["sh", "-c", script],
    );
    r.expect_code(0);
    assert_eq!(
        fs::read(out.join("build/logs/a.log")).expect("a.log"),
        b"a\n"
    );
    assert_eq!(fs::read(out.join("b.log")).expect("b.log"), b"b\n");
    assert_eq!(
        fs::read(out.join("dist/bin/tool")).expect("tool"),
        b"#!/bin/sh\necho hi\n"
    );
    let tool = fs::metadata(out.join("dist/bin/tool")).expect("meta");
    assert_eq!(tool.permissions().mode() & 0o777, 0o755, "executable bit");
    assert!(!out.join("src").exists(), "src/x.rs matched nothing\n{r}");
    assert!(
        !out.join("out").exists(),
        "/workspace/out is not sent with --collect"
    );
    // Times: set in the guest, kept; a new file is dated by the guest's
    // clock, which the host set at boot.
    assert_eq!(
        fs::metadata(out.join("b.log")).expect("meta").mtime(),
        1_600_000_000
    );
    assert_eq!(
        fs::metadata(out.join("dist/bin")).expect("meta").mtime(),
        1_500_000_000
    );
    let made = fs::metadata(out.join("build/logs/a.log"))
        .expect("meta")
        .mtime();
    let made = u64::try_from(made).expect("after 1970");
    assert!(
        made + 5 >= before && made <= before + 600,
        "a.log dated {made}, the run started at {before}\n{r}"
    );
}

#[test]
fn bad_image_archives_and_patterns_are_refused_before_any_vm_starts() {
    let dir = scratch("container-bad");
    let text = dir.join("notes.txt");
    fs::write(&text, "not an image\n".repeat(100)).expect("write");
    let plain_tar = dir.join("plain.tar");
    let src = dir.join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("file"), b"x").expect("write");
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .arg("-cf")
        .arg(&plain_tar)
        .arg(".")
        .status()
        .expect("tar");
    assert!(tar.success());
    let missing = dir.join("missing.tar");
    for (path, says) in [
        (&missing, "cannot read the image archive"),
        (&text, "is not an image archive"),
        (&plain_tar, "not a container image"),
    ] {
        let p = path.display().to_string();
        let r = tcg(&["--image", &p], &["true"]);
        r.expect_code(2)
            .expect_one_line_error(says)
            .expect_stderr(&p);
        assert_eq!(processes_mentioning(&p), "", "a VM was left running");
    }
    let out = dir.join("o").display().to_string();
    let r = tcg(&["--out", &out, "--collect", "../etc/*"], &["true"]);
    r.expect_code(2)
        .expect_one_line_error("not a relative pattern");
    let r = tcg(&["--collect", "*.log"], &["true"]);
    r.expect_code(2);
    assert!(r.stderr.contains("--out"), "--collect needs --out\n{r}");
}

#[test]
fn kvm_the_image_archive_is_the_second_disk_of_our_vmm() {
    let dir = scratch("container-kvm");
    let rootfs = busybox_rootfs(&dir, "archive through airlock-vmm");
    let archive = dir.join("agent.tar");
    image_archive(&rootfs, "localhost/agent:kvm", &archive);
    let out = dir.join("out");
    let script = format!(
        "{} run --engine kvm --mem 1024 --image-root {} --image {} --out {} --collect 'r*.txt' \
         -- sh -c 'cat /hello; cd /workspace && echo r > r.txt && echo s > s.txt'",
        bin("airlock"),
        build_file("rootfs.img"),
        rel(&archive),
        rel(&out),
    );
    let r = testbed(&["sh", "-c", &script], 900);
    r.expect_code(0)
        .expect_stdout_line("archive through airlock-vmm")
        .expect_stderr("engine: kvm");
    assert_eq!(fs::read(out.join("r.txt")).expect("r.txt"), b"r\n");
    assert!(!out.join("s.txt").exists(), "{r}");
}
