//! Loading the eBPF object, attaching it to sandbox cgroups, and the maps user space reads.
//!
//! One [`Kernel`] serves any number of sandboxes: each [`Registration`] attaches the same
//! loaded programs to one more cgroup and adds that sandbox's rows to the shared maps, and
//! dropping it undoes exactly that.
//!
//! Every map and every link is pinned in bpffs under one root. A link held only as a file
//! descriptor detaches when egress dies, and a surviving process of the sandbox would then
//! have open network; a pinned link stays, so its connects keep landing on a closed listener
//! (or `EPERM`) until egress comes back or `egress gc` cleans up. Pinned maps let a restarted
//! egress find its rows and pick up the refusals the kernel reported meanwhile.

pub mod sys;

use std::{
    fs, io,
    net::{SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, MapError, MapInfo, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        CgroupAttachMode, CgroupSkbAttachType, Program, ProgramError,
    },
    Ebpf, EbpfLoader,
};
use egress_common::{
    maps, programs, Allow4, Allow6, Counter, DnsPeerKey, PortKey, Sandbox, SockKey, SockRecord,
    ALLOW_FIXED_PREFIX, SANDBOX_STRICT,
};

use crate::{addr, policy::TcpAllow, records::KernelRecords};

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
    #[error("reading the embedded eBPF object failed")]
    Parse(#[source] Box<aya_obj::ParseError>),
    #[error("eBPF program {name} is missing from the object")]
    MissingProgram { name: &'static str },
    #[error("eBPF program {name} is not of the type egress attaches it as ({kind:?})")]
    WrongProgramType { name: &'static str, kind: Kind },
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
    #[error("opening the cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bpffs at {path}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("replacing the program of the pinned link {path}")]
    LinkUpdate {
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

fn pin_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |e| Error::Pin {
        path: path.to_owned(),
        source: Box::new(e),
    }
}

/// How a program is loaded and attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `cgroup/connect4` and friends.
    SockAddr,
    /// `cgroup/sock_create`, `cgroup/sock_release`.
    Sock,
    SockOps,
    /// `cgroup_skb/egress`.
    SkbEgress,
}

/// One program attached to every sandbox.
#[derive(Clone, Copy, Debug)]
pub struct Attach {
    /// The program's name in the object.
    pub program: &'static str,
    pub kind: Kind,
    /// The name its link is pinned under; the same for both cgroup_skb variants, so that a
    /// sandbox has exactly one of them and a restart can swap one for the other.
    pub pin: &'static str,
}

const fn attach(program: &'static str, kind: Kind) -> Attach {
    Attach {
        program,
        kind,
        pin: program,
    }
}

/// The cgroup_skb slot: [`programs::SKB`], or [`programs::SKB_STRICT`] with `--strict`.
const SKB_PIN: &str = "egress_skb";

/// Every program attached to each sandbox, in attach order: the naming (cgroup_skb),
/// re-keying and clean-up hooks go first so that no rewritten connect or send can miss them.
pub const ATTACH: &[Attach] = &[
    Attach {
        program: programs::SKB,
        kind: Kind::SkbEgress,
        pin: SKB_PIN,
    },
    attach(programs::SOCK_RELEASE, Kind::Sock),
    attach(programs::SOCKOPS, Kind::SockOps),
    attach(programs::GETPEERNAME4, Kind::SockAddr),
    attach(programs::GETPEERNAME6, Kind::SockAddr),
    attach(programs::RECVMSG4, Kind::SockAddr),
    attach(programs::RECVMSG6, Kind::SockAddr),
    attach(programs::SOCK_CREATE, Kind::Sock),
    attach(programs::BIND4, Kind::SockAddr),
    attach(programs::BIND6, Kind::SockAddr),
    attach(programs::SENDMSG4, Kind::SockAddr),
    attach(programs::SENDMSG6, Kind::SockAddr),
    attach(programs::CONNECT4, Kind::SockAddr),
    attach(programs::CONNECT6, Kind::SockAddr),
];

/// Loaded but never in [`ATTACH`]: it takes the cgroup_skb slot of `--strict` sandboxes.
const STRICT_SKB: Attach = Attach {
    program: programs::SKB_STRICT,
    kind: Kind::SkbEgress,
    pin: SKB_PIN,
};

/// The program that fills `slot` for a sandbox.
fn program_for(slot: &Attach, strict: bool) -> Attach {
    if slot.pin == SKB_PIN && strict {
        STRICT_SKB
    } else {
        *slot
    }
}

/// Every map of the object; all are pinned under the root.
pub const MAPS: &[&str] = &[
    maps::SANDBOXES,
    maps::INTERCEPT_PORTS,
    maps::INBOUND_PORTS,
    maps::ALLOW4,
    maps::ALLOW6,
    maps::ORIG_BY_COOKIE,
    maps::ORIG_BY_TUPLE,
    maps::EVENTS,
    maps::COUNTERS,
    maps::DNS_BY_COOKIE,
    maps::DNS_PEERS,
];

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
    /// Ports the sandbox may bind on every address (`--allow-inbound`).
    pub inbound_ports: Vec<u16>,
    /// Attach the `--strict` backstop.
    pub strict: bool,
}

impl SandboxSpec {
    fn row(&self) -> Sandbox {
        Sandbox {
            id: self.id,
            listen4_addr: u32::from_ne_bytes(self.listen4.ip().octets()),
            listen4_port: self.listen4.port().into(),
            listen6_addr: addr::v6_words(self.listen6.ip()),
            listen6_port: self.listen6.port().into(),
            dns4_port: self.dns4_port.into(),
            dns6_port: self.dns6_port.into(),
            flags: if self.strict { SANDBOX_STRICT } else { 0 },
            _pad: 0,
        }
    }
}

/// The control-side maps: rows per sandbox, and the counters.
struct Maps {
    sandboxes: HashMap<MapData, u64, Sandbox>,
    ports: HashMap<MapData, PortKey, u32>,
    inbound: HashMap<MapData, PortKey, u32>,
    allow4: LpmTrie<MapData, Allow4, u32>,
    allow6: LpmTrie<MapData, Allow6, u32>,
    counters: PerCpuArray<MapData, u64>,
}

impl Maps {
    /// Deletes the port and allowance rows of sandbox `id`, except those `keep` wrote.
    fn purge_rows(&mut self, id: u32, keep: Option<&Registration>) {
        let ports: Vec<PortKey> = self
            .ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.sandbox == id && keep.is_none_or(|r| !r.ports.contains(k)))
            .collect();
        for k in ports {
            let _ = self.ports.remove(&k);
        }
        let inbound: Vec<PortKey> = self
            .inbound
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.sandbox == id && keep.is_none_or(|r| !r.inbound.contains(k)))
            .collect();
        for k in inbound {
            let _ = self.inbound.remove(&k);
        }
        let be = id.to_be();
        let allow4: Vec<Key<Allow4>> = self
            .allow4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                k.data().sandbox == be
                    && keep.is_none_or(|r| !r.allow4.iter().any(|w| same_key(w, k)))
            })
            .collect();
        for k in allow4 {
            let _ = self.allow4.remove(&k);
        }
        let allow6: Vec<Key<Allow6>> = self
            .allow6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                k.data().sandbox == be
                    && keep.is_none_or(|r| !r.allow6.iter().any(|w| same_key(w, k)))
            })
            .collect();
        for k in allow6 {
            let _ = self.allow6.remove(&k);
        }
    }
}

