//! A hostile agent against the guest's side: only the init speaks to the
//! host. The agent's container cannot open an `AF_VSOCK` socket; the init
//! opens every connection it needs before the command starts, so a forged
//! connection to a one-connection port (control 1024, workspace 1025,
//! results 1026) is refused and audited and the real results still arrive;
//! without a container the command runs as uid 1000 with no capabilities
//! and no vsock, and cannot take the init's control connection to forge its
//! exit status. On the tcg engine on this host and through our VMM in the
//! nested test bed.

use std::fs;
use std::path::Path;

use airlock_e2e::{
    audit_records, bin, build_file, field, fields_of_kind, rel, scratch, tcg_on_image, testbed, Run,
};
use airlock_protocol::{encode, ExitStatus, FileEntry, FileKind, Message};
use serde_json::Value;

/// Tries `AF_VSOCK` (plain, and with high bits above the `int` the kernel
/// reads), then `AF_UNIX` and `AF_INET`; prints one line each.
const SOCKETS_PY: &str = r#"
import ctypes, errno, socket
def name(e):
    return errno.errorcode.get(e, str(e))
try:
    socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    print("vsock: opened", flush=True)
except OSError as e:
    print(f"vsock: {name(e.errno)}", flush=True)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
fd = libc.syscall(ctypes.c_long(41), ctypes.c_long((1 << 32) | 40), ctypes.c_long(1), ctypes.c_long(0))
print("vsock-wide: " + ("opened" if fd >= 0 else name(ctypes.get_errno())), flush=True)
for fam, label in ((socket.AF_UNIX, "unix"), (socket.AF_INET, "inet")):
    try:
        socket.socket(fam, socket.SOCK_STREAM).close()
        print(f"{label}: ok", flush=True)
    except OSError as e:
        print(f"{label}: {name(e.errno)}", flush=True)
"#;

/// As root in the VM (`--vm-root --no-container`): after the command has
/// started, connect to each one-connection port and send a forged frame
/// (an `Exit(0)` on the control port, a result file on the results port),
/// write the real result, exit 3.
const FORGE_PORTS_PY: &str = r#"
import socket, sys
forged = {
    1024: open("/workspace/forged-exit.bin", "rb").read(),
    1025: b"\x00",
    1026: open("/workspace/forged-results.bin", "rb").read(),
}
for port, data in forged.items():
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect((2, port))
        try:
            s.sendall(data)
            got = s.recv(4096)
            print(f"port {port}: connected, sent, host answered {len(got)} bytes", flush=True)
        except OSError as e:
            print(f"port {port}: connected, then {e}", flush=True)
    except OSError as e:
        print(f"port {port}: refused: {e}", flush=True)
    s.close()
open("/workspace/out/real.txt", "w").write("real result\n")
sys.exit(3)
"#;

/// Without `--vm-root` and without a container: who the command is, what
/// it may not do (vsock, `pidfd_getfd` and `ptrace` on PID 1, PID 1's
/// environment), what it may (/tmp, HOME, /workspace); with any descriptor
/// of the init it got it would write a forged `Exit(0)`. Then it exits 3.
const FORGE_EXIT_PY: &str = r#"
import ctypes, errno, os, sys
def name(e):
    return errno.errorcode.get(e, str(e))
print(f"ids: {os.getuid()} {os.getgid()} {sorted(os.getgroups())}", flush=True)
with open("/proc/self/status") as f:
    caps = [l.split()[1] for l in f if l.startswith(("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"))]
print("caps: " + " ".join(caps), flush=True)
forged = open("/workspace/forged-exit.bin", "rb").read()
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
pidfd = os.pidfd_open(1)
errs, taken = set(), 0
for fd in range(64):
    got = libc.syscall(ctypes.c_long(438), ctypes.c_long(pidfd), ctypes.c_long(fd), ctypes.c_long(0))
    if got >= 0:
        taken += 1
        try:
            os.write(got, forged)
        except OSError:
            pass
    else:
        errs.add(name(ctypes.get_errno()))
