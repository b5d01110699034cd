//! The door: the host's side of everything the guest connects to. Every
//! byte read here comes from a guest we assume hostile, so every length is
//! bounded, every name checked where it is used, and every refusal
//! audited. The model port, which also holds the API keys, is
//! [`crate::model`].
//!
//! - [`ports`]: the one thread that accepts on every vsock port and admits
//!   connections by each port's rule.
//! - [`session`]: the control conversation (run spec, output, exit status).
//! - [`files`]: the workspace sent in and the results taken out.

pub mod files;
pub mod ports;
pub mod session;
