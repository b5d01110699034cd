//! `docker images`, `image inspect|ls|load|save|rm`, `load`, `save`,
//! `rmi`, `build`: Airlock's image store (`crate::image::store`) in
//! docker's words. `build` is the host's podman (or buildah): its result
//! is saved to an archive and loaded into the store; without either, a
//! clear error says what to install. `load` keeps the archive it loaded,
//! so that `save` gives back exactly that.

use std::fs;
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::format::{self, Template};
use super::{error, flags, refuse, unsupported, Code};
use crate::image::store::{Store, Stored};

/// The archive `load` keeps next to the image.
const KEPT_ARCHIVE: &str = "archive.tar";

fn store() -> Result<Store, u8> {
    Store::open_default().map_err(|e| refuse(&format!("the image store: {e}")))
}

/// `2024-01-02T03:04:05(.fff)Z` (or with an offset, taken as UTC) as UNIX
/// seconds.
fn parse_time(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let days = crate::audit::time::days_from_civil(y, m, d);
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// An image's size: unpacked, else its disk's.
fn image_size(image: &Stored) -> u64 {
    let meta = image.meta();
    meta["unpacked"]["bytes"]
        .as_u64()
        .or_else(|| meta["disk_bytes"].as_u64())
        .unwrap_or(0)
}

/// An image as `docker image inspect` shows it.
fn inspect_json(image: &Stored) -> Result<Value, String> {
    let config = image.config().map_err(|e| e.to_string())?;
    let size = image_size(image);
    Ok(json!({
        "Id": image.digest,
        "RepoTags": image.names,
        "RepoDigests": [],
        "Parent": "",
        "Comment": config.get("comment").and_then(Value::as_str).unwrap_or(""),
        "Created": config.get("created").cloned().unwrap_or_else(|| json!("")),
        "Author": config.get("author").and_then(Value::as_str).unwrap_or(""),
        "Config": config.get("config").cloned().unwrap_or(Value::Null),
        "Architecture": config.get("architecture").cloned().unwrap_or_else(|| json!("amd64")),
        "Os": config.get("os").cloned().unwrap_or_else(|| json!("linux")),
        "Size": size,
        "RootFS": {
            "Type": "layers",
            "Layers": config.get("rootfs").and_then(|r| r.get("diff_ids")).cloned().unwrap_or(json!([])),
        },
    }))
}

/// `docker images [-a] [-q] [--no-trunc] [--format T] [REPO[:TAG]]`.
pub fn images(args: &[String]) -> u8 {
    let f = match flags(
        "images",
        args,
        &["-a", "--all", "-q", "--quiet", "--no-trunc", "--digests"],
        &["--format", "-f", "--filter"],
        false,
    ) {
        Ok(f) => f,
        Err(e) => return refuse(&e),
    };
    if f.has(&["-f", "--filter"]) {
        return unsupported("images --filter");
    }
    if f.rest.len() > 1 {
        return refuse("images takes at most one REPOSITORY[:TAG]");
    }
    let store = match store() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let list = match store.list() {
        Ok(l) => l,
        Err(e) => return error(Code::Error, &e.to_string()),
    };
    let no_trunc = f.has(&["--no-trunc"]);
    let now = super::now_unix();
    let mut rows = Vec::new();
    for image in &list {
        let config = image.config().unwrap_or(Value::Null);
        let created = config["created"].as_str().and_then(parse_time);
        let size = image_size(image);
        let id = if no_trunc {
            image.digest.clone()
        } else {
            image
                .digest
                .trim_start_matches("sha256:")
                .chars()
                .take(12)
                .collect()
        };
        let names: Vec<(String, String)> = if image.names.is_empty() {
            vec![("<none>".into(), "<none>".into())]
        } else {
            image
                .names
                .iter()
                .map(|n| {
                    let (r, t) = n.rsplit_once(':').unwrap_or((n, "latest"));
                    (r.to_owned(), t.to_owned())
                })
                .collect()
        };
        for (repo, tag) in names {
            if let Some(want) = f.rest.first() {
                let (wr, wt) = want
                    .rsplit_once(':')
                    .filter(|(_, t)| !t.contains('/'))
                    .unwrap_or((want, ""));
                let repo_ok = repo == wr || repo == format!("localhost/{wr}");
                if !repo_ok || (!wt.is_empty() && tag != wt) {
                    continue;
                }
            }
            rows.push(json!({
                "Repository": repo,
                "Tag": tag,
                "ID": id,
                "Digest": "<none>",
                "CreatedAt": created.map_or_else(String::new, format::created_at),
                "CreatedSince": created.map_or_else(
                    || "N/A".to_owned(),
                    |c| format!("{} ago", format::human_duration(now.saturating_sub(c)))
                ),
                "Size": format::human_size(size),
            }));
        }
    }
    let template = if f.has(&["-q", "--quiet"]) {
        "{{.ID}}".to_owned()
    } else {
        f.last(&["--format"])
            .unwrap_or_else(|| format::IMAGES_DEFAULT.to_owned())
    };
    let template = match Template::parse(&template) {
        Ok(t) => t,
        Err(e) => return refuse(&e),
    };
    print!(
        "{}",
        format::render_all(&template, format::IMAGES_HEADERS, &rows)
    );
    0
}

/// `docker image SUB ...`.
pub fn image(args: &[String]) -> u8 {
    let Some((sub, rest)) = args.split_first() else {
        return refuse("image needs a subcommand: inspect, ls, load, save, rm");
    };
    match sub.as_str() {
        "inspect" => inspect(rest),
        "ls" | "list" => images(rest),
        "load" => load(rest),
        "save" => save(rest),
        "rm" | "remove" => rmi(rest),
        "build" => build(rest),
        other => unsupported(&format!("image {other}")),
    }
}

/// `docker image inspect [--format T] IMAGE...`: a JSON list, as docker;
/// exit 1 (and `No such image`) when one is missing.
pub fn inspect(args: &[String]) -> u8 {
    let f = match flags("image inspect", args, &[], &["-f", "--format"], false) {
        Ok(f) => f,
        Err(e) => return refuse(&e),
    };
    if f.rest.is_empty() {
        return refuse("image inspect needs at least one image");
    }
    let template = match f.last(&["-f", "--format"]).map(|t| Template::parse(&t)) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => return refuse(&e),
    };
    let store = match store() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut found = Vec::new();
    let mut code = 0;
    for reference in &f.rest {
        match store
            .resolve(reference)
            .map_err(|e| e.to_string())
            .and_then(|i| inspect_json(&i))
        {
            Ok(v) => found.push(v),
            Err(_) => {
                code = Code::Error as u8;
                eprintln!(
                    "Error response from daemon: No such image: {}",
                    crate::text::sanitize(reference.as_bytes())
                );
            }
        }
    }
    match template {
        Some(t) => {
            for v in &found {
                println!("{}", t.render(v));
            }
        }
        None => println!(
            "{}",
            serde_json::to_string_pretty(&Value::Array(found)).unwrap_or_default()
        ),
    }
    code
}

