//! `airlock run -- CMD`: the command runs in a real microVM, its stdout and
//! stderr arrive on ours, and airlock exits with its code. Each behaviour is
//! checked on the tcg engine on this host, and through our VMM (the kvm
//! engine) inside the nested test bed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::thread;

use airlock_e2e::{
    bin, processes_mentioning, root, run, run_env, run_raw, run_raw_with_stdin, sha256_hex,
    testbed, Run, TempDir,
};

/// 50 MiB of random bytes: the guest prints its sha256 on stderr and the
/// bytes on stdout.
const BIG_OUTPUT: &str =
    "head -c 52428800 /dev/urandom | tee /tmp/x | sha256sum >&2; cat /tmp/x; rm /tmp/x";
const BIG_LEN: usize = 52_428_800;

/// `airlock run --engine tcg [OPTS] -- CMD...` on this host.
fn tcg(opts: &[&str], cmd: &[&str], env: &[(&str, &str)], timeout_s: u32) -> Run {
    let airlock = bin("airlock");
    let mut argv = vec![airlock.as_str(), "run", "--engine", "tcg"];
    argv.extend_from_slice(opts);
    argv.push("--");
    argv.extend_from_slice(cmd);
    run_env(&argv, env, timeout_s)
}

/// Runs a shell script inside the test bed (L1), with `$A` set to airlock.
fn in_testbed(script: &str, timeout_s: u32) -> Run {
    let full = format!("A={}; {script}", bin("airlock"));
    testbed(&["sh", "-c", &full], timeout_s)
}

/// The sha256 the guest printed on stderr (`<hex>  -`).
fn guest_sha(stderr: &str) -> &str {
    stderr
        .lines()
        .find_map(|l| l.trim_end().strip_suffix("  -"))
        .unwrap_or_else(|| panic!("no sha256sum line on stderr:\n{stderr}"))
        .trim()
}

// ---- tcg engine, on this host ----

#[test]
fn tcg_streams_stdout_and_stderr_and_exits_with_the_code() {
    let r = tcg(
        &[],
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
        &[],
        300,
    );
    r.expect_code(7)
        .expect_stdout_line("out")
        .expect_stderr("err\n")
        .expect_stderr("engine: tcg");
    assert!(!r.stdout.contains("err"), "stderr leaked into stdout\n{r}");
    // The console goes to a log file, not to the terminal.
    assert!(!r.stdout.contains("airlock-init"), "console on stdout\n{r}");
    assert!(!r.stderr.contains("airlock-init"), "console on stderr\n{r}");
}

#[test]
fn tcg_a_command_killed_by_a_signal_exits_128_plus_n() {
    tcg(&[], &["sh", "-c", "kill -9 $$"], &[], 300).expect_code(137);
}

#[test]
fn tcg_50_mb_of_output_arrive_intact() {
    let airlock = bin("airlock");
    let r = run_raw(
        &[
            &airlock, "run", "--engine", "tcg", "--mem", "512", "--", "sh", "-c", BIG_OUTPUT,
        ],
        &[],
        600,
    );
    assert_eq!(r.code, Some(0), "stderr:\n{}", r.stderr);
    assert_eq!(r.stdout.len(), BIG_LEN, "stderr:\n{}", r.stderr);
    assert_eq!(sha256_hex(&r.stdout), guest_sha(&r.stderr));
}

#[test]
fn tcg_timeout_stops_the_vm_and_leaves_nothing() {
    let tmp = TempDir::new("timeout");
    let r = tcg(
        &["--timeout", "10"],
        &["sh", "-c", "echo started; sleep 1000"],
        &[("TMPDIR", tmp.as_str())],
        120,
    );
    r.expect_code(124)
        .expect_stdout_line("started")
        .expect_stderr("--timeout 10 s");
    // QEMU and vhost-device-vsock both name the run directory in their argv.
    let left = processes_mentioning(tmp.as_str());
    assert!(left.is_empty(), "processes left behind:\n{left}");
    let entries: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("read tmp")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(entries.is_empty(), "run directory left behind: {entries:?}");
}

