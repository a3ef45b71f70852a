//! The guest's side of a task, as a metadata-service [`Handler`]: the taskcluster-worker
//! compatible `/engine/v1/` protocol (execute, log, success/failed, ping, poll/reply) and the
//! EC2/NoCloud subset that cloud-init reads. The worker drives it through [`GuestSession`]:
//! set the task, read the log as it streams, await the report, perform actions.
//!
//! Limits: small request bodies are capped and must arrive without long pauses; the log is
//! capped per task (the excess is dropped behind one truncation marker) and flows through a
//! small channel, so a slow log consumer slows the guest instead of growing memory.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use rand::Rng;
use schemas::protocol::feature::MOUNTS;
use schemas::protocol::{Action, ActionKind, Execute, Freshness, Report, API_PREFIX};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};

use crate::network::metadata::{text, Handler, Reply, ReplyFuture};
use crate::network::shell::{query_id, ShellError, ShellRequests, ShellStream};

/// Settings of one session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// `instance-id` for cloud-init (and the EC2 path).
    pub instance_id: String,
    /// `local-hostname` for cloud-init.
    pub hostname: String,
    /// `user-data` for cloud-init (None: served empty).
    pub user_data: Option<Vec<u8>>,
    /// Most log bytes kept per task; the rest is dropped behind one marker.
    pub log_cap: u64,
    /// Largest accepted body of a report.
    pub max_report_body: usize,
    /// Longest pause while a small request body arrives, and while a reply streams.
    pub body_idle_timeout: Duration,
    /// How long `GET execute` and `GET poll` wait before answering 204.
    pub long_poll: Duration,
}

impl SessionConfig {
    /// Defaults for a VM called `name`: a 1 GiB log cap, 4 KiB reports, 60 s body idle
    /// timeout, 20 s long polls.
    pub fn new(name: &str) -> Self {
        SessionConfig {
            instance_id: name.to_owned(),
            hostname: name.to_owned(),
            user_data: None,
            log_cap: 1 << 30,
            max_report_body: 4096,
            body_idle_timeout: Duration::from_secs(60),
            long_poll: Duration::from_secs(20),
        }
    }
}

/// Why an action got no answer.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SessionError {
    /// The guest went away before answering.
    #[error("the guest did not answer action {0}")]
    Unanswered(String),
}

/// The guest's answer to an action: its content type and its body as it streams in.
#[derive(Debug)]
pub struct ActionReply {
    /// The content type the guest declared.
    pub content_type: String,
    /// The body, chunk by chunk; an error ends it early.
    pub body: mpsc::Receiver<io::Result<Bytes>>,
}

impl ActionReply {
    /// Reads the whole body (for small answers such as folder listings).
    pub async fn collect(mut self, limit: usize) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        while let Some(chunk) = self.body.recv().await {
            bytes.extend_from_slice(&chunk?);
            if bytes.len() > limit {
                return Err(io::Error::other(format!("reply larger than {limit} bytes")));
            }
        }
        Ok(bytes)
    }
}

/// The log as it arrives, and what happened to it.
struct LogSink {
    sender: Option<mpsc::Sender<Bytes>>,
    written: u64,
    truncated: bool,
}

/// One task's conversation with its guest. Create with [`GuestSession::new`], hand the
/// `Arc` to the VM as its handler.
pub struct GuestSession {
    config: SessionConfig,
    task: watch::Sender<Option<Execute>>,
    /// Whether the guest took its task; `Some(Err)` when its agent cannot run it.
    taken: watch::Sender<Option<Result<(), String>>>,
    report: watch::Sender<Option<Report>>,
    log: tokio::sync::Mutex<LogSink>,
    actions_in: mpsc::Sender<Action>,
    actions_out: tokio::sync::Mutex<mpsc::Receiver<Action>>,
    pending: Mutex<HashMap<String, oneshot::Sender<ActionReply>>>,
    shells: ShellRequests,
}

/// Log chunks buffered between the guest and a slow consumer.
const LOG_CHANNEL: usize = 16;

impl GuestSession {
    /// A session and the receiving end of its log (closed when the guest finishes its log
    /// upload).
    pub fn new(config: SessionConfig) -> (Arc<GuestSession>, mpsc::Receiver<Bytes>) {
        let (log_tx, log_rx) = mpsc::channel(LOG_CHANNEL);
        let (actions_in, actions_out) = mpsc::channel(64);
        let session = GuestSession {
            config,
            task: watch::channel(None).0,
            taken: watch::channel(None).0,
            report: watch::channel(None).0,
            log: tokio::sync::Mutex::new(LogSink {
                sender: Some(log_tx),
                written: 0,
                truncated: false,
            }),
            actions_in,
            actions_out: tokio::sync::Mutex::new(actions_out),
            pending: Mutex::new(HashMap::new()),
            shells: ShellRequests::default(),
        };
        (Arc::new(session), log_rx)
    }

