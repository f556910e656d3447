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

/// CAP_SYS_ADMIN, CAP_BPF and CAP_PERFMON bits.
const SYS_ADMIN: u32 = 21;
const PERFMON: u32 = 38;
const BPF: u32 = 39;

/// `eff` with what the kernel grants through CAP_SYS_ADMIN added: `bpf_capable()` and
/// `perfmon_capable()` accept it in place of CAP_BPF and CAP_PERFMON. Older runtimes (Docker
/// 20.10) cannot name CAP_BPF at all, so a container given CAP_SYS_ADMIN must pass.
fn with_implied(eff: u64) -> u64 {
    if eff & (1u64 << SYS_ADMIN) != 0 {
        eff | (1u64 << BPF) | (1u64 << PERFMON)
    } else {
        eff
    }
}

pub fn require(needs: &[(&str, u32)]) -> Result<(), Missing> {
    missing_from(with_implied(effective()), needs)
}

fn missing_from(eff: u64, needs: &[(&str, u32)]) -> Result<(), Missing> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_admin_stands_for_bpf_but_not_the_other_way_round() {
        let bits = |b: &[u32]| b.iter().fold(0u64, |acc, b| acc | (1 << b));
        let all = bits(&[21, 12, 7, 6]);
        assert!(missing_from(with_implied(all), RUN_NEEDS).is_ok());
        let no_admin = bits(&[39, 12, 7, 6]);
        let err = missing_from(with_implied(no_admin), RUN_NEEDS).unwrap_err();
        assert_eq!(err.missing, "CAP_SYS_ADMIN");
        let err = missing_from(with_implied(bits(&[21])), RUN_NEEDS).unwrap_err();
        assert_eq!(err.missing, "CAP_NET_ADMIN, CAP_SETUID, CAP_SETGID");
    }
}
