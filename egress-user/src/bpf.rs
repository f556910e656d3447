//! Loading the eBPF object, attaching it to sandbox cgroups, and the maps user space reads.
//!
//! One [`Kernel`] serves any number of sandboxes: each registration attaches the same loaded
//! programs to one more cgroup and adds that sandbox's rows to the shared maps.
//!
//! Links are pinned in bpffs. A link held only as a file descriptor detaches when egress
//! dies, and a surviving process of the sandbox would then have open network; a pinned link
//! stays, so its connects keep landing on a closed listener until `egress gc` cleans up.

use std::{
    fs, io,
    net::{SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        CgroupAttachMode, ProgramError,
    },
    Ebpf,
};
use egress_common::{
    maps, programs, Allow4, Allow6, Counter, DnsPeerKey, PortKey, Sandbox, SockKey, SockRecord,
    ALLOW_FIXED_PREFIX, SANDBOX_STRICT,
};

use crate::{addr, policy::TcpAllow};

/// The eBPF object, embedded at build time by `cargo xtask build`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("EGRESS_BPF_OBJECT_PATH"));

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this egress binary was built without its eBPF object; build it with `cargo xtask build`"
    )]
    NotEmbedded,
    #[error("loading the eBPF object failed")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF program {name} is missing from the object")]
    MissingProgram { name: &'static str },
    #[error("eBPF map {name} is missing from the object")]
    MissingMap { name: &'static str },
    #[error("eBPF program {name}: {what}")]
    Program {
        name: &'static str,
        what: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("eBPF map {name}: {what}")]
    Map {
        name: &'static str,
        what: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("eBPF program {name}: link is not fd-based (kernel older than 5.7?)")]
    Link {
        name: &'static str,
        #[source]
        source: Box<LinkError>,
    },
    #[error("pinning {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("bpffs at {path}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn map_err(name: &'static str, what: &'static str) -> impl FnOnce(MapError) -> Error {
    move |e| Error::Map {
        name,
        what,
        source: Box::new(e),
    }
}

fn prog_err(name: &'static str, what: &'static str) -> impl FnOnce(ProgramError) -> Error {
    move |e| Error::Program {
        name,
        what,
        source: Box::new(e),
    }
}

/// What the kernel needs to know about one sandbox.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    pub id: u32,
    pub listen4: SocketAddrV4,
    pub listen6: SocketAddrV6,
    /// DNS listener ports (UDP and TCP) on the listen4/listen6 addresses.
    pub dns4_port: u16,
    pub dns6_port: u16,
    pub intercept_ports: Vec<u16>,
    pub allow_tcp: Vec<TcpAllow>,
    /// Attach the `--strict` backstop.
    pub strict: bool,
}

/// Loaded programs plus the control-side maps.
pub struct Kernel {
    ebpf: Ebpf,
    sandboxes: HashMap<MapData, u64, Sandbox>,
    ports: HashMap<MapData, PortKey, u32>,
    allow4: LpmTrie<MapData, Allow4, u32>,
    allow6: LpmTrie<MapData, Allow6, u32>,
    counters: PerCpuArray<MapData, u64>,
}

/// The half of the maps the data path uses: where each accepted connection was going.
pub struct OrigDstTable {
    by_tuple: Mutex<HashMap<MapData, SockKey, SockRecord>>,
}

impl OrigDstTable {
    /// Looks up and deletes the entry for an accepted connection. One entry serves exactly
    /// one connection, so a stale entry can never be matched twice.
    pub fn take(&self, key: &SockKey) -> Option<SockRecord> {
        let mut map = self.by_tuple.lock().unwrap_or_else(|p| p.into_inner());
        let v = map.get(key, 0).ok()?;
        let _ = map.remove(key);
        Some(v)
    }
}

/// Who is behind each datagram the DNS listener receives, as the kernel saw it leave.
pub struct DnsPeerTable {
    map: Mutex<HashMap<MapData, DnsPeerKey, SockRecord>>,
}

