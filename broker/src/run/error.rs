//! Why a run could not be set up or carried through, and the exit code
//! each reason gives.

use std::io;
use std::path::PathBuf;

use airlock_protocol::EncodeError;

use crate::audit;
use crate::engine;
use crate::exit::Exit;
use crate::paths;

use super::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--mem {0} is out of range (use {min} to {max} MiB)", min = MEM_MIB_RANGE.start(), max = MEM_MIB_RANGE.end())]
    Mem(u32),
    #[error("--cpus {0} is out of range (use {min} to {max})", min = CPUS_RANGE.start(), max = CPUS_RANGE.end())]
    Cpus(u32),
    #[error("--timeout must be at least 1 second")]
    Timeout,
    #[error("no command given (usage: airlock run [OPTIONS] -- CMD [ARGS...])")]
    NoCommand,
    #[error("--env {arg:?}: {why}")]
    Env { arg: String, why: &'static str },
    #[error("--env {0} is given twice")]
    DuplicateEnv(String),
    #[error("argument {0} of the command contains a NUL byte")]
    NulInArgument(usize),
    #[error("--cmdline contains a NUL byte")]
    NulInCmdline,
    #[error("the command and its environment do not fit the protocol's limits")]
    Spec(#[source] EncodeError),
    #[error(transparent)]
    Image(#[from] paths::Error),
    #[error(transparent)]
    Archive(#[from] crate::archive::Error),
    #[error(
        "--image needs the guest root image (its podman loads the archive): not with --initrd"
    )]
    ArchiveWithoutRoot,
    #[error(transparent)]
    ImageStore(#[from] crate::image::Error),
    #[error("-w {0:?}: the working directory must be an absolute path without NUL")]
    Workdir(String),
    #[error("-u {0:?}: not USER or USER:GROUP of A-Z a-z 0-9 _ . - (names or numbers)")]
    User(String),
    #[error("-u sets the user of the agent's container: not with --no-container or --initrd (without a container the command runs as uid 1000, or root with --vm-root)")]
    UserWithoutContainer,
    #[error("{0}")]
    Mount(String),
    #[error("{0}")]
    Egress(String),
    #[error("--nested needs the guest root image (podman is in it): not with --initrd")]
    NestedWithoutRoot,
    #[error("--vm-root is for a command that runs directly in the VM: add --no-container")]
    VmRootInContainer,
    #[error("--collect {0:?}: not a relative pattern (no leading /, no empty, . or .. component)")]
    CollectPattern(String),
    #[error("--collect is given more than {max} times", max = airlock_protocol::limits::MAX_COLLECT_PATTERNS)]
    TooManyCollect,
    #[error(transparent)]
    Engine(#[from] engine::SelectError),
    #[error("cannot create the console log at {}", path.display())]
    ConsoleLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a private run directory in {}", dir.display())]
    RunDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the socket path {} is longer than {MAX_SOCKET_PATH} bytes (set TMPDIR to a shorter directory)", .0.display())]
    SocketPath(PathBuf),
    #[error("cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("live mounts")]
    Shares(#[source] io::Error),
    #[error("cannot install the SIGINT/SIGTERM handlers")]
    Signals(#[source] io::Error),
    #[error(transparent)]
    Spawn(#[from] engine::Error),
    #[error("lost track of the VM")]
    Supervise(#[source] io::Error),
    #[error(transparent)]
    Audit(#[from] audit::Error),
    #[error(transparent)]
    Files(#[from] crate::door::files::Error),
    #[error("cannot create the output directory {}", .0.display())]
    OutDir(PathBuf, #[source] io::Error),
    #[error("cannot open {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot hash {} for the audit log", path.display())]
    Digest {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Model(#[from] crate::model::config::Error),
    #[error(
        "{what} {} is inside --out {}, where the sandbox's results are written (a result \
         could replace it): put it somewhere else", path.display(), out.display()
    )]
    InsideOut {
        what: &'static str,
        path: PathBuf,
        out: PathBuf,
    },
    #[error("cannot check where {} is", .0.display())]
    Place(PathBuf, #[source] io::Error),
    #[error("cannot write the report {}", .0.display())]
    Report(PathBuf, #[source] io::Error),
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::Mem(_)
            | Error::Cpus(_)
            | Error::Timeout
            | Error::NoCommand
            | Error::Env { .. }
            | Error::DuplicateEnv(_)
            | Error::NulInArgument(_)
            | Error::NulInCmdline
            | Error::Spec(_)
            | Error::Image(_)
            | Error::Archive(_)
            | Error::ArchiveWithoutRoot
            | Error::NestedWithoutRoot
            | Error::VmRootInContainer
            | Error::CollectPattern(_)
            | Error::TooManyCollect
            | Error::Engine(_)
            | Error::ConsoleLog { .. }
            | Error::SocketPath(_)
            | Error::Files(_)
            | Error::OutDir(..)
            | Error::Pin { .. }
            | Error::Digest { .. }
            | Error::Model(_)
            | Error::InsideOut { .. }
            | Error::Place(..) => Exit::Usage,
            Error::Report(..) => Exit::SandboxFailed,
            Error::ImageStore(e) => e.exit(),
            Error::Workdir(_)
            | Error::User(_)
            | Error::UserWithoutContainer
            | Error::Mount(_)
            | Error::Egress(_) => Exit::Usage,
            Error::Audit(e) => match e {
                audit::Error::Create { .. }
                | audit::Error::Read { .. }
                | audit::Error::NoStateDir
                | audit::Error::Key(_) => Exit::Usage,
                audit::Error::Write(_)
                | audit::Error::Encode(_)
                | audit::Error::Replaced { .. }
                | audit::Error::Lost { .. } => Exit::SandboxFailed,
            },
            Error::RunDir { .. }
            | Error::Listen { .. }
            | Error::Shares(_)
            | Error::Signals(_)
            | Error::Spawn(_)
            | Error::Supervise(_) => Exit::SandboxFailed,
        }
    }
}
