//! Live mounts (`-v`, `--mount`): host folders and files shared with the
//! agent's container while it runs, over FUSE through the vsock door, on
//! both engines. What a user sees: a host write seen by the polling guest,
//! a guest write on the host before the command ends, `touch` mtimes, a
//! read-only mount refusing writes, single-file and nested mounts, secrets
//! and symlinks that lead out of the mount not reaching host files, the
//! audit records; and the NanoClaw pattern: two SQLite files exchanged by
//! a host and a guest process.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use airlock_e2e::{
    audit_records, bin, build_file, fields_of_kind, rel, root, scratch, tcg_on_image, testbed, Run,
};

/// The guest's side of the coherence test: waits for the host's write,
/// writes its own, and probes every rule.
const GUEST: &str = r#"
set -u
cat /workspace/msg
echo ready > /workspace/ready
i=0
while [ "$(cat /workspace/msg)" != v2 ]; do
    i=$((i+1)); [ $i -lt 1200 ] || { echo never-saw-v2; exit 9; }
    sleep 0.1
done
echo saw-v2
touch -d '2001-02-03 04:05:06 UTC' /workspace/.heartbeat
echo guest-data > /workspace/from-guest
mv /workspace/from-guest /workspace/renamed
rm /workspace/doomed
ls -a /workspace | grep -q '^.env$' && echo env-listed
cat /workspace/.env 2>/dev/null && echo env-read
cat /workspace/escape 2>/dev/null; cat /workspace/escape-rel 2>/dev/null
readlink /workspace/escape
echo nope > /ro/f 2>/dev/null && echo ro-written || echo ro-refused
cat /ro/f
cat /cfg/settings.json
cat /workspace/agent/inner.txt
echo nested-write > /workspace/agent/new.txt
echo done
"#;

/// Lays out the host side: the session folder, a folder nested in it, a
/// read-only folder, a single file, a secret outside all of them.
fn layout(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
    for d in ["ws", "agent", "ro"] {
        fs::create_dir_all(dir.join(d)).expect("test step");
    }
    fs::write(dir.join("ws/msg"), "v1\n").expect("test step");
    fs::write(dir.join("ws/doomed"), "x").expect("test step");
    fs::write(dir.join("ws/.env"), "API_KEY=do-not-leak\n").expect("test step");
    fs::write(dir.join("ws/.heartbeat"), "").expect("test step");
    fs::write(dir.join("agent/inner.txt"), "inner\n").expect("test step");
    fs::write(dir.join("ro/f"), "read-only content\n").expect("test step");
    fs::write(dir.join("settings.json"), "{\"a\":1}\n").expect("test step");
    fs::write(dir.join("outside-secret.txt"), "TOPSECRET-OUTSIDE\n").expect("test step");
    let secret = fs::canonicalize(dir.join("outside-secret.txt")).expect("test step");
    std::os::unix::fs::symlink(&secret, dir.join("ws/escape")).expect("test step");
    std::os::unix::fs::symlink("../outside-secret.txt", dir.join("ws/escape-rel"))
        .expect("test step");
}

fn mount_args(dir: &Path) -> Vec<String> {
    let p = |s: &str| dir.join(s).display().to_string();
    vec![
        "-v".into(),
        format!("{}:/workspace", p("ws")),
        "-v".into(),
        format!("{}:/workspace/agent", p("agent")),
        "--mount".into(),
        format!("type=bind,src={},dst=/ro,ro", p("ro")),
        "-v".into(),
        format!("{}:/cfg/settings.json:ro", p("settings.json")),
    ]
}