impl DnsPeerTable {
    /// The sender of a datagram from `peer` in the namespace `netns`. Not deleted: a UDP
    /// socket sends many queries; the kernel deletes the entry when the socket is released.
    pub fn get(&self, netns: u64, peer: std::net::SocketAddr) -> Option<SockRecord> {
        let key = DnsPeerKey {
            netns,
            addr: addr::mapped_words(peer.ip().to_canonical()),
            port: peer.port().into(),
            _pad: 0,
        };
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&key, 0).ok()
    }
}

/// Every program attached to each sandbox, in attach order: the re-keying, naming and
/// clean-up hooks go first so that no rewritten connect or send can miss them. The
/// cgroup_skb program (one of [`programs::SKB`] and [`programs::SKB_STRICT`]) comes first.
const ATTACH: &[&str] = &[
    programs::SOCK_RELEASE,
    programs::SOCKOPS,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::RECVMSG4,
    programs::RECVMSG6,
    programs::SOCK_CREATE,
    programs::SENDMSG4,
    programs::SENDMSG6,
    programs::CONNECT4,
    programs::CONNECT6,
];

/// Loaded but attached per sandbox, one or the other.
const SKB_PROGRAMS: &[&str] = &[programs::SKB, programs::SKB_STRICT];

/// Maps pinned beside the links, so that tests and operators can inspect a live run.
const PINNED_MAPS: &[&str] = &[
    maps::ORIG_BY_COOKIE,
    maps::ORIG_BY_TUPLE,
    maps::SANDBOXES,
    maps::COUNTERS,
    maps::DNS_BY_COOKIE,
    maps::DNS_PEERS,
];

/// What [`Kernel::load`] hands to the data path.
pub struct Loaded {
    pub kernel: Kernel,
    pub orig_dst: OrigDstTable,
    pub dns_peers: DnsPeerTable,
    pub events: RingBuf<MapData>,
}

