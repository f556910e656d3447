//! A small Rust client run inside sandboxes by the end-to-end tests. It prints one JSON
//! object per operation on stdout so the tests can check what the sandboxed side saw.
//!
//! Usage: egress-testclient [--wait FILE] OP ADDR [ARGS]
//!   --wait FILE   wait until FILE exists first; an ADDR of `@` is read from FILE
//!   OP is one of: connect, nonblock, fastopen, connect-err, udp, loop N, escape CGROUP_PROCS,
//!   flood N THREADS (N refused UDP sends from THREADS threads, counted by errno),
//!   get-loop N PATHLEN (N sequential HTTP/1.0 GETs, each with a path of PATHLEN bytes),
//!   pq-tls NAME N (N HTTPS GETs of /hello for NAME from rustls offering X25519MLKEM768,
//!   trusting only $SSL_CERT_FILE, each reporting the size and layout of its ClientHello)
#![allow(unsafe_code)]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd},
    time::{Duration, Instant},
};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut wait = None;
    if args.first().map(String::as_str) == Some("--wait") {
        wait = Some(args[1].clone());
        args.drain(..2);
    }
    if let Some(f) = &wait {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::path::Path::new(f).exists() {
            assert!(Instant::now() < deadline, "timed out waiting for {f}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let op = args.first().cloned().unwrap_or_default();
    let addr_arg = args.get(1).cloned().unwrap_or_default();
    let addr_text = if addr_arg == "@" {
        std::fs::read_to_string(wait.as_ref().expect("@ needs --wait"))
            .unwrap()
            .trim()
            .to_owned()
    } else {
        addr_arg
    };
    let pid = std::process::id();
    let out = match op.as_str() {
        "connect" => request(connect_blocking(&addr_text)),
        "nonblock" => request(connect_nonblocking(&addr_text)),
        "fastopen" => fastopen(&addr_text),
        "connect-err" => match connect_blocking(&addr_text) {
            Ok(_) => serde_json::json!({"ok": true}),
            Err(e) => serde_json::json!({"errno": e.raw_os_error()}),
        },
        "udp" => udp(&addr_text),
        "loop" => {
            let n: usize = args[2].parse().unwrap();
            let mut ok = 0;
            for _ in 0..n {
                let v = request(connect_blocking(&addr_text));
                if v.get("response")
                    .and_then(|r| r.as_str())
                    .is_some_and(|r| r.contains("200 OK"))
                {
                    ok += 1;
                }
            }
            serde_json::json!({"ok": ok})
        }
        "flood" => {
            let n: u64 = args[2].parse().unwrap();
            let threads: u64 = args[3].parse().unwrap();
            flood(parse(&addr_text), n, threads)
        }
        "get-loop" => {
            let n: usize = args[2].parse().unwrap();
            let len: usize = args[3].parse().unwrap();
            let path = format!("/{}", "p".repeat(len.saturating_sub(1)));
            let start = Instant::now();
            let mut ok = 0;
            for _ in 0..n {
                let Ok(mut s) = connect_blocking(&addr_text) else {
                    continue;
                };
                // Long enough to sit out a stalled audit writer.
                let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
                let _ = write!(s, "GET {path} HTTP/1.0\r\n\r\n");
                let mut resp = String::new();
                let _ = s.read_to_string(&mut resp);
                if resp.contains("200 OK") {
                    ok += 1;
                }
            }
            serde_json::json!({"ok": ok, "elapsed_ms": start.elapsed().as_millis() as u64})
        }
        "pq-tls" => pq_tls(&addr_text, &args[2], args[3].parse().unwrap()),
        "escape" => match std::fs::write(&addr_text, pid.to_string()) {
            Ok(()) => serde_json::json!({"escaped": true}),
            Err(e) => serde_json::json!({"escaped": false, "errno": e.raw_os_error()}),
        },
        other => panic!("unknown op {other:?}"),
    };
    let mut out = out;
    out["pid"] = pid.into();
    println!("{out}");
    std::io::stdout().flush().unwrap();
    // Optionally linger so that the test can inspect the live sandbox.
    if let Some(f) = args
        .iter()
        .position(|a| a == "--linger")
        .and_then(|i| args.get(i + 1))
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::path::Path::new(f).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn parse(a: &str) -> SocketAddr {
    a.parse()
        .unwrap_or_else(|e| panic!("bad address {a:?}: {e}"))
}

fn connect_blocking(a: &str) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&parse(a), Duration::from_secs(5))
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as _,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as _,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn raw_socket(a: SocketAddr, ty: libc::c_int) -> i32 {
    let fam = if a.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(fam, ty | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    fd
}

/// connect(2) on a non-blocking socket, then poll for completion.
fn connect_nonblocking(a: &str) -> std::io::Result<TcpStream> {
    let a = parse(a);
    let fd = raw_socket(a, libc::SOCK_STREAM | libc::SOCK_NONBLOCK);
    // SAFETY: fd is a fresh socket we own.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (ss, len) = sockaddr(a);
    // SAFETY: ss/len describe a valid sockaddr.
    let r = unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 5000) };
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// TCP fast open: the connect happens inside sendto(MSG_FASTOPEN) with the request as data.
fn fastopen(a: &str) -> serde_json::Value {
    let addr = parse(a);
    let fd = raw_socket(addr, libc::SOCK_STREAM);
    // SAFETY: fd is a fresh socket we own.
    let mut stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (ss, len) = sockaddr(addr);
    let req = b"GET / HTTP/1.0\r\n\r\n";
    // SAFETY: valid buffer and sockaddr.
    let r = unsafe {
        libc::sendto(
            fd,
            req.as_ptr().cast(),
            req.len(),
            libc::MSG_FASTOPEN,
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if r < 0 {
        return serde_json::json!({"errno": std::io::Error::last_os_error().raw_os_error()});
    }
    let mut resp = String::new();
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.read_to_string(&mut resp);
    serde_json::json!({"response": resp, "peer": stream.peer_addr().map(|p| p.to_string()).unwrap_or_default()})
}

fn request(s: std::io::Result<TcpStream>) -> serde_json::Value {
    let mut s = match s {
        Ok(s) => s,
        Err(e) => return serde_json::json!({"errno": e.raw_os_error(), "error": e.to_string()}),
    };
    let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    let local = s.local_addr().map(|p| p.to_string()).unwrap_or_default();
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut resp = String::new();
    let read = s.read_to_string(&mut resp);
    serde_json::json!({
        "peer": peer,
        "local": local,
        "response": resp,
        "read_error": read.err().map(|e| e.to_string()),
        "fd": s.as_raw_fd(),
    })
}

/// Sends as fast as it can to `addr` from `threads` UDP sockets (one per thread), `n` sends
/// in all, and counts how each ended.
fn flood(addr: SocketAddr, n: u64, threads: u64) -> serde_json::Value {
    let start = Instant::now();
    let per = n / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let count = if t == threads - 1 {
                n - per * (threads - 1)
            } else {
                per
            };
            std::thread::spawn(move || {
                let s = UdpSocket::bind(if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                })
                .unwrap();
                let (mut sent, mut eperm, mut other) = (0u64, 0u64, 0u64);
                for _ in 0..count {
                    match s.send_to(b"x", addr) {
                        Ok(_) => sent += 1,
                        Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
                        Err(_) => other += 1,
                    }
                }
                (sent, eperm, other)
            })
        })
        .collect();
    let (mut sent, mut eperm, mut other) = (0, 0, 0);
    for h in handles {
        let (s, e, o) = h.join().unwrap();
        sent += s;
        eperm += e;
        other += o;
    }
    serde_json::json!({
        "sent": sent,
        "eperm": eperm,
        "other_errors": other,
        "elapsed_ms": start.elapsed().as_millis() as u64,
    })
}

fn udp(a: &str) -> serde_json::Value {
    let addr = parse(a);
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let s = UdpSocket::bind(bind).unwrap();
    match s.send_to(b"ping", addr) {
        Ok(_) => serde_json::json!({"sent": true}),
        Err(e) => serde_json::json!({"sent": false, "errno": e.raw_os_error()}),
    }
}

/// HTTPS GETs of `/hello` from a rustls client built on aws-lc-rs, which offers the hybrid
/// post-quantum group X25519MLKEM768 first: its key share alone is 1,216 bytes, so the
/// ClientHello runs past 1.5 KiB, as browsers' do. rustls shuffles its extensions per hello,
/// so across attempts the SNI lands both before and after byte 1024. Odd attempts write the
/// hello in 100-byte segments. The handshake verifies the leaf against $SSL_CERT_FILE (the
/// egress CA) for `name`: a leaf minted for another name fails it.
fn pq_tls(addr: &str, name: &str, attempts: usize) -> serde_json::Value {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer, ServerName};
    let ca = std::env::var("SSL_CERT_FILE").expect("SSL_CERT_FILE");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&ca).expect("the CA file") {
        roots.add(cert.expect("a CA certificate")).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // No session store: it would also remember that the server chose X25519 and send only
    // that share from the second hello on.
    config.resumption = rustls::client::Resumption::disabled();
    let config = std::sync::Arc::new(config);
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let results: Vec<serde_json::Value> = (0..attempts)
        .map(|i| {
            let mut conn =
                rustls::ClientConnection::new(config.clone(), server_name.clone()).unwrap();
            let mut hello = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut hello).unwrap();
            }
            let (sni_at, groups) = hello_layout(&hello);
            let outcome = (|| -> Result<String, String> {
                let mut tcp = connect_blocking(addr).map_err(|e| format!("connect: {e}"))?;
                tcp.set_nodelay(true).unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let chunk = if i % 2 == 1 { 100 } else { hello.len() };
                for part in hello.chunks(chunk) {
                    tcp.write_all(part).map_err(|e| format!("hello: {e}"))?;
                    std::thread::sleep(Duration::from_millis(2));
                }
                let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
                write!(
                    tls,
                    "GET /hello HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                )
                .map_err(|e| format!("handshake or request: {e}"))?;
                let mut resp = String::new();
                match tls.read_to_string(&mut resp) {
                    Ok(_) => Ok(resp),
                    // Some servers close without close_notify once the body is complete.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !resp.is_empty() => {
                        Ok(resp)
                    }
                    Err(e) => Err(format!("response: {e}")),
                }
            })();
            let mut v = serde_json::json!({
                "hello_len": hello.len(),
                "sni_at": sni_at,
                "groups": groups,
                "segments": if i % 2 == 1 { hello.len().div_ceil(100) } else { 1 },
            });
            match outcome {
                Ok(resp) => {
                    v["status_line"] = resp.lines().next().unwrap_or_default().into();
                    v["body"] = resp.rsplit("\r\n\r\n").next().unwrap_or_default().into();
                }
                Err(e) => v["error"] = e.into(),
            }
            v
        })
        .collect();
    serde_json::json!({ "attempts": results })
}

