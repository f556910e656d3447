//! The streaming secret scanner (`secrets::Plan::wrap_body`), differentially: a body cut
//! into chunks at fuzzer-chosen places must come out exactly as the same body given in one
//! chunk (same bytes after substitution, or the same violation). Placeholders and secret
//! values straddling a cut are where a streaming scanner goes wrong.
//!
//! Input: `[plan][n][n cut offsets, u16 LE][body]`. `plan` picks the request's host, and so
//! which secrets are authorized; each cut offset is taken modulo the body length + 1.
//!
//! Also: toward a host with no secret, the body passes unchanged or fails; toward a host
//! every secret is for, it never fails.
#![no_main]

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::{pin, Pin},
    sync::LazyLock,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use egress_user::{
    policy::HostPattern,
    secrets::{Secret, SecretValue, Secrets, Violation, ViolationError},
};
use hyper::body::{Body, Frame};
use libfuzzer_sys::fuzz_target;

/// Values full of bytes that base64 and percent-encoding change; one placeholder is a
/// prefix of another, so leftmost-longest matching matters.
const SECRETS: &[(&str, &str, &[&str])] = &[
    (
        "EGRESS_SECRET_OPENAI",
        "sk-REALVALUE-0penai+/=Xyz~q",
        &["api.openai.com", "all.example"],
    ),
    (
        "EGRESS_SECRET_GH",
        "ghp_REALGITHUB_token_1234",
        &["github.com", "*.github.com", "all.example"],
    ),
    (
        "EGRESS_SECRET_GHE",
        "a b/c+d~e*f'(x)",
        &["ghe.example", "all.example"],
    ),
];

/// Request hosts: every secret authorized, some, one, none.
const HOSTS: &[&str] = &[
    "all.example",
    "api.openai.com",
    "ghe.example",
    "elsewhere.example",
];
const ALL: usize = 0;
const NONE: usize = 3;

static SET: LazyLock<Secrets> = LazyLock::new(|| {
    Secrets::new(
        SECRETS
            .iter()
            .map(|(placeholder, value, hosts)| {
                Secret::new(
                    *placeholder,
                    SecretValue::new(*value).expect("fixture value"),
                    hosts
                        .iter()
                        .map(|h| h.parse::<HostPattern>().expect("fixture host"))
                        .collect(),
                )
                .expect("fixture secret")
            })
            .collect(),
    )
    .expect("fixture secrets compile")
});

/// A body that yields the given chunks and never waits.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

/// Everything the wrapped body yields, then its violation if it failed.
fn drain(host: &str, chunks: Vec<Bytes>) -> (Vec<u8>, Option<Violation>) {
    let mut body = pin!(SET.plan(host).wrap_body(Chunks(chunks.into())));
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    loop {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Pending => panic!("nothing here ever waits"),
            Poll::Ready(None) => return (out, None),
            Poll::Ready(Some(Ok(frame))) => {
                let data = frame.into_data().expect("only data frames go in");
                assert!(!data.is_empty(), "an empty data frame was emitted");
                out.extend_from_slice(&data);
            }
            Poll::Ready(Some(Err(e))) => {
                let v = e
                    .downcast_ref::<ViolationError>()
                    .expect("the body only fails on a violation");
                return (out, Some(v.0.clone()));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [plan, n, rest @ ..] = data else {
        return;
    };
    let n = usize::from(*n % 16);
    let Some((cut_bytes, body)) = rest.split_at_checked(2 * n) else {
        return;
    };
    let host = HOSTS[usize::from(*plan) % HOSTS.len()];
    let mut cuts: Vec<usize> = cut_bytes
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (body.len() + 1))
        .collect();
    cuts.sort_unstable();

    let mut chunks = Vec::with_capacity(cuts.len() + 1);
    let mut at = 0;
    for c in cuts.into_iter().chain([body.len()]) {
        chunks.push(Bytes::copy_from_slice(&body[at..c]));
        at = c;
    }

    let (whole, whole_violation) = drain(host, vec![Bytes::copy_from_slice(body)]);
    let (streamed, streamed_violation) = drain(host, chunks.clone());
    assert_eq!(
        streamed_violation,
        whole_violation,
        "streamed in {} chunks toward {host}: a different verdict than in one",
        chunks.len()
    );
    if whole_violation.is_none() {
        assert!(
            streamed == whole,
            "streamed in chunks of {:?} toward {host}: {} bytes out, one-shot {} bytes",
            chunks.iter().map(Bytes::len).collect::<Vec<_>>(),
            streamed.len(),
            whole.len()
        );
    }
    if host == HOSTS[NONE] {
        if whole_violation.is_none() {
            assert_eq!(
                whole, body,
                "a body toward a host with no secret was changed"
            );
        }
        assert!(
            body.starts_with(&streamed),
            "sent bytes are not a prefix of the body"
        );
    }
    if host == HOSTS[ALL] {
        assert_eq!(
            whole_violation, None,
            "every secret is authorized toward {host}"
        );
    }
});
