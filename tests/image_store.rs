//! Images by name: `airlock image load|ls|inspect|rm` and `airlock run
//! --image NAME`, which boots the agent's container straight on the image's
//! erofs disk (no `podman load` in the VM) and honours the image's
//! Entrypoint, Cmd, Env, WorkingDir and User under --entrypoint, -u, -w and
//! -e. Every test keeps its own store (`XDG_DATA_HOME` in its scratch
//! directory). The test image is a small subset of the guest root image's
//! own files (dash, id, cat and their libraries), so it has a working
//! userland.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use airlock_e2e::{
    audit_log_of, audit_records, bin, build_file, fields_of_kind, root, run_env, scratch, Run,
};

/// `airlock image ARGS` with the store under `data`.
fn image(data: &Path, args: &[&str]) -> Run {
    let airlock = bin("airlock");
    let mut argv = vec![airlock.as_str(), "image"];
    argv.extend_from_slice(args);
    let data = data.display().to_string();
    run_env(&argv, &[("XDG_DATA_HOME", &data)], 120)
}

/// `airlock run --engine tcg --image-root build/rootfs.img OPTS -- CMD` with
/// the store under `data`.
fn tcg(data: &Path, opts: &[&str], cmd: &[&str]) -> Run {
    let data = data.display().to_string();
    airlock_e2e::tcg_on_image(opts, cmd, &[("XDG_DATA_HOME", &data)], 300)
}

/// A small root filesystem taken from the guest root image: /bin/sh
/// (dash), id, cat and the libraries they need, the usrmerge links, an
/// entrypoint script /entry.sh and a directory /app owned by uid 1000.
fn guest_subset_rootfs(dir: &Path) -> PathBuf {
    let full = dir.join("full");
    let status = Command::new("fsck.erofs")
        .arg(format!("--extract={}", full.display()))
        .arg(root().join(build_file("rootfs.img")))
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run fsck.erofs");
    assert!(status.success(), "fsck.erofs --extract failed");
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(&rootfs).expect("mkdir");
    let status = Command::new("sh")
        .arg("-c")
        .arg(
            "cd \"$1\" && cp -a --parents bin lib lib64 usr/lib64 usr/bin/dash usr/bin/sh \
             usr/bin/id usr/bin/cat usr/lib/x86_64-linux-gnu/libc.so.6 \
             usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \
             usr/lib/x86_64-linux-gnu/libselinux.so.1 \
             usr/lib/x86_64-linux-gnu/libpcre2-8.so.0* \"$2\"",
        )
        .args([
            "sh",
            &full.display().to_string(),
            &rootfs.display().to_string(),
        ])
        .status()
        .expect("copy the subset");
    assert!(status.success(), "copying the subset failed");
    fs::remove_dir_all(&full).expect("rm the extracted image");
    fs::create_dir_all(rootfs.join("app")).expect("mkdir app");
    fs::create_dir_all(rootfs.join("tmp")).expect("mkdir tmp");
    fs::write(
        rootfs.join("entry.sh"),
        "#!/bin/sh\necho \"entry: $(id -u) $(pwd)\"\nexec \"$@\"\n",
    )
    .expect("write entry.sh");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(rootfs.join("entry.sh"), fs::Permissions::from_mode(0o755))
        .expect("chmod entry.sh");
    rootfs
}

/// A docker archive of `rootfs` tagged `tag` with the image config `config`
/// (tests/fixtures/image_archive.py).
fn archive(
    dir: &Path,
    rootfs: &Path,
    tag: &str,
    config: &serde_json::Value,
    name: &str,
) -> PathBuf {
    let config_path = dir.join(format!("{name}.json"));
    fs::write(&config_path, config.to_string()).expect("write config");
    let out = dir.join(format!("{name}.tar"));
    let status = Command::new("python3")
        .arg(root().join("tests/fixtures/image_archive.py"))
        .args([
            rootfs.as_os_str(),
            tag.as_ref(),
            out.as_os_str(),
            config_path.as_os_str(),
        ])
        .status()
        .expect("run image_archive.py");
    assert!(status.success(), "image_archive.py failed");
    out
}

