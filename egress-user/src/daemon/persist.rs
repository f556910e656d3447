//! The daemon's record of its sandboxes, in the confdir, so that a restarted daemon
//! re-adopts them without a new `add`. Written whole, atomically (temporary file, fsync,
//! rename, fsync of the directory), after every change.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::config::SandboxDecl;

pub const FILE_NAME: &str = "daemon-state.json";
const VERSION: u32 = 1;

/// Where a sandbox came from: the config (re-read at every start) or the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Config,
    Api,
    /// Enrolled by its `egress.policy` label.
    Docker,
}

/// One registered sandbox as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub id: u32,
    pub source: Source,
    /// The cgroup as resolved, and its inode: a cgroup made anew under the same path is a
    /// different sandbox.
    pub cgroup_path: PathBuf,
    pub cgroup_id: u64,
    pub decl: SandboxDecl,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// The next sandbox id to hand out; ids are never reused.
    pub next_id: u32,
    pub sandboxes: Vec<Saved>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {what} the daemon state {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon state {} is not valid; move it away to start over", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads the state; a missing file is an empty state.
pub fn load(path: &Path) -> Result<State, Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
        Err(source) => {
            return Err(Error::Io {
                what: "read",
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_str(&text).map_err(|source| Error::Invalid {
        path: path.to_owned(),
        source,
    })
}

/// Writes the state atomically: a reader (or a crash) sees the old file or the new one.
pub fn store(path: &Path, state: &State) -> Result<(), Error> {
    let io = |what| {
        move |source| Error::Io {
            what,
            path: path.to_owned(),
            source,
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("create the directory of"))?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)
        .map_err(io("write"))?;
    let mut state = state.clone();
    state.version = VERSION;
    let text = serde_json::to_vec_pretty(&state).expect("the state serialises");
    f.write_all(&text).map_err(io("write"))?;
    f.sync_all().map_err(io("fsync"))?;
    std::fs::rename(&tmp, path).map_err(io("replace"))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::config::{NetnsSpec, UpstreamFrom};

    #[test]
    fn round_trips_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE_NAME);
        assert_eq!(load(&p).unwrap(), State::default());
        let s = State {
            version: VERSION,
            next_id: 4,
            sandboxes: vec![Saved {
                id: 3,
                source: Source::Api,
                cgroup_path: "/sys/fs/cgroup/agents/a".into(),
                cgroup_id: 77,
                decl: SandboxDecl {
                    name: "a".into(),
                    cgroup: "agents/a".into(),
                    policy: Some("agent".into()),
                    netns: NetnsSpec::Pid(12),
                    strict: true,
                    intercept_ports: vec![80, 443],
                    upstream: UpstreamFrom::Host,
                    warn: false,
                    dns_pinning: true,
                    no_guard: vec![crate::cli::GuardName::Doh],
                    learn: Some("/var/lib/egress/a.toml".into()),
                    learn_wildcard_min: 3,
                    docker: None,
                    pod: None,
                },
            }],
        };
        store(&p, &s).unwrap();
        assert_eq!(load(&p).unwrap(), s);
        std::fs::write(&p, "{not json").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("move it away"));
    }
}