/// What the host sees afterwards, and what the guest printed.
fn check(dir: &Path, r: &Run, log: &Path) {
    r.expect_code(0)
        .expect_stdout_line("v1")
        .expect_stdout_line("saw-v2")
        .expect_stdout_line("ro-refused")
        .expect_stdout_line("read-only content")
        .expect_stdout_line("{\"a\":1}")
        .expect_stdout_line("inner")
        .expect_stdout_line("done");
    for leak in [
        "env-listed",
        "env-read",
        "do-not-leak",
        "TOPSECRET",
        "ro-written",
    ] {
        assert!(!r.stdout.contains(leak), "{leak}\n{r}");
    }
    // The link is served as a link: its text, resolved in the guest.
    assert!(r.stdout.contains("outside-secret.txt"), "{r}");
    assert_eq!(
        fs::read_to_string(dir.join("ws/renamed")).expect("test step"),
        "guest-data\n"
    );
    assert!(!dir.join("ws/from-guest").exists() && !dir.join("ws/doomed").exists());
    assert_eq!(
        fs::read_to_string(dir.join("agent/new.txt")).expect("test step"),
        "nested-write\n"
    );
    assert_eq!(
        fs::read_to_string(dir.join("ro/f")).expect("test step"),
        "read-only content\n"
    );
    assert_eq!(
        fs::read_to_string(dir.join("ws/.env")).expect("test step"),
        "API_KEY=do-not-leak\n"
    );
    let beat = fs::metadata(dir.join("ws/.heartbeat")).expect("test step");
    assert_eq!(
        beat.mtime(),
        981_173_106,
        "the guest's touch -d reached the host"
    );
    // Files the guest made belong to whoever runs airlock.
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    assert_eq!(
        fs::metadata(dir.join("ws/renamed"))
            .expect("test step")
            .uid(),
        me
    );
    let records = audit_records(log);
    let start = &fields_of_kind(&records, "run.start")[0];
    let mounts = start["policy"]["mounts"]
        .as_array()
        .expect("mounts in run.start");
    assert_eq!(mounts.len(), 4, "{start}");
    let at = |t: &str| {
        mounts
            .iter()
            .find(|m| m["target"] == t)
            .unwrap_or_else(|| panic!("{t}"))
    };
    assert_eq!(at("/ro")["mode"], "ro");
    assert_eq!(at("/workspace")["mode"], "rw");
    assert_eq!(at("/cfg/settings.json")["kind"], "file");
    assert!(at("/workspace")["source"]
        .as_str()
        .expect("test step")
        .ends_with("/ws"));
    let done = fields_of_kind(&records, "mount.done");
    assert_eq!(done.len(), 4, "{done:?}");
    let ws = done
        .iter()
        .find(|d| d["target"] == "/workspace")
        .expect("test step");
    assert_eq!(ws["target"], "/workspace");
    assert!(
        ws["bytes_written"].as_u64().expect("test step") >= 11,
        "{ws}"
    );
    assert!(
        ws["created"].as_u64().expect("test step") >= 1
            && ws["removed"].as_u64().expect("test step") >= 1,
        "{ws}"
    );
}

