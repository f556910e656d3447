//! What the DNS listener does with bytes from a sandbox, and with the upstream's reply, as
//! in `dns::answer` without the sockets: `dns::message` parses the query, the policy
//! decides its name, a refusal or error reply is built, and the upstream's reply is
//! inspected (for audit and pins) and shortened for UDP.
//!
//! Input: DNS-over-TCP framing of the query (a two-byte big-endian length, then the query),
//! and whatever follows as the upstream's reply.
//!
//! Properties beyond "never panics":
//! - an error reply echoes the query's id and has the QR bit set;
//! - a refusal fits the client's UDP limit and decodes as a reply to the same id with the
//!   rcode asked for;
//! - a reply that matches the query is shortened to the client's UDP limit.
#![no_main]

use std::{path::Path, sync::LazyLock};

use egress_user::{
    dns::{message, tunnel},
    policy::{file::parse, SandboxPolicy},
};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use libfuzzer_sys::fuzz_target;

/// A policy with each kind of entry, so the decision walks every list.
static POLICY: LazyLock<SandboxPolicy> = LazyLock::new(|| {
    let text = r#"
[sandbox.fuzz]
allow = ["*.example.com", "pypi.org", "10.0.0.0/8"]
deny = ["evil.example.com"]
passthrough = ["bank.example"]
"#;
    let mut file = parse(text, Path::new("fuzz.toml")).expect("the fixture policy parses");
    file.sandboxes.remove("fuzz").expect("sandbox fuzz")
});

fuzz_target!(|data: &[u8]| {
    let (query, reply) = match data {
        [a, b, rest @ ..] => {
            let n = usize::from(u16::from_be_bytes([*a, *b])).min(rest.len());
            rest.split_at(n)
        }
        _ => return,
    };

    let q = match message::parse_query(query) {
        Ok(q) => q,
        Err(message::ParseError::NotAQuery) => return,
        Err(e) => {
            let code = match e {
                message::ParseError::Unsupported { .. } => ResponseCode::NotImp,
                _ => ResponseCode::FormErr,
            };
            if let Some(r) = message::error_response(query, code) {
                assert!(
                    r.len() >= message::HEADER_LEN,
                    "error reply of {} bytes",
                    r.len()
                );
                assert_eq!(r[..2], query[..2], "error reply does not echo the id");
                assert_ne!(r[2] & 0x80, 0, "error reply without QR");
            }
            return;
        }
    };
    assert_eq!(q.raw, query);
    let _ = tunnel::suspicion(&q.name);
    let _ = POLICY.host_decision(&q.name);

    let limit = message::udp_limit(&q);
    assert!((512..=4096).contains(&limit), "UDP limit {limit}");
    for (rcode, ede) in [
        (
            ResponseCode::NXDomain,
            Some((15, "egress: host is not in the allowlist")),
        ),
        (ResponseCode::ServFail, None),
    ] {
        let r = message::refuse(&q, rcode, ede);
        assert!(
            r.len() <= limit,
            "refusal of {} bytes, limit {limit}",
            r.len()
        );
        let m = Message::from_vec(&r).expect("a refusal decodes");
        assert_eq!(m.id, q.id);
        assert_eq!(m.message_type, MessageType::Response);
        assert_eq!(m.response_code, rcode);
    }

    if let Ok(answer) = message::inspect_response(reply, &q) {
        // Only a reply the upstream module accepted (same question) is sent on; it must then
        // fit the client's limit.
        let _ = answer;
        let short = message::truncate_for_udp(reply, limit);
        assert!(
            short.len() <= limit,
            "UDP reply of {} bytes, limit {limit}",
            short.len()
        );
    }
    let _ = message::truncate_for_udp(reply, 512);
});