fn mkfs() -> Result<PathBuf, u8> {
    crate::cli::image::which("mkfs.erofs")
        .ok_or_else(|| refuse("mkfs.erofs is not installed (Debian: apt-get install erofs-utils)"))
}

/// Loads `archive` into the store and keeps a copy of it for `save`;
/// prints `Loaded image: NAME` per name (`Loaded image ID:` without one).
fn load_file(store: &Store, archive: &Path, quiet: bool) -> u8 {
    let mkfs = match mkfs() {
        Ok(m) => m,
        Err(code) => return code,
    };
    let loaded = match store.load(archive, &mkfs) {
        Ok(l) => l,
        Err(e) => return error(Code::Error, &crate::text::report(&e)),
    };
    let kept = loaded.image.dir.join(KEPT_ARCHIVE);
    if !kept.exists() {
        let tmp = loaded
            .image
            .dir
            .join(format!("{KEPT_ARCHIVE}.{}", std::process::id()));
        if fs::copy(archive, &tmp)
            .and_then(|_| fs::rename(&tmp, &kept))
            .is_err()
        {
            let _ = fs::remove_file(&tmp);
            eprintln!("airlock docker: warning: the archive was not kept: `docker save` of this image will not work");
        }
    }
    if !quiet {
        if loaded.image.names.is_empty() {
            println!("Loaded image ID: {}", loaded.image.digest);
        }
        for name in &loaded.image.names {
            println!("Loaded image: {name}");
        }
    }
    0
}

