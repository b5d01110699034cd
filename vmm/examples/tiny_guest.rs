//! Writes the smoke-test guest (see `airlock_vmm::tiny_guest`) to a file:
//!
//!     cargo run -p airlock-vmm --example tiny_guest -- OUT.elf [LINE]
//!
//! then `airlock-vmm --kernel OUT.elf` prints LINE (default "airlock smoke ok")
//! and exits 0 through the i8042 reset.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next() else {
        eprintln!("usage: tiny_guest OUT.elf [LINE]");
        return ExitCode::from(2);
    };
    let line = args.next().unwrap_or_else(|| "airlock smoke ok".into()) + "\n";
    let elf =
        airlock_vmm::tiny_guest::pvh_elf(&airlock_vmm::tiny_guest::smoke_code(line.as_bytes()));
    match std::fs::write(&out, elf) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tiny_guest: cannot write {out}: {e}");
            ExitCode::from(1)
        }
    }
}
