//! Finding a Kubernetes pod's cgroup and network namespace from its UID, by scanning
//! `/proc` the way a CNI node agent does after a restart: no kubelet or CRI connection.
//!
//! The kubelet lays pod cgroups out in one of two ways, with a QoS level for Burstable and
//! BestEffort pods and none for Guaranteed ones:
//!
//! | driver   | pod cgroup, below the cgroup2 root                                            |
//! |----------|--------------------------------------------------------------------------------|
//! | cgroupfs | `kubepods/<qos>/pod<uid>` (Guaranteed: `kubepods/pod<uid>`)                     |
//! | systemd  | `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`           |
//! |          | (Guaranteed: `kubepods.slice/kubepods-pod<uid_>.slice`)                        |
//!
//! where `<uid_>` is the UID with `-` written `_`. A container's cgroup is below its pod's:
//! `<cid>` (cgroupfs) or `<runtime>-<cid>.scope` (systemd), the runtime prefix being
//! `cri-containerd-`, `crio-` or `docker-`; CRI-O's `crio-conmon-<cid>` siblings are not the
//! container. Nested kubelets (kind) put all of it under `kubelet/` or `kubelet.slice/`.
//!
//! The pod's network namespace is that of its oldest process (the pod sandbox's pause
//! process, which holds the namespace for every container of the pod).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{uid:?} is not a pod UID (36 characters: hex digits and dashes, 8-4-4-4-12)")]
    BadUid { uid: String },
    #[error("no process of pod {uid} under {} (is it running on this node?)", proc_root.display())]
    NotFound { uid: String, proc_root: PathBuf },
    #[error("pod {uid} has no container {container:?} (its containers: {have})")]
    NoContainer {
        uid: String,
        container: String,
        have: String,
    },
}

/// Where a pod (or one of its containers) lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLocation {
    /// Below the cgroup2 root, without a leading `/`.
    pub cgroup: String,
    /// The pod's oldest process, whose network namespace is the pod's.
    pub pid: u32,
}

/// Checks a pod UID and returns it lowercase.
pub fn normalize_uid(uid: &str) -> Result<String, Error> {
    let u = uid.trim().to_ascii_lowercase();
    let groups: Vec<&str> = u.split('-').collect();
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(u)
    } else {
        Err(Error::BadUid {
            uid: uid.to_owned(),
        })
    }
}

/// The index of the pod's directory among the segments of a cgroup path, if the path is in
/// pod `uid` (lowercase, with dashes).
fn pod_segment(segments: &[&str], uid: &str) -> Option<usize> {
    let cgroupfs = format!("pod{uid}");
    let systemd = format!("-pod{}.slice", uid.replace('-', "_"));
    segments
        .iter()
        .position(|s| *s == cgroupfs || s.ends_with(&systemd))
}

/// A container's id from its cgroup directory name, if it is one.
fn container_id(segment: &str) -> Option<&str> {
    if segment.starts_with("crio-conmon-") {
        return None;
    }
    let id = segment
        .strip_suffix(".scope")
        .and_then(|s| {
            ["cri-containerd-", "crio-", "docker-"]
                .iter()
                .find_map(|p| s.strip_prefix(p))
        })
        .unwrap_or(segment);
    (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// The pod's cgroup (and, with `container`, that container's) from one process's cgroup
/// path, if that process is in the pod.
pub fn locate(cgroup_path: &str, uid: &str, container: Option<&str>) -> Option<String> {
    let segments: Vec<&str> = cgroup_path
        .trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let i = pod_segment(&segments, uid)?;
    match container {
        None => Some(segments[..=i].join("/")),
        Some(want) => {
            let seg = segments.get(i + 1)?;
            let id = container_id(seg)?;
            // Runtimes print ids in full; operators often paste a prefix.
            (id.starts_with(want) && !want.is_empty()).then(|| segments[..=i + 1].join("/"))
        }
    }
}

/// Scans `proc_root` (`/proc`, or a fake tree in tests) for the pod's processes.
pub fn find(proc_root: &Path, uid: &str, container: Option<&str>) -> Result<PodLocation, Error> {
    let uid = normalize_uid(uid)?;
    let container = container.map(|c| c.trim().to_ascii_lowercase());
    // (start time, pid, cgroup) of the oldest process found.
    let mut best: Option<(u64, u32, String)> = None;
    let mut containers = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(proc_root).into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(e.path().join("cgroup")) else {
            continue;
        };
        let Some(path) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
            continue;
        };
        let Some(pod) = locate(path, &uid, None) else {
            continue;
        };
        if let Some(rest) = path.trim_start_matches('/').strip_prefix(pod.as_str()) {
            if let Some(id) = rest
                .split('/')
                .find(|s| !s.is_empty())
                .and_then(container_id)
            {
                containers.insert(id.to_owned());
            }
        }
        let cgroup = match &container {
            None => pod,
            Some(c) => match locate(path, &uid, Some(c)) {
                Some(cg) => cg,
                None => continue,
            },
        };
        let start = start_time(&e.path()).unwrap_or(u64::MAX);
        if best.as_ref().is_none_or(|b| (start, pid) < (b.0, b.1)) {
            best = Some((start, pid, cgroup));
        }
    }
    match (best, container) {
        (Some((_, pid, cgroup)), _) => Ok(PodLocation { cgroup, pid }),
        (None, Some(c)) if !containers.is_empty() => Err(Error::NoContainer {
            uid,
            container: c,
            have: containers.into_iter().collect::<Vec<_>>().join(", "),
        }),
        (None, _) => Err(Error::NotFound {
            uid,
            proc_root: proc_root.to_owned(),
        }),
    }
}

