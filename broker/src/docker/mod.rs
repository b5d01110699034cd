//! The docker-compatible front end (issue 18, in progress): `airlock
//! docker ARGS` and the binary invoked as `docker`, so that an agent
//! platform that drives `docker` (NanoClaw v2) runs each agent session in
//! its own microVM unchanged.
//!
//! Built so far: [`run_args`], `docker run`'s command line parsed into what
//! the sandbox is to be, with every flag that would weaken the sandbox
//! refused with its reason and every unknown flag refused (never silently
//! ignored). Not yet wired to a command: the subcommands, the mapping
//! onto `create`/`exec`/`stop`, the config file and the conformance test
//! come next.

pub mod run_args;