/// `docker load [-i FILE] [-q]` (stdin without -i).
pub fn load(args: &[String]) -> u8 {
    let f = match flags("load", args, &["-q", "--quiet"], &["-i", "--input"], false) {
        Ok(f) => f,
        Err(e) => return refuse(&e),
    };
    if !f.rest.is_empty() {
        return refuse("load takes no arguments (-i FILE, or the archive on stdin)");
    }
    let store = match store() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let quiet = f.has(&["-q", "--quiet"]);
    if let Some(file) = f.last(&["-i", "--input"]) {
        return load_file(&store, Path::new(&file), quiet);
    }
    if io::stdin().is_terminal() {
        return refuse(
            "load: requested load from stdin, but stdin is empty (a terminal): use -i FILE",
        );
    }
    let tmp = std::env::temp_dir().join(format!(
        "airlock-docker-load-{}-{}.tar",
        std::process::id(),
        crate::audit::new_run_id()
    ));
    // A new file of our own (never one someone put there for us to follow).
    let copied = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut out| io::copy(&mut io::stdin().lock(), &mut out));
    let code = match copied {
        Ok(_) => load_file(&store, &tmp, quiet),
        Err(e) => error(Code::Error, &format!("load: reading stdin: {e}")),
    };
    let _ = fs::remove_file(&tmp);
    code
}

/// `docker save [-o FILE] IMAGE`: the archive `docker load` kept.
pub fn save(args: &[String]) -> u8 {
    let f = match flags("save", args, &[], &["-o", "--output"], false) {
        Ok(f) => f,
        Err(e) => return refuse(&e),
    };
    let [reference] = f.rest.as_slice() else {
        return refuse("save takes one image here");
    };
    let store = match store() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let image = match store.resolve(reference) {
        Ok(i) => i,
        Err(e) => return error(Code::Error, &format!("Error response from daemon: {e}")),
    };
    let kept = image.dir.join(KEPT_ARCHIVE);
    if !kept.is_file() {
        return error(
            Code::Error,
            &format!(
                "{reference} was loaded with `airlock image load`, which keeps no archive: \
                 load it with `docker load` to be able to save it"
            ),
        );
    }
    match f.last(&["-o", "--output"]) {
        Some(out) => match fs::copy(&kept, &out) {
            Ok(_) => 0,
            Err(e) => error(Code::Error, &format!("save -o {out}: {e}")),
        },
        None => {
            if io::stdout().is_terminal() {
                return refuse(
                    "save: cowardly refusing to write to a terminal: use -o FILE or a redirection",
                );
            }
            let copied =
                fs::File::open(&kept).and_then(|mut f| io::copy(&mut f, &mut io::stdout().lock()));
            match copied {
                Ok(_) => 0,
                Err(e) => error(Code::Error, &format!("save: {e}")),
            }
        }
    }
}

/// `docker rmi IMAGE...` / `image rm`.
pub fn rmi(args: &[String]) -> u8 {
    let f = match flags("rmi", args, &["-f", "--force", "--no-prune"], &[], false) {
        Ok(f) => f,
        Err(e) => return refuse(&e),
    };
    if f.rest.is_empty() {
        return refuse("rmi needs at least one image");
    }
    let store = match store() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut code = 0;
    for reference in &f.rest {
        match store.remove(reference) {
            Ok(removed) => {
                for name in &removed.untagged {
                    println!("Untagged: {name}");
                }
                if removed.deleted {
                    println!("Deleted: {}", removed.digest);
                }
            }
            Err(e) => code = error(Code::Error, &format!("Error response from daemon: {e}")),
        }
    }
    code
}