/// Waits for `path` to appear (the guest wrote it while its command runs),
/// then writes the host's message.
fn host_side(dir: &Path, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(400);
    while !dir.join("ws/ready").exists() {
        if Instant::now() > deadline || child.try_wait().expect("test step").is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Write-then-close, as NanoClaw's host does.
    fs::write(dir.join("ws/msg.tmp"), "v2\n").expect("test step");
    fs::rename(dir.join("ws/msg.tmp"), dir.join("ws/msg")).expect("test step");
}

#[test]
fn tcg_live_mounts_are_coherent_both_ways_and_keep_their_rules() {
    let dir = scratch("mounts-tcg");
    layout(&dir);
    let log = dir.join("audit.jsonl");
    let mut argv = vec![
        bin("airlock"),
        "run".into(),
        "--engine".into(),
        "tcg".into(),
        "--image-root".into(),
        build_file("rootfs.img"),
        "--audit".into(),
        log.display().to_string(),
    ];
    argv.extend(mount_args(&dir));
    argv.extend(["--".into(), "sh".into(), "-c".into(), GUEST.into()]);
    let mut child = Command::new(&argv[0])
        .current_dir(root())
        .args(&argv[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("test step");
    host_side(&dir, &mut child);
    let out = child.wait_with_output().expect("test step");
    let r = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    check(&dir, &r, &log);
}

#[test]
fn kvm_live_mounts_through_our_vmm() {
    let dir = scratch("mounts-kvm");
    layout(&dir);
    let log = dir.join("audit.jsonl");
    let rd = rel(&dir);
    let mounts: Vec<String> = mount_args(&dir)
        .into_iter()
        .map(|a| format!("'{a}'"))
        .collect();
    let script = format!(
        "{airlock} run --engine kvm --mem 1024 --image-root {image} --audit {log} {mounts} \
         -- sh -c \"$GUEST\" > {rd}/stdout 2> {rd}/stderr & pid=$!
         i=0; while [ ! -f {rd}/ws/ready ] && [ $i -lt 3000 ] && kill -0 $pid 2>/dev/null; do i=$((i+1)); sleep 0.2; done
         printf 'v2\\n' > {rd}/ws/msg.tmp && mv {rd}/ws/msg.tmp {rd}/ws/msg
         wait $pid; echo \"code=$?\"",
        airlock = bin("airlock"),
        image = build_file("rootfs.img"),
        log = rel(&log),
        mounts = mounts.join(" "),
    );
    let r = testbed(
        &["env", &format!("GUEST={GUEST}"), "sh", "-c", &script],
        900,
    );
    r.expect_code(0);
    let code: i32 = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("code="))
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or_else(|| panic!("no code\n{r}"));
    let inner = Run {
        code: Some(code),
        stdout: fs::read_to_string(dir.join("stdout")).unwrap_or_default(),
        stderr: fs::read_to_string(dir.join("stderr")).unwrap_or_default(),
    };
    assert!(inner.stderr.contains("engine: kvm"), "{inner}");
    check(&dir, &inner, &log);
}

/// NanoClaw's pattern: the host writes inbound.db, the agent polls it and
/// answers in outbound.db; each side opens, writes and closes its own file
/// per message and polls the other's (read-only, retrying while the other
/// is mid-write: locks do not cross the boundary).
const SQLITE_SIDE: &str = r#"
import sqlite3, sys, time
mine, theirs, role, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def with_db(path, ro, fn):
    while True:
        try:
            uri = "file:%s%s" % (path, "?mode=ro" if ro else "")
            c = sqlite3.connect(uri, uri=True, timeout=30)
            try:
                out = fn(c)
                if not ro: c.commit()
                return out
            finally:
                c.close()
        except sqlite3.Error as e:
            time.sleep(0.02)
with_db(mine, False, lambda c: c.execute("create table if not exists m (id integer primary key, body text)"))
sent, got = 0, 0
deadline = time.time() + 900
if role == "host":
    for i in range(1, count + 1):
        with_db(mine, False, lambda c: c.execute("insert into m values (?, ?)", (i, "msg %d" % i)))
while got < count and time.time() < deadline:
    try:
        rows = with_db(theirs, True, lambda c: c.execute("select id, body from m where id > ? order by id", (got,)).fetchall())
    except Exception:
        rows = []
    progressed = False
    for id, body in rows:
        if id != got + 1:
            break  # a gap: read again, never skip
        want = ("re: msg %d" % id) if role == "host" else ("msg %d" % id)
        assert body == want, (id, body)
        if role == "guest":
            with_db(mine, False, lambda c: c.execute("insert into m values (?, ?)", (id, "re: " + body)))
        got = id
        progressed = True
    if not progressed:
        time.sleep(0.05)
ok = with_db(mine, True, lambda c: c.execute("pragma integrity_check").fetchone()[0])
n = with_db(mine, True, lambda c: c.execute("select count(*), count(distinct id) from m").fetchone())
print(role, "got", got, "integrity", ok, "rows", n[0], "distinct", n[1])
"#;

#[test]
fn tcg_sqlite_messages_cross_the_boundary_nanoclaw_style() {
    let dir = scratch("mounts-sqlite");
    let _ = fs::remove_dir_all(&dir);
    let sess = dir.join("sess");
    fs::create_dir_all(&sess).expect("test step");
    fs::write(dir.join("side.py"), SQLITE_SIDE).expect("test step");
    fs::write(sess.join("side.py"), SQLITE_SIDE).expect("test step");
    let count = "1000";
    let airlock = bin("airlock");
    let image = build_file("rootfs.img");
    let vol = format!("{}:/workspace", sess.display());
    let guest = Command::new(&airlock)
        .current_dir(root())
        .args([
            "run",
            "--engine",
            "tcg",
            "--mem",
            "512",
            "--image-root",
            &image,
            "-v",
            &vol,
        ])
        .args(["--timeout", "1200", "--", "python3", "/workspace/side.py"])
        .args([
            "/workspace/outbound.db",
            "/workspace/inbound.db",
            "guest",
            count,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("test step");
    let host = Command::new("python3")
        .arg(dir.join("side.py"))
        .args([sess.join("inbound.db"), sess.join("outbound.db")])
        .args(["host", count])
        .output()
        .expect("test step");
    let guest = guest.wait_with_output().expect("test step");
    let g = String::from_utf8_lossy(&guest.stdout);
    let h = String::from_utf8_lossy(&host.stdout);
    let why = format!(
        "host: {h}{}\nguest: {g}{}",
        String::from_utf8_lossy(&host.stderr),
        String::from_utf8_lossy(&guest.stderr)
    );
    assert!(guest.status.success() && host.status.success(), "{why}");
    assert!(
        h.contains("host got 1000 integrity ok rows 1000 distinct 1000"),
        "{why}"
    );
    assert!(
        g.contains("guest got 1000 integrity ok rows 1000 distinct 1000"),
        "{why}"
    );
}

#[test]
fn tcg_bad_mounts_are_refused_before_boot() {
    let dir = scratch("mounts-bad");
    fs::create_dir_all(&dir).expect("test step");
    let d = dir.display().to_string();
    for (args, says) in [
        (
            vec!["-v".to_owned(), "/no/such/dir:/w".to_owned()],
            "/no/such/dir",
        ),
        (
            vec!["-v".to_owned(), format!("{d}:relative")],
            "must be absolute",
        ),
        (vec!["-v".to_owned(), format!("{d}:/proc/x")], "reserved"),
        (vec!["-v".to_owned(), format!("{d}:/w:rx")], "unknown mode"),
        (
            vec!["--mount".to_owned(), format!("type=volume,src={d},dst=/w")],
            "bind only",
        ),
        (
            vec![
                "-v".to_owned(),
                format!("{d}:/w"),
                "-v".to_owned(),
                format!("{d}:/w"),
            ],
            "two mounts at /w",
        ),
        (
            vec![
                "-v".to_owned(),
                format!("{d}:/w"),
                "--no-container".to_owned(),
            ],
            "not with --no-container",
        ),
    ] {
        let mut opts: Vec<&str> = args.iter().map(String::as_str).collect();
        opts.push("--timeout");
        opts.push("30");
        let r = tcg_on_image(&opts, &["true"], &[], 60);
        r.expect_code(2).expect_stderr(says);
        assert!(!r.stderr.contains("engine:"), "booted anyway\n{r}");
    }
}

#[test]
fn tcg_a_guest_cannot_fill_the_host_disk_through_a_mount() {
    let dir = scratch("mounts-quota");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("w")).expect("mkdir");
    let vol = format!("{}:/w", dir.join("w").display());
    let log = dir.join("audit.jsonl");
    let log_s = log.display().to_string();
    let script = "head -c 100000 /dev/zero > /w/big; echo big=$?; \
                  for i in 1 2 3 4 5; do touch /w/f$i || echo touch-refused; done";
    let r = tcg_on_image(
        &[
            "-v",
            &vol,
            "--mount-max-write",
            "65536",
            "--mount-max-files",
            "3",
            "--audit",
            &log_s,
        ],
        &["sh", "-c", script],
        &[],
        300,
    );
    r.expect_code(0).expect_stdout_line("big=1");
    assert!(r.stderr.contains("quota"), "{r}");
    let big = fs::metadata(dir.join("w/big")).expect("big").len();
    assert!(big <= 65536, "{big} bytes reached the host");
    let made = (1..=5)
        .filter(|i| dir.join(format!("w/f{i}")).exists())
        .count();
    assert_eq!(made, 2, "big plus two files make three entries\n{r}");
    assert_eq!(r.stdout.matches("touch-refused").count(), 3, "{r}");
    let records = audit_records(&log);
    let done = &fields_of_kind(&records, "mount.done")[0];
    assert!(done["refused"].as_u64().expect("refused") >= 4, "{done}");
    assert!(
        done["bytes_written"].as_u64().expect("bytes") <= 65536,
        "{done}"
    );
}
