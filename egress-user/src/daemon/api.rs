//! The runtime API: HTTP/1.1 with JSON on a unix socket, so that `curl --unix-socket` works
//! as well as `egress sandbox …`.
//!
//! | method and path              | what                                                  |
//! |------------------------------|-------------------------------------------------------|
//! | `GET /v1/sandboxes`          | every sandbox, with its counters                      |
//! | `POST /v1/sandboxes`         | add one: `{name, cgroup, policy?, netns? \| pid?, …}` |
//! | `DELETE /v1/sandboxes/NAME`  | remove one, draining its connections                  |
//! | `POST /v1/reload`            | compile every sandbox's policy again                  |
//! | `GET /v1/status`             | readiness, what is pending, how many sandboxes        |
//!
//! The socket is mode 0600 root (0660 with `api_group`), and every connection's peer
//! credentials are checked again: only root, or a member of `api_group`, is served. Bad
//! input gets a 4xx with `{"error": …, "field": …}` and changes nothing.

use std::{
    convert::Infallible,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::json;
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use super::{config::SandboxRequest, Daemon};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// Binds the API socket: its directory is made if missing, a stale socket is replaced, and
/// the mode is 0600 (0660 with a group, owned by root:group).
pub fn bind(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Bind under a umask that gives nobody else access even for the instant before chmod.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = l?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, Some(0), Some(gid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    } else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(l)
}

/// Serves the API until the task is dropped.
pub async fn serve(listener: UnixListener, daemon: Daemon, group: Option<u32>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "API accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let allowed = caller_allowed(&stream, group);
        let d = daemon.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let d = d.clone();
                async move {
                    Ok::<_, Infallible>(if allowed {
                        route(req, &d).await
                    } else {
                        error(
                            StatusCode::FORBIDDEN,
                            "caller",
                            "only root (or api_group) may use the egress API",
                        )
                    })
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "API connection ended with an error");
            }
        });
    }
}

/// Root, or a process whose group (primary or supplementary) is `group`.
fn caller_allowed(stream: &UnixStream, group: Option<u32>) -> bool {
    let Ok(cred) = stream.peer_cred() else {
        return false;
    };
    if cred.uid() == 0 {
        return true;
    }
    let Some(gid) = group else {
        return false;
    };
    if cred.gid() == gid {
        return true;
    }
    let Some(pid) = cred.pid() else {
        return false;
    };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
        })
        .unwrap_or(false)
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
    text.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, field: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": message, "field": field }))
}

async fn route(req: Request<Incoming>, d: &Daemon) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::GET, "/v1/sandboxes") => json_response(StatusCode::OK, &d.list().await),
        (Method::POST, "/v1/sandboxes") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, "body", &e.to_string()),
            };
            let parsed: SandboxRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &json_field(&e.to_string()),
                        &format!("not a sandbox: {e}"),
                    )
                }
            };
            let decl = match parsed.validate() {
                Ok(d) => d,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e.field, &e.message),
            };
            match d.add(decl).await {
                Ok(info) => json_response(StatusCode::CREATED, &info),
                Err(e) => error(
                    StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
                    &e.field,
                    &e.message,
                ),
            }
        }
        (Method::DELETE, p) if p.starts_with("/v1/sandboxes/") => {
            let name = &p["/v1/sandboxes/".len()..];
            match d.remove(name).await {
                Ok(r) => json_response(StatusCode::OK, &r),
                Err(e) => error(
                    StatusCode::from_u16(e.status).unwrap_or(StatusCode::NOT_FOUND),
                    &e.field,
                    &e.message,
                ),
            }
        }
        (Method::POST, "/v1/reload") => json_response(StatusCode::OK, &d.reload().await),
        (Method::GET, "/v1/status") => {
            let pending = d.ready().check().err().unwrap_or_default();
            json_response(
                StatusCode::OK,
                &json!({
                    "ready": pending.is_empty(),
                    "pending": pending,
                    "sandboxes": d.shared().registry.len(),
                    "version": env!("CARGO_PKG_VERSION"),
                }),
            )
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "path",
            "unknown endpoint; see GET /v1/sandboxes, POST /v1/sandboxes, DELETE /v1/sandboxes/NAME, POST /v1/reload, GET /v1/status",
        ),
    }
}

/// serde_json names an unknown field in its message (``unknown field `x` ``): blame it.
fn json_field(message: &str) -> String {
    message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("unknown field") || message.contains("invalid type"))
        .unwrap_or("body")
        .to_owned()
}

/// Why the CLI could not get an answer from the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the egress daemon at {}; is `egress daemon` running? (--api names another socket)", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the egress daemon at {}", path.display())]
    Http {
        path: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("the egress daemon sent something that is not JSON")]
    NotJson(#[source] serde_json::Error),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Connect { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                crate::exit::NOPERM
            }
            _ => crate::exit::UNAVAILABLE,
        }
    }
}

/// One request to the daemon's API; the status and the JSON answer.
pub async fn call(
    api: &Path,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(StatusCode, serde_json::Value), ClientError> {
    let stream = UnixStream::connect(api)
        .await
        .map_err(|source| ClientError::Connect {
            path: api.to_owned(),
            source,
        })?;
    let http_err = |source| ClientError::Http {
        path: api.to_owned(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    tokio::spawn(conn);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "egress")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid request");
    let resp = sender.send_request(req).await.map_err(http_err)?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(http_err)?
        .to_bytes();
    let v = serde_json::from_slice(&bytes).map_err(ClientError::NotJson)?;
    Ok((status, v))
}