impl Kernel {
    /// Loads and verifies every program, and pins the inspection maps under `pin_dir`.
    /// Needs CAP_BPF and CAP_NET_ADMIN (or root).
    pub fn load(pin_dir: &Path) -> Result<Loaded, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NotEmbedded);
        }
        // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; harmless elsewhere.
        let _ = nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_MEMLOCK,
            nix::sys::resource::RLIM_INFINITY,
            nix::sys::resource::RLIM_INFINITY,
        );
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
        for name in ATTACH.iter().chain(SKB_PROGRAMS) {
            let prog = ebpf
                .program_mut(name)
                .ok_or(Error::MissingProgram { name })?;
            let r = match prog {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::CgroupSock(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                aya::programs::Program::CgroupSkb(p) => p.load(),
                _ => return Err(Error::MissingProgram { name }),
            };
            r.map_err(prog_err(name, "load"))?;
        }
        fs::create_dir_all(pin_dir).map_err(|source| Error::Pin {
            path: pin_dir.to_owned(),
            source: Box::new(source),
        })?;
        for name in PINNED_MAPS {
            let path = pin_dir.join(name);
            let map = ebpf.map(name).ok_or(Error::MissingMap { name })?;
            map.pin(&path).map_err(|e| Error::Pin {
                path,
                source: Box::new(e),
            })?;
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(Error::MissingMap { name })
        };
        let kernel = Kernel {
            sandboxes: HashMap::try_from(take(&mut ebpf, maps::SANDBOXES)?)
                .map_err(map_err(maps::SANDBOXES, "open"))?,
            ports: HashMap::try_from(take(&mut ebpf, maps::INTERCEPT_PORTS)?)
                .map_err(map_err(maps::INTERCEPT_PORTS, "open"))?,
            allow4: LpmTrie::try_from(take(&mut ebpf, maps::ALLOW4)?)
                .map_err(map_err(maps::ALLOW4, "open"))?,
            allow6: LpmTrie::try_from(take(&mut ebpf, maps::ALLOW6)?)
                .map_err(map_err(maps::ALLOW6, "open"))?,
            counters: PerCpuArray::try_from(take(&mut ebpf, maps::COUNTERS)?)
                .map_err(map_err(maps::COUNTERS, "open"))?,
            ebpf,
        };
        let mut kernel = kernel;
        let table = OrigDstTable {
            by_tuple: Mutex::new(
                HashMap::try_from(take(&mut kernel.ebpf, maps::ORIG_BY_TUPLE)?)
                    .map_err(map_err(maps::ORIG_BY_TUPLE, "open"))?,
            ),
        };
        let dns_peers = DnsPeerTable {
            map: Mutex::new(
                HashMap::try_from(take(&mut kernel.ebpf, maps::DNS_PEERS)?)
                    .map_err(map_err(maps::DNS_PEERS, "open"))?,
            ),
        };
        let events = RingBuf::try_from(take(&mut kernel.ebpf, maps::EVENTS)?)
            .map_err(map_err(maps::EVENTS, "open"))?;
        Ok(Loaded {
            kernel,
            orig_dst: table,
            dns_peers,
            events,
        })
    }

    /// Adds a sandbox's rows to the maps, then attaches every program to its cgroup and pins
    /// the links under `pin_dir`.
    pub fn register(
        &mut self,
        cgroup_dir: &Path,
        cgroup_id: u64,
        spec: &SandboxSpec,
        pin_dir: &Path,
    ) -> Result<Registration, Error> {
        let mut reg = Registration {
            cgroup_id,
            sandbox: spec.id,
            ports: Vec::new(),
            allow4: Vec::new(),
            allow6: Vec::new(),
            links: Vec::new(),
            pin_dir: pin_dir.to_owned(),
        };
        fs::create_dir_all(pin_dir).map_err(|source| Error::Pin {
            path: pin_dir.to_owned(),
            source: Box::new(source),
        })?;
        for &port in &spec.intercept_ports {
            let key = PortKey {
                sandbox: spec.id,
                port: port.into(),
            };
            self.ports
                .insert(key, 1, 0)
                .map_err(map_err(maps::INTERCEPT_PORTS, "insert"))?;
            reg.ports.push(key);
        }
        for a in &spec.allow_tcp {
            match a.net.addr {
                std::net::IpAddr::V4(ip) => {
                    let key = Key::new(
                        ALLOW_FIXED_PREFIX + u32::from(a.net.prefix),
                        Allow4 {
                            sandbox: spec.id.to_be(),
                            port: u32::from(a.port).to_be(),
                            addr: u32::from_ne_bytes(ip.octets()),
                        },
                    );
                    self.allow4
                        .insert(&key, 1, 0)
                        .map_err(map_err(maps::ALLOW4, "insert"))?;
                    reg.allow4.push(key);
                }
                std::net::IpAddr::V6(ip) => {
                    let key = Key::new(
                        ALLOW_FIXED_PREFIX + u32::from(a.net.prefix),
                        Allow6 {
                            sandbox: spec.id.to_be(),
                            port: u32::from(a.port).to_be(),
                            addr: addr::v6_words(&ip),
                        },
                    );
                    self.allow6
                        .insert(&key, 1, 0)
                        .map_err(map_err(maps::ALLOW6, "insert"))?;
                    reg.allow6.push(key);
                }
            }
        }
        let row = Sandbox {
            id: spec.id,
            listen4_addr: u32::from_ne_bytes(spec.listen4.ip().octets()),
            listen4_port: spec.listen4.port().into(),
            listen6_addr: addr::v6_words(spec.listen6.ip()),
            listen6_port: spec.listen6.port().into(),
            dns4_port: spec.dns4_port.into(),
            dns6_port: spec.dns6_port.into(),
            flags: if spec.strict { SANDBOX_STRICT } else { 0 },
            _pad: 0,
        };
        self.sandboxes
            .insert(cgroup_id, row, 0)
            .map_err(map_err(maps::SANDBOXES, "insert"))?;

        let cgroup = fs::File::open(cgroup_dir).map_err(|source| Error::Pin {
            path: cgroup_dir.to_owned(),
            source: Box::new(source),
        })?;
        let skb = if spec.strict {
            programs::SKB_STRICT
        } else {
            programs::SKB
        };
        for name in std::iter::once(&skb).chain(ATTACH) {
            let link = self.attach(name, cgroup.as_fd())?;
            let path = pin_dir.join(name);
            let pinned = link.pin(&path).map_err(|e| Error::Pin {
                path,
                source: Box::new(e),
            })?;
            reg.links.push(pinned);
        }
        Ok(reg)
    }

    fn attach(&mut self, name: &'static str, cgroup: BorrowedFd<'_>) -> Result<FdLink, Error> {
        use aya::programs::Program;
        // BPF links on cgroups always coexist with other links (multi-attach); the kernel
        // refuses any attach flag on them, so `Single` (no flag) is the right mode here.
        let mode = CgroupAttachMode::Single;
        let link_err = |e: LinkError| Error::Link {
            name,
            source: Box::new(e),
        };
        // Each program type has its own link type; all of them are fd-based on Linux 5.7+,
        // which is what pinning needs.
        macro_rules! attach_fd {
            ($p:expr) => {{
                let id = $p.attach(cgroup, mode).map_err(prog_err(name, "attach"))?;
                let link = $p.take_link(id).map_err(prog_err(name, "attach"))?;
                FdLink::try_from(link).map_err(link_err)?
            }};
        }
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram { name })?;
        Ok(match prog {
            Program::CgroupSockAddr(p) => attach_fd!(p),
            Program::CgroupSock(p) => attach_fd!(p),
            Program::SockOps(p) => attach_fd!(p),
            Program::CgroupSkb(p) => {
                let id = p
                    .attach(cgroup, aya::programs::CgroupSkbAttachType::Egress, mode)
                    .map_err(prog_err(name, "attach"))?;
                let link = p.take_link(id).map_err(prog_err(name, "attach"))?;
                FdLink::try_from(link).map_err(link_err)?
            }
            _ => return Err(Error::MissingProgram { name }),
        })
    }

    /// Removes a sandbox: detaches and unpins its links, and deletes its map rows.
    pub fn unregister(&mut self, reg: Registration) {
        for link in reg.links {
            if let Err(e) = link.unpin() {
                tracing::warn!(error = %e, "unpinning a link failed");
            }
        }
        let _ = self.sandboxes.remove(&reg.cgroup_id);
        for k in &reg.ports {
            let _ = self.ports.remove(k);
        }
        for k in &reg.allow4 {
            let _ = self.allow4.remove(k);
        }
        for k in &reg.allow6 {
            let _ = self.allow6.remove(k);
        }
        let _ = fs::remove_dir(&reg.pin_dir);
        tracing::debug!(sandbox = reg.sandbox, "sandbox unregistered");
    }

    /// Sum over CPUs of one kernel counter.
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }
}

