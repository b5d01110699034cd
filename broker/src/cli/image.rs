//! `airlock image load|ls|inspect|rm`: the image store from the command
//! line.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::cli::{ImageCommand, ImageLsArgs, ListFormat};
use crate::exit::Exit;
use crate::image::store::Store;
use crate::image::Error;

/// `airlock image ...`.
pub fn main(command: ImageCommand) -> Exit {
    match run(command) {
        Ok(exit) => exit,
        Err(e) => {
            eprintln!("airlock: error: {}", crate::text::report(&e));
            e.exit()
        }
    }
}

fn run(command: ImageCommand) -> Result<Exit, Error> {
    match command {
        ImageCommand::Load(args) => {
            let store = Store::open_default()?;
            let mkfs = which("mkfs.erofs").ok_or_else(|| {
                Error::Mkfs(
                    "mkfs.erofs is not installed (Debian: apt-get install erofs-utils)".into(),
                )
            })?;
            let loaded = store.load(&args.file, &mkfs)?;
            for bad in &loaded.bad_names {
                eprintln!("airlock: warning: the archive's name {bad:?} is not a valid reference: left out");
            }
            if let Some(stats) = &loaded.stats {
                if stats.devices_dropped > 0 {
                    eprintln!(
                        "airlock: warning: {} device nodes of the image were dropped",
                        stats.devices_dropped
                    );
                }
                if stats.refused > 0 {
                    eprintln!(
                        "airlock: warning: {} entries of the image were left out (e.g. {})",
                        stats.refused,
                        // The paths are the image author's: no terminal controls.
                        crate::text::sanitize(stats.refused_examples.join("; ").as_bytes())
                    );
                }
            }
            let names = if loaded.image.names.is_empty() {
                "(no name)".to_owned()
            } else {
                loaded.image.names.join(", ")
            };
            println!(
                "{} {} {names}",
                if loaded.existed {
                    "Already loaded:"
                } else {
                    "Loaded:"
                },
                loaded.image.digest
            );
            Ok(Exit::Success)
        }
        ImageCommand::Ls(args) => ls(&args),
        ImageCommand::Inspect(args) => {
            let store = Store::open_default()?;
            let image = store.resolve(&args.reference)?;
            let config = image.config()?;
            let disk = image.disk();
            let out = json!({
                "digest": image.digest,
                "names": image.names,
                "config": config.get("config").cloned().unwrap_or(Value::Null),
                "architecture": config.get("architecture"),
                "os": config.get("os"),
                "disk": {
                    "path": disk.display().to_string(),
                    "bytes": std::fs::metadata(&disk).map(|m| m.len()).ok(),
                },
                "loaded": image.meta(),
            });
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            Ok(Exit::Success)
        }
        ImageCommand::Rm(args) => {
            let store = Store::open_default()?;
            // Every reference is checked before any is removed.
            // An image a running sandbox boots from is not removed under it.
            for r in &args.references {
                let image = store.resolve(r)?;
                let goes = r.starts_with("sha256:") || image.names.len() <= 1;
                if goes {
                    let users = crate::sandbox::running_with_image(&image.digest);
                    if !users.is_empty() {
                        return Err(Error::InUse(r.clone(), users.join(", ")));
                    }
                }
            }
            for r in &args.references {
                let removed = store.remove(r)?;
                for n in &removed.untagged {
                    println!("Untagged: {n}");
                }
                if removed.deleted {
                    println!("Deleted: {}", removed.digest);
                }
            }
            Ok(Exit::Success)
        }
    }
}

fn ls(args: &ImageLsArgs) -> Result<Exit, Error> {
    let store = Store::open_default()?;
    let images = store.list()?;
    let rows: Vec<Value> = images
        .iter()
        .map(|i| {
            let meta = i.meta();
            json!({
                "digest": i.digest,
                "names": i.names,
                "disk_bytes": meta.get("disk_bytes"),
                "loaded_at": meta.get("loaded_at"),
            })
        })
        .collect();
    match args.format {
        ListFormat::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&rows).unwrap_or_default()
            );
        }
        ListFormat::Table => {
            println!("{:<40} {:<19} {:>10}", "NAME", "DIGEST", "SIZE");
            for i in &images {
                let size = i
                    .meta()
                    .get("disk_bytes")
                    .and_then(Value::as_u64)
                    .map_or_else(|| "?".to_owned(), human);
                let short = &i.digest[..i.digest.len().min(19)];
                if i.names.is_empty() {
                    println!("{:<40} {short:<19} {size:>10}", "<none>");
                }
                for n in &i.names {
                    println!("{n:<40} {short:<19} {size:>10}");
                }
            }
        }
    }
    Ok(Exit::Success)
}

fn human(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 {
            return format!("{v:.1} {unit}");
        }
        v /= 1024.0;
    }
    format!("{v:.1} TiB")
}

/// The first executable `name` on PATH (or in /usr/sbin, /sbin).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            PathBuf::from("/usr/sbin"),
            PathBuf::from("/sbin"),
            PathBuf::from("/usr/bin"),
        ])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
