//! Network namespaces: a fresh one holding only `lo` for `--isolate-net`, and creating
//! sockets inside a namespace without moving the whole process there.
//!
//! `setns`/`unshare` change only the calling thread, so the work runs on a short-lived thread
//! of its own while tokio's threads stay in egress's namespace. A socket stays in the
//! namespace it was created in, so listeners made there keep serving from anywhere.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
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
}

/// A network namespace held open by file descriptor.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    /// A new namespace with `lo` up and nothing else.
    pub fn create_isolated() -> Result<Self, Error> {
        on_thread(|| {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| Error::Create(e.into()))?;
            let f = File::open("/proc/thread-self/ns/net").map_err(Error::Create)?;
            loopback_up().map_err(Error::Loopback)?;
            Ok(NetNs { fd: f.into() })
        })?
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
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
