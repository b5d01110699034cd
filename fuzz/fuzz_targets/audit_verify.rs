//! The audit verifier (`airlock audit verify`): arbitrary bytes as a log
//! file, with no key and with a fixed trusted key. It must never panic, and
//! a log it calls intact must have its records on their own lines.
//!
//! The broker is a binary crate: its audit modules are compiled in here
//! from their files, with the three record kinds the verifier names.

#![no_main]

// At the crate root: the verifier reaches its siblings through `super::`.
#[path = "../../broker/src/audit/keys.rs"]
#[allow(dead_code)]
mod keys;
#[path = "../../broker/src/audit/record.rs"]
#[allow(dead_code)]
mod record;
#[path = "../../broker/src/audit/time.rs"]
#[allow(dead_code)]
mod time;
#[path = "../../broker/src/audit/verify.rs"]
#[allow(dead_code)]
mod verify;
/// As in broker/src/audit/mod.rs.
mod kind {
    pub const RUN_START: &str = "run.start";
    pub const RUN_END: &str = "run.end";
    pub const RUN_SEAL: &str = "run.seal";
}

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key();
    for key in [None, Some(&key)] {
        if let Ok(intact) = verify::verify(data, key) {
            let lines = data
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .count();
            assert_eq!(intact.records, lines, "records vs lines");
        }
    }
});
