//! `airlock audit verify|show|keygen`: the audit log's offline tools, run
//! by the user after the fact (no guest involved).

use std::io::{self, Write};
use std::path::Path;

use crate::audit::{keys, read_log, show, verify, Error};
use crate::cli::{AuditArgs, AuditCommand};
use crate::exit::Exit;

/// `airlock audit …`.
pub fn main(args: AuditArgs) -> Exit {
    let result = match args.command {
        AuditCommand::Verify(a) => verify_command(&a.file, a.key.as_deref()),
        AuditCommand::Show(a) => show_command(&a.file, a.json),
        AuditCommand::Keygen(a) => keygen_command(&a.out),
    };
    result.unwrap_or_else(|e| {
        eprintln!("airlock: error: {}", crate::text::report(&e));
        Exit::Usage
    })
}

fn verify_command(file: &Path, key: Option<&Path>) -> Result<Exit, Error> {
    let key = key.map(keys::load_verifying_key).transpose()?;
    let bytes = read_log(file)?;
    let shown = crate::text::sanitize(file.display().to_string().as_bytes());
    let mut out = io::stdout().lock();
    let lines = match verify::verify(&bytes, key.as_ref()) {
        Ok(intact) => {
            let mut lines = vec![format!(
                "intact: {shown}: {} records{}, from run.start to run.end, sealed",
                intact.records,
                intact
                    .run_id
                    .map(|id| format!(" (run {})", crate::text::sanitize(id.as_bytes())))
                    .unwrap_or_default()
            )];
            lines.push(format!("run.end sha256: {}", intact.run_end_hash));
            lines.push(match intact.signed {
                verify::Signed::No => {
                    "signature: none (the run had no --audit-key; the chain alone cannot rule out \
                     a log rewritten from the changed record on)"
                        .into()
                }
                verify::Signed::ByGivenKey(k) => {
                    format!("signature: valid, by the --key given ({k})")
                }
                verify::Signed::ByEmbeddedKey(k) => format!(
                    "signature: valid for the key the log names ({k}); pass --key PUB to check \
                     that it is yours"
                ),
            });
            let _ = writeln!(out, "{}", lines.join("\n"));
            return Ok(Exit::Success);
        }
        Err(broken) => {
            let mut lines = vec![
                format!("NOT INTACT: {shown}"),
                crate::text::sanitize(broken.problem.as_bytes()),
            ];
            lines.push(match broken.intact_through {
                Some(good) => format!(
                    "intact through {}: every record up to it is whole and chained",
                    crate::text::sanitize(good.describe().as_bytes())
                ),
                None => "no record before it is intact".into(),
            });
            lines
        }
    };
    let _ = writeln!(out, "{}", lines.join("\n"));
    Ok(Exit::NotIntact)
}

fn show_command(file: &Path, json: bool) -> Result<Exit, Error> {
    let bytes = read_log(file)?;
    let lines = show::parse(&bytes);
    let mut out = io::stdout().lock();
    if json {
        for line in &lines {
            match line {
                show::Line::Record(r) => {
                    let text = r.to_line().map_err(|e| Error::Encode(e.to_string()))?;
                    let _ = out.write_all(&text);
                    let _ = out.write_all(b"\n");
                }
                show::Line::Bad(n, why) => eprintln!(
                    "airlock: line {n} is not a record: {}",
                    crate::text::sanitize(why.as_bytes())
                ),
            }
        }
    } else {
        for line in show::timeline(&lines) {
            let _ = writeln!(out, "{line}");
        }
        eprintln!("airlock: (not verified: run `airlock audit verify` to check the log)");
    }
    Ok(Exit::Success)
}

fn keygen_command(out: &Path) -> Result<Exit, Error> {
    let (public, key) = keys::keygen(out)?;
    eprintln!(
        "airlock: wrote the private key {} (keep it secret; pass it to `airlock run --audit-key`) \
         and the public key {} (for `airlock audit verify --key`): {}",
        out.display(),
        public.display(),
        keys::public_hex(&key)
    );
    Ok(Exit::Success)
}
