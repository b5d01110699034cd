//! Warm pools (`airlock pool`) on the tcg engine: `create` takes a ready
//! sandbox at once, only when everything it asks for matches, and the
//! keeper replaces a pooled sandbox that dies; and on the kvm engine (our
//! VMM, in the nested test bed): the same hand-over of a ready sandbox.

use airlock_e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// This test's state root, with the pool queries.
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

    /// `pool ls --format json`'s entry for `pool`.
    fn pool(&self, pool: &str) -> Value {
        let r = self.airlock(&["pool", "ls", "--format", "json"], 60);
        r.expect_code(0);
        let all: Value = serde_json::from_str(&r.stdout).expect("pool ls JSON");
        all.as_array()
            .expect("array")
            .iter()
            .find(|p| p["name"] == pool)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// The ids of `pool`'s ready members.
    fn ready(&self, pool: &str) -> Vec<String> {
        self.pool(pool)["members"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter(|m| m["state"] == "ready")
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `pool` has `n` ready members other than `not` (at most
    /// `limit`); their ids.
    fn wait_ready(&self, pool: &str, n: usize, not: &[String], limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            let ready: Vec<String> = self
                .ready(pool)
                .into_iter()
                .filter(|id| !not.contains(id))
                .collect();
            if ready.len() >= n || Instant::now() >= deadline {
                return ready;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The processes whose parent is `pid`.
fn children(pid: i64) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// One pool's life on the tcg engine, against a cold `create` of the same
/// options: the pool fills; `create` with the same options takes a ready
/// sandbox (its name, labels and config are the caller's, its audit log
/// records the adoption) in well under the cold boot; options or the
/// value of an environment variable they read (a secret's) that differ
/// boot cold; `--no-pool` boots cold; a pooled VM that is killed is
/// noticed and replaced; `pool rm` leaves no sandbox or process behind.
#[test]
fn tcg_pool_hands_out_ready_sandboxes_and_replaces_dead_ones() {
    let place = Place::new("tcg-pool");
    let image = build_file("rootfs.img");
    let opts = [
        "--engine",
        "tcg",
        "--image-root",
        image.as_str(),
        "--secret",
        "TOKEN=env:POOL_TEST_VALUE",
    ];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(opts.iter())
            .map(|s| (*s).to_owned())
            .collect()
    };
    let one = [("POOL_TEST_VALUE", "one")];
    let create = |name: &str, extra: &[&str], env: &[(&str, &str)]| -> (Run, Duration) {
        let mut args = vec!["create", "--name", name, "--label", "team=blue"];
        args.extend_from_slice(extra);
        let args = with(&args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let began = Instant::now();
        let r = place.airlock_env(&args, env, 300);
        (r, began.elapsed())
    };
    let echo = |name: &str| -> String {
        let r = place.airlock(
            &[
                "exec",
                name,
                "--",
                "sh",
                "-c",
                "echo \"$AIRLOCK_SECRET_TOKEN\"",
            ],
            120,
        );
        r.expect_code(0);
        let placeholder = r.stdout.trim().to_owned();
        assert!(placeholder.starts_with("airlock-ph-"), "{r}");
        placeholder
    };

    // A cold create, for the comparison.
    let (cold, cold_time) = create("cold", &[], &one);
    cold.expect_code(0).expect_stdout_line("cold");
    assert!(!cold.stderr.contains("warm pool"), "no pool yet\n{cold}");
    place.airlock(&["rm", "-f", "cold"], 120).expect_code(0);

    // The pool fills.
    let args = with(&["pool", "--pool", "p", "--size", "2", "--wait"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = place.airlock_env(&args, &one, 900);
    r.expect_code(0).expect_stdout_line("p");
    let first = place.ready("p");
    assert_eq!(first.len(), 2, "{}", place.pool("p"));
    // Running it again with other options under the same name is refused.
    let r = place.airlock_env(
        &[
            "pool", "--pool", "p", "--size", "2", "--engine", "tcg", "--mem", "320",
        ],
        &one,
        60,
    );
    r.expect_code(2)
        .expect_stderr("keeps sandboxes made with other options");

    // Taken from the pool, at once.
    let (taken, pool_time) = create("agent", &[], &one);
    taken
        .expect_code(0)
        .expect_stdout_line("agent")
        .expect_stderr("taken from the warm pool p");
    assert!(
        pool_time * 4 < cold_time,
        "from the pool {pool_time:?}, cold {cold_time:?}"
    );
    let agent_placeholder = echo("agent");
    let r = place.airlock(
        &["ls", "--format", "json", "--filter", "label=team=blue"],
        30,
    );
    r.expect_code(0);
    let listed: Value = serde_json::from_str(&r.stdout).expect("ls JSON");
    let names: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["agent"], "pool members are not listed");
    let r = place.airlock(&["inspect", "agent"], 30);
    r.expect_code(0);
    let inspect: Value = serde_json::from_str(&r.stdout).expect("inspect JSON");
    assert_eq!(inspect["config"]["name"], "agent");
    assert_eq!(inspect["config"]["labels"]["team"], "blue");
    assert_eq!(inspect["config"]["pool"]["name"], "p");
    let member = inspect["config"]["pool"]["member"]
        .as_str()
        .expect("member")
        .to_owned();
    assert!(first.contains(&member), "{member} not in {first:?}");
    let audit = PathBuf::from(inspect["audit_log"].as_str().expect("audit log"));
    let records = audit_records(&audit);
    let adopts = fields_of_kind(&records, "sandbox.adopt");
    assert_eq!(adopts.len(), 1, "{adopts:?}");
    assert_eq!(adopts[0]["name"], "agent");
    assert_eq!(adopts[0]["pool"], "p");
    assert_eq!(adopts[0]["member"], member.as_str());

    // Another value of a variable the options read: cold, its own value.
    let (other, _) = create("other", &[], &[("POOL_TEST_VALUE", "two")]);
    other.expect_code(0).expect_stdout_line("other");
    assert!(!other.stderr.contains("warm pool"), "{other}");
    assert_ne!(echo("other"), agent_placeholder, "each sandbox its own");
    // Other options: cold; --no-pool: cold.
    let (bigger, _) = create("bigger", &["--mem", "320"], &one);
    bigger.expect_code(0);
    assert!(!bigger.stderr.contains("warm pool"), "{bigger}");
    let (own, _) = create("own", &["--no-pool"], &one);
    own.expect_code(0);
    assert!(!own.stderr.contains("warm pool"), "{own}");
    // A name that is taken is refused, and the pool keeps its sandbox.
    let before = place.wait_ready("p", 2, &[], Duration::from_secs(300));
    assert_eq!(before.len(), 2, "refilled: {}", place.pool("p"));
    let (dup, _) = create("agent", &[], &one);
    dup.expect_code(2)
        .expect_stderr("a sandbox named agent already exists");
    assert_eq!(place.ready("p"), before, "nothing taken");
    for name in ["other", "bigger", "own"] {
        place.airlock(&["rm", "-f", name], 120).expect_code(0);
    }

    // A pooled VM dies: noticed, replaced.
    let pool = place.pool("p");
    let victim = &pool["members"][0];
    let victim_id = victim["id"].as_str().expect("id").to_owned();
    let supervisor = victim["supervisor_pid"].as_i64().expect("pid");
    let vm = children(supervisor);
    assert!(!vm.is_empty(), "the member's VM processes");
    for pid in &vm {
        // SAFETY: kill(2) of the engine processes of a sandbox this test
        // made.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let replaced = loop {
        let ready = place.ready("p");
        if ready.len() == 2 && !ready.contains(&victim_id) {
            break ready;
        }
        assert!(
            Instant::now() < deadline,
            "not replaced: {}",
            place.pool("p")
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let log = std::fs::read_to_string(place.dir.join(".pools/p/keeper.log")).expect("keeper log");
    assert!(
        log.contains(&format!("member {victim_id} ended")),
        "the keeper noticed: {log}"
    );
    assert!(replaced.iter().all(|id| id != &victim_id));
    // The dead member's supervisor was the keeper's child: reaped, no zombie.
    let keeper_pid = place.pool("p")["keeper_pid"].as_i64().expect("keeper");
    std::thread::sleep(Duration::from_secs(1));
    for child in children(keeper_pid) {
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        assert!(!state.starts_with('Z'), "the keeper left a zombie: {stat}");
    }

    // The adopted sandbox is the caller's: stopping the pool leaves it.
    let keeper = place.pool("p")["keeper_pid"].as_i64().expect("keeper");
    let members: Vec<i64> = place.pool("p")["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["supervisor_pid"].as_i64())
        .collect();
    place
        .airlock(&["pool", "rm", "p"], 300)
        .expect_code(0)
        .expect_stdout_line("p");
    assert_eq!(place.pool("p"), Value::Null, "the pool is gone");
    assert!(!place.dir.join(".pools/p").exists());
    for pid in members.iter().chain(std::iter::once(&keeper)) {
        let pid = i32::try_from(*pid).expect("pid");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')),
            "process {pid} of the pool still runs"
        );
    }
    assert_eq!(
        echo("agent"),
        agent_placeholder,
        "the taken sandbox still runs"
    );
    place.airlock(&["rm", "-f", "agent"], 120).expect_code(0);
    // Its one audit log, from its boot in the pool to its end, is whole.
    place
        .airlock(&["audit", "verify", audit.to_str().expect("utf-8")], 60)
        .expect_code(0);
    let r = place.airlock(&["pool", "rm", "p"], 30);
    r.expect_code(2).expect_stderr("no pool named p");
}

/// What a pool cannot be asked for is refused before anything starts.
/// The pool on the kvm engine (airlock-vmm in the test bed): a pool of one
/// fills; `create` takes its ready sandbox (the VM keeps running under the
/// new name: exec answers at once, its audit log says `sandbox.adopt`), the
/// keeper boots a replacement; `pool rm` stops that one and leaves the taken
/// sandbox running until it is removed; no VMM is left.
#[test]
fn kvm_pool_hands_out_a_ready_sandbox() {
    let airlock = bin("airlock");
    let image = build_file("rootfs.img");
    let script = format!(
        r#"set -e; date -u -s '{now}' > /dev/null
export AIRLOCK_SANDBOX_DIR=/tmp/sbx AIRLOCK_SNAPSHOT_DIR=/tmp/snaps
A={airlock}; O="--engine kvm --image-root {image}"
ready() {{ w=0; while [ $w -lt 1200 ]; do $A pool ls --format json | grep -q '"ready":1' && return 0; sleep 0.5; w=$((w+1)); done; return 1; }}
$A pool --size 1 --wait $O
$A pool ls --format json | tr -d '\n' | sed 's/^/pool-full: /'; echo
$A create $O --name taken > /dev/null 2> /tmp/err || {{ cat /tmp/err >&2; exit 1; }}
$A exec taken -- sh -c 'echo in-taken: $(hostname)'
LOG=$($A inspect taken | sed -n 's/.*"audit_log": "\(.*\)",*$/\1/p')
echo adopt: $(grep -c '"kind":"sandbox.adopt"' "$LOG")
ready && echo refilled
$A pool rm default
$A pool ls --format json | tr -d '\n' | sed 's/^/pool-after: /'; echo
$A exec taken -- echo still-running
$A rm -f taken > /dev/null
sleep 1; echo vmms-left: $(ps | grep -c '[a]irlock-vmm')
echo done"#,
        now = utc_now(),
    );
    let r = testbed_script(3072, 1200, &script);
    r.expect_code(0)
        .expect_stdout_line("done")
        .expect_stdout_line("in-taken: airlock")
        .expect_stdout_line("adopt: 1")
        .expect_stdout_line("refilled")
        .expect_stdout_line("still-running")
        .expect_stdout_line("vmms-left: 0");
    let line = |prefix: &str| {
        r.stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line\n{r}"))
            .to_owned()
    };
    let full: Value = serde_json::from_str(&line("pool-full: ")).expect("pool ls JSON");
    assert_eq!(full[0]["name"], "default", "{full:#}");
    assert_eq!(full[0]["ready"], 1, "{full:#}");
    let after: Value = serde_json::from_str(&line("pool-after: ")).expect("pool ls JSON");
    assert_eq!(after, serde_json::json!([]), "the pool is gone: {after:#}");
}

#[test]
fn pool_bad_input_is_a_usage_error() {
    let place = Place::new("pool-usage");
    let cases: &[(&[&str], &str)] = &[
        (&["pool"], "--size N is needed"),
        (&["pool", "--size", "0"], "a pool holds 1 to 32"),
        (&["pool", "--size", "33"], "a pool holds 1 to 32"),
        (
            &["pool", "--size", "1", "--pool", "../x"],
            "not a pool name",
        ),
        (
            &["pool", "--size", "1", "--pool", &"p".repeat(33)],
            "not a pool name",
        ),
        (
            &["pool", "--size", "1", "--name", "a"],
            "a pool cannot take --name",
        ),
        (
            &["pool", "--size", "1", "--label", "a=b"],
            "a pool cannot take --label",
        ),
        (
            &["pool", "--size", "1", "--workspace", "."],
            "a pool cannot take --workspace",
        ),
        (
            &["pool", "--size", "1", "--out", "o"],
            "a pool cannot take --out",
        ),
        (
            &["pool", "--size", "1", "--audit", "a.jsonl"],
            "a pool cannot take --audit",
        ),
        (
            &["pool", "--size", "1", "--", "true"],
            "create takes no command",
        ),
        (&["pool", "--size", "1", "--mem", "1"], "--mem"),
        (&["pool", "rm", "nothing"], "no pool named nothing"),
    ];
    for (args, error) in cases {
        let r = place.airlock(args, 30);
        assert_eq!(r.code, Some(2), "{args:?}\n{r}");
        assert!(r.stderr.contains(error), "{args:?}: want {error:?}\n{r}");
    }
    assert!(
        !place.dir.join(".pools").exists()
            || place
                .airlock(&["pool", "ls", "--format", "json"], 30)
                .stdout
                .trim()
                == "[]"
    );
    let r = place.airlock(&["pool", "ls"], 30);
    r.expect_code(0).expect_stdout_line(&format!(
        "{:<20} {:<8} {:>4} {:>5} {:>7}  OPTIONS",
        "POOL", "STATE", "SIZE", "READY", "BOOTING"
    ));
}
