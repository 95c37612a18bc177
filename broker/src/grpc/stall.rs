//! The frame timeout on the gRPC port: a request message that starts and
//! does not finish within `--frame-timeout` ends its call.
//!
//! On txmq's own port a frame the peer stops sending (or trickles) closes
//! the connection, so that half-sent frames cannot hold the broker's
//! memory. Over gRPC the unit is a call's message (a 5-byte prefix with its
//! length, then the protobuf), many calls share one HTTP/2 connection, and
//! tonic keeps the bytes of a message until it is whole (up to the front
//! door's request limit). So the limit here is per message: once a
//! message's first byte has arrived, the rest must arrive within the
//! timeout, or the call is answered `DEADLINE_EXCEEDED` and its buffered
//! bytes are dropped. The connection and its other calls go on. Time
//! between messages (a telemetry stream at rest, a request whose headers
//! came before its body) does not count, and neither does time the call's
//! reader spends on what it was handed before it asks for more (a
//! telemetry command being handled while the next one's start waits): the
//! clock starts when the reader is handed the message's first byte.

use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::Status;

/// Bytes of a gRPC message's prefix: a compression flag and a 4-byte
/// big-endian length.
const PREFIX: usize = 5;

/// The service `S` with each request's body under the frame timeout.
#[derive(Clone)]
pub(super) struct StallLimit<S> {
    inner: S,
    timeout: Duration,
}

impl<S> StallLimit<S> {
    /// `timeout` zero (or too far off to reach): no limit.
    pub(super) fn new(inner: S, timeout: Duration) -> StallLimit<S> {
        let reachable = Instant::now().checked_add(timeout).is_some();
        StallLimit {
            inner,
            timeout: if reachable { timeout } else { Duration::ZERO },
        }
    }
}

impl<S: NamedService> NamedService for StallLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for StallLimit<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if self.timeout.is_zero() {
            return self.inner.call(request);
        }
        let peer = request
            .extensions()
            .get::<super::incoming::Peer>()
            .and_then(|p| p.addr);
        let rpc = request.uri().path_and_query().cloned();
        let timeout = self.timeout;
        self.inner.call(request.map(|body| {
            Body::new(Watched {
                body,
                timeout,
                peer,
                rpc,
                message: Message::default(),
                deadline: None,
                handed: None,
                ended: false,
            })
        }))
    }
}

/// Where the body stands in the message it is carrying.
#[derive(Default)]
struct Message {
    /// Bytes of the prefix seen (0 between messages).
    prefix: usize,
    /// The length, as far as its bytes have been seen.
    length: u32,
    /// Bytes of the message after its prefix still to come.
    rest: u64,
}

impl Message {
    /// Takes `data` in; whether a message is under way after it, and
    /// whether one started within it.
    fn take(&mut self, mut data: &[u8]) -> (bool, bool) {
        let mut started = false;
        while !data.is_empty() {
            if self.prefix < PREFIX {
                if self.prefix == 0 {
                    started = true;
                }
                let n = (PREFIX - self.prefix).min(data.len());
                for &b in &data[..n] {
                    if self.prefix > 0 {
                        self.length = self.length << 8 | u32::from(b);
                    }
                    self.prefix += 1;
                }
                data = &data[n..];
                if self.prefix == PREFIX {
                    self.rest = u64::from(self.length);
                }
            } else {
                let n = self.rest.min(data.len() as u64);
                self.rest -= n;
                data = &data[n as usize..];
            }
            if self.prefix == PREFIX && self.rest == 0 {
                *self = Message::default();
            }
        }
        (self.prefix > 0, started)
    }
}

/// A request body whose messages must each arrive within the timeout.
struct Watched {
    body: Body,
    timeout: Duration,
    peer: Option<SocketAddr>,
    rpc: Option<http::uri::PathAndQuery>,
    message: Message,
    /// While a message is under way: when it must be whole.
    deadline: Option<Pin<Box<Sleep>>>,
    /// While a message is under way: when a frame of it was last handed
    /// to the reader, whose time until it asks again does not count.
    handed: Option<Instant>,
    ended: bool,
}

