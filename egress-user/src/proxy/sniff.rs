//! Classifies a connection from the first bytes the client sent, without consuming them.
//!
//! The proxy peeks at the socket and calls [`classify`] until it stops answering
//! [`Sniff::NeedMore`]. For TLS it extracts what interception needs before any handshake:
//! the SNI (which leaf to mint, which policy applies) and the client's ALPN offer. The parser
//! only reads; the one copy it makes is for a ClientHello split across several TLS records,
//! which it has to join.
//!
//! Every answer other than `NeedMore` is final: a prefix of a valid ClientHello or HTTP
//! request is always `NeedMore`, so the caller may decide on the first non-`NeedMore`.

use std::borrow::Cow;

/// What the first bytes of a connection are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniff {
    /// A prefix of something recognisable: peek again after more bytes arrive.
    NeedMore,
    /// A complete, well-formed TLS ClientHello.
    Tls(ClientHelloInfo),
    /// An HTTP/1.x request line or the HTTP/2 prior-knowledge preface.
    Http,
    /// Anything else, including a malformed or oversized ClientHello.
    Other,
}

/// What interception needs from a ClientHello.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `host_name` from the server_name extension, validated and lowercased.
    pub sni: Option<String>,
    /// The ALPN protocols offered, in the client's order.
    pub alpn: Vec<Vec<u8>>,
}

/// The largest ClientHello accepted. Real ones are well under it (even with post-quantum key
/// shares), and the cap bounds what a client can make the proxy buffer before deciding.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// Longest SNI accepted: the DNS limit for a name in text form.
const MAX_SNI: usize = 253;

const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const RECORD_HEADER: usize = 5;
const HANDSHAKE_HEADER: usize = 4;
/// TLSPlaintext.length may not exceed 2^14.
const MAX_RECORD: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const SNI_HOST_NAME: u8 = 0;

/// Request-line starts that mark HTTP: the methods followed by their space, and the HTTP/2
/// preface's first line.
const HTTP_STARTS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
    b"PRI * HTTP/2.0",
];

/// Classifies the bytes peeked from the start of a connection.
pub fn classify(buf: &[u8]) -> Sniff {
    match buf.first() {
        None => Sniff::NeedMore,
        Some(&CONTENT_TYPE_HANDSHAKE) => classify_tls(buf),
        Some(_) => classify_http(buf),
    }
}

fn classify_http(buf: &[u8]) -> Sniff {
    let mut could_become = false;
    for start in HTTP_STARTS {
        if buf.starts_with(start) {
            return Sniff::Http;
        }
        could_become |= start.starts_with(buf);
    }
    if could_become {
        Sniff::NeedMore
    } else {
        Sniff::Other
    }
}

/// Why a ClientHello could not be read yet, or at all.
enum Stop {
    NeedMore,
    Malformed,
}

fn classify_tls(buf: &[u8]) -> Sniff {
    match client_hello_bytes(buf).and_then(|hello| parse_client_hello(&hello)) {
        Ok(info) => Sniff::Tls(info),
        Err(Stop::NeedMore) => Sniff::NeedMore,
        Err(Stop::Malformed) => Sniff::Other,
    }
}

/// Joins the handshake fragments of the leading records into the ClientHello message body,
/// borrowing when (as almost always) the first record holds it whole.
fn client_hello_bytes(buf: &[u8]) -> Result<Cow<'_, [u8]>, Stop> {
    let mut handshake: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    let mut rest = buf;
    loop {
        let Some(header) = rest.get(..RECORD_HEADER) else {
            check_partial_record_header(rest)?;
            return Err(Stop::NeedMore);
        };
        check_partial_record_header(header)?;
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        // Zero-length handshake fragments are forbidden (RFC 8446 §5.1).
        if len == 0 || len > MAX_RECORD {
            return Err(Stop::Malformed);
        }
        let body = &rest[RECORD_HEADER..];
        let (fragment, complete) = match body.get(..len) {
            Some(fragment) => (fragment, true),
            None => (body, false),
        };
        if handshake.is_empty() {
            handshake = Cow::Borrowed(fragment);
        } else {
            handshake.to_mut().extend_from_slice(fragment);
        }

        if let Some(&kind) = handshake.first() {
            if kind != HANDSHAKE_CLIENT_HELLO {
                return Err(Stop::Malformed);
            }
        }
        if let Some(h) = handshake.get(..HANDSHAKE_HEADER) {
            let msg_len = usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3]);
            if msg_len > MAX_CLIENT_HELLO {
                return Err(Stop::Malformed);
            }
            let total = HANDSHAKE_HEADER + msg_len;
            if handshake.len() >= total {
                return Ok(match handshake {
                    Cow::Borrowed(b) => Cow::Borrowed(&b[HANDSHAKE_HEADER..total]),
                    Cow::Owned(mut v) => {
                        v.truncate(total);
                        v.drain(..HANDSHAKE_HEADER);
                        Cow::Owned(v)
                    }
                });
            }
        }
        if !complete {
            return Err(Stop::NeedMore);
        }
        rest = &body[len..];
    }
}

