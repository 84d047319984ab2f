//! Loading, attaching and pinning. Links are pinned under `<pin dir>/links/` and maps under
//! `<pin dir>/`: the programs stay attached and the maps keep their contents when the agent
//! exits, and a new agent adopts both instead of reloading.

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::Pod;
use aya::maps::{HashMap, Map, MapData, PerCpuHashMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr};
use aya_obj::generated::bpf_attach_type;
use sluice_dataplane_common::{
    Addr, Backend, Endpoint, OriginalDst, PolicyCounters, PolicyRule, PolicySet, RuleKey, ServiceCounters, ServiceKey,
    ServiceValue, SlotKey, Workload, maps,
};

use crate::{DataplaneError, Result, io, map_error};

/// The eBPF object built by `build.rs`.
#[cfg(not(sluice_ebpf_missing))]
static OBJECT: std::result::Result<&[u8], &str> =
    Ok(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-ebpf")));
/// Built on a machine without the eBPF toolchain: why, and what to install.
#[cfg(sluice_ebpf_missing)]
static OBJECT: std::result::Result<&[u8], &str> = Err(env!("SLUICE_EBPF_MISSING"));

/// The eBPF object, or the build's own message when this binary was built without it.
pub fn object() -> Result<&'static [u8]> {
    OBJECT.map_err(|why| {
        DataplaneError::Invalid(format!("this sluice was built without its eBPF programs: {why}; then rebuild"))
    })
}

/// Every program with the cgroup hook it attaches to (all on the agent's cgroup, and so on every
/// cgroup below it).
pub const PROGRAMS: [(&str, bpf_attach_type); 9] = [
    ("sluice_connect4", bpf_attach_type::BPF_CGROUP_INET4_CONNECT),
    ("sluice_connect6", bpf_attach_type::BPF_CGROUP_INET6_CONNECT),
    ("sluice_getpeername4", bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME),
    ("sluice_getpeername6", bpf_attach_type::BPF_CGROUP_INET6_GETPEERNAME),
    ("sluice_sendmsg4", bpf_attach_type::BPF_CGROUP_UDP4_SENDMSG),
    ("sluice_sendmsg6", bpf_attach_type::BPF_CGROUP_UDP6_SENDMSG),
    ("sluice_recvmsg4", bpf_attach_type::BPF_CGROUP_UDP4_RECVMSG),
    ("sluice_recvmsg6", bpf_attach_type::BPF_CGROUP_UDP6_RECVMSG),
    (INGRESS_PROGRAM, bpf_attach_type::BPF_CGROUP_INET_INGRESS),
];
/// The `cgroup_skb/ingress` program; the others are `cgroup/sock_addr`.
const INGRESS_PROGRAM: &str = "sluice_ingress";
/// A symlink in the pin directory whose target names the build of the pinned programs (bpffs
/// holds no regular files).
const BUILD_STAMP: &str = "build";

/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at /sys/fs/bpf unless it is mounted there.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(io("reading /proc/mounts"))?;
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(BPFFS) && l.split_whitespace().nth(2) == Some("bpf"))
    {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).map_err(io("creating /sys/fs/bpf"))?;
    let status =
        std::process::Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]).status().map_err(io("running mount"))?;
    if !status.success() {
        return Err(DataplaneError::Invalid(format!("mount -t bpf bpf {BPFFS} failed: {status}")));
    }
    Ok(())
}

