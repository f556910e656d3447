//! The streaming side of a [`Plan`]: a request body wrapper that replaces authorized
//! placeholders and stops at forbidden patterns, even when either straddles chunks.
//!
//! Between chunks it holds back at most (longest pattern − 1) bytes, the most a pattern
//! starting in them could still need; everything before that is final and sent on. So
//! memory stays bounded whatever the body size, and output lags input by that tail only.

use std::{
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::{splice, violation, Form, Hit, Plan, Violation};

pub use crate::BoxError;

/// What a [`ScanBody`] fails with when a forbidden pattern shows up. Find it in the error
/// chain with `downcast_ref`, or read [`ScanBody::violation_handle`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ViolationError(pub Violation);

pin_project_lite::pin_project! {
    /// A request body seen through a [`Plan`]. See [`Plan::wrap_body`].
    pub struct ScanBody<B> {
        #[pin]
        inner: B,
        scan: Option<Scanner>,
        violation: Arc<OnceLock<Violation>>,
    }
}

struct Scanner {
    plan: Plan,
    /// The held-back bytes: not yet known not to start a pattern.
    tail: Bytes,
    /// Trailers that arrived while the tail still had to be sent.
    held: Option<Frame<Bytes>>,
    done: bool,
}

impl<B> ScanBody<B> {
    pub(super) fn new(inner: B, plan: Option<Plan>) -> Self {
        Self {
            inner,
            scan: plan.map(|plan| Scanner {
                plan,
                tail: Bytes::new(),
                held: None,
                done: false,
            }),
            violation: Arc::default(),
        }
    }

    /// Filled with the violation when the body fails on one, so the proxy can audit it after
    /// handing the body to the client connection.
    pub fn violation_handle(&self) -> Arc<OnceLock<Violation>> {
        self.violation.clone()
    }

    pub fn violation(&self) -> Option<&Violation> {
        self.violation.get()
    }
}

impl Scanner {
    /// Takes the next chunk (or, at `eof`, nothing more) and returns the bytes now final.
    fn push(&mut self, chunk: Bytes, eof: bool) -> Result<Bytes, Violation> {
        let Some(c) = self.plan.compiled.as_deref() else {
            return Ok(chunk);
        };
        let hay = if self.tail.is_empty() {
            chunk
        } else {
            let mut v = Vec::with_capacity(self.tail.len() + chunk.len());
            v.extend_from_slice(&self.tail);
            v.extend_from_slice(&chunk);
            Bytes::from(v)
        };
        // Any pattern starting before `commit` ends inside `hay`, so matches there are
        // final; leftmost-longest also cannot prefer one starting later.
        let commit = if eof {
            hay.len()
        } else {
            hay.len().saturating_sub(c.max_pattern_len() - 1)
        };
        let mut hits: Vec<Hit> = Vec::new();
        self.plan
            .find(c, &hay, commit, &mut hits)
            .map_err(|e| violation(c, e, "body", Form::Plain))?;
        let end = hits.last().map_or(commit, |h| h.end.max(commit));
        // Copy the tail out so that it does not pin the whole previous chunk in memory.
        self.tail = Bytes::copy_from_slice(&hay[end..]);
        Ok(if hits.is_empty() {
            hay.slice(..end)
        } else {
            Bytes::from(splice(&hay[..end], &hits, |i| c.secrets[i].value.expose()))
        })
    }
}

impl<B> Body for ScanBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let Some(scan) = this.scan.as_mut() else {
            return this.inner.poll_frame(cx).map_err(Into::into);
        };
        loop {
            if let Some(f) = scan.held.take() {
                return Poll::Ready(Some(Ok(f)));
            }
            if scan.done {
                return Poll::Ready(None);
            }
            let (chunk, eof, trailers) = match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => (data, false, None),
                    // Trailers come after the last data frame: flush the tail first.
                    Err(other) => (Bytes::new(), true, Some(other)),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => (Bytes::new(), true, None),
            };
            match scan.push(chunk, eof) {
                Ok(out) => {
                    scan.done = eof;
                    scan.held = trailers;
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Err(v) => {
                    scan.done = true;
                    scan.tail = Bytes::new();
                    let _ = this.violation.set(v.clone());
                    return Poll::Ready(Some(Err(Box::new(ViolationError(v)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.scan {
            None => self.inner.is_end_stream(),
            Some(s) => {
                s.held.is_none() && (s.done || (s.tail.is_empty() && self.inner.is_end_stream()))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let Some(s) = &self.scan else {
            return inner;
        };
        if s.done {
            return SizeHint::with_exact(0);
        }
        let tail = s.tail.len() as u64;
        if s.plan.rewrites_body() {
            if tail == 0 && inner.exact() == Some(0) {
                return SizeHint::with_exact(0);
            }
            return SizeHint::new();
        }
        // Only scanning: the length is unchanged, part of it just sits in the tail.
        let mut h = SizeHint::new();
        h.set_lower(inner.lower() + tail);
        if let Some(u) = inner.upper() {
            h.set_upper(u + tail);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, convert::Infallible, pin::pin, task::Waker};

    use http::HeaderMap;

    use super::*;
    use crate::secrets::tests::{fixture, GH, GH_VALUE, OPENAI, OPENAI_VALUE};

    /// A body that yields the given frames, never waits, and knows its size.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Frames {
        fn chunks(chunks: impl IntoIterator<Item = Bytes>) -> Self {
            Self(chunks.into_iter().map(Frame::data).collect())
        }

        fn split(body: &[u8], cuts: &[usize]) -> Self {
            let mut at = 0;
            let mut out = Vec::new();
            for &c in cuts.iter().chain([&body.len()]) {
                out.push(Bytes::copy_from_slice(&body[at..c]));
                at = c;
            }
            Self::chunks(out)
        }
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            if self.0.iter().any(|f| !f.is_data()) {
                return SizeHint::new();
            }
            SizeHint::with_exact(
                self.0
                    .iter()
                    .filter_map(|f| f.data_ref())
                    .map(|d| d.len() as u64)
                    .sum(),
            )
        }
    }

    #[derive(Debug, Default)]
    struct Drained {
        chunks: Vec<Bytes>,
        trailers: Option<HeaderMap>,
        error: Option<BoxError>,
    }

    impl Drained {
        fn bytes(&self) -> Vec<u8> {
            self.chunks.concat()
        }
    }

    fn drain<B: Body<Data = Bytes, Error = BoxError>>(body: B) -> Drained {
        let mut body = pin!(body);
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Drained::default();
        loop {
            match body.as_mut().poll_frame(&mut cx) {
                Poll::Pending => panic!("test bodies never wait"),
                Poll::Ready(None) => break,
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => {
                        assert!(!d.is_empty(), "empty data frames should not be emitted");
                        assert!(out.trailers.is_none(), "data after trailers");
                        out.chunks.push(d);
                    }
                    Err(f) => out.trailers = Some(f.into_trailers().expect("trailers")),
                },
                Poll::Ready(Some(Err(e))) => {
                    out.error = Some(e);
                    break;
                }
            }
        }
        assert!(body.is_end_stream(), "body should report its end");
        out
    }

    fn violation_of(d: &Drained) -> &Violation {
        let e = d.error.as_ref().expect("the body should fail");
        &e.downcast_ref::<ViolationError>()
            .expect("a ViolationError")
            .0
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// A deterministic xorshift, enough to pick split points.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// Every way of cutting `body`: 1-byte chunks, each single cut, and random cuts.
    fn splits(body: &[u8]) -> Vec<Vec<usize>> {
        let mut out = vec![(1..body.len()).collect::<Vec<_>>(), vec![]];
        out.extend((1..body.len()).map(|c| vec![c]));
        let mut rng = Rng(0x5eed_1234_abcd_ef01);
        for _ in 0..200 {
            let mut cuts: Vec<usize> = (0..rng.below(8)).map(|_| rng.below(body.len())).collect();
            cuts.sort_unstable();
            out.push(cuts);
        }
        out
    }

    #[test]
    fn placeholders_replaced_across_every_split() {
        let body = concat!(
            r#"{"a":"EGRESS_SECRET_OPENAI","b":"EGRESS_SECRET_GH "#,
            r#"EGRESS_SECRET_OPENAIEGRESS_SECRET_OPENAI","c":"EGRESS_SECRET_"}"#
        );
        let want = body.replace(OPENAI, OPENAI_VALUE).replace(GH, GH_VALUE);
        let plan = fixture().plan("both.example");
        assert!(plan.rewrites_body());
        for cuts in splits(body.as_bytes()) {
            let d = drain(plan.wrap_body(Frames::split(body.as_bytes(), &cuts)));
            assert!(d.error.is_none(), "cuts {cuts:?}: {:?}", d.error);
            assert_eq!(
                String::from_utf8(d.bytes()).expect("utf8"),
                want,
                "cuts {cuts:?}"
            );
        }
    }

    #[test]
    fn forbidden_forms_fail_the_body_across_every_split() {
        use base64::{engine::general_purpose::STANDARD, Engine as _};
        let b64 = STANDARD.encode(format!("user:{OPENAI_VALUE}"));
        let url = "sk-REALVALUE-0penai%2B%2F%3DXyz~q";
        let cases = [
            (
                "token=EGRESS_SECRET_GH&x=1".to_owned(),
                GH,
                Form::Placeholder,
                GH,
            ),
            (
                format!("{{\"k\":\"{OPENAI_VALUE}\"}}"),
                OPENAI,
                Form::Plain,
                OPENAI_VALUE,
            ),
            (format!("auth={b64}"), OPENAI, Form::Base64, b64.as_str()),
            (format!("k={url}&z"), OPENAI, Form::UrlEncoded, url),
        ];
        let plan = fixture().plan("elsewhere.example");
        for (body, secret, form, needle) in cases {
            for cuts in splits(body.as_bytes()) {
                let wrapped = plan.wrap_body(Frames::split(body.as_bytes(), &cuts));
                let handle = wrapped.violation_handle();
                let d = drain(wrapped);
                let v = violation_of(&d);
                assert_eq!(
                    (v.placeholder.as_str(), v.form, v.location),
                    (secret, form, "body"),
                    "{body} {cuts:?}"
                );
                assert_eq!(handle.get(), Some(v), "handle filled");
                // What went out before the failure is a prefix of the body that stops
                // short of the forbidden text.
                let sent = d.bytes();
                assert!(body.as_bytes().starts_with(&sent), "{cuts:?}");
                assert!(
                    !contains(&sent, needle.as_bytes()),
                    "{needle} sent, {cuts:?}"
                );
            }
        }
    }

    #[test]
    fn value_to_its_own_host_passes_unchanged() {
        let body = format!("key={OPENAI_VALUE}&again={OPENAI_VALUE}");
        let plan = fixture().plan("api.openai.com");
        for cuts in splits(body.as_bytes()) {
            let d = drain(plan.wrap_body(Frames::split(body.as_bytes(), &cuts)));
            assert!(d.error.is_none(), "{:?}", d.error);
            assert_eq!(d.bytes(), body.as_bytes());
        }
    }

    #[test]
    fn large_body_streams_with_bounded_buffering() {
        const CHUNK: usize = 64 * 1024;
        let mut body = Vec::with_capacity(10 << 20);
        let mut i = 0u32;
        while body.len() < 10 << 20 {
            body.extend_from_slice(format!("line {i} lorem ipsum dolor sit amet\n").as_bytes());
            if i.is_multiple_of(5000) {
                body.extend_from_slice(b"EGRESS_SECRET_OPENAI\n");
            }
            i += 1;
        }
        let want = String::from_utf8(body.clone())
            .expect("utf8")
            .replace(OPENAI, OPENAI_VALUE)
            .into_bytes();
        let chunks: Vec<Bytes> = body.chunks(CHUNK).map(Bytes::copy_from_slice).collect();
        let plan = fixture().plan("api.openai.com");
        let max_pattern = plan.compiled.as_ref().expect("compiled").max_pattern_len();
        let n_in = chunks.len();
        let d = drain(plan.wrap_body(Frames::chunks(chunks)));
        assert!(d.error.is_none(), "{:?}", d.error);
        let growth = OPENAI_VALUE.len(); // at most one placeholder per chunk here
        for c in &d.chunks {
            assert!(
                c.len() <= CHUNK + max_pattern + growth,
                "chunk of {} bytes",
                c.len()
            );
        }
        assert!(d.chunks.len() >= n_in - 1, "output is not streamed");
        assert_eq!(d.bytes(), want);

        // Scanning only, toward a host with no secrets: the same bytes, in chunks no
        // larger than the input's.
        let clean: Vec<u8> = String::from_utf8(body.clone())
            .expect("utf8")
            .replace("EGRESS_SECRET_OPENAI\n", "")
            .into_bytes();
        let chunks: Vec<Bytes> = clean.chunks(CHUNK).map(Bytes::copy_from_slice).collect();
        let d = drain(
            fixture()
                .plan("elsewhere.example")
                .wrap_body(Frames::chunks(chunks)),
        );
        assert!(d.error.is_none(), "{:?}", d.error);
        assert!(d.chunks.iter().all(|c| c.len() <= CHUNK));
        assert_eq!(d.bytes(), clean);

        // And the placeholder deep inside the large body is still caught there.
        let chunks: Vec<Bytes> = body.chunks(CHUNK).map(Bytes::copy_from_slice).collect();
        let d = drain(
            fixture()
                .plan("elsewhere.example")
                .wrap_body(Frames::chunks(chunks)),
        );
        assert_eq!(violation_of(&d).form, Form::Placeholder);
    }

    #[test]
    fn trailers_follow_the_flushed_tail() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().expect("value"));
        let frames = Frames(VecDeque::from([
            Frame::data(Bytes::from_static(b"hello EGRESS_SECRET_")),
            Frame::data(Bytes::from_static(b"OPENAI")),
            Frame::trailers(trailers.clone()),
        ]));
        let d = drain(fixture().plan("api.openai.com").wrap_body(frames));
        assert_eq!(d.bytes(), format!("hello {OPENAI_VALUE}").as_bytes());
        assert_eq!(d.trailers, Some(trailers));
    }

    #[test]
    fn size_hints() {
        let body = || Frames::chunks([Bytes::from_static(b"0123456789")]);
        let scanning = fixture().plan("elsewhere.example").wrap_body(body());
        assert_eq!(scanning.size_hint().exact(), Some(10));
        let rewriting = fixture().plan("api.openai.com").wrap_body(body());
        assert_eq!(rewriting.size_hint().exact(), None);
        let empty = fixture()
            .plan("api.openai.com")
            .wrap_body(Frames::chunks([]));
        assert_eq!(empty.size_hint().exact(), Some(0));
        assert!(empty.is_end_stream());
        let noop = crate::secrets::Secrets::default()
            .plan("x")
            .wrap_body(body());
        assert_eq!(noop.size_hint().exact(), Some(10));
    }

    #[test]
    fn wrapped_body_fits_hyper_and_boxed_bodies() {
        fn assert_bounds<T: Body + Send + Sync + Unpin + 'static>() {}
        assert_bounds::<ScanBody<Frames>>();
    }

    #[test]
    fn noop_plan_passes_frames_through() {
        let chunks = [
            Bytes::from_static(b"EGRESS_SECRET_OPENAI"),
            Bytes::from_static(b"x"),
        ];
        let plan = crate::secrets::Secrets::default().plan("x");
        let d = drain(plan.wrap_body(Frames::chunks(chunks.clone())));
        assert_eq!(d.chunks, chunks);
        assert!(d.error.is_none());
    }
}