/// A sandbox's footprint in the kernel, handed back to [`Kernel::unregister`].
pub struct Registration {
    cgroup_id: u64,
    sandbox: u32,
    ports: Vec<PortKey>,
    allow4: Vec<Key<Allow4>>,
    allow6: Vec<Key<Allow6>>,
    links: Vec<PinnedLink>,
    pin_dir: PathBuf,
}

impl Registration {
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

/// Removes a pin directory tree: unlinking the pins detaches the links and frees the maps
/// once nothing else holds them.
pub fn remove_pin_dir(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_pin_dir(&e.path());
            } else {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// The bpffs mount point, mounting bpffs at `/sys/fs/bpf` when none is mounted.
pub fn bpffs() -> Result<PathBuf, Error> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(|source| Error::Bpffs {
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    if let Some(p) = crate::cgroup::parse_mountinfo(&info, "bpf") {
        return Ok(p);
    }
    let path = PathBuf::from("/sys/fs/bpf");
    fs::create_dir_all(&path).map_err(|source| Error::Bpffs {
        path: path.clone(),
        source,
    })?;
    nix::mount::mount(
        Some("bpf"),
        &path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::Bpffs {
        path: path.clone(),
        source: e.into(),
    })?;
    Ok(path)
}

/// Decodes a v4-mapped or native IPv6 address from network-order words.
pub fn words_to_ip(w: &[u32; 4]) -> std::net::IpAddr {
    let v6 = addr::ip_from_words(w);
    match v6.to_ipv4_mapped() {
        Some(v4) => v4.into(),
        None => v6.into(),
    }
}
