//! Sandboxes that live: `airlock create`, `exec`, `ls`, `inspect`, `stop`,
//! `rm`, `logs`, on the tcg engine on this host and through airlock-vmm in
//! the nested test bed. Each test keeps its sandboxes in a directory of its
//! own (`AIRLOCK_SANDBOX_DIR`).

use airlock_e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A test's sandbox state directory and temp dir, and `airlock` in them.
struct Place(StateRoot);

impl std::ops::Deref for Place {
    type Target = StateRoot;
    fn deref(&self) -> &StateRoot {
        &self.0
    }
}

impl Place {
    fn new(test: &str) -> Place {
        Place(StateRoot::new(test))
    }

    /// `airlock create --engine tcg --image-root build/rootfs.img --name NAME ARGS`.
    fn create(&self, name: &str, args: &[&str]) -> Run {
        let image = build_file("rootfs.img");
        let mut argv = vec![
            "create",
            "--engine",
            "tcg",
            "--image-root",
            &image,
            "--name",
            name,
        ];
        argv.extend_from_slice(args);
        self.airlock(&argv, 300)
    }

    /// `airlock exec -i NAME -- CMD` with `input` on its stdin.
    fn exec_with_stdin(&self, name: &str, cmd: &[&str], input: &[u8]) -> RawRun {
        let airlock = bin("airlock");
        let mut argv = vec![airlock.as_str(), "exec", "-i", name, "--"];
        argv.extend_from_slice(cmd);
        run_raw_with_stdin(&argv, &self.env(), input, 300)
    }