    /// The metadata-service handler that serves this session to the guest.
    pub fn handler(self: &Arc<Self>) -> Arc<dyn Handler> {
        Arc::new(SessionHandler(self.clone()))
    }

    /// Gives the guest its task (it may already be polling for it).
    pub fn set_task(&self, task: Execute) {
        self.task.send_replace(Some(task));
    }

    /// Waits until the guest has been handed its task (the command starts right after), or
    /// its agent asked for it without a feature the task needs: why, then.
    pub async fn wait_taken(&self) -> Result<(), String> {
        let mut receiver = self.taken.subscribe();
        let taken = receiver
            .wait_for(Option::is_some)
            .await
            .map(|taken| taken.clone().unwrap_or(Ok(())));
        match taken {
            Ok(taken) => taken,
            Err(_) => std::future::pending().await,
        }
    }

    /// The guest's report, once it has made one.
    pub fn report(&self) -> Option<Report> {
        self.report.borrow().clone()
    }

    /// Waits for the guest's report.
    pub async fn wait_report(&self) -> Report {
        let mut receiver = self.report.subscribe();
        loop {
            if let Some(report) = receiver.borrow_and_update().clone() {
                return report;
            }
            if receiver.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Log bytes accepted so far, and whether the cap cut the log.
    pub async fn log_state(&self) -> (u64, bool) {
        let sink = self.log.lock().await;
        (sink.written, sink.truncated)
    }

    /// Asks the guest to do `kind` and waits for its answer (apply a timeout around this).
    pub async fn perform(&self, kind: ActionKind) -> Result<ActionReply, SessionError> {
        let id = format!("{:016x}", rand::rng().random::<u64>());
        let (tx, rx) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(id.clone(), tx);
        }
        let action = Action {
            id: id.clone(),
            kind,
        };
        if self.actions_in.send(action).await.is_err() {
            return Err(SessionError::Unanswered(id));
        }
        rx.await.map_err(|_| SessionError::Unanswered(id))
    }

    /// Asks the guest for a login shell on a terminal of `rows` × `cols` and waits up to
    /// `patience` for its agent to connect it.
    pub async fn open_shell(
        &self,
        rows: u16,
        cols: u16,
        patience: Duration,
    ) -> Result<ShellStream, ShellError> {
        let id = format!("{:016x}", rand::rng().random::<u64>());
        let connected = self.shells.reserve(&id)?;
        let action = Action {
            id: id.clone(),
            kind: ActionKind::Shell { rows, cols },
        };
        if self.actions_in.send(action).await.is_err() {
            self.shells.forget(&id);
            return Err(ShellError::Gone);
        }
        match tokio::time::timeout(patience, connected).await {
            Ok(Ok(stream)) => Ok(stream),
            _ => {
                self.shells.forget(&id);
                Err(ShellError::NotOpened(patience.as_secs()))
            }
        }
    }

    async fn route(self: Arc<Self>, request: Request<Incoming>) -> Reply {
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        if let Some(name) = path.strip_prefix(API_PREFIX) {
            return match (name, &method) {
                ("/ping", &Method::GET) => text(StatusCode::OK, "pong\n"),
                ("/execute", &Method::GET) => {
                    let features = request
                        .headers()
                        .get(schemas::protocol::FEATURES_HEADER)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default()
                        .split(',')
                        .map(|feature| feature.trim().to_owned())
                        .collect();
                    self.execute(features).await
                }
                ("/log", &Method::POST) => self.receive_log(request.into_body()).await,
                ("/success", &Method::PUT) => self.receive_report(request, 0).await,
                ("/failed", &Method::PUT) => self.receive_report(request, 1).await,
                ("/poll", &Method::GET) => self.poll().await,
                ("/reply", &Method::POST) => self.receive_reply(request).await,
                ("/shell", &Method::GET) => self.shells.accept(request),
                (
                    "/ping" | "/execute" | "/log" | "/success" | "/failed" | "/poll" | "/reply"
                    | "/shell",
                    _,
                ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
                _ => text(StatusCode::NOT_FOUND, "no such endpoint\n"),
            };
        }
        if method != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        let config = &self.config;
        let user_data = || Bytes::from(config.user_data.clone().unwrap_or_default());
        match path.as_str() {
            // EC2 style.
            "/latest/meta-data" | "/latest/meta-data/" => {
                text(StatusCode::OK, "instance-id\nlocal-hostname\n")
            }
            "/latest/meta-data/instance-id" => text(StatusCode::OK, config.instance_id.clone()),
            "/latest/meta-data/local-hostname" => text(StatusCode::OK, config.hostname.clone()),
            "/latest/user-data" => text(StatusCode::OK, user_data()),
            // NoCloud over HTTP (`ds=nocloud;s=http://169.254.169.254/`).
            "/meta-data" => text(
                StatusCode::OK,
                format!(
                    "instance-id: {}\nlocal-hostname: {}\n",
                    config.instance_id, config.hostname
                ),
            ),
            "/user-data" => text(StatusCode::OK, user_data()),
            "/vendor-data" => text(StatusCode::OK, ""),
            _ => text(StatusCode::NOT_FOUND, "no such path\n"),
        }
    }

    /// Answers a `GET execute` of an agent listing `features`: its task once there is one.
    pub(crate) async fn execute(&self, features: Vec<String>) -> Reply {
        let mut receiver = self.task.subscribe();
        let task = tokio::time::timeout(self.config.long_poll, async {
            receiver
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|task| task.clone())
        })
        .await;
        match task {
            Ok(Some(task)) if !task.mounts.is_empty() && !has(&features, MOUNTS) => {
                let reason = "the image's taskvm-agent cannot mount disks (it predates mounts); \
                              the command was not handed over: rebuild the image with a current \
                              agent"
                    .to_owned();
                self.taken.send_replace(Some(Err(reason.clone())));
                text(StatusCode::CONFLICT, reason)
            }
            Ok(Some(mut task)) => {
                task.fresh = Some(freshness());
                match serde_json::to_vec(&task) {
                    Ok(json) => {
                        self.taken.send_replace(Some(Ok(())));
                        json_reply(json)
                    }
                    Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
                }
            }
            _ => text(StatusCode::NO_CONTENT, ""),
        }
    }

    async fn receive_log(&self, mut body: Incoming) -> Reply {
        // No idle timeout here: a task may print nothing for hours. The log connection is
        // one of the VM's bounded connections and ends with the VM.
        let mut sink = self.log.lock().await;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return text(StatusCode::BAD_REQUEST, "log stream broken\n");
            };
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            sink.accept(chunk, self.config.log_cap).await;
        }
        // The log is one stream: its end is the end of the task's output, which the
        // consumer sees as the channel closing. A later upload is accepted and dropped.
        sink.sender = None;
        text(StatusCode::OK, "")
    }

    async fn receive_report(&self, request: Request<Incoming>, default_exit: i32) -> Reply {
        let body = match read_small(
            request.into_body(),
            self.config.max_report_body,
            self.config.body_idle_timeout,
        )
        .await
        {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let report = if body.iter().all(u8::is_ascii_whitespace) {
            Report {
                exit_code: default_exit,
                not_run: None,
            }
        } else {
            match serde_json::from_slice::<Report>(&body) {
                Ok(report) => report,
                Err(error) => {
                    return text(StatusCode::BAD_REQUEST, format!("bad report: {error}\n"))
                }
            }
        };
        let mut first = false;
        self.report.send_if_modified(|current| {
            first = current.is_none();
            if first {
                *current = Some(report);
            }
            first
        });
        if first {
            text(StatusCode::OK, "")
        } else {
            text(StatusCode::CONFLICT, "the task was already reported\n")
        }
    }

    async fn poll(&self) -> Reply {
        let mut actions = self.actions_out.lock().await;
        match tokio::time::timeout(self.config.long_poll, actions.recv()).await {
            Ok(Some(action)) => match serde_json::to_vec(&action) {
                Ok(json) => json_reply(json),
                Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
            },
            _ => text(StatusCode::NO_CONTENT, ""),
        }
    }

    async fn receive_reply(&self, request: Request<Incoming>) -> Reply {
        let id = query_id(&request);
        let waiting = self.pending.lock().ok().and_then(|mut p| p.remove(&id));
        let Some(waiting) = waiting else {
            return text(
                StatusCode::NOT_FOUND,
                "no such action, or already answered\n",
            );
        };
        let content_type = request
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(schemas::protocol::content_type::FILE)
            .to_owned();
        let (tx, rx) = mpsc::channel(8);
        let wanted = waiting
            .send(ActionReply {
                content_type,
                body: rx,
            })
            .is_ok();
        let mut body = request.into_body();
        loop {
            let frame = tokio::time::timeout(self.config.body_idle_timeout, body.frame()).await;
            let chunk = match frame {
                Ok(None) => break,
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(chunk) => chunk,
                    Err(_) => continue,
                },
                Ok(Some(Err(error))) => {
                    let _ = tx.send(Err(io::Error::other(error))).await;
                    return text(StatusCode::BAD_REQUEST, "reply stream broken\n");
                }
                Err(_) => {
                    let _ = tx.send(Err(io::Error::other("the guest stalled"))).await;
                    return text(StatusCode::REQUEST_TIMEOUT, "reply stalled\n");
                }
            };
            // Back-pressure: the guest waits while the worker is slow to take the bytes.
            if wanted && tx.send(Ok(chunk)).await.is_err() {
                break;
            }
        }
        text(StatusCode::OK, "")
    }
}

