//! Warm pools: sandboxes booted before anyone asks for them, so that
//! `airlock create` returns as soon as it has named one.
//!
//! A pool lives in `.pools/NAME/` under the state root (a name no sandbox
//! can have, so `ls` never lists it; the same file system, so a member can
//! move out by rename):
//!
//! | file | what |
//! |---|---|
//! | `pool.json` | its name, size, key (what `create` must match), the `config.json` its members are made with, the command line |
//! | `keeper.lock` | held (`flock`) by the keeper for as long as it lives; holds its pid |
//! | `keeper.log` | the keeper's lines: members booted, died, replaced, taken |
//! | `members/ID/` | one waiting sandbox each: a sandbox directory ([`Dir`]) like any other |
//!
//! The keeper ([`keep`]) boots members one at a time until the pool holds
//! its size, removes members whose supervisor died (and boots others),
//! and stops surplus ones. `create` takes a member with [`take`]: the
//! member's supervisor moves its directory to the state root under the
//! new name (see `adopt` in [`super::server`]); only one taker ever wins.
//! Nothing else about the sandbox changes: it was booted with exactly the
//! options `create` asks for (the key says so).

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::lifecycle::{self, Sandbox};
use super::{root, valid_name, Dir};

/// Longest pool name (a member's control socket path must stay short).
pub const MAX_POOL_NAME: usize = 32;
/// Most sandboxes one pool keeps.
pub const MAX_SIZE: u32 = 32;
/// How long a `create` waits for a member to answer its adoption.
const ADOPT_PATIENCE: Duration = Duration::from_secs(10);
/// The keeper's longest wait after a member failed to boot.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Whether `name` is a pool name: a sandbox name of at most 32 bytes.
pub fn valid_pool_name(name: &str) -> bool {
    valid_name(name) && name.len() <= MAX_POOL_NAME
}

/// Where the pools live.
pub fn pools_root() -> PathBuf {
    root().join(".pools")
}

/// One pool's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDir {
    pub name: String,
    pub path: PathBuf,
}

impl PoolDir {
    pub fn of(name: &str) -> PoolDir {
        PoolDir {
            name: name.to_owned(),
            path: pools_root().join(name),
        }
    }
    pub fn spec(&self) -> PathBuf {
        self.path.join("pool.json")
    }
    pub fn lock(&self) -> PathBuf {
        self.path.join("keeper.lock")
    }
    pub fn log(&self) -> PathBuf {
        self.path.join("keeper.log")
    }
    pub fn members_dir(&self) -> PathBuf {
        self.path.join("members")
    }
    /// The member `id`'s sandbox directory.
    pub fn member(&self, id: &str) -> Dir {
        Dir {
            name: id.to_owned(),
            path: self.members_dir().join(id),
        }
    }
    /// The members' directories, oldest first.
    pub fn members(&self) -> Vec<Dir> {
        let Ok(entries) = fs::read_dir(self.members_dir()) else {
            return Vec::new();
        };
        let mut found: Vec<(std::time::SystemTime, Dir)> = entries
            .flatten()
            .filter_map(|e| {
                let id = e.file_name().into_string().ok()?;
                let made = e.metadata().ok()?.modified().ok()?;
                valid_name(&id).then(|| (made, self.member(&id)))
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
        found.into_iter().map(|(_, d)| d).collect()
    }
    /// The keeper's pid, while one holds the lock.
    pub fn keeper(&self) -> Option<i32> {
        super::lock_holder(&self.lock())
    }
    pub fn read_spec(&self) -> Option<Value> {
        Dir::read_json(&self.spec())
    }
}

/// Every pool of this user, by name.
pub fn list() -> Vec<PoolDir> {
    let Ok(entries) = fs::read_dir(pools_root()) else {
        return Vec::new();
    };
    let mut pools: Vec<PoolDir> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| valid_pool_name(n))
        .map(|n| PoolDir::of(&n))
        .filter(|p| p.spec().exists())
        .collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    pools
}

/// A member as `pool ls` shows it: its id, and whether it is ready
/// (asked of its supervisor), booting, or dead.
pub fn describe_member(member: &Dir) -> Value {
    let Some(pid) = member.supervisor() else {
        return json!({"id": member.name, "state": "dead"});
    };
    let status = Sandbox::at(member.clone())
        .ask(&json!({"op": "status"}), Duration::from_secs(5))
        .unwrap_or_default();
    let state = if status["ready"] == true {
        "ready"
    } else {
        "booting"
    };
    json!({"id": member.name, "state": state, "supervisor_pid": pid})
}

/// Takes a ready sandbox from a pool made with `key` and names it `name`,
/// `config` becoming its `config.json`. The pool's name, or `None` when no
/// pool has a ready one (the caller boots a sandbox of its own).
pub fn take(key: &str, name: &str, config: &Value) -> Result<Option<String>, lifecycle::Error> {
    for pool in list() {
        if pool
            .read_spec()
            .is_none_or(|s| s["key"].as_str() != Some(key))
        {
            continue;
        }
        for member in pool.members() {
            if member.supervisor().is_none() {
                continue;
            }
            let request = json!({"op": "adopt", "name": name, "config": config});
            let Ok(answer) = Sandbox::at(member.clone()).ask(&request, ADOPT_PATIENCE) else {
                continue;
            };
            if answer["ok"] == true {
                return Ok(Some(pool.name));
            }
            let why = answer["error"].as_str().unwrap_or_default();
            if why.starts_with("a sandbox named ") {
                return Err(lifecycle::Error::Usage(why.to_owned()));
            }
        }
    }
    Ok(None)
}

/// What the keeper is given: how to boot a member into a directory, when
/// to stop, and where its lines go.
pub struct Keeper<'a> {
    pub pool: &'a PoolDir,
    /// Boots a sandbox in `dir` and returns once it is ready.
    pub boot: &'a dyn Fn(Dir) -> Result<Sandbox, lifecycle::Error>,
    /// Whether the keeper should end (a signal, or `pool.json` gone).
    pub done: &'a dyn Fn() -> bool,
    pub log: &'a dyn Fn(&str),
}