impl Watched {
    fn stalled(&mut self) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.ended = true;
        self.deadline = None;
        let timeout = humantime::format_duration(self.timeout);
        tracing::warn!(
            peer = ?self.peer,
            rpc = self.rpc.as_ref().map_or("", http::uri::PathAndQuery::path),
            %timeout,
            "a gRPC message started and did not finish within the frame timeout: its call is ended"
        );
        Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
            "the request's message started and did not arrive whole within the broker's \
             --frame-timeout ({timeout}); nothing of it was taken"
        )))))
    }
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let (Some(handed), Some(sleep)) = (this.handed.take(), this.deadline.as_mut()) {
            // The reader was busy with what it was handed: that time is
            // not the peer's.
            let later = sleep.deadline() + handed.elapsed();
            sleep.as_mut().reset(later);
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let (under_way, started) = this.message.take(data);
                    if !under_way {
                        this.deadline = None;
                    } else if started {
                        // The message under way began in this frame.
                        let at = Instant::now() + this.timeout;
                        match &mut this.deadline {
                            Some(sleep) => sleep.as_mut().reset(at),
                            None => this.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
                        }
                    } else if this
                        .deadline
                        .as_ref()
                        .is_some_and(|sleep| sleep.deadline() <= Instant::now())
                    {
                        // Trickled: bytes keep coming, the message not whole.
                        return this.stalled();
                    }
                    if this.deadline.is_some() {
                        this.handed = Some(Instant::now());
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                let due = (this.deadline.as_mut())
                    .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                if due {
                    this.stalled()
                } else {
                    Poll::Pending
                }
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body fed by the test; pending while nothing is queued.
    struct Fed(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

    impl http_body::Body for Fed {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_runs_from_a_messages_first_byte_and_not_while_the_reader_is_busy() {
        let (feed, fed) = tokio::sync::mpsc::unbounded_channel();
        let mut watched = Watched {
            body: Body::new(Fed(fed)),
            timeout: Duration::from_secs(1),
            peer: None,
            rpc: None,
            message: Message::default(),
            deadline: None,
            handed: None,
            ended: false,
        };
        let mut poll = move || {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            match http_body::Body::poll_frame(Pin::new(&mut watched), &mut cx) {
                Poll::Pending => "pending",
                Poll::Ready(Some(Ok(_))) => "frame",
                Poll::Ready(Some(Err(s))) if s.code() == tonic::Code::DeadlineExceeded => "stalled",
                Poll::Ready(other) => panic!("{other:?}"),
            }
        };
        // Between messages the clock does not run.
        assert_eq!(poll(), "pending");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(poll(), "pending");
        // A whole message and three bytes of the next one's prefix.
        let mut chunk = framed(2);
        chunk.extend_from_slice(&framed(4)[..3]);
        feed.send(chunk.into()).unwrap();
        assert_eq!(poll(), "frame");
        // The reader busy for three seconds with what it was handed.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(poll(), "pending");
        tokio::time::advance(Duration::from_millis(900)).await;
        assert_eq!(poll(), "pending");
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(poll(), "stalled");
    }

    fn framed(len: u32) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len as usize));
        v
    }

    #[test]
    fn messages_are_followed_across_any_cut_of_their_bytes() {
        let mut two = framed(300);
        two.extend(framed(0));
        two.extend(framed(2));
        for cut in 0..two.len() {
            let mut m = Message::default();
            let (under_way, _) = m.take(&two[..cut]);
            assert_eq!(under_way, ![0, 305, 310].contains(&cut), "cut at {cut}");
            let (under_way, _) = m.take(&two[cut..]);
            assert!(!under_way, "whole after the rest (cut at {cut})");
        }
        let mut m = Message::default();
        assert_eq!(m.take(&[0, 0, 0]), (true, true));
        assert_eq!(m.take(&[1, 0]), (true, false), "256 bytes to come");
        assert_eq!(m.take(&[1; 255]), (true, false));
        assert_eq!(m.take(&[1]), (false, false));
        assert_eq!(m.take(&framed(1)[..3]), (true, true));
    }
}