/// Where the SNI host name starts in a ClientHello record, and the groups of its key shares.
fn hello_layout(rec: &[u8]) -> (Option<usize>, Vec<u16>) {
    let u16_at = |i: usize| {
        rec.get(i..i + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    };
    // record header (5), handshake header (4), version (2), random (32)
    let mut i = 5 + 4 + 2 + 32;
    let Some(&sid) = rec.get(i) else {
        return (None, Vec::new());
    };
    i += 1 + usize::from(sid);
    i += 2 + u16_at(i).unwrap_or(0);
    i += 1 + usize::from(rec.get(i).copied().unwrap_or(0));
    let end = i + 2 + u16_at(i).unwrap_or(0);
    i += 2;
    let (mut sni_at, mut groups) = (None, Vec::new());
    while i + 4 <= end.min(rec.len()) {
        let (ty, len) = (u16_at(i).unwrap(), u16_at(i + 2).unwrap());
        let body = i + 4;
        match ty {
            // server_name: list length (2), name type (1), name length (2), name
            0 => sni_at = Some(body + 5),
            // key_share: shares length (2), then (group (2), length (2), key)*
            51 => {
                let mut j = body + 2;
                while j + 4 <= body + len {
                    groups.push(u16_at(j).unwrap() as u16);
                    j += 4 + u16_at(j + 2).unwrap();
                }
            }
            _ => {}
        }
        i = body + len;
    }
    (sni_at, groups)
}
