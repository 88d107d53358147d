//! Bounded status messages. An error status often quotes what the peer sent (a path, a job id, a
//! machine name); a peer can send megabytes there. The status travels as the `grpc-message`
//! header, and an HTTP/2 peer refuses a header block beyond its limit (16 KiB by default) by
//! resetting the whole connection: the caller would see a broken connection (INTERNAL) instead of
//! the status, and so would every other call on that connection. [`ClipStatus`] wraps a service
//! and shortens any `grpc-message` of a response's headers (a handler's error) to
//! [`MAX_STATUS_MESSAGE`] bytes; statuses sent at the end of a stream are clipped where they are
//! made ([`clip_status`]).

use std::task::{Context, Poll};

use tonic::codegen::http::{HeaderMap, Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::{Code, Status};

/// The longest status message sent, in bytes (before percent-encoding).
pub const MAX_STATUS_MESSAGE: usize = 2048;

/// `s` cut to [`MAX_STATUS_MESSAGE`] bytes (at a character boundary), saying so.
pub fn clip_message(s: &str) -> String {
    crate::store::clip_to(s, MAX_STATUS_MESSAGE)
}

/// A status with its message clipped to [`MAX_STATUS_MESSAGE`] bytes.
pub fn clip_status(code: Code, message: &str) -> Status {
    Status::new(code, clip_message(message))
}

/// Clips the `grpc-message` header in `headers`, if there is one and it is too long.
pub fn clip_headers(headers: &mut HeaderMap) {
    let too_long = headers
        .get(Status::GRPC_MESSAGE)
        .is_some_and(|v| v.len() > MAX_STATUS_MESSAGE);
    if !too_long {
        return;
    }
    let status = match Status::from_header_map(headers) {
        Some(s) => clip_status(s.code(), s.message()),
        None => return,
    };
    headers.remove(Status::GRPC_MESSAGE);
    if status.add_header(headers).is_err() {
        // Cannot happen (the message is percent-encoded); never send the long one anyway.
        headers.remove(Status::GRPC_MESSAGE);
    }
}

/// A gRPC service whose error statuses have bounded messages (see the module docs).
#[derive(Debug, Clone)]
pub struct ClipStatus<S> {
    inner: S,
}

impl<S> ClipStatus<S> {
    pub fn new(inner: S) -> Self {
        ClipStatus { inner }
    }
}

impl<S: NamedService> NamedService for ClipStatus<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<Request<B>> for ClipStatus<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Response<R>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            clip_headers(resp.headers_mut());
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_clipped_short_ones_kept() {
        let mut h = HeaderMap::new();
        Status::invalid_argument("short é")
            .add_header(&mut h)
            .unwrap();
        let before = h.clone();
        clip_headers(&mut h);
        assert_eq!(h, before);

        let long = format!("bad path {}", "é/".repeat(100_000));
        let mut h = HeaderMap::new();
        Status::invalid_argument(long.clone())
            .add_header(&mut h)
            .unwrap();
        clip_headers(&mut h);
        let s = Status::from_header_map(&h).unwrap();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().starts_with("bad path é/"), "{}", s.message());
        assert!(s.message().len() < MAX_STATUS_MESSAGE + 40);
        assert!(s.message().ends_with(&format!("({} bytes)", long.len())));
        assert!(h[Status::GRPC_MESSAGE].len() < 4 * MAX_STATUS_MESSAGE);
    }
}
