//! egress: a transparent, eBPF-captured egress proxy for sandboxes.
//!
//! Reading order for the data path: `main.rs` (CLI) → [`app`] (wiring) → [`proxy`].
//! What the proxy, DNS and the kernel event reader share is in [`state`]; one sandbox's
//! handle is [`sandbox::Sandbox`].
#![deny(unsafe_code)]

pub mod addr;
pub mod admin;
pub mod app;
pub mod audit;
pub mod bpf;
pub mod caps;
pub mod cgroup;
pub mod cli;
pub mod command;
pub mod daemon;
pub mod dns;
pub mod docker;
pub mod events;
pub mod gc;
pub mod learn;
pub mod listen;
pub mod located;
pub mod mountns;
pub mod netns;
pub mod notify;
pub mod pattern;
pub mod pods;
pub mod policy;
pub mod proxy;
pub mod records;
pub mod reload;
pub mod sandbox;
pub mod secrets;
pub mod state;
pub mod tls;
pub mod upstream;

/// A boxed error that can cross tasks: what HTTP bodies fail with (hyper's own errors, or a
/// secret found while streaming).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error and its sources on one line: `outer: inner: root cause`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Exit codes from sysexits(3), so that scripts can tell a typo from a broken host.
pub mod exit {
    pub const USAGE: u8 = 64;
    pub const UNAVAILABLE: u8 = 69;
    pub const SOFTWARE: u8 = 70;
    pub const NOPERM: u8 = 77;
}