fn same_key<K: aya::Pod + PartialEq>(a: &Key<K>, b: &Key<K>) -> bool {
    a.prefix_len() == b.prefix_len() && a.data() == b.data()
}

/// Loaded programs plus the control-side maps.
pub struct Kernel {
    ebpf: Mutex<Ebpf>,
    maps: Arc<Mutex<Maps>>,
    root: PathBuf,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel").field("root", &self.root).finish()
    }
}

/// The data path's view of the kernel: the records of redirected sockets.
pub struct BpfRecords {
    by_tuple: Mutex<HashMap<MapData, SockKey, SockRecord>>,
    dns_peers: Mutex<HashMap<MapData, DnsPeerKey, SockRecord>>,
}

impl KernelRecords for BpfRecords {
    fn take_conn(&self, key: &SockKey) -> Option<SockRecord> {
        let mut map = lock(&self.by_tuple);
        let v = map.get(key, 0).ok()?;
        let _ = map.remove(key);
        Some(v)
    }

    fn dns_peer(&self, key: &DnsPeerKey) -> Option<SockRecord> {
        lock(&self.dns_peers).get(key, 0).ok()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What [`Kernel::load`] hands out.
pub struct Loaded {
    pub kernel: Kernel,
    pub records: BpfRecords,
    pub events: RingBuf<MapData>,
}

impl Kernel {
    /// Loads and verifies every program, with every map pinned under `root`: a pinned map
    /// already there is reused if its type, key, value, size and flags match this object,
    /// and unpinned otherwise, so that a new one is made. Needs CAP_BPF and CAP_NET_ADMIN
    /// (or root).
    pub fn load(root: &Path) -> Result<Loaded, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NotEmbedded);
        }
        // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; harmless elsewhere.
        let _ = nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_MEMLOCK,
            nix::sys::resource::RLIM_INFINITY,
            nix::sys::resource::RLIM_INFINITY,
        );
        fs::create_dir_all(root).map_err(pin_err(root))?;
        unpin_incompatible(root)?;
        let paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|m| (*m, root.join(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
        for a in ATTACH.iter().chain([&STRICT_SKB]) {
            load_program(&mut ebpf, a)?;
        }
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(Error::MissingMap { name });
        let maps = Maps {
            sandboxes: HashMap::try_from(take(maps::SANDBOXES)?)
                .map_err(map_err(maps::SANDBOXES, "open"))?,
            ports: HashMap::try_from(take(maps::INTERCEPT_PORTS)?)
                .map_err(map_err(maps::INTERCEPT_PORTS, "open"))?,
            inbound: HashMap::try_from(take(maps::INBOUND_PORTS)?)
                .map_err(map_err(maps::INBOUND_PORTS, "open"))?,
            allow4: LpmTrie::try_from(take(maps::ALLOW4)?)
                .map_err(map_err(maps::ALLOW4, "open"))?,
            allow6: LpmTrie::try_from(take(maps::ALLOW6)?)
                .map_err(map_err(maps::ALLOW6, "open"))?,
            counters: PerCpuArray::try_from(take(maps::COUNTERS)?)
                .map_err(map_err(maps::COUNTERS, "open"))?,
        };
        let records = BpfRecords {
            by_tuple: Mutex::new(
                HashMap::try_from(take(maps::ORIG_BY_TUPLE)?)
                    .map_err(map_err(maps::ORIG_BY_TUPLE, "open"))?,
            ),
            dns_peers: Mutex::new(
                HashMap::try_from(take(maps::DNS_PEERS)?)
                    .map_err(map_err(maps::DNS_PEERS, "open"))?,
            ),
        };
        let events =
            RingBuf::try_from(take(maps::EVENTS)?).map_err(map_err(maps::EVENTS, "open"))?;
        Ok(Loaded {
            kernel: Kernel {
                ebpf: Mutex::new(ebpf),
                maps: Arc::new(Mutex::new(maps)),
                root: root.to_owned(),
            },
            records,
            events,
        })
    }

    /// Where every map and link of this kernel is pinned.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Adds a sandbox's rows to the maps, then attaches every program to its cgroup and pins
    /// the links under `link_dir`. A failure half-way undoes what was done.
    ///
    /// Links already pinned there for this cgroup (a sandbox a previous egress registered)
    /// are taken over: their program is swapped for this object's in one step
    /// (`BPF_LINK_UPDATE`), so the cgroup is never without a program. Rows of this sandbox id
    /// that the spec no longer has are deleted.
    pub fn register(
        &self,
        cgroup_dir: &Path,
        cgroup_id: u64,
        spec: &SandboxSpec,
        link_dir: &Path,
    ) -> Result<Registration, Error> {
        let mut reg = Registration {
            maps: self.maps.clone(),
            cgroup_id,
            sandbox: spec.id,
            ports: Vec::new(),
            inbound: Vec::new(),
            allow4: Vec::new(),
            allow6: Vec::new(),
            links: Vec::new(),
            link_dir: link_dir.to_owned(),
            keep: false,
            adopted: 0,
        };
        reg.write_rows(spec)?;
        lock(&self.maps).purge_rows(spec.id, Some(&reg));
        if let Err(e) = self.attach_all(&mut reg, cgroup_dir, cgroup_id, spec.strict, link_dir) {
            // Links a previous egress left were taken over: undoing would uncapture a
            // sandbox that was captured before this call. Fail closed: leave it all.
            reg.keep = reg.adopted > 0;
            return Err(e);
        }
        Ok(reg)
    }

    fn attach_all(
        &self,
        reg: &mut Registration,
        cgroup_dir: &Path,
        cgroup_id: u64,
        strict: bool,
        link_dir: &Path,
    ) -> Result<(), Error> {
        fs::create_dir_all(link_dir).map_err(pin_err(link_dir))?;
        let cgroup = fs::File::open(cgroup_dir).map_err(|source| Error::Cgroup {
            path: cgroup_dir.to_owned(),
            source,
        })?;
        let mut ebpf = lock(&self.ebpf);
        for slot in ATTACH {
            let a = program_for(slot, strict);
            let path = link_dir.join(a.pin);
            let pinned = match adopt_link(&ebpf, &a, &path, cgroup_id)? {
                Some(link) => {
                    reg.adopted += 1;
                    link
                }
                None => {
                    let link = attach_program(&mut ebpf, &a, cgroup.as_fd())?;
                    link.pin(&path).map_err(|e| Error::Pin {
                        path,
                        source: Box::new(e),
                    })?
                }
            };
            reg.links.push(pinned);
        }
        Ok(())
    }

    /// Removes what a sandbox left in the kernel when there is no [`Registration`] for it
    /// (its cgroup vanished while no egress ran): its pinned links, its row and every row
    /// of its id.
    pub fn purge(&self, sandbox: u32, cgroup_id: u64, link_dir: &Path) {
        remove_pin_dir(link_dir);
        let mut m = lock(&self.maps);
        let _ = m.sandboxes.remove(&cgroup_id);
        m.purge_rows(sandbox, None);
    }

    /// The largest sandbox id any row names (0 when none): ids handed out after a restart
    /// must not collide with rows left behind.
    pub fn max_sandbox_id(&self) -> u32 {
        let m = lock(&self.maps);
        let rows = m.sandboxes.iter().filter_map(Result::ok).map(|(_, v)| v.id);
        let ports = m.ports.keys().filter_map(Result::ok).map(|k| k.sandbox);
        let inbound = m.inbound.keys().filter_map(Result::ok).map(|k| k.sandbox);
        rows.chain(ports).chain(inbound).max().unwrap_or(0)
    }

    /// Sum over CPUs of one kernel counter.
    pub fn counter(&self, c: Counter) -> u64 {
        lock(&self.maps)
            .counters
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }
}

