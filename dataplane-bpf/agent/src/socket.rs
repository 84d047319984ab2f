//! The agent's local socket (`/run/sluice/agent.sock`): `sluice run` asks the agent for a
//! workload cgroup. One JSON line each way.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{DataplaneError, Result, io};

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/sluice/agent.sock";

/// A request to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// `<name>.<namespace>` of a Pod or WorkloadEntry in the served config.
    pub workload: String,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    /// The cgroup to move into.
    Cgroup(PathBuf),
    /// Why not.
    Error(String),
}

/// Splits `<name>.<namespace>` (namespaces have no dots; names may).
pub fn parse_workload(text: &str) -> Result<(String, String)> {
    match text.rsplit_once('.') {
        Some((name, ns)) if !name.is_empty() && !ns.is_empty() => Ok((ns.to_string(), name.to_string())),
        _ => Err(DataplaneError::Invalid(format!("--workload {text:?}: expected <name>.<namespace>"))),
    }
}

/// Asks the agent at `socket` for the cgroup of `workload`.
pub fn register(socket: &Path, workload: &str) -> Result<PathBuf> {
    parse_workload(workload)?;
    let mut stream = UnixStream::connect(socket)
        .map_err(io(format!("connecting to the agent at {} (is `sluice agent` running?)", socket.display())))?;
    let mut line = serde_json::to_string(&Register { workload: workload.to_string() }).expect("serializable");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io("writing to the agent socket"))?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io("reading the agent's answer"))?;
    match serde_json::from_str(&answer) {
        Ok(Reply::Cgroup(path)) => Ok(path),
        Ok(Reply::Error(message)) => Err(DataplaneError::Invalid(message)),
        Err(e) => Err(DataplaneError::Invalid(format!("unreadable answer from the agent {answer:?}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_split_at_the_last_dot() {
        assert_eq!(parse_workload("reviews-v1.default").unwrap(), ("default".into(), "reviews-v1".into()));
        assert_eq!(parse_workload("a.b.prod").unwrap(), ("prod".into(), "a.b".into()));
        assert!(parse_workload("nodot").is_err());
        assert!(parse_workload(".default").is_err());
    }

    #[test]
    fn replies_round_trip() {
        let text = serde_json::to_string(&Reply::Cgroup("/x".into())).unwrap();
        assert_eq!(text, r#"{"cgroup":"/x"}"#);
        assert_eq!(serde_json::from_str::<Reply>(r#"{"error":"no"}"#).unwrap(), Reply::Error("no".into()));
    }
}