print(f"pidfd_getfd: taken {taken}, errors {','.join(sorted(errs))}", flush=True)
rc = libc.ptrace(ctypes.c_long(16), ctypes.c_long(1), None, None)
print("ptrace: " + ("attached" if rc == 0 else name(ctypes.get_errno())), flush=True)
try:
    open("/proc/1/environ", "rb").read()
    print("init environ: read", flush=True)
except OSError as e:
    print(f"init environ: {name(e.errno)}", flush=True)
for path in ("/tmp/t", os.environ["HOME"] + "/h", "/workspace/w", "/workspace/out/real.txt"):
    with open(path, "w") as f:
        f.write("real result\n")
print(f"home: {os.environ['HOME']}", flush=True)
sys.exit(3)
"#;

/// A workspace with the probes and the forged frames the guest sends.
fn workspace(dir: &Path) -> std::path::PathBuf {
    let ws = dir.join("ws");
    fs::create_dir_all(&ws).expect("mkdir");
    fs::write(ws.join("sockets.py"), SOCKETS_PY).expect("write");
    fs::write(ws.join("forge-ports.py"), FORGE_PORTS_PY).expect("write");
    fs::write(ws.join("forge-exit.py"), FORGE_EXIT_PY).expect("write");
    let exit = encode(&Message::Exit(ExitStatus::Exited(0))).expect("encode");
    fs::write(ws.join("forged-exit.bin"), exit).expect("write");
    let data = b"forged\n".to_vec();
    let sha256: [u8; 32] = {
        use sha2::Digest;
        sha2::Sha256::digest(&data).into()
    };
    let mut results = Vec::new();
    for msg in [
        Message::FileEntry(FileEntry {
            path: "forged.txt".into(),
            kind: FileKind::File,
            mode: 0o644,
            mtime: 0,
            size: data.len() as u64,
        }),
        Message::FileData(data.clone()),
        Message::FileEnd { sha256 },
        Message::FilesDone { count: 1, bytes: 7 },
    ] {
        results.extend(encode(&msg).expect("encode"));
    }
    fs::write(ws.join("forged-results.bin"), results).expect("write");
    ws
}

/// The ports of the `control.refused` records of the audit log at `log`.
fn refused_ports(log: &Path) -> Vec<u64> {
    let records = audit_records(log);
    let mut ports: Vec<u64> = fields_of_kind(&records, "control.refused")
        .iter()
        .filter_map(|f| f["port"].as_u64())
        .collect();
    ports.sort_unstable();
    ports
}

/// The `run.start` policy's `command_user`.
fn command_user(log: &Path) -> Value {
    let records = audit_records(log);
    let start = fields_of_kind(&records, "run.start");
    start
        .first()
        .unwrap_or_else(|| panic!("no run.start in {records:#?}"))["policy"]["command_user"]
        .clone()
}

fn expect_no_vsock(r: &Run) {
    assert_eq!(field(r, "vsock: "), "EPERM", "{r}");
    assert_eq!(field(r, "vsock-wide: "), "EPERM", "{r}");
    assert_eq!(field(r, "unix: "), "ok", "{r}");
    assert_eq!(field(r, "inet: "), "ok", "{r}");
}

fn expect_forgery_failed(r: &Run) {
    r.expect_code(3);
    assert_eq!(field(r, "ids: "), "1000 1000 []", "{r}");
    assert_eq!(
        field(r, "caps: "),
        "0000000000000000 0000000000000000 0000000000000000 0000000000000000 0000000000000000",
        "{r}"
    );
    assert_eq!(field(r, "pidfd_getfd: "), "taken 0, errors EPERM", "{r}");
    assert_eq!(field(r, "ptrace: "), "EPERM", "{r}");
    assert_eq!(field(r, "init environ: "), "EACCES", "{r}");
    assert_eq!(field(r, "home: "), "/tmp/home", "{r}");
}

// ---- tcg engine, on this host ----