/// Takes over the link pinned at `path` if it is attached to `cgroup_id`: swaps its program
/// for this object's `a.program` and returns it. A link that is missing, defunct (its cgroup
/// is gone) or on another cgroup is left to the caller (removed first, if it was there).
fn adopt_link(
    ebpf: &Ebpf,
    a: &Attach,
    path: &Path,
    cgroup_id: u64,
) -> Result<Option<PinnedLink>, Error> {
    if !path.exists() {
        return Ok(None);
    }
    let fd = sys::obj_get(path).map_err(pin_err(path))?;
    match sys::cgroup_link_info(fd.as_fd()) {
        Ok(info) if info.cgroup_id == cgroup_id => {}
        _ => {
            tracing::warn!(pin = %path.display(), "pinned link is not attached to this sandbox's cgroup; replacing it");
            fs::remove_file(path).map_err(pin_err(path))?;
            return Ok(None);
        }
    }
    let name = a.program;
    let prog = ebpf.program(name).ok_or(Error::MissingProgram { name })?;
    let prog_fd = prog.fd().map_err(prog_err(name, "fd"))?;
    sys::link_update(fd.as_fd(), prog_fd.as_fd()).map_err(|source| Error::LinkUpdate {
        path: path.to_owned(),
        source,
    })?;
    let link = PinnedLink::from_pin(path).map_err(|e| Error::Link {
        name,
        source: Box::new(e),
    })?;
    Ok(Some(link))
}

