//! A small client of the Docker Engine API on its unix socket (hyper, no `docker` CLI):
//! inspect a container for its init pid (and so its cgroup and network namespace), list
//! the running containers that carry a label, and follow the event stream.

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;

pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// The label that enrols a container and names its policy: `egress.policy=NAME`.
pub const POLICY_LABEL: &str = "egress.policy";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the Docker Engine at {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the Docker Engine at {}", socket.display())]
    Http {
        socket: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("no container {container:?}")]
    NoSuchContainer { container: String },
    #[error("the Docker Engine answered {status} to {path}: {message}")]
    Status {
        status: StatusCode,
        path: String,
        message: String,
    },
    #[error("the Docker Engine sent JSON egress cannot read")]
    Json(#[source] serde_json::Error),
}

/// What `GET /containers/{id}/json` says about a container, in the parts egress uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    pub running: bool,
    /// The container's init process, 0 when not running.
    pub pid: u32,
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawInspect {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "State")]
    state: RawState,
    #[serde(rename = "Config")]
    config: Option<RawConfig>,
}

#[derive(Deserialize)]
struct RawState {
    #[serde(rename = "Running")]
    running: bool,
    #[serde(rename = "Pid")]
    pid: u32,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(rename = "Labels")]
    labels: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct RawSummary {
    #[serde(rename = "Id")]
    id: String,
}

/// One container event: `start`, `die`, `destroy`, ...
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Event {
    #[serde(rename = "Action")]
    pub action: String,
    #[serde(rename = "Actor")]
    pub actor: Actor,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Actor {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Attributes", default)]
    pub attributes: std::collections::BTreeMap<String, String>,
}

/// The Docker Engine behind one socket.
#[derive(Clone, Debug)]
pub struct Docker {
    socket: PathBuf,
}

impl Docker {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Docker {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn get(&self, path: &str) -> Result<hyper::Response<Incoming>, Error> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| Error::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let http = |source| Error::Http {
            socket: self.socket.clone(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(http::header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        sender.send_request(req).await.map_err(http)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let resp = self.get(path).await?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|source| Error::Http {
                socket: self.socket.clone(),
                source,
            })?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(Error::Status {
                status,
                path: path.to_owned(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(Error::Json)
    }

    /// A container by id, id prefix or name.
    pub async fn inspect(&self, container: &str) -> Result<Container, Error> {
        let path = format!("/containers/{}/json", encode(container));
        let raw: RawInspect = match self.get_json(&path).await {
            Err(Error::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }) => {
                return Err(Error::NoSuchContainer {
                    container: container.to_owned(),
                })
            }
            r => r?,
        };
        Ok(Container {
            id: raw.id,
            name: raw.name.trim_start_matches('/').to_owned(),
            running: raw.state.running,
            pid: raw.state.pid,
            labels: raw.config.and_then(|c| c.labels).unwrap_or_default(),
        })
    }

    /// Ids of the running containers that carry `label`.
    pub async fn running_with_label(&self, label: &str) -> Result<Vec<String>, Error> {
        let filters = format!(r#"{{"label":["{label}"],"status":["running"]}}"#);
        let path = format!("/containers/json?filters={}", encode(&filters));
        let list: Vec<RawSummary> = self.get_json(&path).await?;
        Ok(list.into_iter().map(|c| c.id).collect())
    }

    /// Follows container `start`, `die` and `destroy` events of containers carrying `label`,
    /// handing each to `on_event`, until the stream ends or fails.
    pub async fn follow_events(
        &self,
        label: &str,
        mut on_event: impl AsyncFnMut(Event),
    ) -> Result<(), Error> {
        let filters = format!(
            r#"{{"type":["container"],"event":["start","die","destroy"],"label":["{label}"]}}"#
        );
        let path = format!("/events?filters={}", encode(&filters));
        let resp = self.get(&path).await?;
        if !resp.status().is_success() {
            return Err(Error::Status {
                status: resp.status(),
                path,
                message: "the event stream was refused".into(),
            });
        }
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|source| Error::Http {
                socket: self.socket.clone(),
                source,
            })?;
            if let Some(data) = frame.data_ref() {
                buf.extend_from_slice(data);
            }
            for ev in take_events(&mut buf) {
                on_event(ev).await;
            }
        }
        Ok(())
    }
}

/// Splits complete newline-terminated JSON objects off the front of `buf`; lines that are
/// not events are skipped.
pub fn take_events(buf: &mut BytesMut) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(i) = buf.iter().position(|b| *b == b'\n') {
        let line = buf.split_to(i + 1);
        let line = &line[..i];
        if let Ok(ev) = serde_json::from_slice::<Event>(line) {
            out.push(ev);
        } else if !line.iter().all(u8::is_ascii_whitespace) {
            tracing::debug!(line = %String::from_utf8_lossy(line), "docker event not understood");
        }
    }
    out
}

/// Percent-encodes what a path segment or query value may not hold.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A sandbox name for a container: its name in the alphabet sandbox names allow, with the
/// id's first 12 characters when the name alone would not do.
pub fn sandbox_name(c: &Container) -> String {
    let clean: String = c
        .name
        .to_ascii_lowercase()
        .chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || ch == '_' || ch == '-' {
                ch
            } else {
                '-'
            }
        })
        .collect();
    let short = &c.id[..c.id.len().min(12)];
    if clean.is_empty() {
        format!("docker-{short}")
    } else if clean.len() > 64 {
        format!("{}-{short}", &clean[..51])
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_on_newlines_across_reads() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(br#"{"Type":"container","Action":"start","Actor":{"ID":"abc","Attributes":{"egress.policy":"agent","name":"web"}},"time":1}"#);
        assert!(take_events(&mut buf).is_empty(), "no newline yet");
        buf.extend_from_slice(b"\n{\"Action\":\"die\",\"Actor\":{\"ID\":\"abc\"}}\n{\"Act");
        let evs = take_events(&mut buf);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].action, "start");
        assert_eq!(evs[0].actor.attributes["egress.policy"], "agent");
        assert_eq!(evs[1].action, "die");
        assert_eq!(&buf[..], b"{\"Act", "the partial event waits for the rest");
    }

    #[test]
    fn names_fit_the_sandbox_alphabet() {
        let c = |name: &str| Container {
            id: "3f1c2b9a8d7e6f5a4b3c2d1e".into(),
            name: name.into(),
            running: true,
            pid: 1,
            labels: Default::default(),
        };
        assert_eq!(sandbox_name(&c("Web.1")), "web-1");
        assert_eq!(sandbox_name(&c("")), "docker-3f1c2b9a8d7e");
        let long = sandbox_name(&c(&"a".repeat(80)));
        assert!(
            long.len() <= 64 && long.ends_with("-3f1c2b9a8d7e"),
            "{long}"
        );
        assert_eq!(encode(r#"{"a":["b"]}"#), "%7B%22a%22%3A%5B%22b%22%5D%7D");
    }
}
