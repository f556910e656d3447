//! The few `bpf(2)` commands aya 0.14 does not expose: opening a pinned link as a raw fd,
//! reading which cgroup it is attached to, and swapping the program behind it atomically
//! (`BPF_LINK_UPDATE`), which is how a new egress takes over a sandbox without a moment in
//! which no program runs for it.
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `enum bpf_link_type`: a cgroup link.
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// `union bpf_attr` is 120+ bytes on current kernels; every command here uses a prefix and
/// the kernel requires the rest to be zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }

    fn put_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }

    fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-initialised, 8-aligned buffer at least as large as the size
    // passed, and outlives the call; the kernel reads and writes only within that size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens a pinned bpffs object (here: a link) and returns its fd.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in pin path"))?;
    let mut attr = Attr::new();
    attr.put_u64(0, c.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What the kernel says about a cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLink {
    pub prog_id: u32,
    /// 0 once the cgroup is gone (the link is defunct).
    pub cgroup_id: u64,
}

/// Reads a link's program and cgroup. Errors for links that are not cgroup links.
pub fn cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLink> {
    // struct bpf_link_info: type u32, id u32, prog_id u32, then an 8-aligned union whose
    // cgroup member starts with cgroup_id u64.
    let mut info = [0u64; 32];
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, std::mem::size_of_val(&info) as u32);
    attr.put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let word = |i: usize| info[i].to_ne_bytes();
    let (w0, w1) = (word(0), word(1));
    let link_type = u32::from_ne_bytes([w0[0], w0[1], w0[2], w0[3]]);
    if link_type != BPF_LINK_TYPE_CGROUP {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("link type {link_type}, not a cgroup link"),
        ));
    }
    Ok(CgroupLink {
        prog_id: u32::from_ne_bytes([w1[0], w1[1], w1[2], w1[3]]),
        cgroup_id: info[2],
    })
}

/// Replaces the program of `link` with `prog`, atomically: every hook invocation runs either
/// the old program or the new one.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}