fn load_program(ebpf: &mut Ebpf, a: &Attach) -> Result<(), Error> {
    let name = a.program;
    let prog = ebpf
        .program_mut(name)
        .ok_or(Error::MissingProgram { name })?;
    let r = match (a.kind, prog) {
        (Kind::SockAddr, Program::CgroupSockAddr(p)) => p.load(),
        (Kind::Sock, Program::CgroupSock(p)) => p.load(),
        (Kind::SockOps, Program::SockOps(p)) => p.load(),
        (Kind::SkbEgress, Program::CgroupSkb(p)) => p.load(),
        (kind, _) => return Err(Error::WrongProgramType { name, kind }),
    };
    r.map_err(prog_err(name, "load"))
}

fn attach_program(ebpf: &mut Ebpf, a: &Attach, cgroup: BorrowedFd<'_>) -> Result<FdLink, Error> {
    let name = a.program;
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
        ($p:expr, $($arg:expr),*) => {{
            let id = $p.attach(cgroup, $($arg,)* mode).map_err(prog_err(name, "attach"))?;
            let link = $p.take_link(id).map_err(prog_err(name, "attach"))?;
            FdLink::try_from(link).map_err(link_err)?
        }};
    }
    let prog = ebpf
        .program_mut(name)
        .ok_or(Error::MissingProgram { name })?;
    Ok(match (a.kind, prog) {
        (Kind::SockAddr, Program::CgroupSockAddr(p)) => attach_fd!(p,),
        (Kind::Sock, Program::CgroupSock(p)) => attach_fd!(p,),
        (Kind::SockOps, Program::SockOps(p)) => attach_fd!(p,),
        (Kind::SkbEgress, Program::CgroupSkb(p)) => attach_fd!(p, CgroupSkbAttachType::Egress),
        (kind, _) => return Err(Error::WrongProgramType { name, kind }),
    })
}