#[test]
fn tcg_ctrl_c_tears_the_vm_down() {
    let tmp = TempDir::new("sigint");
    let mut child = Command::new(root().join(bin("airlock")))
        .args(["run", "--engine", "tcg", "--timeout", "120", "--"])
        .args(["sh", "-c", "echo started; sleep 1000"])
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn airlock");
    let stdout = child.stdout.take().expect("stdout");
    let mut first = String::new();
    BufReader::new(stdout)
        .read_line(&mut first)
        .expect("read stdout");
    assert_eq!(first.trim_end(), "started");
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = child.wait_with_output().expect("wait airlock");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "stderr:\n{stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    let left = processes_mentioning(tmp.as_str());
    assert!(left.is_empty(), "processes left behind:\n{left}");
}

#[test]
fn tcg_two_runs_at_once_do_not_interfere() {
    let script =
        |tag: &str| format!("for i in 1 2 3 4 5; do echo {tag}-$i; sleep 0.2; done; exit 3");
    let (one, two) = (script("one"), script("two"));
    let first = thread::spawn(move || tcg(&[], &["sh", "-c", &one], &[], 300));
    let second = tcg(&[], &["sh", "-c", &two], &[], 300);
    let first = first.join().expect("first run");
    for (r, tag) in [(&first, "one"), (&second, "two")] {
        r.expect_code(3);
        let lines: Vec<&str> = r.stdout.lines().collect();
        let want: Vec<String> = (1..=5).map(|i| format!("{tag}-{i}")).collect();
        assert_eq!(lines, want, "{r}");
    }
}

#[test]
fn tcg_the_command_gets_only_the_env_it_is_given() {
    let r = tcg(
        &["--env", "FOO=bar baz", "-e", "EMPTY="],
        &[
            "sh",
            "-c",
            r#"echo "FOO=$FOO"; echo "EMPTY=[$EMPTY]"; echo "SECRET=[$AIRLOCK_TEST_SECRET]"; pwd"#,
        ],
        &[("AIRLOCK_TEST_SECRET", "hunter2")],
        300,
    );
    r.expect_code(0)
        .expect_stdout_line("FOO=bar baz")
        .expect_stdout_line("EMPTY=[]")
        .expect_stdout_line("SECRET=[]")
        .expect_stdout_line("/");
    assert!(!r.stdout.contains("hunter2") && !r.stderr.contains("hunter2"));
}