/// Field 22 of `<proc>/<pid>/stat`: start time in clock ticks since boot.
fn start_time(pid_dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(pid_dir.join("stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1b2c3d4e-5f60-4a1b-8c2d-3e4f5a6b7c8d";
    const CID: &str = "3f1c2b9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a";
    const PAUSE: &str = "aa11bb22cc33dd44ee55ff66aa11bb22cc33dd44ee55ff66aa11bb22cc33dd44";

    /// Every layout: (cgroup of the pause process, of the container, expected pod cgroup).
    fn layouts() -> Vec<(String, String, String)> {
        let u_ = UID.replace('-', "_");
        let mut v = Vec::new();
        for qos in ["burstable", "besteffort"] {
            let pod = format!("kubepods/{qos}/pod{UID}");
            v.push((format!("/{pod}/{PAUSE}"), format!("/{pod}/{CID}"), pod));
            let pod = format!("kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u_}.slice");
            for rt in ["cri-containerd", "crio", "docker"] {
                v.push((
                    format!("/{pod}/{rt}-{PAUSE}.scope"),
                    format!("/{pod}/{rt}-{CID}.scope"),
                    pod.clone(),
                ));
            }
        }
        // Guaranteed: no QoS level.
        let pod = format!("kubepods/pod{UID}");
        v.push((format!("/{pod}/{PAUSE}"), format!("/{pod}/{CID}"), pod));
        let pod = format!("kubepods.slice/kubepods-pod{u_}.slice");
        v.push((
            format!("/{pod}/cri-containerd-{PAUSE}.scope"),
            format!("/{pod}/cri-containerd-{CID}.scope"),
            pod,
        ));
        // Nested kubelet (kind), and crun's child of the scope.
        let pod = format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u_}.slice");
        v.push((
            format!("/{pod}/cri-containerd-{PAUSE}.scope"),
            format!("/{pod}/cri-containerd-{CID}.scope/container"),
            pod,
        ));
        v
    }

    struct FakeProc(tempfile::TempDir);

    impl FakeProc {
        fn new() -> Self {
            FakeProc(tempfile::tempdir().unwrap())
        }

        fn add(&self, pid: u32, start: u64, cgroup: &str) {
            let d = self.0.path().join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
            let mut fields = vec!["S".to_string()];
            fields.extend((0..18).map(|_| "0".to_string()));
            fields.push(start.to_string());
            std::fs::write(
                d.join("stat"),
                format!("{pid} (x) y) {}\n", fields.join(" ")),
            )
            .unwrap();
        }
    }

    #[test]
    fn every_layout_finds_the_pod_its_pause_process_and_a_container() {
        for (pause, container, pod) in layouts() {
            let p = FakeProc::new();
            p.add(100, 5000, &pause);
            p.add(200, 6000, &container);
            p.add(300, 1, "/system.slice/kubelet.service");
            p.add(
                400,
                2,
                &format!("/kubepods/pod{}/x", "9".repeat(8) + &UID[8..]),
            );
            let found = find(p.0.path(), UID, None).unwrap_or_else(|e| panic!("{pod}: {e}"));
            assert_eq!(
                found,
                PodLocation {
                    cgroup: pod.clone(),
                    pid: 100
                },
                "{pod}"
            );
            let c = find(p.0.path(), &UID.to_uppercase(), Some(&CID[..12]))
                .unwrap_or_else(|e| panic!("{container}: {e}"));
            assert_eq!(c.pid, 200);
            assert!(
                c.cgroup.starts_with(&pod) && c.cgroup.contains(CID),
                "{c:?}"
            );
            assert!(
                !c.cgroup.ends_with("/container"),
                "the scope, not crun's child: {c:?}"
            );
        }
    }

    #[test]
    fn crio_conmon_is_not_a_container_and_misses_are_named() {
        let u_ = UID.replace('-', "_");
        let pod = format!("kubepods.slice/kubepods-pod{u_}.slice");
        let p = FakeProc::new();
        p.add(10, 10, &format!("/{pod}/crio-conmon-{CID}.scope"));
        p.add(11, 11, &format!("/{pod}/crio-{PAUSE}.scope"));
        let e = find(p.0.path(), UID, Some(CID)).unwrap_err();
        assert!(
            e.to_string().contains(PAUSE),
            "names the containers it has: {e}"
        );
        let other = "00000000-0000-4000-8000-000000000000";
        assert!(matches!(
            find(p.0.path(), other, None),
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            find(p.0.path(), "pod-1", None),
            Err(Error::BadUid { .. })
        ));
    }
}