#[test]
fn tcg_the_agents_container_cannot_open_vsock() {
    let dir = scratch("hostile-guest-container");
    let ws = workspace(&dir);
    let log = dir.join("audit.jsonl");
    let r = tcg_on_image(
        &["--workspace", &rel(&ws), "--audit", &rel(&log)],
        &["sh", "-c", "python3 /workspace/sockets.py; exit 4"],
        &[],
        300,
    );
    r.expect_code(4);
    expect_no_vsock(&r);
    assert_eq!(command_user(&log), "container root");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn tcg_a_nested_container_cannot_open_vsock_either() {
    let dir = scratch("hostile-guest-nested");
    let ws = workspace(&dir);
    let log = dir.join("audit.jsonl");
    let r = tcg_on_image(
        &["--nested", "--workspace", &rel(&ws), "--audit", &rel(&log)],
        &["sh", "-c", "python3 /workspace/sockets.py; exit 4"],
        &[],
        300,
    );
    r.expect_code(4);
    expect_no_vsock(&r);
    assert_eq!(command_user(&log), "privileged container root");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn tcg_forged_connections_are_refused_and_the_real_results_arrive() {
    let dir = scratch("hostile-guest-ports");
    let ws = workspace(&dir);
    let out = dir.join("out");
    let log = dir.join("audit.jsonl");
    let r = tcg_on_image(
        &[
            "--no-container",
            "--vm-root",
            "--workspace",
            &rel(&ws),
            "--out",
            &rel(&out),
            "--audit",
            &rel(&log),
        ],
        &["python3", "/workspace/forge-ports.py"],
        &[],
        300,
    );
    // The forged Exit(0) on a refused connection changed nothing.
    r.expect_code(3)
        .expect_stderr("refused connection 1 to the control port")
        .expect_stderr("refused extra connection 1 to file port 1025")
        .expect_stderr("refused extra connection 1 to file port 1026");
    assert_eq!(refused_ports(&log), [1024, 1025, 1026], "{r}");
    assert_eq!(command_user(&log), "root");
    // The real result, and nothing of the forged stream.
    assert_eq!(
        fs::read(out.join("real.txt")).expect("real result"),
        b"real result\n"
    );
    let names: Vec<_> = fs::read_dir(&out)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["real.txt"], "{r}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn tcg_without_a_container_the_command_cannot_forge_its_exit() {
    let dir = scratch("hostile-guest-exit");
    let ws = workspace(&dir);
    let out = dir.join("out");
    let log = dir.join("audit.jsonl");
    let r = tcg_on_image(
        &[
            "--no-container",
            "--workspace",
            &rel(&ws),
            "--out",
            &rel(&out),
            "--audit",
            &rel(&log),
        ],
        &[
            "sh",
            "-c",
            "echo uid=$(id -u); python3 /workspace/sockets.py; exec python3 /workspace/forge-exit.py",
        ],
        &[],
        300,
    );
    expect_forgery_failed(&r);
    expect_no_vsock(&r);
    r.expect_stdout_line("uid=1000");
    assert_eq!(command_user(&log), "uid 1000");
    // What it could write, it wrote: its results come back.
    assert_eq!(
        fs::read(out.join("real.txt")).expect("real result"),
        b"real result\n"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn tcg_initramfs_commands_run_as_uid_1000_unless_vm_root() {
    let airlock = bin("airlock");
    let script = "echo uid=$(id -u) gid=$(id -g) groups=$(id -G); echo home=$HOME; \
                  touch /tmp/t $HOME/h && echo writable; \
                  grep -E '^CapEff|^NoNewPrivs' /proc/self/status";
    let r = airlock_e2e::run(
        &[&airlock, "run", "--engine", "tcg", "--", "sh", "-c", script],
        300,
    );
    r.expect_code(0)
        .expect_stdout_line("uid=1000 gid=1000 groups=1000")
        .expect_stdout_line("home=/tmp/home")
        .expect_stdout_line("writable");
    assert!(
        r.stdout.contains("CapEff:\t0000000000000000"),
        "capabilities left\n{r}"
    );
    assert!(r.stdout.contains("NoNewPrivs:\t1"), "{r}");
    let r = airlock_e2e::run(
        &[
            &airlock,
            "run",
            "--engine",
            "tcg",
            "--vm-root",
            "--",
            "sh",
            "-c",
            "echo uid=$(id -u)",
        ],
        300,
    );
    r.expect_code(0).expect_stdout_line("uid=0");
}

/// Break 6's other form: the agent (uid 1000, initramfs mode, where
/// /workspace shares the root file system) hard-links a file it does not
/// own into /workspace/out for the init, which reads as root, to send. The
/// kernel's link protection refuses the link; nothing of it comes back.
#[test]
fn tcg_the_agent_cannot_hard_link_what_it_does_not_own_into_its_results() {
    let dir = scratch("hostile-guest-hardlink");
    let out = dir.join("out");
    let out_s = out.display().to_string();
    let airlock = bin("airlock");
    let script = "echo protected=$(cat /proc/sys/fs/protected_hardlinks); \
                  ls -ln /init | awk '{print \"owner=\" $3}'; \
                  if ln /init /workspace/out/init 2>/dev/null; then echo linked; else echo refused; fi; \
                  echo mine > /workspace/out/mine.txt";
    let r = airlock_e2e::run(
        &[
            &airlock, "run", "--engine", "tcg", "--out", &out_s, "--", "sh", "-c", script,
        ],
        300,
    );
    r.expect_code(0)
        .expect_stdout_line("protected=1")
        .expect_stdout_line("owner=0")
        .expect_stdout_line("refused");
    assert!(!out.join("init").exists(), "{r}");
    assert_eq!(
        std::fs::read(out.join("mine.txt")).expect("the command's own result"),
        b"mine\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vm_root_is_refused_with_a_container() {
    let airlock = bin("airlock");
    let image = build_file("rootfs.img");
    let r = airlock_e2e::run(
        &[
            &airlock,
            "run",
            "--engine",
            "tcg",
            "--image-root",
            &image,
            "--vm-root",
            "--",
            "true",
        ],
        60,
    );
    r.expect_code(2)
        .expect_one_line_error("--vm-root is for a command that runs directly in the VM");
}

// ---- our VMM, in the nested test bed ----

#[test]
fn kvm_no_vsock_forged_connections_refused_and_no_exit_forgery() {
    let dir = scratch("hostile-guest-kvm");
    let ws = workspace(&dir);
    let (out1, out2) = (dir.join("out1"), dir.join("out2"));
    let log = dir.join("audit.jsonl");
    let script = format!(
        "A='{airlock} run --engine kvm --mem 1024 --image-root {image} --workspace {ws}'; \
         $A -- sh -c 'python3 /workspace/sockets.py; exit 4'; echo container-exit=$?; \
         $A --no-container --vm-root --out {out1} --audit {log} -- python3 /workspace/forge-ports.py; \
           echo ports-exit=$?; \
         $A --no-container --out {out2} -- sh -c \
           'python3 /workspace/sockets.py; exec python3 /workspace/forge-exit.py'; \
           echo forge-exit=$?",
        airlock = bin("airlock"),
        image = build_file("rootfs.img"),
        ws = rel(&ws),
        out1 = rel(&out1),
        out2 = rel(&out2),
        log = rel(&log),
    );
    let r = testbed(&["sh", "-c", &script], 900);
    r.expect_code(0)
        .expect_stdout_line("container-exit=4")
        .expect_stdout_line("ports-exit=3")
        .expect_stdout_line("forge-exit=3")
        .expect_stderr("engine: kvm");
    // The container's lines, then the uid 1000 command's: both without vsock.
    let lines = |prefix: &str| -> Vec<&str> {
        r.stdout
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .collect()
    };
    assert_eq!(lines("vsock: "), ["EPERM", "EPERM"], "{r}");
    assert_eq!(lines("vsock-wide: "), ["EPERM", "EPERM"], "{r}");
    assert_eq!(lines("unix: "), ["ok", "ok"], "{r}");
    assert_eq!(refused_ports(&log), [1024, 1025, 1026], "{r}");
    assert_eq!(
        fs::read(out1.join("real.txt")).expect("real result"),
        b"real result\n"
    );
    assert!(!out1.join("forged.txt").exists(), "{r}");
    assert_eq!(field(&r, "pidfd_getfd: "), "taken 0, errors EPERM", "{r}");
    assert_eq!(field(&r, "ids: "), "1000 1000 []", "{r}");
    assert_eq!(
        fs::read(out2.join("real.txt")).expect("real result"),
        b"real result\n"
    );
    let _ = fs::remove_dir_all(&dir);
}