/// Unpins every pinned map under `root` whose layout differs from this object's, so that
/// the loader makes it anew.
fn unpin_incompatible(root: &Path) -> Result<(), Error> {
    let obj = aya_obj::Object::parse(OBJECT).map_err(|e| Error::Parse(Box::new(e)))?;
    for &name in MAPS {
        let path = root.join(name);
        if !path.exists() {
            continue;
        }
        let want = obj.maps.get(name).ok_or(Error::MissingMap { name })?;
        let fits = match MapInfo::from_pin(&path) {
            Ok(have) => {
                let want_entries = if want.map_type()
                    == aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32
                {
                    want.max_entries().div_ceil(4096) * 4096
                } else {
                    want.max_entries()
                };
                have.map_type().ok().map(|t| t as u32) == Some(want.map_type())
                    && have.key_size() == want.key_size()
                    && have.value_size() == want.value_size()
                    && have.max_entries() == want_entries
                    && have.map_flags() == want.map_flags()
            }
            Err(_) => false,
        };
        if !fits {
            // Unpinned, not renamed (bpffs refuses rename): the programs still attached
            // through the old links keep the old map alive and keep working until their
            // links take the new programs, which use the new map.
            fs::remove_file(&path).map_err(pin_err(&path))?;
            tracing::warn!(map = name, pin = %path.display(), "pinned map does not match this binary's layout; replacing it");
        }
    }
    Ok(())
}

/// A sandbox's footprint in the kernel: its map rows and pinned links. Dropping it detaches
/// the links, then deletes the rows and the link directory, leaving every other sandbox as
/// it was; [`Registration::persist`] leaves everything in place instead (a daemon going down
/// keeps its sandboxes closed).
pub struct Registration {
    maps: Arc<Mutex<Maps>>,
    cgroup_id: u64,
    sandbox: u32,
    ports: Vec<PortKey>,
    inbound: Vec<PortKey>,
    allow4: Vec<Key<Allow4>>,
    allow6: Vec<Key<Allow6>>,
    links: Vec<PinnedLink>,
    link_dir: PathBuf,
    keep: bool,
    /// Links taken over from a previous egress rather than attached here.
    adopted: usize,
}

impl Registration {
    /// Writes the sandbox row and its port and allowance rows, recording each for undo.
    fn write_rows(&mut self, spec: &SandboxSpec) -> Result<(), Error> {
        let mut m = lock(&self.maps);
        for &port in &spec.intercept_ports {
            let key = PortKey {
                sandbox: spec.id,
                port: port.into(),
            };
            m.ports
                .insert(key, 1, 0)
                .map_err(map_err(maps::INTERCEPT_PORTS, "insert"))?;
            self.ports.push(key);
        }
        drop(m);
        self.write_inbound(&spec.inbound_ports)?;
        self.write_allow(&spec.allow_tcp)?;
        lock(&self.maps)
            .sandboxes
            .insert(self.cgroup_id, spec.row(), 0)
            .map_err(map_err(maps::SANDBOXES, "insert"))?;
        Ok(())
    }

