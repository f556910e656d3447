//! Properties, checked with proptest on generated inputs, of what the README and the module
//! docs promise about host patterns (`pattern.rs`), path globs (`policy/glob.rs`) and the
//! encodings a secret is recognised in (`secrets.rs`, `secrets/forms.rs`). Each property is
//! stated from the documented behaviour, not from the implementation; path globs are also
//! checked against a naive backtracking matcher written here.

use base64::{
    engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD},
    Engine as _,
};
use egress_user::{
    policy::{file::parse, normalize_host, HostPattern, PathGlob, RequestDecision},
    secrets::{ApplyError, Form, Secret, SecretValue, Secrets, Violation},
};
use proptest::prelude::*;

// ---- Host patterns ----

/// A DNS label as policies and SNIs spell them: letters, digits, `-`, `_`.
fn label() -> impl Strategy<Value = String> {
    "[a-z0-9_-]{1,12}"
}

fn name(max_labels: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 1..=max_labels).prop_map(|l| l.join("."))
}

/// Randomly upper-cases ASCII letters.
fn recase(s: &str, mask: u64) -> String {
    s.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

fn pat(s: &str) -> HostPattern {
    s.parse()
        .unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
}

proptest! {
    /// `*.D` matches every name below D, however deep, and nothing else: not D itself, not a
    /// name that merely ends with D's text, not D with something after it.
    #[test]
    fn wildcard_matches_exactly_the_subdomains(
        domain in name(3),
        sub in name(3),
        glued in label(),
        other in name(2),
    ) {
        let p = pat(&format!("*.{domain}"));
        let below = format!("{sub}.{domain}");
        prop_assert!(p.matches(&below), "{p} should match {below}");
        prop_assert!(!p.matches(&domain), "{p} matched its apex");
        let sibling = format!("{glued}{domain}");
        prop_assert!(!p.matches(&sibling), "{p} matched {sibling}");
        let beyond = format!("{below}.{other}");
        let still_below = beyond.ends_with(&format!(".{domain}"));
        prop_assert!(!p.matches(&beyond) || still_below, "{p} matched {beyond}");
    }

    /// An exact name matches itself and none of its subdomains or parents.
    #[test]
    fn exact_name_matches_only_itself(host in name(4), sub in label()) {
        let p = pat(&host);
        prop_assert!(p.matches(&host));
        let below = format!("{sub}.{host}");
        prop_assert!(!p.matches(&below));
        if let Some((_, parent)) = host.split_once('.') {
            prop_assert!(!p.matches(parent));
        }
    }

    /// Case and a trailing dot do not matter, in the pattern or (once normalised, as the
    /// proxy and the DNS listener do) in the host, nor does a port on the host.
    #[test]
    fn case_trailing_dot_and_port_do_not_matter(
        domain in name(3),
        sub in name(2),
        wild in any::<bool>(),
        masks in any::<[u64; 2]>(),
        dot in any::<bool>(),
        port in prop::option::of(1u16..),
    ) {
        let text = if wild { format!("*.{domain}") } else { domain.clone() };
        let p = pat(&text);
        let variant = format!("{}{}", recase(&text, masks[0]), if dot { "." } else { "" });
        prop_assert_eq!(pat(&variant), p.clone());

        let host = if wild { format!("{sub}.{domain}") } else { domain.clone() };
        let mut spelled = recase(&host, masks[1]);
        if dot {
            spelled.push('.');
        }
        if let Some(port) = port {
            spelled = format!("{spelled}:{port}");
        }
        prop_assert!(p.matches(&normalize_host(&spelled)), "{p} vs {spelled:?}");
    }

    /// What a pattern prints parses back to the same pattern.
    #[test]
    fn display_round_trips(domain in name(3), wild in any::<bool>(), v4 in any::<[u8; 4]>(), len in 0u8..=32) {
        for text in [
            if wild { format!("*.{domain}") } else { domain.clone() },
            format!("{}/{len}", std::net::Ipv4Addr::from(v4)),
        ] {
            let p = pat(&text);
            prop_assert_eq!(pat(&p.to_string()), p);
        }
    }

    /// `A/N` matches exactly the addresses whose first N bits are A's, and an IPv4 address
    /// written v4-mapped in IPv6 matches the same v4 patterns.
    #[test]
    fn cidr_matches_its_prefix(net in any::<u32>(), len in 0u8..=32, ip in any::<u32>()) {
        let p = pat(&format!("{}/{len}", std::net::Ipv4Addr::from(net)));
        let same_prefix = (0..u32::from(len)).all(|i| (net >> (31 - i)) & 1 == (ip >> (31 - i)) & 1);
        let host = std::net::Ipv4Addr::from(ip);
        prop_assert_eq!(p.matches(&host.to_string()), same_prefix, "{} vs {}", p, host);
        let mapped = format!("[{}]", host.to_ipv6_mapped());
        prop_assert_eq!(p.matches(&mapped), same_prefix, "{} vs {}", p, mapped);
    }

    /// `*` matches every host.
    #[test]
    fn star_matches_everything(host in "\\PC{0,40}") {
        prop_assert!(pat("*").matches(&host));
    }
}

// ---- Path globs ----

/// Glob semantics from the PathGlob docs, by plain backtracking over characters: `*` any
/// run without `/`, `**` any run, `?` one character other than `/`.
fn reference_match(glob: &[char], path: &[char]) -> bool {
    match glob {
        [] => path.is_empty(),
        ['*', '*', rest @ ..] => (0..=path.len()).any(|i| reference_match(rest, &path[i..])),
        ['*', rest @ ..] => (0..=path.len())
            .take_while(|&i| i == 0 || path[i - 1] != '/')
            .any(|i| reference_match(rest, &path[i..])),
        ['?', rest @ ..] => {
            matches!(path.first(), Some(c) if *c != '/') && reference_match(rest, &path[1..])
        }
        [c, rest @ ..] => path.first() == Some(c) && reference_match(rest, &path[1..]),
    }
}

/// Globs built from pieces (so `***` never occurs) over a small alphabet, so that matches
/// are frequent.
fn glob_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("/"),
            Just("a"),
            Just("b"),
            Just("é"),
            Just("?"),
            Just("*"),
            Just("**")
        ],
        0..8,
    )
    .prop_map(|pieces| {
        let mut s = String::from("/");
        for p in pieces {
            // Keep `*` and `**` apart so that two pieces do not glue into `***`.
            if p.starts_with('*') && s.ends_with('*') {
                s.push('a');
            }
            s.push_str(p);
        }
        s
    })
}