/// Checks as much of a record header as has arrived: handshake content type and a TLS 1.x
/// (or SSL 3) legacy record version.
fn check_partial_record_header(header: &[u8]) -> Result<(), Stop> {
    let ok = header.first().is_none_or(|&t| t == CONTENT_TYPE_HANDSHAKE)
        && header.get(1).is_none_or(|&major| major == 3)
        && header.get(2).is_none_or(|&minor| minor <= 4);
    if ok {
        Ok(())
    } else {
        Err(Stop::Malformed)
    }
}

/// A bounds-checked reader over a complete message: running out of bytes here means the
/// message lied about its lengths, so it is malformed, not incomplete.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Stop> {
        if n > self.0.len() {
            return Err(Stop::Malformed);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Stop> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Stop> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self) -> Result<&'a [u8], Stop> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self) -> Result<Reader<'a>, Stop> {
        let n = self.u16()?;
        Ok(Reader(self.take(usize::from(n))?))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parses a ClientHello body (after the handshake header), RFC 8446 §4.1.2.
fn parse_client_hello(body: &[u8]) -> Result<ClientHelloInfo, Stop> {
    let mut r = Reader(body);
    let _legacy_version = r.take(2)?;
    let _random = r.take(32)?;
    if r.vec8()?.len() > 32 {
        return Err(Stop::Malformed);
    }
    let suites = r.vec16()?;
    if suites.0.is_empty() || suites.0.len() % 2 != 0 {
        return Err(Stop::Malformed);
    }
    if r.vec8()?.is_empty() {
        return Err(Stop::Malformed);
    }
    let mut info = ClientHelloInfo::default();
    // A TLS 1.2 hello may end here with no extensions at all.
    if r.is_empty() {
        return Ok(info);
    }
    let mut extensions = r.vec16()?;
    if !r.is_empty() {
        return Err(Stop::Malformed);
    }
    let (mut seen_sni, mut seen_alpn) = (false, false);
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vec16()?;
        match kind {
            EXT_SERVER_NAME => {
                if std::mem::replace(&mut seen_sni, true) {
                    return Err(Stop::Malformed);
                }
                info.sni = parse_server_name(&mut data)?;
            }
            EXT_ALPN => {
                if std::mem::replace(&mut seen_alpn, true) {
                    return Err(Stop::Malformed);
                }
                info.alpn = parse_alpn(&mut data)?;
            }
            _ => {}
        }
    }
    Ok(info)
}

/// RFC 6066 §3: a list of (type, name); at most one `host_name`.
fn parse_server_name(data: &mut Reader<'_>) -> Result<Option<String>, Stop> {
    let mut list = data.vec16()?;
    if !data.is_empty() || list.is_empty() {
        return Err(Stop::Malformed);
    }
    let mut host = None;
    while !list.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?.0;
        if kind == SNI_HOST_NAME {
            if host.is_some() {
                return Err(Stop::Malformed);
            }
            host = Some(validate_host(name)?);
        }
    }
    Ok(host)
}

