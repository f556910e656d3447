//! Network namespaces: a fresh one holding only `lo` for `--isolate-net`, an existing one
//! (a container's) opened by path or pid, and creating sockets inside a namespace without
//! moving the whole process there.
//!
//! `setns`/`unshare` change only the calling thread, so the work runs on a thread of its own
//! while tokio's threads stay in egress's namespace. A socket stays in the namespace it was
//! created in, so listeners made there keep serving from anywhere, and upstream sockets made
//! there leave through that namespace's routes with its addresses.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::{mpsc, Arc},
};

use nix::sched::{setns, unshare, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating a network namespace")]
    Create(#[source] io::Error),
    #[error("bringing up lo in the new network namespace")]
    Loopback(#[source] io::Error),
    #[error("entering the network namespace")]
    Enter(#[source] io::Error),
    #[error("network namespace worker thread panicked")]
    Panicked,
    #[error("cannot open the network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("the network namespace worker has stopped")]
    WorkerGone,
}

/// Identity of a network namespace: device and inode of its nsfs file. Two opens of the
/// same namespace compare equal; a container restarted with a new namespace does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl std::fmt::Display for NetnsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

impl NetnsId {
    /// The namespace egress itself runs in.
    pub fn current() -> io::Result<Self> {
        Self::of_path(Path::new("/proc/self/ns/net"))
    }

    pub fn of_path(path: &Path) -> io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(NetnsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    fn of_file(f: &File) -> io::Result<Self> {
        let m = f.metadata()?;
        Ok(NetnsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// A network namespace held open by file descriptor.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    id: NetnsId,
}

impl NetNs {
    /// A new namespace with `lo` up and nothing else.
    pub fn create_isolated() -> Result<Self, Error> {
        on_thread(|| {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| Error::Create(e.into()))?;
            let f = File::open("/proc/thread-self/ns/net").map_err(Error::Create)?;
            loopback_up().map_err(Error::Loopback)?;
            let id = NetnsId::of_file(&f).map_err(Error::Create)?;
            Ok(NetNs { fd: f.into(), id })
        })?
    }

    /// An existing namespace: a bind mount (`/var/run/netns/NAME`) or `/proc/PID/ns/net`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let err = |source| Error::Open {
            path: path.to_owned(),
            source,
        };
        let f = File::open(path).map_err(err)?;
        // Only nsfs files of type "net" can be entered as one; anything else fails setns
        // later with a less helpful EINVAL, so check now.
        let ok = on_thread({
            let fd = f.as_fd();
            move || setns(fd, CloneFlags::CLONE_NEWNET).is_ok()
        })?;
        if !ok {
            return Err(Error::NotNetns {
                path: path.to_owned(),
            });
        }
        let id = NetnsId::of_file(&f).map_err(err)?;
        Ok(NetNs { fd: f.into(), id })
    }

    /// The namespace process `pid` is in.
    pub fn of_pid(pid: u32) -> Result<Self, Error> {
        Self::open(Path::new(&format!("/proc/{pid}/ns/net")))
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// Brings `lo` up inside this namespace (a namespace made with `ip netns add` starts
    /// with it down, and egress's listeners live on loopback).
    pub fn loopback_up(&self) -> Result<(), Error> {
        self.run(loopback_up)?.map_err(Error::Loopback)
    }

    /// Runs `f` on a thread inside this namespace, for example to bind a listener there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        let fd = self.fd.as_fd();
        on_thread(move || {
            setns(fd, CloneFlags::CLONE_NEWNET).map_err(|e| Error::Enter(e.into()))?;
            Ok(f())
        })?
    }
}

fn on_thread<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, Error> {
    std::thread::scope(|s| s.spawn(f).join().map_err(|_| Error::Panicked))
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread that lives inside one network namespace and makes sockets there on request.
/// It ends when the last handle is dropped.
#[derive(Debug)]
pub struct Worker {
    jobs: std::sync::Mutex<mpsc::Sender<Job>>,
    id: NetnsId,
}

impl Worker {
    pub fn start(ns: &NetNs) -> Result<Self, Error> {
        let fd = ns.fd.try_clone().map_err(Error::Enter)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("egress-{}", ns.id))
            .spawn(move || {
                let entered = setns(&fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })
            .map_err(Error::Enter)?;
        ready_rx
            .recv()
            .map_err(|_| Error::Panicked)?
            .map_err(Error::Enter)?;
        Ok(Worker {
            jobs: std::sync::Mutex::new(tx),
            id: ns.id,
        })
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<tokio::sync::oneshot::Receiver<T>, Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| Error::WorkerGone)?;
        Ok(rx)
    }

    /// Runs `f` inside the namespace and waits for it (from async code).
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        self.submit(f)?.await.map_err(|_| Error::Panicked)
    }

    /// Runs `f` inside the namespace and waits for it (from a plain thread).
    pub fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        self.submit(f)?.blocking_recv().map_err(|_| Error::Panicked)
    }
}

/// Where upstream sockets (to origins and resolvers) are made: in egress's own namespace,
/// or in a sandbox's, so the sandbox's routes, addresses and the node's rules for it apply.
#[derive(Clone, Debug, Default)]
pub enum Connector {
    #[default]
    Here,
    In(Arc<Worker>),
}

impl Connector {
    /// Connects a TCP socket to `dst` (no timeout of its own).
    pub async fn tcp(&self, dst: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        match self {
            Connector::Here => tokio::net::TcpStream::connect(dst).await,
            Connector::In(w) => {
                let fd = w
                    .run(move || {
                        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
                        let family = if dst.is_ipv4() {
                            AddressFamily::Inet
                        } else {
                            AddressFamily::Inet6
                        };
                        socket(
                            family,
                            SockType::Stream,
                            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                            None,
                        )
                        .map_err(io::Error::from)
                    })
                    .await
                    .map_err(io::Error::other)??;
                let sock = tokio::net::TcpSocket::from_std_stream(fd.into());
                sock.connect(dst).await
            }
        }
    }

    /// A UDP socket bound to `local`.
    pub async fn udp(&self, local: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
        match self {
            Connector::Here => tokio::net::UdpSocket::bind(local).await,
            Connector::In(w) => {
                let s = w
                    .run(move || {
                        let s = std::net::UdpSocket::bind(local)?;
                        s.set_nonblocking(true)?;
                        Ok::<_, io::Error>(s)
                    })
                    .await
                    .map_err(io::Error::other)??;
                tokio::net::UdpSocket::from_std(s)
            }
        }
    }

    /// The namespace sockets are made in, when it is not egress's own.
    pub fn netns(&self) -> Option<NetnsId> {
        match self {
            Connector::Here => None,
            Connector::In(w) => Some(w.id()),
        }
    }
}

/// `ip link set lo up`, through the SIOCSIFFLAGS ioctl of a throwaway socket.
#[allow(unsafe_code)]
fn loopback_up() -> io::Result<()> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| {
        // lo is down, so binding 127.0.0.1 fails; an unbound socket serves for the ioctl.
        std::net::UdpSocket::bind("0.0.0.0:0")
    })?;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: valid socket fd and a properly initialised ifreq that outlives both calls.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The kernel's cookie for the namespace a socket lives in (`SO_NETNS_COOKIE`, Linux 5.14+).
/// sockops keys connections by the same value.
pub fn socket_netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    #[allow(unsafe_code)]
    // SAFETY: v and len are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}
