//! Loading, attaching and pinning. Links are pinned under `<pin dir>/links/` and maps under
//! `<pin dir>/`: the programs stay attached and the maps keep their contents when the agent
//! exits, and a new agent adopts both instead of reloading.

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::Pod;
use aya::maps::{HashMap, Map, MapData, PerCpuHashMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr};
use sluice_dataplane_common::{
    Addr, Backend, Endpoint, OriginalDst, PolicyCounters, PolicyRule, PolicySet, RuleKey, ServiceCounters, ServiceKey,
    ServiceValue, SlotKey, Workload, maps,
};

use crate::{DataplaneError, Result, io, map_error};

/// The eBPF object built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-ebpf"));

/// The `cgroup/sock_addr` programs, by function name.
const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    "sluice_connect4",
    "sluice_connect6",
    "sluice_getpeername4",
    "sluice_getpeername6",
    "sluice_sendmsg4",
    "sluice_sendmsg6",
    "sluice_recvmsg4",
    "sluice_recvmsg6",
];
/// The `cgroup_skb/ingress` program.
const INGRESS_PROGRAM: &str = "sluice_ingress";

/// Every program, all attached to the agent's cgroup (and so to every cgroup below it).
pub const PROGRAMS: [&str; 9] = [
    SOCK_ADDR_PROGRAMS[0],
    SOCK_ADDR_PROGRAMS[1],
    SOCK_ADDR_PROGRAMS[2],
    SOCK_ADDR_PROGRAMS[3],
    SOCK_ADDR_PROGRAMS[4],
    SOCK_ADDR_PROGRAMS[5],
    SOCK_ADDR_PROGRAMS[6],
    SOCK_ADDR_PROGRAMS[7],
    INGRESS_PROGRAM,
];

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
    /// True when an earlier agent's programs and maps were adopted.
    pub adopted: bool,
}

fn link_pin(pin_dir: &Path, program: &str) -> PathBuf {
    pin_dir.join("links").join(program)
}

impl Dataplane {
    /// Attaches the programs to `cgroup` (or adopts the ones an earlier agent pinned in
    /// `pin_dir`) and opens the maps.
    pub fn attach(pin_dir: &Path, cgroup: &Path) -> Result<Self> {
        std::fs::create_dir_all(pin_dir.join("links")).map_err(io(format!("creating {}", pin_dir.display())))?;
        let pinned = PROGRAMS.iter().all(|p| link_pin(pin_dir, p).exists());
        if pinned {
            tracing::info!(pin_dir = %pin_dir.display(), "adopting pinned programs and maps");
            return Ok(Self { pin_dir: pin_dir.to_path_buf(), maps: Maps::open(pin_dir)?, adopted: true });
        }
        // A partial set of links is an interrupted start: detach what is there and start over.
        for p in PROGRAMS {
            let path = link_pin(pin_dir, p);
            if path.exists() {
                let _ = PinnedLink::from_pin(&path).map(|l| l.unpin());
            }
        }
        let mut ebpf = aya::EbpfLoader::new().default_map_pin_directory(pin_dir).load(OBJECT)?;
        let cgroup_file = File::open(cgroup).map_err(io(format!("opening cgroup {}", cgroup.display())))?;
        for name in PROGRAMS {
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
            fd.pin(&path)
                .map_err(|e| DataplaneError::Pin { path: path.display().to_string(), message: e.to_string() })?;
        }
        drop(ebpf);
        tracing::info!(cgroup = %cgroup.display(), pin_dir = %pin_dir.display(), "programs attached and pinned");
        Ok(Self { pin_dir: pin_dir.to_path_buf(), maps: Maps::open(pin_dir)?, adopted: false })
    }

    /// Detaches the programs and removes every pin under `pin_dir`, then the directory.
    pub fn remove(pin_dir: &Path) -> Result<()> {
        for p in PROGRAMS {
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
