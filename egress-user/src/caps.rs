//! Which capabilities egress has, so that a missing one is named before anything fails
//! half-way.

use std::fs;

/// Capabilities `egress run` needs, with their bit numbers from `<linux/capability.h>`.
pub const RUN_NEEDS: &[(&str, u32)] = &[
    ("CAP_SYS_ADMIN", 21), // cgroups, bpffs, setns
    ("CAP_NET_ADMIN", 12), // cgroup socket programs
    ("CAP_BPF", 39),       // loading programs and maps
    ("CAP_SETUID", 7),     // dropping to the sandbox user
    ("CAP_SETGID", 6),
];

#[derive(Debug, thiserror::Error)]
#[error(
    "egress needs {missing}, which this process lacks; run it as root (for example with sudo) \
     or grant the capabilities"
)]
pub struct Missing {
    pub missing: String,
}

/// The effective capability set of this process.
fn effective() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub fn require(needs: &[(&str, u32)]) -> Result<(), Missing> {
    let eff = effective();
    let missing: Vec<&str> = needs
        .iter()
        .filter(|(_, bit)| eff & (1u64 << bit) == 0)
        .map(|(n, _)| *n)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Missing {
            missing: missing.join(", "),
        })
    }
}