fn app_config(greeting: &str) -> serde_json::Value {
    serde_json::json!({
        "Entrypoint": ["/entry.sh"],
        "Cmd": ["sh", "-c", "echo \"cmd: $(id -u) $(pwd) $GREETING\"; cat /workspace/in.txt"],
        "Env": ["PATH=/usr/bin:/bin", format!("GREETING={greeting}")],
        "WorkingDir": "/app",
        "User": "1000",
        "x-owned-by-1000": ["app"],
    })
}

/// Every file and directory under `dir` (the store), for "nothing changed".
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            let bytes = fs::read(&p).map(|b| b.len()).unwrap_or(0);
            out.push(format!("{} {bytes}", p.display()));
        }
    }
    out.sort();
    out
}

fn inspect(data: &Path, reference: &str) -> serde_json::Value {
    let r = image(data, &["inspect", reference]);
    r.expect_code(0);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON: {e}\n{r}"))
}

#[test]
fn tcg_a_loaded_image_runs_as_its_user_in_its_workdir_through_its_entrypoint() {
    let dir = scratch("image-store-run");
    let data = dir.join("data");
    let rootfs = guest_subset_rootfs(&dir);
    let tar = archive(
        &dir,
        &rootfs,
        "localhost/app:e2e",
        &app_config("from-image"),
        "app",
    );
    let load = image(&data, &["load", &tar.display().to_string()]);
    load.expect_code(0);
    assert!(load.stdout.starts_with("Loaded: sha256:"), "{load}");
    let digest = inspect(&data, "app:e2e")["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    let disk = data
        .join("airlock/images/sha256")
        .join(&digest[7..])
        .join("rootfs.erofs");
    assert!(disk.is_file(), "the erofs disk is in the store");

    let ws = dir.join("ws");
    fs::create_dir_all(&ws).expect("mkdir");
    fs::write(ws.join("in.txt"), b"workspace file\n").expect("write");
    let console = dir.join("console.log");
    let (ws_s, console_s) = (ws.display().to_string(), console.display().to_string());
    // No command: the image's Entrypoint and Cmd, as its User, in its WorkingDir.
    let r = tcg(
        &data,
        &[
            "--image",
            "localhost/app:e2e",
            "--workspace",
            &ws_s,
            "--console-log",
            &console_s,
            "--cmdline",
            "airlock.debug=1",
        ],
        &[],
    );
    r.expect_code(0)
        .expect_stdout_line("entry: 1000 /app")
        .expect_stdout_line("cmd: 1000 /app from-image")
        .expect_stdout_line("workspace file");
    let log = audit_log_of(&r);
    let records = audit_records(&log);
    let start = fields_of_kind(&records, "run.start")
        .into_iter()
        .next()
        .expect("run.start");
    let image_fields = &start["container_image"];
    assert_eq!(image_fields["source"], "store", "{start}");
    assert_eq!(image_fields["digest"], digest.as_str(), "{start}");
    assert_eq!(
        image_fields["names"],
        serde_json::json!(["localhost/app:e2e"])
    );
    let applied = &image_fields["config_applied"];
    for (field, from) in [
        ("entrypoint", "image"),
        ("cmd", "image"),
        ("working_dir", "image"),
        ("user", "image"),
    ] {
        assert_eq!(applied[field], from, "{field}: {start}");
    }
    assert_eq!(
        start["policy"]["command_user"], "container user 1000",
        "{start}"
    );
    let words = start["policy"]["boot_cmdline"].as_array().expect("words");
    assert!(words.iter().any(|w| w == "airlock.imagedisk=1"), "{start}");
    assert!(!words.iter().any(|w| w == "airlock.archive=1"), "{start}");
    let data_s = data.display().to_string();
    assert!(
        !words.iter().any(|w| w
            .as_str()
            .is_some_and(|w| w.contains(&data_s) || w.contains("erofs."))),
        "no host path on the guest's command line: {start}"
    );
    assert!(
        !start["spec"].to_string().contains(&data_s),
        "no host path in the run spec: {start}"
    );
    // No `podman load` in the VM: the guest ran the container straight on
    // the image disk (its debug line names the podman run), never loaded.
    let console_text = fs::read_to_string(&console).expect("console log");
    assert!(
        console_text.contains("/run/airlock/image:O"),
        "the container runs on the image disk\n{console_text}"
    );
    assert!(
        !console_text.contains("loaded image") && !console_text.contains("podman load"),
        "nothing was loaded\n{console_text}"
    );
    let execs = fields_of_kind(&records, "exec");
    assert!(
        execs.iter().any(|e| e["argv"]
            .as_str()
            .is_some_and(|a| a.contains("podman run") && a.contains("--user=1000"))),
        "the guest's exec records show the podman run"
    );
    assert!(
        !execs.iter().any(|e| e["argv"]
            .as_str()
            .is_some_and(|a| a.contains("podman load"))),
        "no podman load among the guest's execs"
    );

    // The options over the image's config.
    let r = tcg(
        &data,
        &[
            "--image",
            &digest[..16],
            "-u",
            "0",
            "-w",
            "/tmp",
            "-e",
            "GREETING=overridden",
            "--entrypoint",
            "",
        ],
        &["sh", "-c", "echo \"cmd: $(id -u) $(pwd) $GREETING\""],
    );
    r.expect_code(0)
        .expect_stdout_line("cmd: 0 /tmp overridden");
    assert!(
        !r.stdout.contains("entry:"),
        "--entrypoint '' cleared it\n{r}"
    );
    let start = fields_of_kind(&audit_records(&audit_log_of(&r)), "run.start")
        .into_iter()
        .next()
        .expect("run.start");
    let applied = &start["container_image"]["config_applied"];
    assert_eq!(applied["user"], "-u", "{start}");
    assert_eq!(applied["working_dir"], "-w", "{start}");
    assert_eq!(applied["entrypoint"], "--entrypoint", "{start}");
    assert_eq!(applied["env_overridden"], serde_json::json!(["GREETING"]));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn image_load_ls_inspect_rm_and_a_tag_that_moves() {
    let dir = scratch("image-store-cli");
    let data = dir.join("data");
    // A tiny rootfs: the commands here boot nothing.
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(rootfs.join("etc")).expect("mkdir");
    fs::write(rootfs.join("etc/one"), b"1").expect("write");
    let a1 = archive(&dir, &rootfs, "localhost/tool:1", &app_config("a"), "a1");
    fs::write(rootfs.join("etc/two"), b"2").expect("write");
    let a2 = archive(&dir, &rootfs, "localhost/tool:1", &app_config("b"), "a2");
    image(&data, &["load", &a1.display().to_string()]).expect_code(0);
    let first = inspect(&data, "localhost/tool:1");
    assert_eq!(first["config"]["User"], "1000");
    assert_eq!(first["names"], serde_json::json!(["localhost/tool:1"]));
    let store = data.join("airlock/images");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&store).expect("m").permissions());
    assert_eq!(mode & 0o777, 0o700, "the store is private");
    // Loading again is a no-op that says so.
    let again = image(&data, &["load", &a1.display().to_string()]);
    again.expect_code(0);
    assert!(again.stdout.starts_with("Already loaded:"), "{again}");
    // The same tag from another archive moves to the new image.
    image(&data, &["load", &a2.display().to_string()]).expect_code(0);
    let second = inspect(&data, "tool:1");
    assert_ne!(first["digest"], second["digest"]);
    let ls = image(&data, &["ls", "--format", "json"]);
    ls.expect_code(0);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&ls.stdout).expect("json");
    assert_eq!(rows.len(), 2, "{ls}");
    let old = rows
        .iter()
        .find(|r| r["digest"] == first["digest"])
        .expect("old");
    assert_eq!(old["names"], serde_json::json!([]), "{ls}");
    let table = image(&data, &["ls"]);
    table.expect_code(0);
    assert!(
        table.stdout.contains("localhost/tool:1") && table.stdout.contains("<none>"),
        "{table}"
    );

    // Bad input: one line, exit 2, nothing changed.
    let before = tree(&store);
    let text = dir.join("notes.txt");
    fs::write(&text, "not an image\n".repeat(100)).expect("write");
    let missing = dir.join("missing.tar").display().to_string();
    let text_s = text.display().to_string();
    for (args, says) in [
        (
            vec!["load", missing.as_str()],
            "cannot read the image archive",
        ),
        (vec!["load", text_s.as_str()], "is not an image archive"),
        (vec!["rm", "nope:1"], "no image \"nope:1\""),
        (
            vec!["rm", "localhost/tool:1", "nope:2"],
            "no image \"nope:2\"",
        ),
        (vec!["inspect", "sha256:ffff"], "no image"),
        (vec!["inspect", "bad ref"], "not an image reference"),
    ] {
        let r = image(&data, &args);
        r.expect_code(2).expect_one_line_error(says);
        assert_eq!(tree(&store), before, "{args:?} changed the store");
    }
    let r = tcg(&data, &["--image", "nope:3"], &["true"]);
    r.expect_code(2)
        .expect_one_line_error("no image \"nope:3\"");

    // rm a name: the image goes with it; rm by digest.
    let r = image(&data, &["rm", "tool:1"]);
    r.expect_code(0);
    assert!(
        r.stdout.contains("Untagged: localhost/tool:1") && r.stdout.contains("Deleted:"),
        "{r}"
    );
    let old_digest = first["digest"].as_str().expect("digest");
    image(&data, &["rm", &old_digest[..12]]).expect_code(0);
    let ls = image(&data, &["ls", "--format", "json"]);
    assert_eq!(ls.stdout.trim(), "[]", "{ls}");
    let _ = fs::remove_dir_all(&dir);
}

