//! A cgroup and a pin directory of the caller's own, for tests and benchmarks that attach the
//! programs without touching the machine's cgroup root or `/sys/fs/bpf/sluice`: detached and
//! removed on drop, however the caller ends.

use std::path::PathBuf;

use crate::loader::{Dataplane, ensure_bpffs};
use crate::{Result, cgroup};

/// `<cgroup2>/sluice-<tag>-<pid>` and `/sys/fs/bpf/sluice-<tag>-<pid>`.
pub struct Sandbox {
    /// The cgroup the programs attach to.
    pub cgroup: PathBuf,
    /// Where programs and maps are pinned.
    pub pin_dir: PathBuf,
}

impl Sandbox {
    /// Mounts bpffs if needed and creates the cgroup (the pin directory is made on attach).
    pub fn new(tag: &str) -> Result<Sandbox> {
        ensure_bpffs()?;
        let id = std::process::id();
        let cgroup = cgroup::cgroup2_mount()?.join(format!("sluice-{tag}-{id}"));
        cgroup::create(&cgroup)?;
        Ok(Sandbox { cgroup, pin_dir: PathBuf::from(format!("/sys/fs/bpf/sluice-{tag}-{id}")) })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Dataplane::remove(&self.pin_dir);
        let _ = cgroup::remove(&self.cgroup);
    }
}