    fn write_inbound(&mut self, ports: &[u16]) -> Result<(), Error> {
        let mut m = lock(&self.maps);
        for &port in ports {
            let key = PortKey {
                sandbox: self.sandbox,
                port: port.into(),
            };
            m.inbound
                .insert(key, 1, 0)
                .map_err(map_err(maps::INBOUND_PORTS, "insert"))?;
            if !self.inbound.contains(&key) {
                self.inbound.push(key);
            }
        }
        Ok(())
    }

    fn write_allow(&mut self, allow: &[TcpAllow]) -> Result<(), Error> {
        let mut m = lock(&self.maps);
        let id = self.sandbox;
        for a in allow {
            match a.net.addr {
                std::net::IpAddr::V4(ip) => {
                    let key = Key::new(
                        ALLOW_FIXED_PREFIX + u32::from(a.net.prefix),
                        Allow4 {
                            sandbox: id.to_be(),
                            port: u32::from(a.port).to_be(),
                            addr: u32::from_ne_bytes(ip.octets()),
                        },
                    );
                    m.allow4
                        .insert(&key, 1, 0)
                        .map_err(map_err(maps::ALLOW4, "insert"))?;
                    self.allow4.push(key);
                }
                std::net::IpAddr::V6(ip) => {
                    let key = Key::new(
                        ALLOW_FIXED_PREFIX + u32::from(a.net.prefix),
                        Allow6 {
                            sandbox: id.to_be(),
                            port: u32::from(a.port).to_be(),
                            addr: addr::v6_words(&ip),
                        },
                    );
                    m.allow6
                        .insert(&key, 1, 0)
                        .map_err(map_err(maps::ALLOW6, "insert"))?;
                    self.allow6.push(key);
                }
            }
        }
        Ok(())
    }

    pub fn sandbox(&self) -> u32 {
        self.sandbox
    }

    /// How many of its links were taken over from a previous egress.
    pub fn adopted(&self) -> usize {
        self.adopted
    }

    /// Replaces the sandbox's direct TCP allowances (a reloaded policy's `tcp`): the new
    /// rows go in before the old ones go, so an allowance in both never blinks.
    pub fn set_allow(&mut self, allow: &[TcpAllow]) -> Result<(), Error> {
        let (old4, old6) = (
            std::mem::take(&mut self.allow4),
            std::mem::take(&mut self.allow6),
        );
        self.write_allow(allow)?;
        let mut m = lock(&self.maps);
        for k in old4
            .iter()
            .filter(|k| !self.allow4.iter().any(|n| same_key(n, k)))
        {
            let _ = m.allow4.remove(k);
        }
        for k in old6
            .iter()
            .filter(|k| !self.allow6.iter().any(|n| same_key(n, k)))
        {
            let _ = m.allow6.remove(k);
        }
        Ok(())
    }

    /// Replaces the ports the sandbox may bind on every address (a reloaded policy's
    /// `inbound`): new rows first, then the old ones that are not kept.
    pub fn set_inbound(&mut self, ports: &[u16]) -> Result<(), Error> {
        let old = std::mem::take(&mut self.inbound);
        if let Err(e) = self.write_inbound(ports) {
            // Keep tracking every row still in the map, so removal deletes them all.
            for k in old {
                if !self.inbound.contains(&k) {
                    self.inbound.push(k);
                }
            }
            return Err(e);
        }
        let mut m = lock(&self.maps);
        for k in old.iter().filter(|k| !self.inbound.contains(k)) {
            let _ = m.inbound.remove(k);
        }
        Ok(())
    }

    /// Leaves links, rows and pins in place: the sandbox stays captured with no egress
    /// running, until a new egress re-adopts it or `egress gc` removes it.
    pub fn persist(mut self) {
        self.keep = true;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Links first: once they are gone no program runs for this cgroup, so deleting the
        // rows cannot make a hook see a half-removed sandbox.
        for link in self.links.drain(..) {
            if let Err(e) = link.unpin() {
                tracing::warn!(error = %e, "unpinning a link failed");
            }
        }
        let mut m = lock(&self.maps);
        let _ = m.sandboxes.remove(&self.cgroup_id);
        for k in &self.ports {
            let _ = m.ports.remove(k);
        }
        for k in &self.inbound {
            let _ = m.inbound.remove(k);
        }
        for k in &self.allow4 {
            let _ = m.allow4.remove(k);
        }
        for k in &self.allow6 {
            let _ = m.allow6.remove(k);
        }
        drop(m);
        let _ = fs::remove_dir(&self.link_dir);
        tracing::debug!(sandbox = self.sandbox, "sandbox unregistered");
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
