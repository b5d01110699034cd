//! The VMM's own confinement: per-thread seccomp filters and the jail.
//! Checked through `airlock run --engine kvm` in the nested test bed, with
//! hidden VMM test flags added by a wrapper (`$AIRLOCK_VMM`), and on this
//! host for what needs no guest.

use std::path::{Path, PathBuf};

use airlock_e2e::{bin, rel, root, run, scratch, testbed, Run};

/// A wrapper that runs airlock-vmm with `extra` flags, for `$AIRLOCK_VMM`.
fn vmm_wrapper(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let wrapper = dir.join(name);
    let vmm = root().join(bin("airlock-vmm"));
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec {} \"$@\" {extra}\n", vmm.display()),
    )
    .expect("wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    wrapper
}

/// Runs a shell script in the test bed with `$A` set to airlock.
fn in_testbed(script: &str, timeout_s: u32) -> Run {
    let full = format!("A={}; {script}", bin("airlock"));
    testbed(&["sh", "-c", &full], timeout_s)
}

#[test]
fn kvm_a_forbidden_system_call_kills_the_vmm_and_the_run_fails_clearly() {
    let dir = scratch("seccomp-kill");
    // 5 s after the guest's init started, the VMM thread opens an AF_INET
    // socket, which its filter does not allow.
    let wrapper = vmm_wrapper(&dir, "vmm", "--test-forbidden-syscall 5");
    // The VMM's log (vm.log) stays in the kept run directory; busybox has
    // no pgrep in the test bed, ps does.
    let r = in_testbed(
        &format!(
            "AIRLOCK_VMM={} $A run --engine kvm --keep-console -- sh -c 'echo started; sleep 300' \
             2> /tmp/err; code=$?; cat /tmp/err >&2; \
             c=$(sed -n 's/^airlock: console log: //p' /tmp/err); \
             sed 's/^/vm.log: /' \"$(dirname \"$c\")/vm.log\"; \
             sleep 1; if ps | grep -q '[a]irlock-vmm'; then echo LEFT-BEHIND; fi; exit $code",
            rel(&wrapper)
        ),
        600,
    );
    // The command was running (Hello came), then the VM died under it: the
    // broker's "VM stopped before the exit status" code, 121.
    r.expect_code(121).expect_stdout_line("started");
    // The VMM's log names the cause.
    assert!(r.stdout.contains("making a forbidden system call"), "{r}");
    assert!(
        r.stdout.lines().any(|l| l.starts_with("vm.log: ")
            && l.contains("seccomp: a VMM thread made system call 41") // socket
            && l.contains("killed by SIGSYS")),
        "{r}"
    );
    assert!(!r.stdout.contains("LEFT-BEHIND"), "{r}");
    // airlock's own report says how the VM process ended and shows the
    // seccomp line from its log.
    assert!(r.stderr.contains("signal 31"), "{r}");
    assert!(
        r.stderr
            .contains("seccomp: a VMM thread made system call 41"),
        "{r}"
    );
    assert!(
        !r.stdout.contains("socket(AF_INET) was allowed"),
        "the filter let the call through\n{r}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `jail-report: KEY VALUE` lines the VMM printed into its log.
fn report<'a>(r: &'a Run, key: &str) -> Vec<&'a str> {
    let prefix = format!("jail-report: {key} ");
    r.stdout
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect()
}

