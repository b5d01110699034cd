//! `airlock run` in image mode: the guest boots from the read-only erofs
//! root image (`build/rootfs.img`, built by `AIRLOCK_IMAGE=1
//! scripts/build.sh`) and, by default, runs the command in a podman
//! container on it. Checked on the tcg engine on this host and through our
//! VMM (the kvm engine) inside the nested test bed.

use airlock_e2e::{bin, build_file, root, run, run_env, sha256_hex, testbed, Run};

/// Prints the distribution, the shell's PID and the PID 1's command line.
const WHERE_AM_I: &str =
    "grep PRETTY_NAME /etc/os-release; echo pid=$$; printf 'init='; tr '\\0' ' ' < /proc/1/cmdline; echo; hostname";

/// `airlock run --engine tcg --image-root build/rootfs.img [OPTS] -- CMD...`.
fn tcg(opts: &[&str], cmd: &[&str], timeout_s: u32) -> Run {
    let airlock = bin("airlock");
    let image = build_file("rootfs.img");
    let mut argv = vec![
        airlock.as_str(),
        "run",
        "--engine",
        "tcg",
        "--image-root",
        image.as_str(),
    ];
    argv.extend_from_slice(opts);
    argv.push("--");
    argv.extend_from_slice(cmd);
    run(&argv, timeout_s)
}

/// The line of `r`'s stdout that starts with `prefix`, without it.
fn field<'a>(r: &'a Run, prefix: &str) -> &'a str {
    r.stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line\n{r}"))
        .trim_end()
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
    let text = std::fs::read_to_string(&log).expect("audit log");
    let start: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("a record")).expect("json");
    let fields = &start["fields"];
    assert_eq!(
        fields["root_image"]["sha256"].as_str(),
        Some(image_sha().as_str()),
        "{text}"
    );
    assert!(fields["initrd"].is_null(), "{text}");
    assert_eq!(fields["policy"]["container"], true, "{text}");
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
