//! cgroup v2 helpers: find the mount, create and remove cgroups, cgroup ids, moving processes.

use std::path::{Path, PathBuf};

use crate::{Result, io};

/// The cgroup2 mount point, read from /proc/mounts (it is not always /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(io("reading /proc/mounts"))?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(path))
        })
        .ok_or_else(|| crate::DataplaneError::Invalid("no cgroup2 file system is mounted".into()))
}

/// The cgroup id (the inode number of its directory, as bpf_get_current_cgroup_id returns).
pub fn cgroup_id(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path).map_err(io(format!("cgroup {}", path.display())))?.ino())
}

/// The cgroup below `root` (or `root` itself) whose id is `id`.
pub fn find_by_id(root: &Path, id: u64) -> Option<PathBuf> {
    if cgroup_id(root).ok()? == id {
        return Some(root.to_path_buf());
    }
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| find_by_id(&e.path(), id))
}

/// Creates a cgroup directory (and parents).
pub fn create(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(io(format!("creating cgroup {}", path.display())))
}

/// Moves process `pid` into the cgroup.
pub fn add_process(path: &Path, pid: u32) -> Result<()> {
    std::fs::write(path.join("cgroup.procs"), pid.to_string())
        .map_err(io(format!("moving {pid} into {}", path.display())))
}

/// Removes a cgroup and its empty children, deepest first.
pub fn remove(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(path).map_err(io(format!("listing {}", path.display())))? {
        let entry = entry.map_err(io("reading cgroup entry"))?;
        if entry.file_type().map_err(io("cgroup entry type"))?.is_dir() {
            remove(&entry.path())?;
        }
    }
    std::fs::remove_dir(path).map_err(io(format!("removing cgroup {}", path.display())))
}