#[test]
fn kvm_the_vmm_runs_jailed_unprivileged_without_network_or_host_files() {
    let dir = scratch("jail-report");
    let wrapper = vmm_wrapper(&dir, "vmm", "--test-report-jail");
    // The VMM's log (vm.log) stays in the kept run directory.
    let r = in_testbed(
        &format!(
            "AIRLOCK_VMM={} $A run --engine kvm --keep-console -- echo guest-ran 2> /tmp/err; \
             code=$?; cat /tmp/err >&2; c=$(sed -n 's/^airlock: console log: //p' /tmp/err); \
             cat \"$(dirname \"$c\")/vm.log\"; exit $code",
            rel(&wrapper)
        ),
        600,
    );
    r.expect_code(0).expect_stdout_line("guest-ran");
    // Started by root (the test bed's user), it runs as nobody.
    assert_eq!(report(&r, "uid"), ["65534 gid 65534"], "{r}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(report(&r, set), ["0000000000000000"], "{set}\n{r}");
    }
    assert_eq!(report(&r, "NoNewPrivs"), ["1"], "{r}");
    // Its own network namespace: only the interfaces every new namespace
    // has, none of them up.
    let ifaces = report(&r, "interface");
    assert!(!ifaces.is_empty(), "no interface report\n{r}");
    assert!(
        ifaces.iter().all(|l| l.ends_with(" down")),
        "an interface is up: {ifaces:?}\n{r}"
    );
    assert!(
        !report(&r, "interfaces").iter().any(|l| l.contains("eth")),
        "{r}"
    );
    // An empty root: no host files, no devices, no /proc.
    for path in ["/etc/passwd", "/dev/kvm", "/proc/self/status"] {
        assert_eq!(
            report(&r, &format!("open {path}")),
            ["failed errno 2"],
            "{path}\n{r}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn kvm_an_unprivileged_vmm_jails_itself_in_a_user_namespace() {
    // Run directly as an ordinary user (uid 1000, made up in the test bed's
    // throw-away root, with /dev/kvm opened up to it): no root to drop, so
    // the jail's namespaces hang off a user namespace; the guest still
    // boots under the filters. /etc/passwd exists in the test bed, so the
    // failed open is the jail's doing.
    let script = format!(
        "chmod 666 /dev/kvm; mkdir -p /tmp/u /etc; chmod 777 /tmp/u; \
         printf 'root:x:0:0::/root:/bin/sh\\nu:x:1000:1000::/tmp:/bin/sh\\n' > /etc/passwd; \
         printf 'root:x:0:\\nu:x:1000:\\n' > /etc/group; \
         su u -c '{} --kernel build/vmlinux --initrd build/initramfs.cpio --console none \
         --vsock-uds /tmp/u/v --test-report-jail' 2>&1",
        root().join(bin("airlock-vmm")).display()
    );
    let r = testbed(&["sh", "-c", &script], 600);
    r.expect_code(0)
        .expect_stdout_line("jail-report: uid 1000 gid 1000")
        .expect_stdout_line("jail-report: CapEff 0000000000000000")
        .expect_stdout_line("jail-report: CapBnd 0000000000000000")
        .expect_stdout_line("jail-report: NoNewPrivs 1")
        .expect_stdout_line("jail-report: open /etc/passwd failed errno 2");
    // The guest ran (its init reached the boot timer) and ended cleanly.
    assert!(r.stdout.contains("guest init reached"), "{r}");
    assert!(
        r.stdout.contains("guest stopped: guest reset the machine"),
        "{r}"
    );
}

// ---- on this host: no guest needed ----

#[test]
fn a_jailed_vmm_exits_with_its_own_code_through_the_jail() {
    // The jail forks: the parent must exit like the VMM inside (2: bad input).
    let r = run(
        &[&bin("airlock-vmm"), "--kernel", "/nonexistent/vmlinux"],
        60,
    );
    r.expect_code(2).expect_stderr("kernel not found");
}

#[test]
fn the_vmm_s_command_line_answers_like_a_tool() {
    // Usage errors: exit 2, what is wrong, the usage line; nothing booted.
    let vmm = bin("airlock-vmm");
    for (args, says) in [
        (
            &["--kernel", "/k", "--mem", "5"][..],
            "5 is not in 64..=65536",
        ),
        (&["--kernel", "/k", "--cpus", "17"], "17 is not in 1..=16"),
        (
            &["--kernel", "/k", "--bogus"],
            "unexpected argument '--bogus'",
        ),
        (&["--mem", "512"], "'--kernel <PATH>' was not given"),
        (&["--kernel", "/k", "--kernel", "/j"], "more than once"),
        (
            &["--kernel", "/k", "--prefault", "all"],
            "'--prefault' needs '--restore'",
        ),
        (
            &["--kernel=/k", "--disk", "/a"],
            "expected ro:PATH or rw:PATH",
        ),
    ] {
        let argv: Vec<&str> = std::iter::once(vmm.as_str())
            .chain(args.iter().copied())
            .collect();
        let r = run(&argv, 60);
        r.expect_code(2)
            .expect_stderr(says)
            .expect_stderr("Usage: airlock-vmm [OPTIONS] --kernel <PATH>");
        assert!(r.stdout.is_empty(), "{r}");
    }
    // --help and --version on stdout, exit 0.
    let r = run(&[&vmm, "--help"], 60);
    r.expect_code(0);
    for option in [
        "--kernel <PATH>",
        "--restore <DIR>",
        "--snapshot-to <DIR>",
        "--vsock-uds <PATH>",
        "--timings",
    ] {
        assert!(r.stdout.contains(option), "--help lacks {option}\n{r}");
    }
    let r = run(&[&vmm, "-V"], 60);
    r.expect_code(0);
    assert_eq!(
        r.stdout,
        format!("airlock-vmm {}\n", env!("CARGO_PKG_VERSION")),
        "{r}"
    );
}

#[test]
fn running_without_seccomp_or_jail_is_loud() {
    let r = run(
        &[
            &bin("airlock-vmm"),
            "--no-seccomp",
            "--no-jail",
            "--kernel",
            "/nonexistent/vmlinux",
        ],
        60,
    );
    r.expect_code(2)
        .expect_stderr("WARNING: --no-jail")
        .expect_stderr("WARNING: --no-seccomp");
}
