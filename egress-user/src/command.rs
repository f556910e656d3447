//! Starting the sandboxed command of `egress run`: into the sandbox cgroup (and netns) before
//! `exec`, as an unprivileged user, with signals forwarded and its exit status passed through.

use std::{
    io,
    os::{fd::AsRawFd, unix::process::ExitStatusExt as _},
    process::ExitStatus,
    sync::Arc,
};

use tokio::signal::unix::{signal, SignalKind};

use crate::{cgroup::SandboxCgroup, cli::SandboxUser, mountns::Plan, netns::NetNs};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start {cmd:?}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("waiting for the command")]
    Wait(#[source] io::Error),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::Error),
    #[error(
        "cannot give the command its own mount namespace with the egress CA in the system \
         trust store: {step} failed (this needs CAP_SYS_ADMIN); pass --no-ca-mount to run \
         without it, trusting egress only through the CA environment variables"
    )]
    TrustMount {
        step: crate::mountns::Step,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Like a shell: 127 for a command that does not exist, 126 for one that cannot run.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound => 127,
            Error::Spawn { .. } => 126,
            Error::TrustMount { source, .. } if source.raw_os_error() == Some(libc::EPERM) => {
                crate::exit::NOPERM
            }
            Error::TrustMount { .. } => crate::exit::UNAVAILABLE,
            _ => crate::exit::SOFTWARE,
        }
    }
}

/// Signals passed on to the command. SIGINT from a terminal usually reaches the command
/// directly as well (same process group); forwarding it too covers `kill -INT <egress>`.
const FORWARDED: &[SignalKind] = &[
    SignalKind::interrupt(),
    SignalKind::terminate(),
    SignalKind::hangup(),
    SignalKind::quit(),
    SignalKind::user_defined1(),
    SignalKind::user_defined2(),
];

/// Spawns `argv` inside `cgroup` (and `mounts`' mount namespace) and waits for it,
/// forwarding signals. With `keep_hup`, SIGHUP is egress's own (policy reload) and is not
/// passed on.
#[allow(unsafe_code)]
pub async fn run(
    argv: &[std::ffi::OsString],
    cgroup: &SandboxCgroup,
    netns: Option<&NetNs>,
    mounts: Option<Arc<Plan>>,
    user: &SandboxUser,
    env: &[(String, String)],
    keep_hup: bool,
) -> Result<ExitStatus, Error> {
    let procs = cgroup.procs_file()?;
    let procs_fd = procs.as_raw_fd();
    let netns_fd = netns.map(|n| n.fd().as_raw_fd());
    let (uid, gid) = (user.uid, user.gid);
    // The child names the mount step that failed here; the pipe closes on exec.
    let (mut step_rx, step_tx) = io::pipe().map_err(Error::Wait)?;
    let step_fd = step_tx.as_raw_fd();
    let plan = mounts.clone();

    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("HOME", &user.home)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true);
    // SAFETY: between fork and exec only async-signal-safe calls are made (write, setns,
    // unshare, mount, setgroups, setgid, setuid, prctl), on values captured by copy or
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Into the sandbox before anything else: every socket the command opens from
            // here on belongs to the sandbox cgroup.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // While still root: the trust-store mounts, in a namespace of the command's own.
            if let Some(plan) = &plan {
                if let Err((step, errno)) = plan.enter() {
                    let step = step.to_ne_bytes();
                    libc::write(step_fd, step.as_ptr().cast(), step.len());
                    return Err(io::Error::from_raw_os_error(errno));
                }
            }
            let groups = [gid];
            if libc::setgroups(1, groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // No setuid binary inside the sandbox can win back the privileges dropped above.
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    drop(step_tx);
    let mut child = spawned.map_err(|source| {
        let mut step = [0u8; 4];
        match (&mounts, std::io::Read::read(&mut step_rx, &mut step)) {
            (Some(plan), Ok(4)) => Error::TrustMount {
                step: plan.step(u32::from_ne_bytes(step)),
                source,
            },
            _ => Error::Spawn {
                cmd: argv[0].to_string_lossy().into_owned(),
                source,
            },
        }
    })?;
    drop((procs, step_rx));
    let pid = child.id().map(|p| p as libc::pid_t);
    tracing::info!(pid, user = %user.name, uid, cgroup = %cgroup.path().display(), "command started");

    let mut streams = Vec::new();
    for &kind in FORWARDED
        .iter()
        .filter(|k| !(keep_hup && **k == SignalKind::hangup()))
    {
        streams.push((kind, signal(kind).map_err(Error::Wait)?));
    }
    loop {
        let any_signal = futures_select(&mut streams);
        tokio::select! {
            status = child.wait() => return status.map_err(Error::Wait),
            kind = any_signal => {
                if let Some(pid) = pid {
                    // SAFETY: plain kill(2) on our own child's pid.
                    unsafe { libc::kill(pid, kind.as_raw_value()) };
                }
            }
        }
    }
}

/// Waits for the first of several signal streams.
async fn futures_select(streams: &mut [(SignalKind, tokio::signal::unix::Signal)]) -> SignalKind {
    std::future::poll_fn(|cx| {
        for (kind, s) in streams.iter_mut() {
            if s.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready(*kind);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// The shell convention: the exit code, or 128+N for death by signal N.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        _ => crate::exit::SOFTWARE,
    }
}