    fn inspect(&self, name: &str) -> Value {
        let r = self.airlock(&["inspect", name], 30);
        r.expect_code(0);
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("inspect JSON: {e}\n{r}"))
    }

    fn state(&self, name: &str) -> String {
        let r = self.airlock(&["ls", "--all", "--format", "json"], 30);
        r.expect_code(0);
        let all: Value = serde_json::from_str(&r.stdout).expect("ls JSON");
        all.as_array()
            .expect("array")
            .iter()
            .find(|s| s["name"] == name)
            .map_or_else(
                || "absent".into(),
                |s| s["state"].as_str().unwrap_or("").to_owned(),
            )
    }

    /// Waits until `name`'s state is `want` (at most `limit`).
    fn wait_state(&self, name: &str, want: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let state = self.state(name);
            if state == want || Instant::now() >= deadline {
                return state;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The pids of the engine processes a sandbox's audit log names
/// (`vm.start`).
fn vm_pids(audit: &Path) -> Vec<i32> {
    let records = audit_records(audit);
    let start = fields_of_kind(&records, "vm.start");
    start[0]["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| i32::try_from(p["pid"].as_i64().expect("pid")).expect("pid fits"))
        .collect()
}

/// Whether `pid` is a live process (a zombie counts as gone).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        })
        .unwrap_or(false)
}

fn wait_dead(pids: &[i32], limit: Duration) -> Vec<i32> {
    let deadline = Instant::now() + limit;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The life of one sandbox: it keeps its state between execs (a file in
/// /tmp, a background process), runs two execs at once, takes 10 MB of
/// stdin intact, reports each exec's exit code and signal, says so when
/// a command cannot start, stops within -t of a process that ignores
/// SIGTERM, refuses what makes no sense, and is gone after rm; one audit
/// log records it all.
#[test]
fn tcg_a_sandbox_lives_across_execs() {
    let p = Place::new("sandbox-life");
    let ws = scratch("sandbox-life").join("ws");
    std::fs::create_dir_all(&ws).expect("ws");
    std::fs::write(ws.join("hello.txt"), "from the host\n").expect("write");
    let out = scratch("sandbox-life").join("out");
    let _ = std::fs::remove_dir_all(&out);
    let r = p.create(
        "life",
        &[
            "--label",
            "team=blue",
            "--workspace",
            &rel(&ws),
            "--out",
            &rel(&out),
        ],
    );
    r.expect_code(0);
    assert_eq!(r.stdout.trim(), "life", "{r}");

    // An exec runs with exactly the container's own credentials and
    // confinement: those of the keeper, which `podman run` started.
    let r = p.airlock(
        &[
            "exec",
            "life",
            "--",
            "sh",
            "-c",
            "for f in /proc/self/status /proc/2/status; do \
             grep -E '^(Uid|Gid|Groups|Cap[A-Za-z]+|NoNewPrivs|Seccomp|Seccomp_filters):' $f \
             | tr -s '\t ' ' '; echo ==; done; cat /proc/2/cmdline | tr '\\0' ' '",
        ],
        120,
    );
    r.expect_code(0);
    let parts: Vec<&str> = r.stdout.split("==\n").collect();
    assert_eq!(parts.len(), 3, "{r}");
    assert!(parts[2].starts_with("/run/airlock/keeper pause"), "{r}");
    assert!(
        parts[0].contains("Seccomp: 2"),
        "the exec is under seccomp\n{r}"
    );
    assert_eq!(
        parts[0], parts[1],
        "the exec's credentials are the container's\n{r}"
    );

    // ls: running, found by label, not by another label.
    let r = p.airlock(
        &["ls", "--format", "json", "--filter", "label=team=blue"],
        30,
    );
    let ls: Value = serde_json::from_str(&r.stdout).expect("ls JSON");
    assert_eq!(ls[0]["name"], "life", "{r}");
    assert_eq!(ls[0]["state"], "running", "{r}");
    let r = p.airlock(
        &["ls", "--format", "json", "--filter", "label=team=red"],
        30,
    );
    assert_eq!(r.stdout.trim(), "[]", "{r}");

    // State persists between execs; the workspace is there.
    let r = p.airlock(
        &[
            "exec",
            "life",
            "--",
            "sh",
            "-c",
            "cat hello.txt; echo kept > /tmp/f; mkdir -p out; echo result > out/r.txt; \
             nohup sleep 1000 >/dev/null 2>&1 & echo $! > /tmp/pid",
        ],
        120,
    );
    r.expect_code(0);
    assert_eq!(r.stdout, "from the host\n", "{r}");
    let r = p.airlock(
        &[
            "exec",
            "life",
            "--",
            "sh",
            "-c",
            "cat /tmp/f; kill -0 $(cat /tmp/pid) && echo alive",
        ],
        120,
    );
    r.expect_code(0);
    assert_eq!(r.stdout, "kept\nalive\n", "{r}");

    // Two at once: each waits for the other's mark, so both finish only
    // if both run at the same time.
    let airlock = root().join(bin("airlock"));
    let first = std::process::Command::new(&airlock)
        .args([
            "exec", "life", "--", "sh", "-c",
            "touch /tmp/a; for i in $(seq 900); do [ -e /tmp/b ] && echo a-saw-b && exit 0; sleep 0.1; done; exit 1",
        ])
        .envs(p.env())
        .env("XDG_STATE_HOME", state_dir())
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("first exec");
    let r = p.airlock(
        &[
            "exec", "life", "--", "sh", "-c",
            "touch /tmp/b; for i in $(seq 900); do [ -e /tmp/a ] && echo b-saw-a && exit 0; sleep 0.1; done; exit 1",
        ],
        120,
    );
    r.expect_code(0);
    assert_eq!(r.stdout, "b-saw-a\n", "{r}");
    let first = first.wait_with_output().expect("first");
    assert_eq!(first.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&first.stdout), "a-saw-b\n");

    // 10 MB of stdin, binary, intact.
    let data: Vec<u8> = (0..10_000_000u32)
        .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect();
    let r = p.exec_with_stdin("life", &["sha256sum"], &data);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let got = String::from_utf8_lossy(&r.stdout).into_owned();
    assert_eq!(
        got.split_whitespace().next(),
        Some(sha256_hex(&data).as_str()),
        "{got}"
    );

    // Exit codes and signals, and a command that does not exist.
    p.airlock(&["exec", "life", "--", "sh", "-c", "exit 3"], 120)
        .expect_code(3);
    p.airlock(&["exec", "life", "--", "sh", "-c", "kill -9 $$"], 120)
        .expect_code(137);
    let r = p.airlock(&["exec", "life", "--", "no-such-program"], 120);
    r.expect_code(127);
    // -e and -w.
    let r = p.airlock(
        &[
            "exec",
            "-e",
            "GREETING=hi there",
            "-w",
            "/tmp",
            "life",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\" in $(pwd)",
        ],
        120,
    );
    r.expect_code(0);
    assert_eq!(r.stdout, "hi there in /tmp\n", "{r}");

    // -u: as another user in the container; a bad one is refused.
    let r = p.airlock(&["exec", "-u", "1000:1000", "life", "--", "id", "-u"], 120);
    r.expect_code(0);
    assert_eq!(r.stdout, "1000\n", "{r}");
    let r = p.airlock(&["exec", "-u", "nobody", "life", "--", "id", "-un"], 120);
    r.expect_code(0);
    assert_eq!(r.stdout, "nobody\n", "{r}");
    let r = p.airlock(&["exec", "-u", "$(id)", "life", "--", "true"], 30);
    r.expect_code(2).expect_one_line_error("-u");

    // inspect: running, its audit log, how many execs.
    let v = p.inspect("life");
    assert_eq!(v["state"], "running", "{v:#}");
    assert_eq!(v["labels"]["team"], "blue", "{v:#}");
    let audit = PathBuf::from(v["audit_log"].as_str().expect("audit_log"));
    assert!(v["status"]["execs"].as_u64().expect("execs") >= 9, "{v:#}");

    // A duplicate name, and rm of a running sandbox without -f: refused,
    // nothing changed.
    let r = p.create("life", &[]);
    r.expect_code(2).expect_stderr("already exists");
    let r = p.airlock(&["rm", "life"], 30);
    r.expect_code(2).expect_stderr("is running");
    assert_eq!(p.state("life"), "running");

    // stop -t 2, with a process that ignores SIGTERM.
    p.airlock(
        &[
            "exec",
            "life",
            "--",
            "sh",
            "-c",
            "nohup sh -c 'trap \"\" TERM; while :; do sleep 1; done' >/dev/null 2>&1 &",
        ],
        120,
    )
    .expect_code(0);
    let pids = vm_pids(&audit);
    let began = Instant::now();
    let r = p.airlock(&["stop", "-t", "2", "life"], 120);
    r.expect_code(0);
    assert!(
        began.elapsed() < Duration::from_secs(60),
        "stop took {:?}",
        began.elapsed()
    );
    assert_eq!(p.state("life"), "stopped");
    // What the execs wrote under /workspace/out came back when it stopped.
    assert_eq!(
        std::fs::read_to_string(out.join("r.txt")).expect("result"),
        "result\n"
    );
    assert!(
        wait_dead(&pids, Duration::from_secs(10)).is_empty(),
        "VM processes left"
    );

    // Into a stopped sandbox: refused.
    let r = p.airlock(&["exec", "life", "--", "true"], 30);
    r.expect_code(2).expect_stderr("not running");

    // The one audit log: intact, every exec and the stop in it.
    let v = run(
        &[
            &bin("airlock"),
            "audit",
            "verify",
            audit.to_str().expect("utf-8"),
        ],
        30,
    );
    v.expect_code(0);
    let records = audit_records(&audit);
    let execs = fields_of_kind(&records, "sandbox.exec");
    let ends = fields_of_kind(&records, "sandbox.exec_end");
    assert_eq!(execs.len(), ends.len(), "{ends:#?}");
    assert!(execs
        .iter()
        .any(|e| e["argv"][0] == "sha256sum" && e["stdin"] == true));
    let claims = fields_of_kind(&records, "sandbox.exec_exit");
    assert_eq!(claims.len(), execs.len(), "{claims:#?}");
    assert!(claims.iter().any(|e| e["status"]["exited"] == 3));
    assert!(claims.iter().any(|e| e["status"]["exited"] == 137));
    assert!(execs.iter().any(|e| e["user"] == "nobody"), "{execs:#?}");
    // sha256sum's line: 64 hex digits, "  -", a newline.
    assert!(ends.iter().any(|e| e["stdout_bytes"] == 68), "{ends:#?}");
    let stops = fields_of_kind(&records, "sandbox.stop");
    assert_eq!(stops.len(), 1, "{stops:#?}");
    assert_eq!(stops[0]["why"], "stop");
    // The stop's TERM reached the keeper's `kill` through `crun exec` (the
    // container's process with CAP_KILL added), not a `podman exec --user 0`.
    let guest_execs: Vec<String> = fields_of_kind(&records, "exec")
        .iter()
        .filter_map(|e| e["argv"].as_str().map(str::to_owned))
        .collect();
    assert!(
        guest_execs
            .iter()
            .any(|a| a == "/run/airlock/keeper kill TERM"),
        "{guest_execs:#?}"
    );
    assert!(
        !guest_execs
            .iter()
            .any(|a| a.starts_with("/usr/bin/podman exec") && a.contains("keeper kill")),
        "{guest_execs:#?}"
    );

    // rm: gone, with its directory.
    p.airlock(&["rm", "life"], 30).expect_code(0);
    assert_eq!(p.state("life"), "absent");
    assert!(!p.dir.join("life").exists());
}

/// Two sandboxes do not see each other; `rm -f` of a running one leaves no
/// process and no state; SIGKILL of a supervisor takes its VM with it and
/// `ls` says the sandbox is dead; `--idle-timeout` stops an idle one.
#[test]
fn tcg_sandboxes_are_apart_and_leave_nothing_behind() {
    let p = Place::new("sandbox-apart");
    for name in ["one", "two"] {
        p.create(name, &["--idle-timeout", "600"]).expect_code(0);
    }
    p.airlock(
        &[
            "exec",
            "one",
            "--",
            "sh",
            "-c",
            "echo secret-of-one > /tmp/secret; nohup sleep 999 >/dev/null 2>&1 &",
        ],
        120,
    )
    .expect_code(0);
    let r = p.airlock(
        &[
            "exec",
            "two",
            "--",
            "sh",
            "-c",
            "cat /tmp/secret; ps -eo args | grep -c '^sleep 999'",
        ],
        120,
    );
    assert!(!r.stdout.contains("secret-of-one"), "{r}");
    assert!(
        r.stdout.trim_end().ends_with('0'),
        "two sees one's process\n{r}"
    );

    // SIGKILL of one's supervisor: its VM goes too; ls says dead.
    let v = p.inspect("one");
    let pid =
        i32::try_from(v["supervisor_pid"].as_i64().expect("supervisor pid")).expect("pid fits");
    let pids = vm_pids(Path::new(v["audit_log"].as_str().expect("audit")));
    assert!(!pids.is_empty());
    // SAFETY: kill(2) of the supervisor this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(
        wait_dead(&pids, Duration::from_secs(20)).is_empty(),
        "a VM outlived its supervisor"
    );
    assert_eq!(p.wait_state("one", "dead", Duration::from_secs(10)), "dead");
    let r = p.airlock(&["exec", "one", "--", "true"], 30);
    r.expect_code(2).expect_stderr("not running");
    p.airlock(&["rm", "one"], 30).expect_code(0);
    assert!(!p.dir.join("one").exists());

    // rm -f of a running sandbox.
    let v = p.inspect("two");
    let pids = vm_pids(Path::new(v["audit_log"].as_str().expect("audit")));
    let sup =
        i32::try_from(v["supervisor_pid"].as_i64().expect("supervisor pid")).expect("pid fits");
    // With a name that does not exist among them: that one is said, the
    // others are still removed.
    let r = p.airlock(&["rm", "-f", "two", "ghost"], 120);
    r.expect_code(2)
        .expect_stdout_line("two")
        .expect_stderr("no sandbox named ghost");
    assert!(
        wait_dead(&pids, Duration::from_secs(10)).is_empty(),
        "VM processes left"
    );
    assert!(!alive(sup), "the supervisor is left");
    assert!(!p.dir.join("two").exists(), "state left");
    assert_eq!(p.state("two"), "absent");

    // --idle-timeout: stops by itself once nothing runs.
    p.create("idle", &["--idle-timeout", "3"]).expect_code(0);
    p.airlock(&["exec", "idle", "--", "true"], 120)
        .expect_code(0);
    assert_eq!(
        p.wait_state("idle", "stopped", Duration::from_secs(90)),
        "stopped"
    );
    let v = p.inspect("idle");
    let records = audit_records(Path::new(v["audit_log"].as_str().expect("audit")));
    let stops = fields_of_kind(&records, "sandbox.stop");
    assert_eq!(stops.len(), 1, "{stops:#?}");
    assert_eq!(stops[0]["why"], "idle");
    p.airlock(&["rm", "idle"], 30).expect_code(0);
}

/// Bad input: one clear line, exit 2, nothing changed; no VM starts.
#[test]
fn sandbox_bad_input_is_a_usage_error() {
    let p = Place::new("sandbox-bad");
    for (args, says) in [
        (vec!["exec", "nope", "--", "true"], "no sandbox named nope"),
        (vec!["inspect", "nope"], "no sandbox named nope"),
        (vec!["stop", "nope"], "no sandbox named nope"),
        (vec!["rm", "nope"], "no sandbox named nope"),
        (vec!["logs", "nope"], "no sandbox named nope"),
        (vec!["exec", "../x", "--", "true"], "not a sandbox name"),
        (vec!["create", "--name=-bad"], "not a sandbox name"),
        (vec!["create", "--name", "a/b"], "not a sandbox name"),
        (
            vec!["create", "--name", "ok", "--", "true"],
            "create takes no command",
        ),
        (
            vec!["create", "--name", "ok", "--timeout", "5"],
            "create has no --timeout",
        ),
        (vec!["create", "--name", "ok", "-i"], "create takes no -i"),
        (
            vec!["create", "--name", "ok", "--label", "novalue"],
            "expected KEY=VALUE",
        ),
        (vec!["create", "--name", "ok", "--mem", "1"], "mem"),
        (vec!["ls", "--filter", "color=red"], "expected name=NAME"),
        // Found by the supervisor, before anything boots: no sandbox is left.
        (
            vec![
                "create",
                "--name",
                "nokernel",
                "--kernel",
                "/nonexistent/vmlinux",
            ],
            "/nonexistent/vmlinux",
        ),
    ] {
        let r = p.airlock(&args, 30);
        r.expect_code(2).expect_one_line_error(says);
    }
    // Nothing was made.
    let r = p.airlock(&["ls", "--all", "--format", "json"], 30);
    r.expect_code(0);
    assert_eq!(r.stdout.trim(), "[]", "{r}");
}

/// The same life through airlock-vmm: `--engine kvm` in the nested test
/// bed.
#[test]
fn kvm_sandbox_in_the_test_bed() {
    let image = build_file("rootfs.img");
    let airlock = bin("airlock");
    let s = format!(
        "set -e; export AIRLOCK_SANDBOX_DIR=/tmp/sbx; A={airlock}; \
         $A create --engine kvm --image-root {image} --name k1; \
         $A exec k1 -- sh -c 'echo kept > /tmp/f'; \
         $A exec k1 -- cat /tmp/f; \
         echo abc | $A exec -i k1 -- tr a-z A-Z; \
         set +e; $A exec k1 -- sh -c 'exit 7'; echo \"code=$?\"; set -e; \
         $A ls --format json; \
         $A stop -t 1 k1; $A ls --all --format json; $A rm k1; $A ls --all --format json"
    );
    let r = testbed(&["sh", "-c", &s], 900);
    r.expect_code(0).expect_stderr("engine: kvm");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "k1", "{r}");
    assert_eq!(lines[1], "kept", "{r}");
    assert_eq!(lines[2], "ABC", "{r}");
    assert_eq!(lines[3], "code=7", "{r}");
    let running: Value = serde_json::from_str(lines[4]).expect("ls JSON");
    assert_eq!(running[0]["state"], "running", "{r}");
    assert_eq!(running[0]["engine"], "kvm", "{r}");
    assert_eq!(lines[5], "k1", "{r}");
    let stopped: Value = serde_json::from_str(lines[6]).expect("ls JSON");
    assert_eq!(stopped[0]["state"], "stopped", "{r}");
    assert_eq!(lines[7], "k1", "{r}");
    assert_eq!(lines[8], "[]", "{r}");
}
