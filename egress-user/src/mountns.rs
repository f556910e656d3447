//! The sandboxed command's own mount namespace, in which egress's trust-store copies are
//! bind-mounted, read-only, over the host's (see [`crate::tls::trust`]).
//!
//! Everything is prepared before `fork` ([`Plan::new`]); between `fork` and `exec` the
//! child only makes syscalls ([`Plan::enter`]): `unshare(CLONE_NEWNS)`, then every mount
//! made a slave so that nothing done in the namespace propagates back to the host, then
//! each bind mount and its read-only remount. The host's files and mount table are never
//! touched.

use std::{
    ffi::{CString, NulError},
    io,
    os::unix::ffi::OsStrExt as _,
    path::PathBuf,
};

use crate::tls::trust::BindMount;

/// What to do in the child, with every path already a C string.
pub struct Plan {
    mounts: Vec<Prepared>,
    root: CString,
}

struct Prepared {
    source: CString,
    target: CString,
    dir: bool,
    shown: BindMount,
}

/// A step of [`Plan::enter`], named when it fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Unshare,
    MakeSlave,
    Bind { source: PathBuf, target: PathBuf },
    ReadOnly { target: PathBuf },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Unshare => f.write_str("unshare(CLONE_NEWNS)"),
            Step::MakeSlave => f.write_str("making every mount a slave of the host's"),
            Step::Bind { source, target } => {
                write!(
                    f,
                    "bind-mounting {} over {}",
                    source.display(),
                    target.display()
                )
            }
            Step::ReadOnly { target } => write!(f, "making {} read-only", target.display()),
        }
    }
}

impl Plan {
    pub fn new(mounts: &[BindMount]) -> Result<Plan, NulError> {
        let mounts = mounts
            .iter()
            .map(|m| {
                Ok(Prepared {
                    source: CString::new(m.source.as_os_str().as_bytes())?,
                    target: CString::new(m.target.as_os_str().as_bytes())?,
                    dir: m.dir,
                    shown: m.clone(),
                })
            })
            .collect::<Result<_, NulError>>()?;
        Ok(Plan {
            mounts,
            root: CString::new("/")?,
        })
    }

    /// Moves the calling process into a new mount namespace and makes the mounts. Returns
    /// the number of the step that failed (see [`Plan::step`]) and errno.
    ///
    /// # Safety
    /// Meant for the child between `fork` and `exec`: it allocates nothing and makes only
    /// async-signal-safe syscalls. Called elsewhere it moves the whole calling thread into
    /// another namespace.
    #[allow(unsafe_code)]
    pub unsafe fn enter(&self) -> Result<(), (u32, i32)> {
        let errno = || io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // SAFETY: unshare and mount take no pointers but the NUL-terminated strings this
        // plan owns (or null where mount(2) allows it).
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err((0, errno()));
            }
            // Slave, not private: mounts the host makes later still show, ours never leave.
            if libc::mount(
                std::ptr::null(),
                self.root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
            {
                return Err((1, errno()));
            }
            for (i, m) in self.mounts.iter().enumerate() {
                let i = i as u32;
                let rec = if m.dir { libc::MS_REC } else { 0 };
                if libc::mount(
                    m.source.as_ptr(),
                    m.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | rec,
                    std::ptr::null(),
                ) != 0
                {
                    return Err((2 + 2 * i, errno()));
                }
                if libc::mount(
                    std::ptr::null(),
                    m.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT
                        | libc::MS_BIND
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV,
                    std::ptr::null(),
                ) != 0
                {
                    return Err((3 + 2 * i, errno()));
                }
            }
        }
        Ok(())
    }

    /// What step number `n` of [`Plan::enter`] was.
    pub fn step(&self, n: u32) -> Step {
        match n {
            0 => Step::Unshare,
            1 => Step::MakeSlave,
            n => {
                let m = self
                    .mounts
                    .get(((n - 2) / 2) as usize)
                    .map(|m| m.shown.clone())
                    .unwrap_or_else(|| BindMount {
                        source: PathBuf::from("?"),
                        target: PathBuf::from("?"),
                        dir: false,
                    });
                if n % 2 == 0 {
                    Step::Bind {
                        source: m.source,
                        target: m.target,
                    }
                } else {
                    Step::ReadOnly { target: m.target }
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.mounts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_name_what_failed() {
        let m = |s: &str, t: &str| BindMount {
            source: s.into(),
            target: t.into(),
            dir: false,
        };
        let plan = Plan::new(&[m("/run/a", "/etc/a"), m("/run/b", "/etc/b")]).unwrap();
        assert_eq!(plan.step(0), Step::Unshare);
        assert_eq!(plan.step(1), Step::MakeSlave);
        assert_eq!(plan.step(4).to_string(), "bind-mounting /run/b over /etc/b");
        assert_eq!(plan.step(5).to_string(), "making /etc/b read-only");
        assert_eq!(plan.step(3).to_string(), "making /etc/a read-only");
    }
}