/// `airlock ARGS` with the store under `data` and the sandboxes under `sbx`.
fn airlock_in(data: &Path, sbx: &Path, args: &[&str], timeout_s: u32) -> Run {
    let airlock = bin("airlock");
    let mut argv = vec![airlock.as_str()];
    argv.extend_from_slice(args);
    let (data, sbx) = (data.display().to_string(), sbx.display().to_string());
    run_env(
        &argv,
        &[("XDG_DATA_HOME", &data), ("AIRLOCK_SANDBOX_DIR", &sbx)],
        timeout_s,
    )
}

#[test]
fn tcg_a_sandbox_on_a_loaded_image_execs_as_its_user_in_its_workdir_and_holds_the_image() {
    let dir = scratch("image-store-sandbox");
    let data = dir.join("data");
    let sbx = dir.join("sbx");
    let _ = fs::remove_dir_all(&sbx);
    let rootfs = guest_subset_rootfs(&dir);
    let tar = archive(
        &dir,
        &rootfs,
        "localhost/app:live",
        &app_config("live"),
        "app",
    );
    image(&data, &["load", &tar.display().to_string()]).expect_code(0);
    let digest = inspect(&data, "app:live")["digest"]
        .as_str()
        .expect("digest")
        .to_owned();

    let image_root = build_file("rootfs.img");
    let name = "img-live";
    let create = airlock_in(
        &data,
        &sbx,
        &[
            "create",
            "--engine",
            "tcg",
            "--image-root",
            &image_root,
            "--image",
            "app:live",
            "--name",
            name,
        ],
        300,
    );
    create.expect_code(0);
    // The image's User, WorkingDir and Env are every exec's defaults.
    airlock_in(
        &data,
        &sbx,
        &[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "echo \"$(id -u) $(pwd) $GREETING\"",
        ],
        120,
    )
    .expect_code(0)
    .expect_stdout_line("1000 /app live");
    // ... and -u / -w override them for one exec.
    airlock_in(
        &data,
        &sbx,
        &[
            "exec",
            "-u",
            "0",
            "-w",
            "/tmp",
            name,
            "--",
            "sh",
            "-c",
            "echo \"$(id -u) $(pwd)\"",
        ],
        120,
    )
    .expect_code(0)
    .expect_stdout_line("0 /tmp");
    let info = airlock_in(&data, &sbx, &["inspect", name], 30);
    info.expect_code(0);
    let info: serde_json::Value = serde_json::from_str(&info.stdout).expect("inspect JSON");
    assert_eq!(info["config"]["image"]["digest"], digest.as_str(), "{info}");

    // The image a running sandbox boots from cannot be removed: one line,
    // exit 2, the store unchanged.
    let before = tree(&data);
    for reference in ["app:live", &digest[..19]] {
        let r2 = airlock_in(&data, &sbx, &["image", "rm", reference], 60);
        r2.expect_code(2);
        assert!(
            r2.stderr.contains("in use by the running sandbox") && r2.stderr.contains(name),
            "{r2}"
        );
        assert_eq!(r2.stderr.trim().lines().count(), 1, "{r2}");
    }
    assert_eq!(tree(&data), before, "a refused image rm changed the store");

    airlock_in(&data, &sbx, &["rm", "-f", name], 120).expect_code(0);
    airlock_in(&data, &sbx, &["image", "rm", "app:live"], 60)
        .expect_code(0)
        .expect_stdout_line(&format!("Deleted: {digest}"));
}