/// The maps, typed.
pub struct Maps {
    /// (VIP, port, proto) → service.
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// (service, slot) → backend id.
    pub slots: HashMap<MapData, SlotKey, u32>,
    /// backend id → backend.
    pub backends: HashMap<MapData, u32, Backend>,
    /// cgroup id → workload.
    pub workloads: HashMap<MapData, u64, Workload>,
    /// socket cookie → dialled address.
    pub original_dst: HashMap<MapData, u64, OriginalDst>,
    /// service id → per-CPU counters.
    pub counters: PerCpuHashMap<MapData, u32, ServiceCounters>,
    /// backend id → per-CPU connects.
    pub backend_counters: PerCpuHashMap<MapData, u32, u64>,
    /// workload address → identity and policy set.
    pub endpoints: HashMap<MapData, Addr, Endpoint>,
    /// policy set id → set.
    pub policy_sets: HashMap<MapData, u32, PolicySet>,
    /// (set, slot) → rule.
    pub policy_rules: HashMap<MapData, RuleKey, PolicyRule>,
    /// policy set id → per-CPU decisions.
    pub policy_counters: PerCpuHashMap<MapData, u32, PolicyCounters>,
    /// 0 → the node proxy's address.
    pub node_proxy: HashMap<MapData, u32, Addr>,
}

impl Maps {
    /// Opens the maps pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let data = |name: &'static str| MapData::from_pin(pin_dir.join(name)).map_err(map_error(name));
        Ok(Self {
            services: hash(pin_dir, maps::SERVICES)?,
            slots: hash(pin_dir, maps::SLOTS)?,
            backends: hash(pin_dir, maps::BACKENDS)?,
            workloads: hash(pin_dir, maps::WORKLOADS)?,
            original_dst: HashMap::try_from(Map::LruHashMap(data(maps::ORIGINAL_DST)?))
                .map_err(map_error(maps::ORIGINAL_DST))?,
            counters: per_cpu(pin_dir, maps::SERVICE_COUNTERS)?,
            backend_counters: per_cpu(pin_dir, maps::BACKEND_COUNTERS)?,
            endpoints: hash(pin_dir, maps::ENDPOINTS)?,
            policy_sets: hash(pin_dir, maps::POLICY_SETS)?,
            policy_rules: hash(pin_dir, maps::POLICY_RULES)?,
            policy_counters: per_cpu(pin_dir, maps::POLICY_COUNTERS)?,
            node_proxy: hash(pin_dir, maps::NODE_PROXY)?,
        })
    }
}

/// Opens one pinned map by path (for measurements such as the memory its fdinfo reports).
pub fn open_pinned(path: &Path) -> Result<MapData> {
    MapData::from_pin(path)
        .map_err(|source| DataplaneError::Pin { path: path.display().to_string(), message: source.to_string() })
}

fn hash<K: Pod, V: Pod>(pin_dir: &Path, name: &'static str) -> Result<HashMap<MapData, K, V>> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_error(name))?;
    HashMap::try_from(Map::HashMap(data)).map_err(map_error(name))
}

fn per_cpu<K: Pod, V: Pod>(pin_dir: &Path, name: &'static str) -> Result<PerCpuHashMap<MapData, K, V>> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_error(name))?;
    PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).map_err(map_error(name))
}

/// The attached data plane.
pub struct Dataplane {
    /// Where links and maps are pinned.
    pub pin_dir: PathBuf,
    /// The maps.
    pub maps: Maps,
    /// True when an earlier agent's programs were adopted as they were (all of this build, all
    /// attached to this cgroup).
    pub adopted: bool,
    /// The cgroup the programs are attached to, and its id (checked against the kernel's links).
    pub cgroup: PathBuf,
    /// The id of `cgroup`.
    pub cgroup_id: u64,
}

fn link_pin(pin_dir: &Path, program: &str) -> PathBuf {
    pin_dir.join("links").join(program)
}

/// Where the kernel says a link is attached (its fdinfo: `cgroup_id`, `attach_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTarget {
    /// The cgroup's id. A removed cgroup keeps its id while links hold it (the kernel keeps
    /// it as a zombie), so a link on a removed cgroup is one whose id no directory has.
    pub cgroup_id: u64,
    /// `bpf_attach_type`.
    pub attach_type: u32,
}