fn path_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![Just('/'), Just('a'), Just('b'), Just('é')],
        0..10,
    )
    .prop_map(|c| std::iter::once('/').chain(c).collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The compiled glob agrees with the documented semantics on every path.
    #[test]
    fn glob_agrees_with_the_reference(glob in glob_text(), path in path_text()) {
        let g = PathGlob::parse(&glob).expect("generated globs are valid");
        let want = reference_match(&glob.chars().collect::<Vec<_>>(), &path.chars().collect::<Vec<_>>());
        prop_assert_eq!(g.matches(&path), want, "glob {} path {}", glob, path);
    }

    /// A glob without wildcards matches exactly its own text.
    #[test]
    fn literal_glob_matches_only_itself(lit in "/[a-z/._-]{0,12}", other in "/[a-z/._-]{0,12}") {
        let g = PathGlob::parse(&lit).expect("literal");
        prop_assert!(g.matches(&lit));
        prop_assert_eq!(g.matches(&other), other == lit);
    }

    /// `/p/**` matches everything below `/p/` (and `/p/` itself), but not `/p`; `/p/*`
    /// matches one segment only.
    #[test]
    fn star_star_and_star(prefix in "/[a-z]{1,6}", rest in "[a-z/]{0,12}") {
        let below = format!("{prefix}/{rest}");
        let any = PathGlob::parse(&format!("{prefix}/**")).expect("glob");
        let one = PathGlob::parse(&format!("{prefix}/*")).expect("glob");
        prop_assert!(any.matches(&below));
        prop_assert!(!any.matches(&prefix));
        prop_assert_eq!(one.matches(&below), !rest.contains('/'));
    }

    /// A path with a `.` or `..` segment (also as `%2e`) never passes a rule's path globs,
    /// so `/api/../admin` cannot pass `/api/**`.
    #[test]
    fn dot_segments_never_pass_a_path_rule(
        before in prop::collection::vec("[a-z]{1,5}", 0..3),
        dots in prop_oneof![Just("."), Just(".."), Just("%2e"), Just("%2E%2e"), Just(".%2E")],
        after in prop::collection::vec("[a-z]{1,5}", 0..3),
    ) {
        let file = parse(
            "[sandbox.s]\nallow = [\"api.example\"]\n[[sandbox.s.rule]]\nhost = \"api.example\"\npaths = [\"/**\"]\n",
            std::path::Path::new("p.toml"),
        )
        .expect("fixture policy");
        let s = &file.sandboxes["s"];
        let mut segs = before;
        segs.push(dots.to_owned());
        segs.extend(after);
        let path = format!("/{}", segs.join("/"));
        let verdict = s.request_decision("api.example", &http::Method::GET, &path);
        prop_assert!(matches!(verdict, RequestDecision::Deny { .. }), "{} passed", path);
    }
}