impl LogSink {
    async fn accept(&mut self, chunk: Bytes, cap: u64) {
        if self.truncated {
            return;
        }
        let room = cap.saturating_sub(self.written);
        let (kept, cut) = if chunk.len() as u64 > room {
            (chunk.slice(..room as usize), true)
        } else {
            (chunk, false)
        };
        self.written += kept.len() as u64;
        if !kept.is_empty() {
            self.send(kept).await;
        }
        if cut {
            self.truncated = true;
            let marker =
                format!("\n[taskvm: log truncated at {cap} bytes; the rest was dropped]\n");
            self.send(Bytes::from(marker)).await;
        }
    }

    async fn send(&mut self, chunk: Bytes) {
        if let Some(sender) = &self.sender {
            if sender.send(chunk).await.is_err() {
                // Nobody reads the log any more: keep accepting it, drop it.
                self.sender = None;
            }
        }
    }
}

/// The handler to install on a VM for a session ([`GuestSession::handler`]).
struct SessionHandler(Arc<GuestSession>);

impl Handler for SessionHandler {
    fn handle(&self, request: Request<Incoming>) -> ReplyFuture {
        Box::pin(self.0.clone().route(request))
    }
}

/// The clock now, 32 random bytes and a random machine-id, made when the guest takes its task.
pub(crate) fn freshness() -> Freshness {
    let mut random = rand::rng();
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let entropy: [u8; 32] = random.random();
    let machine_id: [u8; 16] = random.random();
    Freshness {
        unix_time_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        entropy: hex(&entropy),
        machine_id: hex(&machine_id),
    }
}

