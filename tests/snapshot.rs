//! Fast wake through airlock-vmm in the nested test bed: sandboxes woken
//! from one snapshot of the cache are each their own (randomness, clock,
//! files), and a damaged or mismatched snapshot is refused, said, and
//! followed by a cold boot.

use airlock_e2e::*;
use serde_json::Value;

/// One `vm.start` line per sandbox, printed by the script below as
/// `vmstart:NAME:JSON`.
fn vm_starts(r: &Run) -> Vec<(String, Value)> {
    r.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("vmstart:"))
        .map(|l| {
            let (name, json) = l.split_once(':').expect("name:json");
            let record: Value = serde_json::from_str(json).expect("vm.start JSON");
            (name.to_owned(), record["fields"].clone())
        })
        .collect()
}

/// Create → snapshot (the first create makes it) → 5 sandboxes woken from
/// the same snapshot: each answers its exec, reads 32 bytes of
/// /dev/urandom unlike every other, has the host's wall clock, and does
/// not see the file another wrote; every `vm.start` names the one
/// snapshot (the first made it). The first also recorded the snapshot's
/// working set, which the next wakes map ahead of their guests; damaged
/// before the fifth, it is said and not used, and the fifth works alike. Then the snapshot's state file is
/// damaged: the next create says the snapshot was refused and removed,
/// boots cold and works; a snapshot of another machine shape (256 MiB
/// where 320 MiB is asked) put in place of the right one is refused the
/// same way. The snapshot of a live sandbox holds its agent container
/// started: each woken sandbox takes it (audit `container.prepared`), and
/// its execs see the run's environment and reach the model endpoint and
/// the egress proxy.
#[test]
fn kvm_snapshot_wakes_distinct_sandboxes_and_refuses_bad_snapshots() {
    let airlock = bin("airlock");
    let image = build_file("rootfs.img");
    let script = format!(
        r#"set -e; date -u -s '{now}' > /dev/null
export AIRLOCK_SANDBOX_DIR=/tmp/sbx AIRLOCK_SNAPSHOT_DIR=/tmp/snaps
A={airlock}; C="create --engine kvm --image-root {image}"
log() {{ $A inspect $1 | sed -n 's/.*"audit_log": "\(.*\)",*$/\1/p'; }}
vmstart() {{ echo "vmstart:$1:$(grep '"kind":"vm.start"' "$(log $1)")"; echo "prepared:$1:$(grep -c '"kind":"container.prepared"' "$(log $1)")"; }}
for i in 1 2 3 4 5; do
  if [ $i = 5 ]; then printf 'X' | dd of=$(ls -d /tmp/snaps/[0-9a-f]*)/working-set bs=1 seek=60 count=1 conv=notrunc 2> /dev/null; fi
  mkdir -p /tmp/t$i; TMPDIR=/tmp/t$i $A $C -e MINE=env-$i --name s$i 2> /tmp/err; cat /tmp/err >&2; vmstart s$i
  if [ $i = 1 ]; then echo "snapshot-files: $(ls /tmp/snaps/[0-9a-f]* | tr '\n' ' ')"; fi
done
for f in $(find /tmp/t1 -name snapshot-record.log); do grep -h 'working set' $f | sed 's/^/record-line: /'; done
for i in 1 2 3 4 5; do grep -h 'restored from the snapshot\|working set' $(find /tmp/t$i -name vm.log) | sed "s/^/restore-line-$i: /"; done
for i in 1 2 3 4 5; do
  $A exec s$i -- sh -c "echo mine-$i > /tmp/mine-$i; echo files-$i: \$(ls /tmp | grep mine- | tr '\n' ' '); echo random-$i: \$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'); echo clock-$i: \$(date +%s); echo env-$i: \$MINE \$ANTHROPIC_BASE_URL"
  echo host-clock-$i: $(date +%s)
  if [ $i -le 2 ]; then $A exec s$i -- sh -c "echo model-$i: \$(curl -s -o /dev/null -w %{{http_code}} -X POST -d {{}} \$ANTHROPIC_BASE_URL/v1/messages); echo proxy-$i: \$(curl -s -o /dev/null -w %{{http_code}} http://example.com/)"; fi
done
for i in 1 2 3 4 5; do $A rm -f s$i > /dev/null; done
# A run whose snapshot (forced by hand) holds a keeper's container: the woken
# init removes it and makes the run's own.
AIRLOCK_SNAPSHOT_DIR=/tmp/snaps-np $A run --engine kvm --image-root {image} --cmdline airlock.prepare=1 --audit /tmp/np.jsonl -- echo not-prepared-ok 2> /tmp/err || cat /tmp/err >&2
echo "np-prepared:$(grep -c '"kind":"container.prepared"' /tmp/np.jsonl)"
echo "np-woken:$(grep '"kind":"vm.start"' /tmp/np.jsonl | grep -c state_sha256)"
# A sandbox with its own directory and user: its snapshot holds that container.
AIRLOCK_SNAPSHOT_DIR=/tmp/snaps-u $A $C -w /tmp -u 1000 --name u1 2> /tmp/err || cat /tmp/err >&2
$A exec u1 -- sh -c 'echo who-u1: $(id -u) $(pwd)'; vmstart u1; $A rm -f u1 > /dev/null
ls /tmp/snaps | grep -v '^\.' | sed 's/^/snapshot-dir: /'
S=$(ls -d /tmp/snaps/[0-9a-f]*)
printf 'X' | dd of=$S/state bs=1 seek=200 count=1 conv=notrunc 2> /dev/null
$A $C --name d1 2> /tmp/err || true; sed 's/^/damaged: /' /tmp/err
$A exec d1 -- echo cold-after-damage; vmstart d1; $A rm -f d1 > /dev/null
# Made again by the next create; then one of 320 MiB, replaced by it.
$A $C --name r1 2> /dev/null > /dev/null; vmstart r1; $A rm -f r1 > /dev/null
sleep 1; $A $C --mem 320 --name m0 2> /dev/null > /dev/null; $A rm -f m0 > /dev/null
BIG=$(ls -td /tmp/snaps/[0-9a-f]* | head -1); SMALL=$(ls -td /tmp/snaps/[0-9a-f]* | tail -1)
echo big=$BIG small=$SMALL
[ "$BIG" != "$SMALL" ]
cp $SMALL/state $BIG/state; cp $SMALL/memory $BIG/memory
$A $C --mem 320 --name m1 2> /tmp/err || true; sed 's/^/mismatched: /' /tmp/err
$A exec m1 -- sh -c 'echo cold-after-mismatch; grep MemTotal /proc/meminfo'; vmstart m1; $A rm -f m1 > /dev/null
echo done"#,
        now = utc_now(),
    );
    let r = testbed_script(3072, 1500, &script);
    r.expect_code(0).expect_stdout_line("done");
    let field = |prefix: &str| -> Vec<String> {
        r.stdout
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .map(|s| s.trim().to_owned())
            .collect()
    };
    // Every sandbox answered, and saw only its own file.
    for i in 1..=5 {
        let files = field(&format!("files-{i}:"));
        assert_eq!(files, [format!("mine-{i}")], "sandbox {i}\n{r}");
    }
    // 32 random bytes each, all different.
    let mut randoms = Vec::new();
    for i in 1..=5 {
        let random = field(&format!("random-{i}:"));
        assert_eq!(random.len(), 1, "{r}");
        assert_eq!(random[0].len(), 64, "32 bytes in hex: {r}");
        randoms.push(random[0].clone());
    }
    let mut unique = randoms.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5, "siblings share no randomness: {randoms:?}");
    // The wall clock is the host's (L1's), not the snapshot's.
    for i in 1..=5 {
        let guest: i64 = field(&format!("clock-{i}:"))[0].parse().expect("clock");
        let host: i64 = field(&format!("host-clock-{i}:"))[0]
            .parse()
            .expect("clock");
        assert!(
            (host - guest).abs() <= 3,
            "sandbox {i}: guest {guest}, host {host}\n{r}"
        );
    }
    // A live sandbox's snapshot holds its container started: every woken
    // sandbox took it instead of making its own, and its execs still get
    // the run's environment (its own variable, the model endpoint's).
    for i in 1..=5 {
        assert_eq!(field(&format!("prepared:s{i}:")), ["1"], "{r}");
        assert_eq!(
            field(&format!("env-{i}:")),
            [format!("env-{i} http://127.0.0.1:8088")],
            "{r}"
        );
    }
    // The model endpoint and the egress proxy listen where the container
    // is: a call gets the endpoint's API-shaped 403 (no upstream), a
    // request through the proxy its default-deny 403.
    for i in 1..=2 {
        assert_eq!(field(&format!("model-{i}:")), ["403"], "{r}");
        assert_eq!(field(&format!("proxy-{i}:")), ["403"], "{r}");
    }
    // A run's spec is not the keeper's: the container its snapshot held
    // (forced here with the boot word) is removed and the run's own made.
    assert!(r.stdout.lines().any(|l| l == "not-prepared-ok"), "{r}");
    assert_eq!(field("np-woken:"), ["1"], "{r}");
    assert_eq!(field("np-prepared:"), ["0"], "{r}");
    // A directory and a user of its own: its snapshot held that very
    // container, taken by the woken sandbox, whose execs run as that user
    // there.
    assert_eq!(field("prepared:u1:"), ["1"], "{r}");
    assert_eq!(field("who-u1:"), ["1000 /tmp"], "{r}");
    // A cold boot starts its own.
    assert_eq!(field("prepared:d1:"), ["0"], "{r}");
    // The first create recorded the snapshot's working set beside it
    // (the pages a woken guest touches until ready, some of them written)...
    let files = field("snapshot-files:").join(" ");
    assert!(
        files.contains("memory") && files.contains("state") && files.contains("working-set"),
        "{r}"
    );
    let recorded = field("record-line:");
    assert_eq!(recorded.len(), 1, "{r}");
    let counts: Vec<u64> = recorded[0]
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        recorded[0].starts_with("airlock-vmm: working set recorded:")
            && counts.len() >= 2
            && counts[0] > 10
            && counts[1] > 0
            && counts[1] < counts[0]
            // The test bed's L1 kernel has userfaultfd, as Debian's do: the
            // recording kept fault-around off with it (on L1's tmpfs the
            // page cache cannot be dropped instead).
            && recorded[0].ends_with("(fault-around off: userfaultfd)"),
        "{r}"
    );
    // ... each wake mapped it ahead of its guest (its written pages
    // copied) ...
    for i in 1..=4 {
        let line = field(&format!("restore-line-{i}:")).join("\n");
        assert!(
            line.contains(&format!(
                "(prefaulted {} pages of its working set",
                counts[0]
            )) && line.contains("of them copied"),
            "sandbox {i}: {line}\n{r}"
        );
    }
    // ... and a damaged one is said and not used: the guest faults its
    // pages in on demand and answers as its siblings did (above).
    let line = field("restore-line-5:").join("\n");
    assert!(
        line.contains("airlock-vmm: warning: the snapshot's working set is not used: its checksum does not match (damaged)")
            && line.contains("restored from the snapshot")
            && !line.contains("prefaulted"),
        "{line}\n{r}"
    );
    // One snapshot, made by the first, used by all five; recorded.
    let starts = vm_starts(&r);
    let woken: Vec<&(String, Value)> = starts.iter().filter(|(n, _)| n.starts_with('s')).collect();
    assert_eq!(woken.len(), 5, "{r}");
    let digest = woken[0].1["snapshot"]["state_sha256"]
        .as_str()
        .expect("digest");
    assert_eq!(digest.len(), 64);
    for (i, (name, fields)) in woken.iter().enumerate() {
        assert_eq!(fields["engine"], "kvm", "{name}");
        assert_eq!(fields["snapshot"]["state_sha256"], digest, "{name}");
        assert_eq!(fields["snapshot"]["made"], i == 0, "{name}");
    }
    // Damaged: refused, removed, said; the sandbox booted cold and works.
    let damaged = field("damaged:").join("\n");
    assert!(
        damaged.contains("airlock: snapshot: the snapshot was refused and removed")
            && damaged.contains("damaged")
            && damaged.contains("booting without it"),
        "{r}"
    );
    assert!(r.stdout.lines().any(|l| l == "cold-after-damage"), "{r}");
    let d1 = starts.iter().find(|(n, _)| n == "d1").expect("d1");
    assert!(d1.1.get("snapshot").is_none(), "booted cold: {:?}", d1.1);
    let r1 = starts.iter().find(|(n, _)| n == "r1").expect("r1");
    assert_eq!(r1.1["snapshot"]["made"], true, "made again: {:?}", r1.1);
    assert_ne!(r1.1["snapshot"]["state_sha256"], digest, "a new snapshot");
    // Mismatched: refused with the reason, cold boot with 320 MiB.
    let mismatched = field("mismatched:").join("\n");
    assert!(
        mismatched.contains("the snapshot was refused and removed")
            && mismatched.contains("256 MiB of memory, this VM 320 MiB"),
        "{r}"
    );
    assert!(r.stdout.lines().any(|l| l == "cold-after-mismatch"), "{r}");
    let m1 = starts.iter().find(|(n, _)| n == "m1").expect("m1");
    assert!(m1.1.get("snapshot").is_none(), "booted cold: {:?}", m1.1);
}