// ---- Secret encodings ----

const PLACEHOLDER: &str = "EGRESS_SECRET_PROP";
const HOST: &str = "api.example";

fn secrets_for(value: &[u8]) -> Secrets {
    Secrets::new(vec![Secret::new(
        PLACEHOLDER,
        SecretValue::new(value.to_vec()).expect("value length is in range"),
        vec![pat(HOST)],
    )
    .expect("placeholder ok")])
    .expect("compiles")
}

/// A secret value: 8 to 40 bytes of anything, or of printable ASCII (which can sit in a
/// header).
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 8..40)
}

fn printable_value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0x21u8..0x7f, 8..40)
}

/// Runs a body through the plan for `host` in one chunk.
fn body_verdict(set: &Secrets, host: &str, body: &[u8]) -> Result<Vec<u8>, Violation> {
    use std::{
        pin::pin,
        task::{Context, Poll, Waker},
    };
    let inner = http_body_util::Full::new(bytes::Bytes::copy_from_slice(body));
    let mut wrapped = pin!(set.plan(host).wrap_body(inner));
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    loop {
        match hyper::body::Body::poll_frame(wrapped.as_mut(), &mut cx) {
            Poll::Pending => panic!("a Full body never waits"),
            Poll::Ready(None) => return Ok(out),
            Poll::Ready(Some(Ok(f))) => out.extend_from_slice(&f.into_data().expect("data")),
            Poll::Ready(Some(Err(e))) => {
                return Err(e
                    .downcast_ref::<egress_user::secrets::ViolationError>()
                    .expect("a violation")
                    .0
                    .clone())
            }
        }
    }
}

/// Percent-encodes as a given encoder does: bytes in `keep` and alphanumerics stay.
fn percent(value: &[u8], keep: &[u8], space_as_plus: bool, upper: bool) -> String {
    let mut s = String::new();
    for &b in value {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            s.push(char::from(b));
        } else if b == b' ' && space_as_plus {
            s.push('+');
        } else if upper {
            s.push_str(&format!("%{b:02X}"));
        } else {
            s.push_str(&format!("%{b:02x}"));
        }
    }
    s
}

