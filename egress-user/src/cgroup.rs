//! cgroup v2: finding the mount, and the life of a sandbox cgroup.
//!
//! The cgroup2 mount is read from `/proc/self/mountinfo`, never assumed: hybrid hosts mount it
//! at `/sys/fs/cgroup/unified`, others at `/sys/fs/cgroup`.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Directory under the cgroup2 root that holds every cgroup egress creates.
pub const EGRESS_DIR: &str = "egress";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cgroup2 filesystem is mounted (looked in {mountinfo}); egress needs cgroup v2")]
    NoMount { mountinfo: PathBuf },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} still has processes after cgroup.kill")]
    NotEmpty { path: PathBuf },
}

/// Finds the first cgroup2 mount point in a mountinfo file.
pub fn find_cgroup2_mount(mountinfo: &Path) -> Result<PathBuf, Error> {
    let text = fs::read_to_string(mountinfo).map_err(|source| Error::Read {
        path: mountinfo.to_owned(),
        source,
    })?;
    parse_mountinfo(&text, "cgroup2").ok_or_else(|| Error::NoMount {
        mountinfo: mountinfo.to_owned(),
    })
}

/// The mount point of the first filesystem of type `fstype` in mountinfo text.
///
/// Format (proc(5)): `id parent major:minor root mountpoint options [optional...] - fstype
/// source superoptions`. The optional fields vary in number, so the type is found after `-`.
pub fn parse_mountinfo(text: &str, fstype: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let mount_point = fields.nth(4)?;
        let mut rest = fields.skip_while(|f| *f != "-");
        rest.next()?;
        (rest.next()? == fstype).then(|| PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 directory a process is in, from `/proc/PID/cgroup` (the `0::` line).
pub fn cgroup_of(pid: u32) -> Result<String, Error> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = fs::read_to_string(&path).map_err(|source| Error::Read { path, source })?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .to_owned())
}

/// A cgroup that egress created and owns. Dropping it kills whatever is left inside and
/// removes the directory.
#[derive(Debug)]
pub struct SandboxCgroup {
    path: PathBuf,
    id: u64,
    removed: bool,
}

impl SandboxCgroup {
    /// Creates `<root>/egress/<name>`.
    pub fn create(root: &Path, name: &str) -> Result<Self, Error> {
        let parent = root.join(EGRESS_DIR);
        let path = parent.join(name);
        // The last run out removes the shared parent; if that races with this create, the
        // child's mkdir sees ENOENT and the parent is made again.
        let mut attempts = 0;
        loop {
            match fs::create_dir(&parent) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(Error::Io {
                        what: "create",
                        path: parent,
                        source,
                    })
                }
            }
            match fs::create_dir(&path) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 10 => attempts += 1,
                Err(source) => {
                    return Err(Error::Io {
                        what: "create",
                        path,
                        source,
                    })
                }
            }
        }
        let id = cgroup_id(&path)?;
        Ok(Self {
            path,
            id,
            removed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id the kernel reports from `bpf_get_current_cgroup_id`: the directory's inode.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Opens `cgroup.procs` for writing, so that a child can move itself in between fork
    /// and exec by writing `0`.
    pub fn procs_file(&self) -> Result<fs::File, Error> {
        let path = self.path.join("cgroup.procs");
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|source| Error::Io {
                what: "open",
                path,
                source,
            })
    }

    /// Kills every process in the cgroup and removes it.
    pub fn destroy(mut self) -> Result<(), Error> {
        self.removed = true;
        kill_and_remove(&self.path)
    }
}

impl Drop for SandboxCgroup {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = kill_and_remove(&self.path) {
                tracing::error!(error = %crate::error_chain(&e), "sandbox cgroup cleanup failed");
            }
        }
    }
}

/// The cgroup id of a cgroup2 directory.
pub fn cgroup_id(path: &Path) -> Result<u64, Error> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| Error::Io {
            what: "stat",
            path: path.to_owned(),
            source,
        })
}

/// `cgroup.kill` (Linux 5.14+) and wait for the cgroup to empty, then rmdir it and any
/// child cgroups the sandbox made, deepest first.
pub fn kill_and_remove(path: &Path) -> Result<(), Error> {
    if !path.exists() {
        return Ok(());
    }
    let kill = path.join("cgroup.kill");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&kill)
        .map_err(|source| Error::Io {
            what: "open",
            path: kill.clone(),
            source,
        })?;
    f.write_all(b"1").map_err(|source| Error::Io {
        what: "write",
        path: kill,
        source,
    })?;

    let deadline = Instant::now() + Duration::from_secs(10);
    while populated(path)? {
        if Instant::now() > deadline {
            return Err(Error::NotEmpty {
                path: path.to_owned(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    remove_tree(path)?;
    // Leave no empty `egress` parent behind; fails harmlessly while other runs use it.
    if let Some(parent) = path.parent().filter(|p| p.ends_with(EGRESS_DIR)) {
        let _ = fs::remove_dir(parent);
    }
    Ok(())
}

fn populated(path: &Path) -> Result<bool, Error> {
    let events = path.join("cgroup.events");
    let text = fs::read_to_string(&events).map_err(|source| Error::Read {
        path: events,
        source,
    })?;
    Ok(text.lines().any(|l| l == "populated 1"))
}

fn remove_tree(path: &Path) -> Result<(), Error> {
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path())?;
            }
        }
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            what: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn finds_hybrid_mount() {
        assert_eq!(
            parse_mountinfo(HYBRID, "cgroup2").unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified")
        );
    }

    #[test]
    fn finds_mount_without_optional_fields() {
        let t = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(t, "cgroup2").unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified")
        );
    }

    #[test]
    fn v1_only_host_has_no_cgroup2() {
        let t = "33 31 0:28 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_mountinfo(t, "cgroup2"), None);
        assert_eq!(parse_mountinfo("", "cgroup2"), None);
        assert_eq!(parse_mountinfo("garbage\n\n", "cgroup2"), None);
    }

    #[test]
    fn unescapes_spaces() {
        let t = "1 2 0:1 / /mnt/a\\040b rw - cgroup2 none rw\n";
        assert_eq!(
            parse_mountinfo(t, "cgroup2").unwrap(),
            PathBuf::from("/mnt/a b")
        );
    }

    #[test]
    fn finds_this_machines_mount() {
        // egress needs cgroup2, so every machine it is tested on has one mounted: the parser
        // must find it in the real mountinfo, and it must be a cgroup2 root.
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = parse_mountinfo(&text, "cgroup2").expect("no cgroup2 mount found");
        assert!(
            root.join("cgroup.controllers").exists(),
            "{} is not a cgroup2 root",
            root.display()
        );
        assert_eq!(parse_mountinfo(&text, "no-such-fs"), None);
    }
}
