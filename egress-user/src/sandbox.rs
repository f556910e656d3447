//! One sandbox under egress: the handle that owns everything of it.
//!
//! A [`Sandbox`] holds its data-path state (registered in the [`Registry`]), its kernel
//! [`Registration`] (map rows and pinned links on its cgroup), a share of the listeners of
//! the network namespace it lives in, and its run directory. Removing it
//! ([`Sandbox::remove`], or dropping it) undoes exactly that, in order, and leaves every
//! other sandbox as it was.
//!
//! [`Registry`]: crate::state::Registry

use std::{path::PathBuf, sync::Arc, time::Duration};

use crate::{
    bpf::{self, Kernel, Registration, SandboxSpec},
    dns,
    listen::Listeners,
    netns::Connector,
    policy::LivePolicy,
    state::{DuplicateId, SandboxState, Shared},
    upstream::Pool,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Duplicate(#[from] DuplicateId),
    #[error("registering sandbox {name} with the kernel")]
    Kernel {
        name: String,
        #[source]
        source: bpf::Error,
    },
}

/// Everything needed to put one cgroup under egress.
pub struct Config {
    /// The id the kernel writes into this sandbox's records; unique within the process.
    pub id: u32,
    pub name: String,
    /// The cgroup (subtree) whose sockets are captured.
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub policy: LivePolicy,
    /// TCP ports sent through the proxy.
    pub intercept_ports: Vec<u16>,
    /// Attach the `--strict` packet backstop.
    pub strict: bool,
    /// The listeners of the namespace the sandbox lives in.
    pub listeners: Arc<Listeners>,
    /// Where its upstream connections and DNS forwarding leave from.
    pub upstream: Connector,
    /// Where permitted DNS queries are forwarded.
    pub resolvers: dns::upstream::Upstreams,
    /// Where its links are pinned.
    pub link_dir: PathBuf,
}

/// A directory of per-sandbox files (the CA bundle `egress run` hands the command), removed
/// with the sandbox.
pub struct RunDir(pub PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sandbox being served. See the module docs.
pub struct Sandbox {
    state: Arc<SandboxState>,
    shared: Arc<Shared>,
    cgroup: PathBuf,
    registration: Option<Registration>,
    listeners: Option<Arc<Listeners>>,
    run_dir: Option<RunDir>,
    registered: bool,
}

impl Sandbox {
    /// Registers the sandbox's state, then its rows and programs, so that its first
    /// captured connect already finds its policy. A failure half-way undoes what was done.
    pub fn add(
        shared: &Arc<Shared>,
        kernel: &Kernel,
        cfg: Config,
        run_dir: Option<RunDir>,
    ) -> Result<Sandbox, Error> {
        let spec = SandboxSpec {
            id: cfg.id,
            listen4: cfg.listeners.addrs.proxy4,
            listen6: cfg.listeners.addrs.proxy6,
            dns4_port: cfg.listeners.addrs.dns4_port,
            dns6_port: cfg.listeners.addrs.dns6_port,
            intercept_ports: cfg.intercept_ports,
            allow_tcp: cfg.policy.sandbox.tcp.clone(),
            inbound_ports: cfg.policy.sandbox.inbound.clone(),
            strict: cfg.strict,
        };
        let pool = Pool::new(&shared.upstream_tls, cfg.upstream.clone());
        let resolvers = cfg.resolvers.via(cfg.upstream);
        let state = Arc::new(SandboxState::new(
            cfg.id, cfg.name, cfg.policy, pool, resolvers,
        ));
        shared.registry.insert(state.clone())?;
        let mut sb = Sandbox {
            state,
            shared: shared.clone(),
            cgroup: cfg.cgroup,
            registration: None,
            listeners: Some(cfg.listeners),
            run_dir,
            registered: true,
        };
        let reg = kernel
            .register(&sb.cgroup, cfg.cgroup_id, &spec, &cfg.link_dir)
            .map_err(|source| Error::Kernel {
                name: sb.state.name.clone(),
                source,
            })?;
        sb.registration = Some(reg);
        Ok(sb)
    }

    pub fn state(&self) -> &Arc<SandboxState> {
        &self.state
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn cgroup(&self) -> &std::path::Path {
        &self.cgroup
    }

    pub fn listeners(&self) -> Option<&Arc<Listeners>> {
        self.listeners.as_ref()
    }

    /// How many of its kernel links were taken over from a previous egress.
    pub fn adopted_links(&self) -> usize {
        self.registration.as_ref().map_or(0, Registration::adopted)
    }

    /// Moves the sandbox to the listeners of another namespace (its container restarted
    /// with a new one) and makes its upstream connections there. The kernel's rows stay:
    /// the listeners sit on the same ports in every namespace.
    pub fn rebind(
        &mut self,
        listeners: Arc<Listeners>,
        upstream: Connector,
        resolvers: dns::upstream::Upstreams,
    ) {
        self.state.pool.rebind(upstream.clone());
        self.state
            .resolvers
            .store(Arc::new(resolvers.via(upstream)));
        self.listeners = Some(listeners);
    }

    /// Replaces its direct TCP allowances in the kernel (a reloaded policy's `tcp`).
    pub fn set_allow(&mut self, allow: &[crate::pattern::TcpAllow]) -> Result<(), bpf::Error> {
        match self.registration.as_mut() {
            Some(r) => r.set_allow(allow),
            None => Ok(()),
        }
    }

    /// Replaces the ports it may bind on every address (a reloaded policy's `inbound`).
    pub fn set_inbound(&mut self, ports: &[u16]) -> Result<(), bpf::Error> {
        match self.registration.as_mut() {
            Some(r) => r.set_inbound(ports),
            None => Ok(()),
        }
    }

    /// Removes the sandbox: its programs and rows first (its cgroup is no longer captured),
    /// then its state, then its connections get up to `drain` to finish before they are
    /// cut off; then its share of the listeners and its run directory go. Returns how many
    /// connections were cut off.
    pub async fn remove(mut self, drain: Duration) -> usize {
        drop(self.registration.take());
        self.unregister_state();
        let cut = self.state.drain(drain).await;
        drop(self.listeners.take());
        drop(self.run_dir.take());
        cut
    }

    /// Stops serving the sandbox but leaves it captured in the kernel (links, rows, pins
    /// stay), for a daemon going down: its connects are refused until a new daemon
    /// re-adopts it.
    pub async fn release(mut self, drain: Duration) -> usize {
        if let Some(r) = self.registration.take() {
            r.persist();
        }
        self.unregister_state();
        let cut = self.state.drain(drain).await;
        drop(self.listeners.take());
        cut
    }

    fn unregister_state(&mut self) {
        if std::mem::take(&mut self.registered) {
            self.shared.registry.remove(self.state.id);
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        drop(self.registration.take());
        self.unregister_state();
        self.state.cut.cancel();
    }
}