/// What common encoders keep: RFC 3986 (curl, Python `quote(safe="")`), Go `QueryEscape` /
/// Python `quote_plus`, WHATWG forms, JavaScript `encodeURIComponent`, Python `quote`.
const ENCODERS: &[(&[u8], bool)] = &[
    (b"-._~", false),
    (b"-._~", true),
    (b"*-._", true),
    (b"-_.!~*'()", false),
    (b"-._~/", false),
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The value base64-encoded inside any longer blob (any alignment, standard or URL-safe,
    /// padded or not) is caught in a body bound elsewhere.
    #[test]
    fn base64_of_the_value_is_found_at_any_alignment(
        v in value(),
        prefix in prop::collection::vec(any::<u8>(), 0..6),
        suffix in prop::collection::vec(any::<u8>(), 0..6),
        engine in 0usize..4,
    ) {
        let mut blob = prefix;
        blob.extend_from_slice(&v);
        blob.extend_from_slice(&suffix);
        let encoded = match engine {
            0 => STANDARD.encode(&blob),
            1 => STANDARD_NO_PAD.encode(&blob),
            2 => URL_SAFE.encode(&blob),
            _ => URL_SAFE_NO_PAD.encode(&blob),
        };
        let body = format!("{{\"blob\":\"{encoded}\"}}");
        let verdict = body_verdict(&secrets_for(&v), "elsewhere.example", body.as_bytes());
        let violation = verdict.expect_err("the encoded value passed");
        prop_assert_eq!(violation.placeholder, PLACEHOLDER);
    }

    /// The value percent-encoded by any common encoder, in either hex case, is caught in a
    /// body bound elsewhere.
    #[test]
    fn url_encoded_value_is_found_in_a_body(v in value(), enc in 0..ENCODERS.len(), upper in any::<bool>()) {
        let (keep, plus) = ENCODERS[enc];
        let body = format!("a=1&k={}&z=2", percent(&v, keep, plus, upper));
        let violation = body_verdict(&secrets_for(&v), "elsewhere.example", body.as_bytes())
            .expect_err("the encoded value passed");
        prop_assert!(matches!(violation.form, Form::UrlEncoded | Form::Plain), "{:?}", violation.form);
    }

    /// In a query, any percent-encoding at all (each byte escaped or not, either hex case)
    /// is caught: the query is also scanned decoded.
    #[test]
    fn any_percent_encoding_is_found_in_a_query(v in value(), escape in any::<u64>(), upper in any::<bool>()) {
        let mut q = String::new();
        for (i, &b) in v.iter().enumerate() {
            if b.is_ascii_alphanumeric() && escape >> (i % 64) & 1 == 0 {
                q.push(char::from(b));
            } else if upper {
                q.push_str(&format!("%{b:02X}"));
            } else {
                q.push_str(&format!("%{b:02x}"));
            }
        }
        let mut parts = http::Request::builder()
            .uri(format!("/x?k={q}"))
            .body(())
            .expect("request")
            .into_parts()
            .0;
        match secrets_for(&v).plan("elsewhere.example").apply_head(&mut parts) {
            Err(ApplyError::Violation(violation)) => {
                prop_assert_eq!(violation.placeholder, PLACEHOLDER);
            }
            other => {
                prop_assert!(false, "query {} passed: {:?}", q, other);
            }
        }
    }

    /// Round trip: a placeholder in a query, swapped toward its host, decodes (as the
    /// upstream decodes the component) to exactly the value, whatever bytes it holds.
    #[test]
    fn placeholder_in_a_query_decodes_to_the_value(v in value(), before in "[a-z]{0,4}") {
        let mut parts = http::Request::builder()
            .uri(format!("/x?k={before}{PLACEHOLDER}&z=1"))
            .body(())
            .expect("request")
            .into_parts()
            .0;
        let n = secrets_for(&v).plan(HOST).apply_head(&mut parts).expect("authorized");
        prop_assert_eq!(n, 1);
        let query = parts.uri.query().expect("query").to_owned();
        let k = query.split('&').next().expect("k=").strip_prefix("k=").expect("k=");
        let mut want = before.into_bytes();
        want.extend_from_slice(&v);
        prop_assert_eq!(percent_decode(k.as_bytes()), want);
    }

    /// Round trip: a placeholder inside Basic credentials comes out as the value inside
    /// valid base64 credentials.
    #[test]
    fn placeholder_in_basic_credentials_decodes_to_the_value(v in printable_value(), user in "[a-z]{1,8}") {
        let creds = STANDARD.encode(format!("{user}:{PLACEHOLDER}"));
        let mut parts = http::Request::builder()
            .uri("/")
            .header("authorization", format!("Basic {creds}"))
            .body(())
            .expect("request")
            .into_parts()
            .0;
        secrets_for(&v).plan(HOST).apply_head(&mut parts).expect("authorized");
        let header = parts.headers["authorization"].as_bytes();
        let token = header.strip_prefix(b"Basic ").expect("still Basic");
        let mut want = format!("{user}:").into_bytes();
        want.extend_from_slice(&v);
        prop_assert_eq!(STANDARD.decode(token).expect("valid base64"), want);
    }

    /// Round trip in a body: every placeholder becomes the value, nothing else changes.
    #[test]
    fn placeholders_in_a_body_become_the_value(
        v in value(),
        pieces in prop::collection::vec(prop_oneof![Just(None), "[a-z {}\":,]{0,8}".prop_map(Some)], 0..8),
    ) {
        let (mut body, mut want) = (Vec::new(), Vec::new());
        for p in pieces {
            match p {
                None => {
                    body.extend_from_slice(PLACEHOLDER.as_bytes());
                    want.extend_from_slice(&v);
                }
                Some(text) => {
                    body.extend_from_slice(text.as_bytes());
                    want.extend_from_slice(text.as_bytes());
                }
            }
        }
        let out = body_verdict(&secrets_for(&v), HOST, &body).expect("authorized");
        prop_assert_eq!(out, want);
    }
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            if let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}