/// Keeps `keeper.pool` at its size (re-read from `pool.json` each round)
/// until `done`; then stops its members and removes the pool.
pub fn keep(keeper: &Keeper<'_>) {
    let pool = keeper.pool;
    let mut backoff = Duration::from_secs(1);
    let mut next_boot = Instant::now();
    let mut booted: u64 = 0;
    while !(keeper.done)() {
        reap_children();
        let size = pool
            .read_spec()
            .and_then(|s| s["size"].as_u64())
            .unwrap_or(0);
        let mut live = Vec::new();
        for member in pool.members() {
            if member.supervisor().is_some() {
                live.push(member);
                continue;
            }
            let how = Dir::read_json(&member.state())
                .and_then(|s| s["exit_code"].as_i64())
                .map_or_else(
                    || "without a word".to_owned(),
                    |c| format!("with exit code {c}"),
                );
            (keeper.log)(&format!(
                "member {} ended {how}: removed, another one boots",
                member.name
            ));
            let _ = fs::remove_dir_all(&member.path);
        }
        let live_count = u64::try_from(live.len()).unwrap_or(u64::MAX);
        if live_count > size {
            // The newest go first: the oldest have waited longest to be used.
            for member in live
                .iter()
                .rev()
                .take(usize::try_from(live_count - size).unwrap_or(0))
            {
                (keeper.log)(&format!(
                    "member {} stopped: the pool shrank to {size}",
                    member.name
                ));
                stop_member(member);
            }
        } else if live_count < size && Instant::now() >= next_boot {
            let id = format!("m-{}", crate::audit::new_run_id().get(..10).unwrap_or("0"));
            let began = Instant::now();
            match (keeper.boot)(pool.member(&id)) {
                Ok(_) => {
                    booted += 1;
                    backoff = Duration::from_secs(1);
                    (keeper.log)(&format!(
                        "member {id} ready in {:.1} s ({booted} booted by this keeper)",
                        began.elapsed().as_secs_f64()
                    ));
                }
                Err(e) => {
                    (keeper.log)(&format!(
                        "member {id} did not start: {e}; next try in {} s",
                        backoff.as_secs()
                    ));
                    next_boot = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            continue;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let members = pool.members();
    (keeper.log)(&format!(
        "stopping: {} member(s) still waiting",
        members.len()
    ));
    let stoppers: Vec<_> = members
        .into_iter()
        .map(|m| std::thread::spawn(move || stop_member(&m)))
        .collect();
    for s in stoppers {
        let _ = s.join();
    }
}

/// Reaps the keeper's children that ended: the supervisors it started,
/// taken by a `create` or not, stay its children until they end.
fn reap_children() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) for any child, without blocking; `status` is a
        // valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
    }
}

/// Stops a member at once and removes its directory (unless a `create`
/// took it meanwhile: then it is no longer here).
pub fn stop_member(member: &Dir) {
    let sandbox = Sandbox::at(member.clone());
    if member.supervisor().is_some() {
        // A member taken meanwhile answers from its new place; asking it
        // here would stop someone's sandbox, so only a member still in
        // the pool (its directory still here) is asked.
        let _ = sandbox.stop_if_pooled(Duration::ZERO);
    }
    if member.supervisor().is_none() {
        let _ = fs::remove_dir_all(&member.path);
    }
}
