//! The metadata HTTP service of one VM: a hyper server whose listener was made inside the
//! VM's network namespace, so every request it accepts comes from that VM — attribution by
//! listener, never by a header or an address the guest controls. What it answers is up to
//! the [`Handler`] set for the VM (seed 001's `SetHTTPHandler`), replaceable at any time.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpListener;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// A response of the metadata service.
pub type Reply = Response<Full<Bytes>>;

/// What a handler's future resolves to.
pub type ReplyFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// Answers the requests of one VM.
pub trait Handler: Send + Sync + 'static {
    /// Answers `request`.
    fn handle(&self, request: Request<Incoming>) -> ReplyFuture;
}

/// Protection against a guest that holds connections open or dribbles bytes.
#[derive(Debug, Clone, Copy)]
pub struct ServiceLimits {
    /// Connections served at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// Time to send a request's headers (also the idle time between keep-alive requests).
    pub header_timeout: Duration,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        ServiceLimits {
            max_connections: 16,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// A plain-text reply.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The handler of a VM before one is set: the guest is told to come back.
struct NotYet;

impl Handler for NotYet {
    fn handle(&self, _request: Request<Incoming>) -> ReplyFuture {
        Box::pin(async { text(StatusCode::SERVICE_UNAVAILABLE, "no handler set yet\n") })
    }
}

/// The running service; stops serving (and closes its connections) when dropped.
pub struct MetadataService {
    handler: Arc<RwLock<Arc<dyn Handler>>>,
    accept_loop: JoinHandle<()>,
    /// Connections accepted and not yet served to their end.
    open: Arc<AtomicUsize>,
}

impl MetadataService {
    /// Serves connections accepted on `listener` (already bound in the VM's namespace).
    pub fn start(listener: std::net::TcpListener, limits: ServiceLimits) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let handler: Arc<RwLock<Arc<dyn Handler>>> = Arc::new(RwLock::new(Arc::new(NotYet)));
        let slot = handler.clone();
        let open = Arc::new(AtomicUsize::new(0));
        let accept_loop = tokio::spawn(accept_loop(listener, slot, limits, open.clone()));
        Ok(MetadataService {
            handler,
            accept_loop,
            open,
        })
    }

    /// Connections accepted and not yet served to their end (a long poll is one).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Stops the service for good and returns how many connections it cut off (accepted and
    /// not served to their end): their peers learn of it only when they next read.
    pub async fn stop(mut self) -> usize {
        self.accept_loop.abort();
        // Once the loop is gone no connection is accepted any more; its connections went with
        // it, and those that had not ended by themselves are still counted as open.
        let loop_ended = tokio::time::timeout(Duration::from_secs(5), &mut self.accept_loop);
        let _ = loop_ended.await;
        self.open.load(Ordering::SeqCst)
    }

    /// Sets the handler for every request from now on.
    pub fn set_handler(&self, handler: Arc<dyn Handler>) {
        if let Ok(mut slot) = self.handler.write() {
            *slot = handler;
        }
    }
}

impl Drop for MetadataService {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    handler: Arc<RwLock<Arc<dyn Handler>>>,
    limits: ServiceLimits,
    open: Arc<AtomicUsize>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Connections are tasks of their own; dropping the set (when this loop is aborted)
    // aborts them too, so nothing outlives the VM.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        open.fetch_add(1, Ordering::SeqCst);
        let served = open.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let current = handler.read().map(|h| h.clone()).ok();
                async move {
                    Ok::<_, Infallible>(match current {
                        Some(handler) => handler.handle(request).await,
                        None => text(StatusCode::INTERNAL_SERVER_ERROR, "handler unavailable\n"),
                    })
                }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service)
                // A shell's connection becomes a byte stream (see `shell`).
                .with_upgrades()
                .await;
            // Not reached by a connection aborted with the service: that one stays counted.
            served.fetch_sub(1, Ordering::SeqCst);
            drop(permit);
        });
        while connections.try_join_next().is_some() {}
    }
}