/// The first of `programs` on PATH.
fn find_builder(programs: &[&str]) -> Option<(String, PathBuf)> {
    programs
        .iter()
        .find_map(|p| crate::cli::image::which(p).map(|path| ((*p).to_owned(), path)))
}

/// The `-t`/`--tag` values of a build command line.
fn build_tags(args: &[String]) -> Vec<String> {
    let mut tags = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "-t" || a == "--tag" {
            if let Some(v) = args.get(i + 1) {
                tags.push(v.clone());
            }
            i += 2;
            continue;
        }
        if let Some(v) = a
            .strip_prefix("--tag=")
            .or_else(|| a.strip_prefix("-t").filter(|v| !v.is_empty()))
        {
            tags.push(v.trim_start_matches('=').to_owned());
        }
        i += 1;
    }
    tags
}

/// `docker build ARGS`: `podman build ARGS` (or `buildah bud ARGS`) on the
/// host, then each `-t` tag saved and loaded into the store.
pub fn build(args: &[String]) -> u8 {
    let tags = build_tags(args);
    if tags.is_empty() {
        return refuse(
            "build needs -t NAME[:TAG] here: the image is loaded into airlock's store by name",
        );
    }
    let Some((kind, program)) = find_builder(&["podman", "buildah"]) else {
        return refuse(
            "build needs podman or buildah on the host to build images (Debian: apt-get install \
             podman); or build elsewhere and `docker load -i ARCHIVE`",
        );
    };
    let sub = if kind == "podman" { "build" } else { "bud" };
    let status = Command::new(&program)
        .arg(sub)
        .args(args)
        .stdin(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            return error(
                Code::Error,
                &format!("{kind} {sub} failed ({s}): its output is above"),
            )
        }
        Err(e) => {
            return error(
                Code::Error,
                &format!("cannot run {}: {e}", program.display()),
            )
        }
    }
    let store = match store() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let tmp_dir = std::env::temp_dir().join(format!(
        "airlock-docker-build-{}-{}",
        std::process::id(),
        crate::audit::new_run_id()
    ));
    // A new directory of our own, private.
    if let Err(e) = fs::DirBuilder::new().mode(0o700).create(&tmp_dir) {
        return error(Code::Error, &format!("{}: {e}", tmp_dir.display()));
    }
    let mut code = 0;
    for tag in &tags {
        let archive = tmp_dir.join("image.tar");
        let _ = fs::remove_file(&archive);
        let saved = if kind == "podman" {
            Command::new(&program)
                .args(["save", "--format", "docker-archive", "-o"])
                .arg(&archive)
                .arg(tag)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
        } else {
            Command::new(&program)
                .arg("push")
                .arg(tag)
                .arg(format!("docker-archive:{}:{tag}", archive.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
        };
        match saved {
            Ok(s) if s.success() => {
                let _ = io::stdout().flush();
                code = load_file(&store, &archive, false);
            }
            Ok(s) => code = error(Code::Error, &format!("{kind} could not save {tag} ({s})")),
            Err(e) => {
                code = error(
                    Code::Error,
                    &format!("cannot run {}: {e}", program.display()),
                )
            }
        }
        if code != 0 {
            break;
        }
    }
    let _ = fs::remove_dir_all(&tmp_dir);
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_time("2000-02-29T00:00:00Z"), Some(951_782_400));
        assert_eq!(
            parse_time("2026-12-04T16:02:35.123456789Z"),
            Some(1_796_400_155)
        );
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn build_tags_are_found_in_every_spelling() {
        let a = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            build_tags(&a(&[
                "-t",
                "a:1",
                "--tag=b",
                "-tc",
                "--tag",
                "d",
                "-f",
                "Dockerfile",
                "."
            ])),
            ["a:1", "b", "c", "d"]
        );
        assert!(build_tags(&a(&["."])).is_empty());
        assert_eq!(build(&a(&["."])), 125);
    }
}