fn json_reply(json: Vec<u8>) -> Reply {
    let mut reply = text(StatusCode::OK, json);
    reply.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(schemas::protocol::content_type::JSON),
    );
    reply
}

/// Reads a body of at most `cap` bytes with at most `idle` between chunks.
async fn read_small(mut body: Incoming, cap: usize, idle: Duration) -> Result<Vec<u8>, Reply> {
    let mut bytes = Vec::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Ok(None) => return Ok(bytes),
            Ok(Some(Ok(frame))) => {
                if let Ok(chunk) = frame.into_data() {
                    if bytes.len() + chunk.len() > cap {
                        return Err(text(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("body larger than {cap} bytes\n"),
                        ));
                    }
                    bytes.extend_from_slice(&chunk);
                }
            }
            Ok(Some(Err(_))) => return Err(text(StatusCode::BAD_REQUEST, "body broken\n")),
            Err(_) => return Err(text(StatusCode::REQUEST_TIMEOUT, "body stalled\n")),
        }
    }
}

/// Whether the agent's `features` include `feature`.
fn has(features: &[String], feature: &str) -> bool {
    features.iter().any(|listed| listed == feature)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use schemas::protocol::{GuestMount, FEATURES_HEADER};

    use super::*;
    use crate::network::metadata::{MetadataService, ServiceLimits};

    /// `GET execute` with `headers`, raw, on a blocking thread: the status line's code.
    async fn ask(address: std::net::SocketAddr, headers: &'static str) -> u16 {
        tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(address).unwrap();
            write!(
                stream,
                "GET /engine/v1/execute HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n"
            )
            .unwrap();
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            answer[9..12].parse().unwrap()
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_task_with_mounts_is_never_handed_to_an_agent_that_cannot_mount() {
        let task = Execute {
            command: vec!["true".into()],
            mounts: vec![GuestMount {
                serial: "taskvm-slot0".into(),
                path: "/deps".into(),
                read_only: false,
            }],
            ..Execute::default()
        };
        for (headers, status) in [
            (String::new(), 409),
            (format!("{FEATURES_HEADER}: other, mounts\r\n"), 200),
        ] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let address = listener.local_addr().unwrap();
            let service = MetadataService::start(listener, ServiceLimits::default()).unwrap();
            let (session, _log) = GuestSession::new(SessionConfig::new("test"));
            service.set_handler(session.handler());
            session.set_task(task.clone());
            let headers: &'static str = Box::leak(headers.into_boxed_str());
            assert_eq!(ask(address, headers).await, status, "{headers:?}");
            let taken = session.wait_taken().await;
            match status {
                200 => assert_eq!(taken, Ok(())),
                _ => assert!(taken.unwrap_err().contains("predates mounts")),
            }
            service.stop().await;
        }
    }
}