#[test]
fn tcg_run_i_forwards_stdin_binary_safe_to_its_end() {
    // 10 MB of bytes of every value, not valid UTF-8.
    let data: Vec<u8> = (0..10_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    let airlock = bin("airlock");
    let image = airlock_e2e::build_file("rootfs.img");
    // In the VM (initramfs, no container) and in the agent's container.
    for (what, opts) in [
        ("initramfs", vec![]),
        ("container", vec!["--image-root", image.as_str()]),
    ] {
        let mut argv = vec![airlock.as_str(), "run", "--engine", "tcg", "-i"];
        argv.extend(opts.iter().copied());
        argv.extend(["--", "sh", "-c", "sha256sum"]);
        let r = run_raw_with_stdin(&argv, &[], &data, 300);
        assert_eq!(r.code, Some(0), "{what}: {}", r.stderr);
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        assert_eq!(
            out.split_whitespace().next(),
            Some(sha256_hex(&data).as_str()),
            "{what}: the command read exactly our stdin, to its end\n{out}"
        );
        // The audit log says the command had stdin.
        let log = airlock_e2e::audit_log_of(&r.into_run());
        let start = airlock_e2e::fields_of_kind(&airlock_e2e::audit_records(&log), "run.start");
        assert_eq!(start[0]["spec"]["stdin"], true, "{what}: {start:?}");
    }

    // Without -i the command's stdin is empty, whatever ours holds.
    let r = run_raw_with_stdin(
        &[
            &airlock, "run", "--engine", "tcg", "--", "sh", "-c", "wc -c",
        ],
        &[],
        b"not forwarded",
        300,
    )
    .into_run();
    r.expect_code(0).expect_stdout_line("0");
}

#[test]
fn tcg_a_missing_command_is_reported() {
    let r = tcg(&[], &["/no/such/program"], &[], 300);
    r.expect_code(127)
        .expect_stderr("could not be started in the sandbox");
}

#[test]
fn tcg_output_beyond_the_limit_is_cut_and_stops_the_run() {
    let r = tcg(
        &["--max-output-bytes", "1000"],
        &["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"],
        &[],
        300,
    );
    // What fits is forwarded; then the sandbox is stopped, exit 125.
    r.expect_code(125).expect_stderr("--max-output-bytes");
    assert_eq!(r.stdout.len(), 1000, "{}", r.stderr);
}

/// The vhost-device-vsock `airlock doctor` finds (the one runs use).
fn real_vhost_vsock() -> String {
    let r = run(&[&bin("airlock"), "doctor"], 60);
    r.stdout
        .lines()
        .chain(r.stderr.lines())
        .find_map(|l| {
            l.trim_start_matches("ok")
                .trim()
                .strip_prefix("vhost-device-vsock: ")
        })
        .and_then(|rest| rest.split(" (").next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("airlock doctor names no vhost-device-vsock\n{r}"))
}

/// A stand-in for vhost-device-vsock in `dir` that runs the real one, but
/// for its first `deaf` starts serves the guest's connections on a path
/// nobody listens on: it never answers them (it sends no reset), which is
/// what the guest sees when the real helper's queue worker has stopped.
/// Each start adds a line to `dir/starts`.
fn deaf_vhost_vsock(dir: &TempDir, deaf: u32) -> String {
    let wrapper = dir.path().join("vhost-wrapper");
    let script = format!(
        "#!/bin/sh\n\
         echo start >> '{dir}/starts'\n\
         if [ \"$(wc -l < '{dir}/starts')\" -le {deaf} ]; then\n\
         \x20 prev=\n\
         \x20 for a do\n\
         \x20   shift\n\
         \x20   if [ \"$prev\" = --uds-path ]; then set -- \"$@\" \"$a.deaf\"; else set -- \"$@\" \"$a\"; fi\n\
         \x20   prev=$a\n\
         \x20 done\n\
         fi\n\
         exec '{real}' \"$@\"\n",
        dir = dir.as_str(),
        real = real_vhost_vsock(),
    );
    std::fs::write(&wrapper, script).expect("write the wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod the wrapper");
    wrapper.to_str().expect("utf-8").to_owned()
}

fn starts(dir: &TempDir) -> usize {
    std::fs::read_to_string(dir.path().join("starts"))
        .unwrap_or_default()
        .lines()
        .count()
}

#[test]
fn tcg_a_vsock_device_that_never_answers_is_booted_again_once() {
    // The first boot's vsock device never answers: the guest's init gives
    // up on the host after its patience and powers off. airlock says so,
    // boots the VM again, and the command runs; the audit log shows both.
    let tmp = TempDir::new("deaf1");
    let wrapper = deaf_vhost_vsock(&tmp, 1);
    let r = tcg(
        &[],
        &["sh", "-c", "echo ran; exit 3"],
        &[("AIRLOCK_VHOST_VSOCK", &wrapper), ("TMPDIR", tmp.as_str())],
        300,
    );
    r.expect_code(3)
        .expect_stdout_line("ran")
        .expect_stderr("vsock device (vhost-device-vsock) never answered its connects")
        .expect_stderr("booting the VM again (once)")
        // The first boot's console and the helper's threads, shown.
        .expect_stderr("failed to connect to the host (vsock cid 2 port 1024)")
        .expect_stderr("vhost-device-vsock's threads: ");
    assert_eq!(starts(&tmp), 2, "the helper started twice\n{r}");
    let records = airlock_e2e::audit_records(&airlock_e2e::audit_log_of(&r));
    let vm_starts = airlock_e2e::fields_of_kind(&records, "vm.start");
    assert_eq!(vm_starts.len(), 2, "two vm.start records\n{r}");
    let exits = airlock_e2e::fields_of_kind(&records, "vm.exit");
    assert_eq!(exits.len(), 2, "two vm.exit records\n{r}");
    let why = exits[0]["why"].as_str().unwrap_or_default();
    assert!(
        why.contains("never answered") && why.ends_with("airlock boots it again"),
        "the first vm.exit says why: {why}"
    );
    assert_eq!(exits[0]["stopped_by"], "itself");
    assert_eq!(exits[1]["stopped_by"], "itself", "{r}");
    let end = airlock_e2e::fields_of_kind(&records, "run.end");
    assert_eq!(end[0]["exit_code"], 3, "{r}");
    let left = processes_mentioning(tmp.as_str());
    assert!(left.is_empty(), "processes left behind:\n{left}");
}

#[test]
fn tcg_a_vsock_device_that_never_answers_twice_fails_the_run() {
    // Booted again only once: a second deaf boot ends the run as a sandbox
    // failure, with the console and the helper's threads to show why.
    let tmp = TempDir::new("deaf2");
    let wrapper = deaf_vhost_vsock(&tmp, 2);
    let r = tcg(
        &[],
        &["sh", "-c", "echo ran"],
        &[("AIRLOCK_VHOST_VSOCK", &wrapper), ("TMPDIR", tmp.as_str())],
        300,
    );
    r.expect_code(120)
        .expect_stderr("before the guest connected")
        .expect_stderr("vhost-device-vsock's threads: ");
    assert!(!r.stdout.contains("ran"), "{r}");
    assert_eq!(starts(&tmp), 2, "one second boot, no third\n{r}");
    let again = r.stderr.matches("booting the VM again").count();
    assert_eq!(again, 1, "{r}");
}

#[test]
fn run_rejects_bad_usage_before_starting_anything() {
    let airlock = bin("airlock");
    run(&[&airlock, "run", "--engine", "tcg"], 30)
        .expect_code(2)
        .expect_one_line_error("no command given");
    run(&[&airlock, "run", "--env", "HOME", "--", "true"], 30)
        .expect_code(2)
        .expect_one_line_error("expected NAME=VALUE");
    run(&[&airlock, "run", "--env", "=x", "--", "true"], 30)
        .expect_code(2)
        .expect_one_line_error("the name is empty");
    run(
        &[&airlock, "run", "-e", "A=1", "-e", "A=2", "--", "true"],
        30,
    )
    .expect_code(2)
    .expect_one_line_error("--env A is given twice");
    let r = run(&[&airlock, "run", "--help"], 30);
    r.expect_code(0);
    for code in ["120", "121", "124", "125", "127", "130"] {
        assert!(
            r.stdout.contains(code),
            "--help lacks exit code {code}\n{r}"
        );
    }
}

// ---- kvm engine (our VMM), in the nested test bed ----

#[test]
fn kvm_streams_stdout_and_stderr_and_exits_with_the_code() {
    let r = testbed(
        &[
            &bin("airlock"),
            "run",
            "--engine",
            "kvm",
            "--",
            "sh",
            "-c",
            "echo out; grep -o -m1 tsc_deadline_timer /proc/cpuinfo; echo err >&2; exit 7",
        ],
        600,
    );
    // The guest is offered the LAPIC's TSC-deadline mode (KVM emulates it),
    // so its kernel skips the APIC-timer calibration at every boot.
    r.expect_code(7)
        .expect_stdout_line("out")
        .expect_stdout_line("tsc_deadline_timer")
        .expect_stderr("err\n")
        .expect_stderr("engine: kvm");
    assert!(!r.stdout.contains("err"), "stderr leaked into stdout\n{r}");
}

#[test]
fn kvm_a_command_killed_by_a_signal_exits_128_plus_n() {
    testbed(
        &[
            &bin("airlock"),
            "run",
            "--engine",
            "kvm",
            "--",
            "sh",
            "-c",
            "kill -9 $$",
        ],
        600,
    )
    .expect_code(137);
}

#[test]
fn kvm_50_mb_of_output_arrive_intact() {
    // Hashed inside the test bed: its console link is not made for 50 MB.
    let r = in_testbed(
        &format!(
            "$A run --engine kvm --mem 512 -- sh -c '{BIG_OUTPUT}' > /tmp/out 2> /tmp/err; \
             code=$?; cat /tmp/err >&2; echo \"size $(wc -c < /tmp/out)\"; sha256sum /tmp/out; \
             exit $code"
        ),
        900,
    );
    r.expect_code(0)
        .expect_stdout_line(&format!("size {BIG_LEN}"));
    let got = r
        .stdout
        .lines()
        .find_map(|l| l.strip_suffix("  /tmp/out"))
        .unwrap_or_else(|| panic!("no sha256 of the output\n{r}"));
    assert_eq!(got, guest_sha(&r.stderr), "{r}");
}

#[test]
fn kvm_timeout_stops_the_vm_and_leaves_nothing() {
    let r = in_testbed(
        "$A run --engine kvm --timeout 30 -- sh -c 'echo started; sleep 1000'; code=$?; \
         for p in /proc/[0-9]*; do \
           grep -q '^Name:.airlock-vmm' $p/status 2>/dev/null && \
           ! grep -q '^State:.Z' $p/status && echo LEFT-BEHIND; \
         done; exit $code",
        600,
    );
    r.expect_code(124)
        .expect_stdout_line("started")
        .expect_stderr("--timeout 30 s");
    // No airlock-vmm process alive (a zombie is not: the jailed VMM's
    // pid-namespace child, dead, reparented to L1's PID 1, which does not
    // reap).
    assert!(!r.stdout.contains("LEFT-BEHIND"), "{r}");
}

#[test]
fn kvm_two_runs_at_once_do_not_interfere() {
    let r = in_testbed(
        r#"for tag in one two; do
             ( $A run --engine kvm -- sh -c "for i in 1 2 3; do echo $tag-\$i; sleep 0.5; done; exit 3" \
                 > /tmp/$tag.out 2> /tmp/$tag.err; echo $? > /tmp/$tag.code ) &
           done
           wait
           for tag in one two; do
             echo "== $tag $(cat /tmp/$tag.code)"; cat /tmp/$tag.out; cat /tmp/$tag.err >&2
           done"#,
        900,
    );
    r.expect_code(0);
    let want = "== one 3\none-1\none-2\none-3\n== two 3\ntwo-1\ntwo-2\ntwo-3\n";
    assert!(r.stdout.contains(want), "{r}");
    assert_eq!(r.stderr.matches("engine: kvm").count(), 2, "{r}");
}

// ---- a hostile guest ----

#[test]
fn tcg_hostile_guest_is_refused_bounded_and_the_run_still_reports_its_exit() {
    // The command is a guest program that opens raw vsock connections to the
    // control port and sends garbage, a 4 GiB frame header, an unknown tag
    // and a flood of connections and bytes, then exits 0. It models a
    // compromised VM: root in it (--vm-root), which may open AF_VSOCK.
    let airlock = root().join(bin("airlock"));
    let initrd = airlock_e2e::build_file("initramfs-test.cpio");
    let (r, peaks) = airlock_e2e::run_with_peaks(
        &[
            airlock.to_str().expect("utf8"),
            "run",
            "--engine",
            "tcg",
            "--initrd",
            &initrd,
            "--vm-root",
            "--",
            "airlock-hostile",
        ],
        300,
    );
    r.expect_code(0).expect_stdout_line("hostile: done");
    let refusals = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("airlock: guest protocol error: refused connection"))
        .count();
    assert!(
        refusals >= 3,
        "each attack connection is refused and logged\n{r}"
    );
    assert!(refusals <= 64, "refusals are capped per run\n{r}");
    // The broker never buffers what the guest floods it with.
    let peak_kib = peaks.broker_kib;
    assert!(peak_kib > 0, "the sampler saw the broker");
    assert!(peak_kib < 64 * 1024, "broker peak RSS {peak_kib} KiB\n{r}");
}

#[test]
fn kvm_hostile_guest_is_refused_and_the_run_still_reports_its_exit() {
    let r = in_testbed(
        "$A run --engine kvm --initrd build/initramfs-test.cpio --vm-root -- airlock-hostile",
        600,
    );
    r.expect_code(0)
        .expect_stdout_line("hostile: done")
        .expect_stderr("airlock: guest protocol error: refused connection");
}
