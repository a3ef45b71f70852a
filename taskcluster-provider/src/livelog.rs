//! The worker's HTTP server, on an address the operator chose: the live log, and the
//! interactive shells of [`crate::shells`]. While a task runs, its log is served as it grows,
//! under a path of its own that nobody can guess. The queue's `public/logs/live.log` is a
//! `reference` artifact to that URL until the run ends; then it points at the uploaded
//! `public/logs/live_backing.log` and this server stops serving it.
//!
//! Whoever holds a URL may read that one log (the log is a public artifact anyway); the
//! server answers nothing else. Connections are bounded in number and in the time their
//! headers take; a stream ends when its task does.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use lifecycle::log::LogListener;
use lifecycle::LiveVm;
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::replies::{headers, new_token, text, Body};
use crate::shells::{InteractiveShell, ShellRegistry, SHELL_PREFIX};

/// Where the live logs are served, and how clients reach them.
#[derive(Debug, Clone)]
pub struct LiveLogOptions {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// The base URL clients use (without a trailing slash); None: `http://` and the bound
    /// address.
    pub base_url: Option<String>,
    /// Connections served at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// Time a client has to send its request's headers.
    pub header_timeout: Duration,
}

impl LiveLogOptions {
    /// Options with the default bounds: 64 connections, 10 s for a request's headers.
    pub fn new(listen: SocketAddr, base_url: Option<String>) -> LiveLogOptions {
        LiveLogOptions {
            listen,
            base_url,
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// The live-log server could not start.
#[derive(Debug, Error)]
#[error("the live log cannot listen on {address}: {source}")]
pub struct LiveLogError {
    /// The address asked for.
    pub address: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

/// The logs being served, by token.
type Registry = Mutex<HashMap<String, Arc<Followed>>>;

/// One task's log as the server sees it.
struct Followed {
    path: PathBuf,
    /// Bumped on every write to the log and when the run ends.
    growth: watch::Sender<u64>,
    /// The run has ended: a stream sends what is left and ends.
    ended: AtomicBool,
}

/// The running server; stops serving (and cuts its streams) when dropped.
pub struct LiveLogServer {
    logs: Arc<Registry>,
    shells: Arc<ShellRegistry>,
    base_url: String,
    address: SocketAddr,
    accept_loop: JoinHandle<()>,
}

impl std::fmt::Debug for LiveLogServer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LiveLogServer")
            .field("address", &self.address)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl LiveLogServer {
    /// Binds the address and starts serving.
    pub async fn start(options: LiveLogOptions) -> Result<LiveLogServer, LiveLogError> {
        let failed = |source| LiveLogError {
            address: options.listen,
            source,
        };
        let listener = TcpListener::bind(options.listen).await.map_err(failed)?;
        let address = listener.local_addr().map_err(failed)?;
        let base_url = match options.base_url.as_deref() {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{address}"),
        };
        let logs = Arc::new(Registry::default());
        let shells = Arc::new(ShellRegistry::default());
        let routes = Routes {
            logs: logs.clone(),
            shells: shells.clone(),
        };
        let accept_loop = tokio::spawn(accept_loop(listener, Arc::new(routes), options));
        Ok(LiveLogServer {
            logs,
            shells,
            base_url,
            address,
            accept_loop,
        })
    }

    /// The address the server listens on (a port 0 asked for is the chosen one).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The base URL the logs' URLs start with.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Offers shells into the VM `live` names (once it runs) until the returned handle is
    /// dropped.
    pub fn offer_shells(&self, live: watch::Receiver<Option<LiveVm>>) -> InteractiveShell {
        InteractiveShell::offer(&self.shells, &self.base_url, live)
    }

    /// Serves the log at `path` (which may not exist yet) until the returned handle is
    /// dropped.
    pub fn serve(&self, path: PathBuf) -> LiveLog {
        let token = new_token();
        let followed = Arc::new(Followed {
            path,
            growth: watch::channel(0).0,
            ended: AtomicBool::new(false),
        });
        lock(&self.logs).insert(token.clone(), followed.clone());
        LiveLog {
            url: format!("{}{LOG_PREFIX}{token}", self.base_url),
            token,
            logs: self.logs.clone(),
            followed,
        }
    }
}

impl Drop for LiveLogServer {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// What the server answers.
struct Routes {
    logs: Arc<Registry>,
    shells: Arc<ShellRegistry>,
}
/// The path of every log, before its token.
const LOG_PREFIX: &str = "/log/";
/// The longest a stream waits without hearing of a write before it looks at the file again.
const SAFETY_NET: Duration = Duration::from_secs(2);
/// Bytes read from the log per chunk sent.
const CHUNK: usize = 64 * 1024;

/// One run's log being served; the URL stops answering when this is dropped, and streams
/// send what is left and end.
pub struct LiveLog {
    token: String,
    url: String,
    logs: Arc<Registry>,
    followed: Arc<Followed>,
}

impl LiveLog {
    /// Where clients read the log.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What the task's log calls on every write, so that streams send it at once.
    pub fn listener(&self) -> LogListener {
        let followed = self.followed.clone();
        Arc::new(move || {
            followed
                .growth
                .send_modify(|count| *count = count.wrapping_add(1))
        })
    }
}

impl Drop for LiveLog {
    fn drop(&mut self) {
        lock(&self.logs).remove(&self.token);
        self.followed.ended.store(true, Ordering::SeqCst);
        self.followed
            .growth
            .send_modify(|count| *count = count.wrapping_add(1));
    }
}

fn lock(logs: &Registry) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Followed>>> {
    logs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn accept_loop(listener: TcpListener, routes: Arc<Routes>, options: LiveLogOptions) {
    let permits = Arc::new(Semaphore::new(options.max_connections));
    // Dropping the set (the loop aborted with the server) cuts every connection.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, most likely: wait instead of spinning.
                tracing::debug!("live log: accept: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let routes = routes.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let routes = routes.clone();
                async move { Ok::<_, Infallible>(answer(&routes, request).await) }
            });
            // A shell's websocket holds its connection (and its place) until it ends.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(options.header_timeout)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
            drop(permit);
        });
        while connections.try_join_next().is_some() {}
    }
}

async fn answer(routes: &Routes, request: Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n");
    }
    if request.uri().path().starts_with(SHELL_PREFIX) {
        return crate::shells::answer(&routes.shells, request).await;
    }
    let token = request.uri().path().strip_prefix(LOG_PREFIX);
    let Some(followed) = token.and_then(|token| lock(&routes.logs).get(token).cloned()) else {
        return text(
            StatusCode::NOT_FOUND,
            "no live log here: its task has ended (read public/logs/live_backing.log) or \
             never ran on this worker\n",
        );
    };
    let stream = futures::stream::unfold(Follower::new(followed), |mut follower| async move {
        follower
            .next_chunk()
            .await
            .map(|chunk| (chunk.map(Frame::data), follower))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed());
    headers(&mut response);
    response
}

/// Reads one log like `tail -f` until its run has ended and everything is sent.
struct Follower {
    followed: Arc<Followed>,
    growth: watch::Receiver<u64>,
    file: Option<tokio::fs::File>,
    draining: bool,
}

impl Follower {
    fn new(followed: Arc<Followed>) -> Follower {
        Follower {
            growth: followed.growth.subscribe(),
            followed,
            file: None,
            draining: false,
        }
    }

    async fn wait_for_growth(&mut self) {
        let _ = tokio::time::timeout(SAFETY_NET, self.growth.changed()).await;
    }

    async fn next_chunk(&mut self) -> Option<std::io::Result<Bytes>> {
        loop {
            // Seen now: a write or the end from here on ends the next wait at once.
            self.growth.borrow_and_update();
            let ended = self.followed.ended.load(Ordering::SeqCst);
            let Some(file) = &mut self.file else {
                match tokio::fs::File::open(&self.followed.path).await {
                    Ok(file) => self.file = Some(file),
                    Err(_) if ended => return None,
                    Err(_) => self.wait_for_growth().await,
                }
                continue;
            };
            let mut buffer = vec![0u8; CHUNK];
            match file.read(&mut buffer).await {
                Ok(0) if self.draining => return None,
                Ok(0) if ended => self.draining = true,
                Ok(0) => self.wait_for_growth().await,
                Ok(read) => {
                    buffer.truncate(read);
                    return Some(Ok(Bytes::from(buffer)));
                }
                Err(error) => return Some(Err(error)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    async fn server() -> LiveLogServer {
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        LiveLogServer::start(LiveLogOptions::new(listen, None))
            .await
            .expect("the server starts")
    }

    #[tokio::test]
    async fn a_stream_follows_the_log_as_it_grows_and_ends_with_its_run() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("live.log");
        let server = server().await;
        let live = server.serve(path.clone());
        assert!(live
            .url()
            .starts_with(&format!("http://{}{LOG_PREFIX}", server.address())));
        assert_eq!(
            live.url().len() - live.url().rfind('/').unwrap_or(0) - 1,
            43
        );
        let notify = live.listener();
        // The file does not exist yet: the stream waits for it.
        let mut response = reqwest::get(live.url()).await.expect("an answer");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; charset=utf-8"
        );
        let mut log = std::fs::File::create(&path).expect("the log");
        log.write_all(b"first line\n").expect("a write");
        notify();
        let chunk = tokio::time::timeout(Duration::from_secs(1), response.chunk())
            .await
            .expect("sent at once, not at the safety net's pace")
            .expect("a chunk")
            .expect("not the end");
        assert_eq!(&chunk[..], b"first line\n");
        log.write_all(b"second line\n").expect("a write");
        notify();
        let url = live.url().to_owned();
        drop(live);
        let mut rest = Vec::new();
        while let Some(chunk) = response.chunk().await.expect("the rest") {
            rest.extend_from_slice(&chunk);
        }
        assert_eq!(rest, b"second line\n");
        let after = reqwest::get(&url).await.expect("an answer");
        assert_eq!(after.status(), 404);
    }

    #[tokio::test]
    async fn only_the_logs_own_paths_answer() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let server = server().await;
        let live = server.serve(dir.path().join("live.log"));
        let base = format!("http://{}", server.address());
        for path in ["/", "/log/", "/log/nothing", "/log/../log"] {
            let response = reqwest::get(format!("{base}{path}")).await.expect("answer");
            assert_eq!(response.status(), 404, "{path}");
        }
        let posted = reqwest::Client::new()
            .post(live.url())
            .send()
            .await
            .expect("an answer");
        assert_eq!(posted.status(), 405);
    }

    #[tokio::test]
    async fn a_client_that_never_sends_its_headers_is_cut_off() {
        use tokio::io::AsyncReadExt as _;
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        let mut options = LiveLogOptions::new(listen, None);
        options.header_timeout = Duration::from_millis(300);
        options.max_connections = 1;
        let server = LiveLogServer::start(options).await.expect("starts");
        let mut silent = tokio::net::TcpStream::connect(server.address())
            .await
            .expect("connects");
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut byte))
            .await
            .expect("cut off within the header timeout");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        // Its permit came back: the one connection allowed is served again.
        let response = reqwest::get(format!("http://{}/", server.address()))
            .await
            .expect("an answer");
        assert_eq!(response.status(), 404);
    }
}
