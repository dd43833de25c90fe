//! The accept loop in front of the axum app: a cap on open connections, header, body and
//! idle timeouts, TCP_NODELAY, the peer address as `ConnectInfo`, and a graceful drain
//! bounded by the grace period.
//!
//! Why not `axum::serve`: it has no connection cap and no timeouts, so 200 slowloris
//! clients sending a byte a second hold 200 connections (and their tasks) for as long as
//! they like. The shape follows mini-redis's `server.rs` (a semaphore permit taken before
//! `accept`, so excess clients wait in the kernel's backlog rather than in our memory) and
//! axum's own `serve` (one task per connection, a watch channel to drain them).
//!
//! Malformed HTTP/1 that hyper rejects itself (a request line or header it cannot parse,
//! headers past its size limit) is answered by hyper with a bare `400`/`431` and no body:
//! hyper writes that response inside its parser and offers no hook to replace it, and no
//! request ever reaches the app. Everything that does parse gets an OpenAI error body.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes, HttpBody},
    extract::ConnectInfo,
    http::Request,
};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    time::{Instant, Sleep},
};

use crate::config::ServerConfig;

/// The limits of the HTTP server; defaults are `ServerConfig::default()`'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerLimits {
    /// Open connections at most (`server.max_connections`, default 1024).
    pub max_connections: usize,
    /// Time to send the request headers (default 10 s); on HTTP/1 also the longest wait
    /// for the next request on a kept-alive connection, since hyper starts this timer as
    /// soon as a connection waits for a request head.
    pub header_read_timeout: Duration,
    /// Time to send a whole request body, counted from its headers (default 60 s).
    pub body_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (default 60 s).
    pub idle_timeout: Duration,
    /// How long in-flight requests may run after shutdown starts (default 30 s).
    pub grace: Duration,
}

impl ServerLimits {
    /// The limits set in `[server]`.
    pub fn from_config(server: &ServerConfig) -> ServerLimits {
        ServerLimits {
            max_connections: server.max_connections,
            header_read_timeout: server.header_read_timeout,
            body_read_timeout: server.body_read_timeout,
            idle_timeout: server.idle_timeout,
            grace: server.shutdown_grace,
        }
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits::from_config(&ServerConfig::default())
    }
}

/// What the connection tasks are told, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Finish the requests in flight, take no new ones.
    Draining,
    /// The grace period is over: drop the connection.
    Closing,
}

/// Serve `app` on `listener` until `shutdown` resolves; then stop accepting, let in-flight
/// requests finish within `limits.grace`, close what is left and return.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ServerLimits,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (phase_tx, phase_rx) = watch::channel(Phase::Serving);
    tokio::pin!(shutdown);
    loop {
        // The permit first: at the cap, new clients wait in the backlog, not in our memory.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed; nothing left to serve if it were
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: retrying at once would spin.
                    tracing::warn!(%err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection = serve_connection(stream, peer, app.clone(), limits, phase_rx.clone());
        tokio::spawn(async move {
            connection.await;
            drop(permit);
        });
    }
    drop(listener);
    drain(phase_tx, phase_rx, limits.grace).await;
    Ok(())
}

/// Tell every connection to finish, wait up to `grace` for them, then close the rest.
async fn drain(phase_tx: watch::Sender<Phase>, phase_rx: watch::Receiver<Phase>, grace: Duration) {
    tracing::info!(grace = %humantime::format_duration(grace), "shutting down: draining in-flight requests");
    // Our own receiver would keep `closed()` from ever resolving.
    drop(phase_rx);
    let _ = phase_tx.send(Phase::Draining);
    if tokio::time::timeout(grace, phase_tx.closed()).await.is_err() {
        tracing::warn!("grace period over; closing the remaining connections");
        let _ = phase_tx.send(Phase::Closing);
        // The tasks drop their connections at once; a moment lets the sockets close.
        let _ = tokio::time::timeout(Duration::from_secs(1), phase_tx.closed()).await;
    }
}