/// The target of the link pinned for `program`, or None when no cgroup link is pinned there.
pub fn pinned_target(pin_dir: &Path, program: &str) -> Option<LinkTarget> {
    let link: FdLink = PinnedLink::from_pin(link_pin(pin_dir, program)).ok()?.into();
    let id = link.info().ok()?.id();
    // aya keeps the link's descriptor private, so find it among this process's descriptors by
    // the link id the kernel prints in each one's fdinfo.
    let want = id.to_string();
    for entry in std::fs::read_dir("/proc/self/fdinfo").ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        let field = |name: &str| {
            text.lines().find_map(|l| l.split_once(':').filter(|(k, _)| *k == name).map(|(_, v)| v.trim().to_string()))
        };
        if field("link_id").as_deref() != Some(&want) {
            continue;
        }
        return Some(LinkTarget {
            cgroup_id: field("cgroup_id")?.parse().ok()?,
            attach_type: field("attach_type")?.parse().ok()?,
        });
    }
    None
}

/// A name for this build's programs: the adopted links must run these, not an older build's.
fn build_stamp(object: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    object.hash(&mut h);
    format!("sluice-ebpf-{:016x}", h.finish())
}

/// Refuses pinned maps whose type, key, value, size or flags differ from this build's: the
/// loader would reuse them as they are, and the programs would misread every entry.
fn check_pinned_maps(pin_dir: &Path, object: &[u8]) -> Result<()> {
    let parsed =
        aya_obj::Object::parse(object).map_err(|e| DataplaneError::Invalid(format!("parsing the eBPF object: {e}")))?;
    for (name, def) in &parsed.maps {
        let path = pin_dir.join(name);
        if def.pinning() != aya_obj::maps::PinningType::ByName || !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path)
            .map_err(|e| DataplaneError::Pin { path: path.display().to_string(), message: e.to_string() })?;
        let have = (
            info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags(),
        );
        let want = (def.map_type(), def.key_size(), def.value_size(), def.max_entries(), def.map_flags());
        if have != want {
            return Err(DataplaneError::Invalid(format!(
                "pin dir {}: map {name} has another layout than this build's \
                 (type, key size, value size, max entries, flags: pinned {have:?}, expected {want:?}); \
                 it was made by another sluice version: `sluice agent detach --pin-dir {}` removes it \
                 (connections are not balanced until the agent starts again)",
                pin_dir.display(),
                pin_dir.display()
            )));
        }
    }
    Ok(())
}