/// An SNI we are willing to mint a certificate for and match policy against: LDH names plus
/// `_` (seen in the wild), at most 253 bytes, no empty labels; lowercased.
fn validate_host(name: &[u8]) -> Result<String, Stop> {
    let well_formed = !name.is_empty()
        && name.len() <= MAX_SNI
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && !name.starts_with(b".")
        && !name.windows(2).any(|w| w == b"..");
    if !well_formed {
        return Err(Stop::Malformed);
    }
    let mut host = String::with_capacity(name.len());
    host.extend(name.iter().map(|&b| char::from(b.to_ascii_lowercase())));
    // RFC 6066 forbids the trailing dot, but some clients send it; it names the same host.
    if host.ends_with('.') {
        host.pop();
    }
    Ok(host)
}

/// RFC 7301 §3.1: a non-empty list of non-empty protocol names.
fn parse_alpn(data: &mut Reader<'_>) -> Result<Vec<Vec<u8>>, Stop> {
    let mut list = data.vec16()?;
    if !data.is_empty() || list.is_empty() {
        return Err(Stop::Malformed);
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let name = list.vec8()?;
        if name.is_empty() {
            return Err(Stop::Malformed);
        }
        protocols.push(name.to_vec());
    }
    Ok(protocols)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::{ClientConfig, ClientConnection, RootCertStore};
    use rustls_pki_types::ServerName;

    use super::*;

    /// A real ClientHello, as rustls writes it for `name` offering h2 and http/1.1.
    fn client_hello(name: ServerName<'static>) -> Vec<u8> {
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut conn = ClientConnection::new(Arc::new(config), name).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("write hello");
        out
    }

    fn example_hello() -> Vec<u8> {
        client_hello(ServerName::try_from("example.com").expect("name"))
    }

    fn expected_example() -> Sniff {
        Sniff::Tls(ClientHelloInfo {
            sni: Some("example.com".into()),
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        })
    }

    /// Re-frames a single-record hello as two records, split `at` bytes into the handshake.
    fn split_records(hello: &[u8], at: usize) -> Vec<u8> {
        let payload = &hello[RECORD_HEADER..];
        assert_eq!(
            payload.len(),
            usize::from(u16::from_be_bytes([hello[3], hello[4]])),
            "fixture must be exactly one record"
        );
        let mut out = Vec::new();
        for part in [&payload[..at], &payload[at..]] {
            out.extend_from_slice(&hello[..3]);
            out.extend_from_slice(&u16::try_from(part.len()).expect("len").to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn assert_every_prefix_needs_more(bytes: &[u8]) {
        for len in 0..bytes.len() {
            assert_eq!(
                classify(&bytes[..len]),
                Sniff::NeedMore,
                "prefix of {len} of {} bytes",
                bytes.len()
            );
        }
    }

    #[test]
    fn a_real_client_hello_is_read() {
        let hello = example_hello();
        assert_eq!(classify(&hello), expected_example());
        // Bytes after the hello (early data, a second flight) do not change the answer.
        let mut more = hello.clone();
        more.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
        assert_eq!(classify(&more), expected_example());
    }

    #[test]
    fn every_prefix_of_a_client_hello_needs_more() {
        assert_every_prefix_needs_more(&example_hello());
    }

    #[test]
    fn a_client_hello_split_across_records_is_joined() {
        let hello = example_hello();
        let body_len = hello.len() - RECORD_HEADER;
        for at in [1, 2, 3, 4, 5, 40, body_len / 2, body_len - 1] {
            let split = split_records(&hello, at);
            assert_eq!(classify(&split), expected_example(), "split at {at}");
            assert_every_prefix_needs_more(&split);
        }
    }

    #[test]
    fn a_client_hello_in_one_byte_records_is_joined() {
        let hello = example_hello();
        let mut framed = Vec::new();
        for &b in &hello[RECORD_HEADER..] {
            framed.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x01, b]);
        }
        assert_eq!(classify(&framed), expected_example());
    }

    #[test]
    fn an_ip_server_name_sends_no_sni() {
        let hello = client_hello(ServerName::from(
            "192.0.2.1".parse::<std::net::IpAddr>().expect("ip"),
        ));
        assert_eq!(
            classify(&hello),
            Sniff::Tls(ClientHelloInfo {
                sni: None,
                alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            })
        );
    }

    /// A minimal TLS 1.2 hello built by hand, with `extensions` (None: no extensions block).
    fn handmade_hello(extensions: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0xAB; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0xC0, 0x2F]); // one suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        if let Some(ext) = extensions {
            body.extend_from_slice(&u16::try_from(ext.len()).expect("len").to_be_bytes());
            body.extend_from_slice(ext);
        }
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO, 0];
        msg.extend_from_slice(&u16::try_from(body.len()).expect("len").to_be_bytes());
        msg.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&u16::try_from(msg.len()).expect("len").to_be_bytes());
        record.extend_from_slice(&msg);
        record
    }

    fn sni_extension(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in names {
            list.push(*kind);
            list.extend_from_slice(&u16::try_from(name.len()).expect("len").to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&u16::try_from(list.len() + 2).expect("len").to_be_bytes());
        ext.extend_from_slice(&u16::try_from(list.len()).expect("len").to_be_bytes());
        ext.extend_from_slice(&list);
        ext
    }

    #[test]
    fn handmade_hellos() {
        assert_eq!(
            classify(&handmade_hello(None)),
            Sniff::Tls(ClientHelloInfo::default())
        );
        let upper = sni_extension(&[(0, b"API.Example.COM.")]);
        assert_eq!(
            classify(&handmade_hello(Some(&upper))),
            Sniff::Tls(ClientHelloInfo {
                sni: Some("api.example.com".into()),
                alpn: vec![],
            })
        );
        let underscore = sni_extension(&[(0, b"_svc.example")]);
        assert!(matches!(
            classify(&handmade_hello(Some(&underscore))),
            Sniff::Tls(ClientHelloInfo { sni: Some(s), .. }) if s == "_svc.example"
        ));
    }

    #[test]
    fn invalid_server_names_are_malformed() {
        let long = vec![b'a'; 254];
        let cases: &[&[(u8, &[u8])]] = &[
            &[(0, b"bad host")],
            &[(0, b"evil\0.example")],
            &[(0, b"caf\xc3\xa9.example")],
            &[(0, b"")],
            &[(0, b".example")],
            &[(0, b"a..example")],
            &[(0, &long)],
            &[(0, b"one.example"), (0, b"two.example")],
        ];
        for names in cases {
            let ext = sni_extension(names);
            assert_eq!(
                classify(&handmade_hello(Some(&ext))),
                Sniff::Other,
                "{names:?}"
            );
        }
        let max = vec![b'a'; 253];
        let ext = sni_extension(&[(0, &max)]);
        assert!(matches!(
            classify(&handmade_hello(Some(&ext))),
            Sniff::Tls(_)
        ));
    }

    #[test]
    fn malformed_hellos_are_other() {
        let hello = example_hello();
        // Not a ClientHello (a ServerHello type byte).
        let mut wrong_type = hello.clone();
        wrong_type[RECORD_HEADER] = 0x02;
        assert_eq!(classify(&wrong_type), Sniff::Other);
        // A record version that is not TLS.
        let mut wrong_version = hello.clone();
        wrong_version[1] = 0x02;
        assert_eq!(classify(&wrong_version), Sniff::Other);
        // A zero-length record.
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x00, 0x00, 0x01]),
            Sniff::Other
        );
        // A record longer than TLS allows.
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x40, 0x01]), Sniff::Other);
        // A handshake message over the cap, announced in its first bytes.
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x40, 0x01]),
            Sniff::Other
        );
        // An alert record where the hello's continuation should be.
        let mut interrupted = split_records(&hello, 10);
        interrupted[RECORD_HEADER + 10] = 0x15;
        assert_eq!(classify(&interrupted), Sniff::Other);
        // Inner lengths that overrun the message.
        let mut overrun = hello.clone();
        let session_id_len = RECORD_HEADER + HANDSHAKE_HEADER + 2 + 32;
        overrun[session_id_len] = 0xFF;
        assert_eq!(classify(&overrun), Sniff::Other);
        // Trailing bytes inside the message after the extensions.
        let mut handmade = handmade_hello(Some(&[]));
        handmade.push(0);
        let len = handmade.len() - RECORD_HEADER;
        handmade[3..5].copy_from_slice(&u16::try_from(len).expect("len").to_be_bytes());
        handmade[RECORD_HEADER + 3] += 1;
        assert_eq!(classify(&handmade), Sniff::Other);
    }

    #[test]
    fn a_hello_at_the_cap_is_accepted_and_over_it_is_not() {
        // Pad with an unknown extension so the body is exactly the cap.
        let base = handmade_hello(Some(&[])).len() - RECORD_HEADER - HANDSHAKE_HEADER;
        let pad = MAX_CLIENT_HELLO - base - 4;
        let mut ext = vec![0xFF, 0x01];
        ext.extend_from_slice(&u16::try_from(pad).expect("len").to_be_bytes());
        ext.resize(ext.len() + pad, 0);
        let hello = handmade_hello(Some(&ext));
        // One record cannot hold it: re-frame as records of at most 2^14 bytes.
        let msg = &hello[RECORD_HEADER..];
        assert_eq!(msg.len() - HANDSHAKE_HEADER, MAX_CLIENT_HELLO);
        let mut framed = Vec::new();
        for chunk in msg.chunks(MAX_RECORD) {
            framed.extend_from_slice(&[0x16, 0x03, 0x01]);
            framed.extend_from_slice(&u16::try_from(chunk.len()).expect("len").to_be_bytes());
            framed.extend_from_slice(chunk);
        }
        assert!(matches!(classify(&framed), Sniff::Tls(_)));

        let mut over = framed.clone();
        over[RECORD_HEADER + 3] += 1; // announce one byte more than the cap
        assert_eq!(classify(&over), Sniff::Other);
    }

    /// xorshift64*: deterministic, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % u64::try_from(n).expect("n")).expect("fits")
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for i in 0..4000 {
            let len = rng.below(600);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Steer a share of inputs past the first checks so the parser itself is exercised.
            if i % 2 == 0 && len >= 6 {
                buf[..3].copy_from_slice(&[0x16, 0x03, 0x01]);
                let body = u16::try_from(len - 5).expect("len");
                buf[3..5].copy_from_slice(&body.to_be_bytes());
                buf[5] = HANDSHAKE_CLIENT_HELLO;
            }
            let _ = classify(&buf);
        }
    }

    #[test]
    fn mutated_hellos_never_panic() {
        let hello = example_hello();
        let mut rng = Rng(42);
        for _ in 0..3000 {
            let mut buf = hello.clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(buf.len());
                buf[at] = rng.next() as u8;
            }
            let cut = rng.below(buf.len() + 1);
            let verdict = classify(&buf[..cut]);
            if let Sniff::Tls(info) = verdict {
                if let Some(sni) = info.sni {
                    assert!(sni.len() <= MAX_SNI);
                    assert!(!sni.bytes().any(|b| b.is_ascii_uppercase()));
                }
            }
        }
    }

    #[test]
    fn http_is_recognised() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Sniff::Http);
        assert_eq!(classify(b"GET / HTTP/1.1"), Sniff::Http);
        assert_eq!(classify(b"CONNECT example.com:443 HTTP/1.1"), Sniff::Http);
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Sniff::Http);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Sniff::Http);
        for prefix in [
            &b"G"[..],
            b"GE",
            b"GET",
            b"P",
            b"PO",
            b"PAT",
            b"PRI * HTTP/2",
            b"DELETE",
        ] {
            assert_eq!(classify(prefix), Sniff::NeedMore, "{prefix:?}");
        }
        assert_eq!(classify(b""), Sniff::NeedMore);
    }

    #[test]
    fn other_protocols_are_other() {
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.6\r\n"), Sniff::Other);
        assert_eq!(classify(b"S"), Sniff::Other);
        assert_eq!(
            classify(b"get / HTTP/1.1"),
            Sniff::Other,
            "methods are case-sensitive"
        );
        assert_eq!(classify(b"GETX / HTTP/1.1"), Sniff::Other);
        assert_eq!(classify(b"PRI * HTTP/1.1"), Sniff::Other);
        assert_eq!(classify(b"\x00\x00\x00\x00"), Sniff::Other);
        assert_eq!(classify(b"\x16\x02"), Sniff::Other);
        assert_eq!(classify(b"\x16\x03\x09"), Sniff::Other);
    }
}