/// One connection, HTTP/1 or HTTP/2, until the client leaves, it idles out, or shutdown.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: axum::Router,
    limits: ServerLimits,
    mut phase: watch::Receiver<Phase>,
) {
    // Without TCP_NODELAY a small SSE frame written after the previous one waits for the
    // client's delayed ACK (~40 ms per frame on a kept-alive connection).
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%err, "cannot set TCP_NODELAY");
    }
    let activity = Arc::new(Activity::new());
    let service = connection_service(app, peer, activity.clone(), limits.body_read_timeout);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let idle = idle_out(&activity, limits.idle_timeout);
    tokio::pin!(idle);
    // hyper's header timer starts only once the HTTP/1 parser runs; before that the auto
    // builder waits for bytes to tell HTTP/1 from HTTP/2, for ever. A connection that has
    // not begun a request within the header timeout is dropped.
    let first_request = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(first_request);
    let mut first_checked = false;
    let mut closing = false;
    loop {
        tokio::select! {
            () = &mut first_request, if !first_checked => {
                first_checked = true;
                if !activity.seen_request() {
                    tracing::debug!(%peer, "no request within the header timeout; closed");
                    return;
                }
            }
            result = connection.as_mut() => {
                if let Err(err) = result {
                    // A client that hangs up or times out is routine, not an error of ours.
                    tracing::debug!(%peer, %err, "connection ended");
                }
                return;
            }
            () = &mut idle, if !closing => {
                tracing::debug!(%peer, "idle connection closed");
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            changed = phase.changed() => match (changed, *phase.borrow_and_update()) {
                (Ok(()), Phase::Serving) => {}
                (Ok(()), Phase::Draining) => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                (Ok(()), Phase::Closing) | (Err(_), _) => return,
            },
        }
    }
}

/// The app as one connection's hyper service: each request counted in `activity` until
/// its response body is dropped, and prepared by [`prepare`].
fn connection_service(
    app: axum::Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
    body_timeout: Duration,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Future<Output = Result<axum::response::Response, Infallible>> + Send,
> + Clone {
    let app = TowerToHyperService::new(app);
    hyper::service::service_fn(move |request: Request<Incoming>| {
        let guard = InFlight::enter(&activity);
        let request = prepare(request, peer, body_timeout);
        let response = hyper::service::Service::call(&app, request);
        async move {
            let response = response.await?;
            Ok::<_, Infallible>(response.map(|body| {
                Body::new(GuardedBody {
                    inner: body,
                    _guard: guard,
                })
            }))
        }
    })
}

/// The request as the app sees it: the peer address for `ConnectInfo<SocketAddr>` (per-
/// client fairness reads it) and a body that must arrive within `body_timeout`.
fn prepare(request: Request<Incoming>, peer: SocketAddr, body_timeout: Duration) -> Request<Body> {
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(ConnectInfo(peer));
    Request::from_parts(parts, Body::new(DeadlineBody::new(body, body_timeout)))
}

// === impl Activity ===

/// Requests in flight on one connection and when it last became idle.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    /// Whether any request head has arrived.
    seen: AtomicBool,
    idle_since: Mutex<Instant>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            seen: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    fn seen_request(&self) -> bool {
        self.seen.load(Ordering::Acquire)
    }

    /// How much longer the connection may stay idle; `None` while a request is in flight.
    fn idle_left(&self, limit: Duration) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = *self.idle_since.lock().unwrap_or_else(|p| p.into_inner());
        Some(limit.saturating_sub(since.elapsed()))
    }
}

/// Resolves once the connection has had no request in flight for `limit`.
async fn idle_out(activity: &Activity, limit: Duration) {
    loop {
        match activity.idle_left(limit) {
            Some(left) if left.is_zero() => return,
            Some(left) => tokio::time::sleep(left).await,
            // A request's end restarts the clock, so a full period is the soonest it can end.
            None => tokio::time::sleep(limit).await,
        }
    }
}

/// Counts one request from its head until its response body is dropped (sent in full,
/// or the client left).
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.seen.store(true, Ordering::Release);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight while it is sent.
struct GuardedBody {
    inner: Body,
    _guard: InFlight,
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body took longer than `server.body_read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {}", humantime::format_duration(*.0))]
pub struct BodyTimeout(Duration);

/// A request body with a deadline for the whole of it, not per chunk: a client sending a
/// byte a second would reset a per-chunk timer forever.
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration) -> DeadlineBody {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout(this.timeout).into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
