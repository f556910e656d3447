//! Runs that die without cleaning up (SIGKILL, a crash, a reboot of the daemon) leave their
//! sandbox cgroup and pinned programs behind, on purpose: that keeps their processes cut off.
//! `egress gc`, and every new `egress run`, removes what belongs to runs no longer alive.

use std::{fs, path::Path};

use crate::{bpf, cgroup};

/// The name of this process's run: pid plus start time, so that a reused pid never makes a
/// dead run look alive.
pub fn run_name(pid: u32) -> String {
    format!("run-{pid}-{}", start_time(pid).unwrap_or(0))
}

/// Field 22 of /proc/PID/stat: start time in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses; the fields after the last ')' are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether `name` (a `run-PID-START` directory) belongs to a live process.
fn alive(name: &str) -> bool {
    let mut parts = name.strip_prefix("run-").unwrap_or("").splitn(2, '-');
    let (Some(pid), Some(start)) = (parts.next(), parts.next()) else {
        // Not ours to judge: leave it.
        return true;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return true;
    };
    start_time(pid) == Some(start)
}

/// Removes dead runs' cgroups (killing what is left in them first) and then their pins.
/// Returns the names removed.
pub fn collect(cgroup_root: &Path, bpffs: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let cg_dir = cgroup_root.join(cgroup::EGRESS_DIR);
    for e in fs::read_dir(&cg_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("run-") && !alive(&name) {
            match cgroup::kill_and_remove(&e.path()) {
                Ok(()) => removed.push(name),
                Err(err) => {
                    tracing::warn!(error = %crate::error_chain(&err), "gc: cgroup not removed")
                }
            }
        }
    }
    let pin_dir = bpffs.join("egress");
    for e in fs::read_dir(&pin_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("run-") && !alive(&name) {
            bpf::remove_pin_dir(&e.path());
            if !removed.contains(&name) {
                removed.push(name);
            }
        }
    }
    // Per-run files (the CA bundle handed to the command) live in the temp dir.
    for e in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let file_name = e.file_name().to_string_lossy().into_owned();
        if let Some(name) = file_name
            .strip_prefix("egress-")
            .filter(|n| n.starts_with("run-"))
        {
            if !alive(name)
                && fs::remove_dir_all(e.path()).is_ok()
                && !removed.iter().any(|r| r == name)
            {
                removed.push(name.to_owned());
            }
        }
    }
    // Empty parents are removed too; non-empty ones (live runs) stay.
    let _ = fs::remove_dir(&cg_dir);
    let _ = fs::remove_dir(&pin_dir);
    for name in &removed {
        tracing::info!(run = %name, "gc: removed state of a dead run");
    }
    removed
}

/// Removes the pinned programs and maps of the daemon (everything under `<bpffs>/egress`
/// that is not a run's): every sandbox it governed is no longer captured.
pub fn collect_daemon(bpffs: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let dir = bpffs.join("egress");
    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("run-") {
            bpf::remove_pin_dir(&e.path());
            tracing::info!(pins = %e.path().display(), "gc: removed the daemon's pinned state");
            removed.push(name);
        }
    }
    let _ = fs::remove_dir(&dir);
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_run_is_alive_and_bogus_ones_are_not() {
        let me = run_name(std::process::id());
        assert!(alive(&me), "{me}");
        assert!(!alive("run-4194304-1"));
        let pid = std::process::id();
        assert!(
            !alive(&format!("run-{pid}-1")),
            "pid reuse must not look alive"
        );
        assert!(alive("something-else"));
    }
}
