//! sluice's node agent library: loads sluice's eBPF programs, attaches them to a cgroup, pins
//! programs' links and maps under a bpffs directory (so a restarted agent adopts them and no
//! connection is dropped), and keeps the maps equal to what the control plane computed.

pub mod agent;
pub mod backends;
pub mod cert_files;
pub mod cgroup;
pub mod delivery;
pub mod dump;
pub mod held;
pub mod loader;
pub mod metrics;
pub mod policy;
pub mod sandbox;
pub mod sds;
pub mod socket;
pub mod sync;

/// Errors of the agent library.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// Loading or attaching a program failed.
    #[error("{what}: {source}")]
    Program {
        /// Which step.
        what: String,
        /// The cause.
        source: aya::programs::ProgramError,
    },
    /// Loading the object failed.
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A map operation failed.
    #[error("map {map}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// The cause.
        source: aya::maps::MapError,
    },
    /// Pinning failed.
    #[error("pinning {path}: {message}")]
    Pin {
        /// Path.
        path: String,
        /// The cause.
        message: String,
    },
    /// A file-system step failed.
    #[error("{what}: {source}")]
    Io {
        /// Which step.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The xDS stream failed.
    #[error("xDS: {0}")]
    Xds(String),
    /// A config entry the maps cannot hold.
    #[error("{0}")]
    Invalid(String),
}

/// Result of the agent library.
pub type Result<T> = std::result::Result<T, DataplaneError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let what = what.into();
    move |source| DataplaneError::Io { what, source }
}

/// Wraps a map operation's error with the map's name.
pub(crate) fn map_error(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// The result of deleting a map entry, with "already gone" counted as done: aya reports a
/// delete of a missing key as the syscall's ENOENT.
pub(crate) fn deleted(r: std::result::Result<(), aya::maps::MapError>, map: &'static str) -> Result<()> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(map_error(map)(source)),
    }
}