impl Dataplane {
    /// Attaches the programs to `cgroup`, adopting the links an earlier agent pinned in `pin_dir`
    /// where they run this build and are attached to this cgroup; any other link (to a removed
    /// or another cgroup, of another build, half-made) is replaced: the new one is attached
    /// before the old one goes, so no connect goes unbalanced. Pinned maps of another layout are
    /// refused.
    pub fn attach(pin_dir: &Path, cgroup: &Path) -> Result<Self> {
        let object = object()?;
        std::fs::create_dir_all(pin_dir.join("links")).map_err(io(format!("creating {}", pin_dir.display())))?;
        check_pinned_maps(pin_dir, object)?;
        let cgroup_id = crate::cgroup::cgroup_id(cgroup)?;
        let stamp = build_stamp(object);
        let stamp_path = pin_dir.join(BUILD_STAMP);
        let same_build = std::fs::read_link(&stamp_path).is_ok_and(|t| t.as_os_str() == stamp.as_str());
        let stale: Vec<(&str, bpf_attach_type)> = PROGRAMS
            .into_iter()
            .filter(|(name, hook)| {
                let target = pinned_target(pin_dir, name);
                let current = same_build && target == Some(LinkTarget { cgroup_id, attach_type: *hook as u32 });
                if !current && target.is_some() {
                    tracing::warn!(
                        program = name, pin_dir = %pin_dir.display(), cgroup = %cgroup.display(), cgroup_id,
                        pinned = ?target, same_build,
                        "pinned link is not this build's program on this cgroup: replacing it"
                    );
                }
                !current
            })
            .collect();
        let adopted = stale.is_empty();
        if adopted {
            tracing::info!(pin_dir = %pin_dir.display(), cgroup = %cgroup.display(), "adopting pinned programs and maps");
        } else {
            Self::attach_programs(pin_dir, cgroup, object, &stale)?;
            // Written last: a start interrupted before this replaces every link next time.
            let _ = std::fs::remove_file(&stamp_path);
            std::os::unix::fs::symlink(&stamp, &stamp_path).map_err(io(format!("writing {}", stamp_path.display())))?;
            tracing::info!(cgroup = %cgroup.display(), pin_dir = %pin_dir.display(), attached = stale.len(), "programs attached and pinned");
        }
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            maps: Maps::open(pin_dir)?,
            adopted,
            cgroup: cgroup.to_path_buf(),
            cgroup_id,
        })
    }

    /// Loads the object (reusing the pinned maps) and attaches `programs` to `cgroup`, each
    /// pinned under a temporary name and renamed over the old pin: the old link is detached
    /// only once the new one runs.
    fn attach_programs(
        pin_dir: &Path,
        cgroup: &Path,
        object: &[u8],
        programs: &[(&str, bpf_attach_type)],
    ) -> Result<()> {
        let mut ebpf = aya::EbpfLoader::new().default_map_pin_directory(pin_dir).load(object)?;
        let cgroup_file = File::open(cgroup).map_err(io(format!("opening cgroup {}", cgroup.display())))?;
        for &(name, _) in programs {
            let step =
                |what: &'static str| move |source| DataplaneError::Program { what: format!("{what} {name}"), source };
            let program = ebpf
                .program_mut(name)
                .ok_or_else(|| DataplaneError::Invalid(format!("program {name} missing from the object")))?;
            // Links (kernel >= 5.7) coexist with other programs on the cgroup whatever the mode;
            // bpf_link_create refuses the legacy multi-attach flag.
            let link: std::result::Result<FdLink, _> = if name == INGRESS_PROGRAM {
                let program: &mut CgroupSkb = program.try_into().map_err(step("typing"))?;
                program.load().map_err(step("loading"))?;
                let id = program
                    .attach(&cgroup_file, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
                    .map_err(step("attaching"))?;
                program.take_link(id).map_err(step("taking the link of"))?.try_into()
            } else {
                let program: &mut CgroupSockAddr = program.try_into().map_err(step("typing"))?;
                program.load().map_err(step("loading"))?;
                let id = program.attach(&cgroup_file, CgroupAttachMode::Single).map_err(step("attaching"))?;
                program.take_link(id).map_err(step("taking the link of"))?.try_into()
            };
            let fd = link.map_err(|e: aya::programs::links::LinkError| DataplaneError::Pin {
                path: name.into(),
                message: e.to_string(),
            })?;
            let path = link_pin(pin_dir, name);
            // bpffs refuses names with a dot.
            let fresh = link_pin(pin_dir, &format!("{name}_new"));
            let _ = std::fs::remove_file(&fresh);
            fd.pin(&fresh)
                .map_err(|e| DataplaneError::Pin { path: fresh.display().to_string(), message: e.to_string() })?;
            std::fs::rename(&fresh, &path).map_err(io(format!(
                "renaming {} over {}",
                fresh.display(),
                path.display()
            )))?;
        }
        Ok(())
    }

    /// Detaches the programs and removes every pin under `pin_dir`, then the directory.
    pub fn remove(pin_dir: &Path) -> Result<()> {
        for (p, _) in PROGRAMS {
            let path = link_pin(pin_dir, p);
            if path.exists() {
                // Unpinning drops the last reference: the link is destroyed and detached.
                let link = PinnedLink::from_pin(&path)
                    .map_err(|e| DataplaneError::Pin { path: path.display().to_string(), message: e.to_string() })?;
                drop(link.unpin().map_err(io(format!("unpinning {}", path.display())))?);
            }
        }
        if pin_dir.exists() {
            std::fs::remove_dir_all(pin_dir).map_err(io(format!("removing {}", pin_dir.display())))?;
        }
        Ok(())
    }
}
