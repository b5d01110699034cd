//! The command line, above the libraries: it parses what the user typed
//! ([`args`]), turns it into the libraries' own configuration, calls them
//! and prints what they found. No library module imports from here.

pub mod args;
pub mod audit;
pub mod doctor;
pub mod image;
pub mod pool;
pub mod run;
pub mod sandbox;

pub use args::*;
