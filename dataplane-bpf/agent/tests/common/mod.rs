//! Shared by the agent's root tests: Python processes started inside a cgroup.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use sluice_dataplane::cgroup;

/// A child process killed on drop.
pub struct Running {
    /// The process.
    pub child: Child,
}

impl Running {
    /// Waits for the process and returns its output lines.
    pub fn lines(mut self) -> Vec<String> {
        let lines = BufReader::new(self.child.stdout.take().unwrap()).lines().map(|l| l.unwrap()).collect();
        let _ = self.child.wait();
        lines
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a Python script inside `cgroup_dir`. The script must wait for a line on stdin when
/// `WAIT_STDIN` is set: it is sent once the process is in the cgroup.
pub fn python_in(cgroup_dir: &Path, script: &str, args: &[&str]) -> Running {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .env("WAIT_STDIN", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let running = Running { child };
    cgroup::add_process(cgroup_dir, pid).expect("move into cgroup");
    stdin.write_all(b"go\n").unwrap();
    running
}
