//! The connection sniffer (`proxy::sniff::classify`): the first bytes a sandboxed client
//! sends, TLS ClientHello or HTTP, read before any handshake.
//!
//! Properties beyond "never panics":
//! - an answer other than `NeedMore` is final: every longer prefix gets the same answer
//!   (the proxy decides on the first such answer while bytes are still arriving);
//! - an SNI is what policy matching assumes: lowercase, no trailing dot, at most 253 bytes of
//!   letters, digits, `-`, `.` and `_`; every ALPN name is non-empty.
#![no_main]

use egress_user::proxy::sniff::{classify, Sniff};
use libfuzzer_sys::fuzz_target;

/// Above this, check a sample of prefixes rather than all of them, to keep runs fast.
const ALL_PREFIXES_UP_TO: usize = 2048;

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    if let Sniff::Tls(info) = &whole {
        if let Some(sni) = &info.sni {
            assert!(
                !sni.is_empty() && sni.len() <= 253,
                "SNI length {}",
                sni.len()
            );
            assert!(
                sni.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'-' | b'.' | b'_')),
                "SNI {sni:?} has a byte policy matching does not expect"
            );
            assert!(!sni.ends_with('.') && !sni.starts_with('.'), "SNI {sni:?}");
        }
        assert!(info.alpn.iter().all(|p| !p.is_empty()), "empty ALPN name");
    }

    let step = (data.len() / ALL_PREFIXES_UP_TO).max(1);
    let mut decided: Option<(usize, Sniff)> = None;
    for len in (0..data.len()).step_by(step) {
        let verdict = classify(&data[..len]);
        if let Some((at, first)) = &decided {
            assert_eq!(
                &verdict, first,
                "the answer at {at} bytes changed at {len} bytes"
            );
        } else if verdict != Sniff::NeedMore {
            assert_eq!(
                verdict,
                whole,
                "the answer at {len} bytes differs from the answer for all {} bytes",
                data.len()
            );
            decided = Some((len, verdict));
        }
    }
});
