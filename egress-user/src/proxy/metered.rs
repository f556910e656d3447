//! Body wrappers that count bytes, so each request's audit record carries bytes up and down
//! and its full duration, written when the response body ends (or is cut off).

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::upstream::{Body, BoxError};

/// Counts the data bytes of a request body into a shared counter.
pub struct Counted {
    inner: Body,
    count: Arc<AtomicU64>,
}

impl Counted {
    pub fn new(inner: Body, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Called once with (bytes sent to the client, whether the body completed).
pub type OnEnd = Box<dyn FnOnce(u64, bool) + Send + Sync>;

/// A response body that reports its size when it ends, or when it is dropped early (client
/// gone, upstream reset): every request gets exactly one record either way.
pub struct Reported {
    inner: Body,
    bytes: u64,
    on_end: Option<OnEnd>,
}

impl Reported {
    pub fn new(inner: Body, on_end: OnEnd) -> Self {
        Self {
            inner,
            bytes: 0,
            on_end: Some(on_end),
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(f) = self.on_end.take() {
            f(self.bytes, complete);
        }
    }
}

impl HttpBody for Reported {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Reported {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}
