//! Warming a VM up before it waits, paused, for a task (the worker's warm pool): a
//! metadata-service [`Handler`] that hands the guest's agent one warm-up command
//! ([`Execute::warm_up`], run as a task is: freshness applied, output streamed to `log`,
//! which is read and dropped here) and notes when the agent asks for its task again — the warm-up has
//! then run to its end in this very VM. That second request is held until the VM is handed
//! to its task: [`WarmUp::hand_over`] answers it from the task's session (the task, at once:
//! no further request is needed), and any later request with "nothing yet" (204) so that the
//! agent asks the task's handler, set just before.
//!
//! An agent that does not list [`feature::WARM_UP`] gets no warm-up (it would run the
//! command as its task); [`WarmUp::finished`] says so.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use schemas::protocol::{feature, Execute, API_PREFIX, FEATURES_HEADER};
use tokio::sync::watch;

use crate::network::metadata::{text, Handler, Reply, ReplyFuture};
use crate::network::session::GuestSession;

/// How far a warm-up has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmUpState {
    /// The agent has not asked for its task yet.
    Waiting,
    /// The agent took the warm-up command and runs it.
    Running,
    /// The agent ran it and asked for its task again.
    Done,
    /// The agent cannot run warm-ups (an image with an older agent).
    Unsupported,
}

/// What a warm-up runs by default ([`WarmUp::standard`]): a shell that starts programs the
/// way commands do, and a few of the tools commands use.
pub const WARM_UP_COMMAND: [&str; 3] = [
    // Found through `PATH`, as a task's command mostly is: the failed lookups in the
    // directories before it are code that then has run (measured through `taskvm serve` with
    // a warm pool under TCG: a task's first output 37-43 ms instead of 49-63, medians of 8).
    "sh",
    "-c",
    "echo warm; /bin/echo warm; cat /proc/uptime; ls / >/dev/null; true",
];

/// How long a warm-up may take in the guest (it takes well under a second): a pooled VM is
/// pooled without it after that, a snapshot is not made.
pub const WARM_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// One VM's warm-up. Set [`WarmUp::handler`] as the VM's handler before the guest runs.
pub struct WarmUp {
    command: Vec<String>,
    state: watch::Sender<WarmUpState>,
    /// Set when the VM goes to a task: the held request is answered from this session.
    handed_to: watch::Sender<Option<Arc<GuestSession>>>,
}

impl WarmUp {
    /// A warm-up that runs `command` in the guest.
    pub fn new(command: Vec<String>) -> Arc<WarmUp> {
        Arc::new(WarmUp {
            command,
            state: watch::channel(WarmUpState::Waiting).0,
            handed_to: watch::channel(None).0,
        })
    }

    /// A warm-up that runs [`WARM_UP_COMMAND`].
    pub fn standard() -> Arc<WarmUp> {
        WarmUp::new(
            WARM_UP_COMMAND
                .iter()
                .map(|part| (*part).to_owned())
                .collect(),
        )
    }

    /// The metadata-service handler that serves it.
    pub fn handler(self: &Arc<Self>) -> Arc<dyn Handler> {
        Arc::new(WarmUpHandler(self.clone()))
    }

    /// Waits until the warm-up has run, or the agent turned out not to support it (apply a
    /// timeout around this); which of the two.
    pub async fn finished(&self) -> WarmUpState {
        let mut receiver = self.state.subscribe();
        let state = receiver
            .wait_for(|state| matches!(state, WarmUpState::Done | WarmUpState::Unsupported))
            .await
            .map(|state| *state);
        state.unwrap_or(WarmUpState::Waiting)
    }

    /// Waits until the agent has asked for its task for the first time (apply a timeout
    /// around this).
    pub async fn asked(&self) {
        let mut receiver = self.state.subscribe();
        let _ = receiver
            .wait_for(|state| *state != WarmUpState::Waiting)
            .await;
    }

    /// Hands the VM to the task of `session` (set as the VM's handler first): the agent's
    /// held request is answered from that session, so it gets its task without asking again.
    pub fn hand_over(&self, session: Arc<GuestSession>) {
        self.handed_to.send_replace(Some(session));
    }

    async fn execute(&self, features: &str) -> Reply {
        let listed = features
            .split(',')
            .any(|listed| listed.trim() == feature::WARM_UP);
        let state = *self.state.borrow();
        match state {
            WarmUpState::Waiting if listed => {
                let warm_up = Execute {
                    command: self.command.clone(),
                    warm_up: true,
                    fresh: Some(crate::network::session::freshness()),
                    ..Execute::default()
                };
                match serde_json::to_vec(&warm_up) {
                    Ok(json) => {
                        self.state.send_replace(WarmUpState::Running);
                        let mut reply = text(StatusCode::OK, json);
                        reply.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(
                                schemas::protocol::content_type::JSON,
                            ),
                        );
                        reply
                    }
                    Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
                }
            }
            WarmUpState::Waiting => {
                self.state.send_replace(WarmUpState::Unsupported);
                self.hold(features).await
            }
            WarmUpState::Running => {
                self.state.send_replace(WarmUpState::Done);
                self.hold(features).await
            }
            WarmUpState::Done | WarmUpState::Unsupported => self.hold(features).await,
        }
    }

    /// Holds a request for the task until [`WarmUp::hand_over`], then answers it from the
    /// task's session.
    async fn hold(&self, features: &str) -> Reply {
        let mut handed_to = self.handed_to.subscribe();
        let session = handed_to
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|session| session.clone());
        match session {
            Some(session) => {
                let features = features.split(',').map(|f| f.trim().to_owned()).collect();
                session.execute(features).await
            }
            None => text(StatusCode::NO_CONTENT, ""),
        }
    }
}

struct WarmUpHandler(Arc<WarmUp>);

impl Handler for WarmUpHandler {
    fn handle(&self, request: Request<Incoming>) -> ReplyFuture {
        let warm_up = self.0.clone();
        Box::pin(async move {
            let path = request.uri().path().strip_prefix(API_PREFIX);
            if path == Some("/log") && request.method() == Method::POST {
                return drain(request.into_body()).await;
            }
            if path != Some("/execute") || request.method() != Method::GET {
                return text(StatusCode::SERVICE_UNAVAILABLE, "warming up\n");
            }
            let features = request
                .headers()
                .get(FEATURES_HEADER)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            warm_up.execute(&features).await
        })
    }
}

/// Reads a warm-up's log to its end and drops it (nothing is kept, so nothing grows).
async fn drain(mut body: Incoming) -> Reply {
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return text(StatusCode::BAD_REQUEST, "log stream broken\n");
        }
    }
    text(StatusCode::OK, "")
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use super::*;
    use crate::network::metadata::{MetadataService, ServiceLimits};
    use crate::network::session::SessionConfig;

    /// `GET execute` listing `features`, raw, on a blocking thread: status code and body.
    async fn ask(address: std::net::SocketAddr, features: &'static str) -> (u16, String) {
        tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(address).unwrap();
            write!(
                stream,
                "GET /engine/v1/execute HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                 {FEATURES_HEADER}: {features}\r\n\r\n"
            )
            .unwrap();
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            let body = answer
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            (answer[9..12].parse().unwrap(), body)
        })
        .await
        .unwrap()
    }

    async fn service(warm_up: &Arc<WarmUp>) -> (MetadataService, std::net::SocketAddr) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let service = MetadataService::start(listener, ServiceLimits::default()).unwrap();
        service.set_handler(warm_up.handler());
        (service, address)
    }

    #[tokio::test]
    async fn an_agent_gets_one_warm_up_and_its_next_request_waits_for_the_task() {
        let warm_up = WarmUp::new(vec!["true".into()]);
        let (service, address) = service(&warm_up).await;
        let (status, body) = ask(address, "mounts,warm-up").await;
        assert_eq!(status, 200);
        let handed: Execute = serde_json::from_str(&body).unwrap();
        assert!(handed.warm_up && handed.fresh.is_some(), "{handed:?}");
        assert_eq!(handed.command, ["true"]);
        // The agent asks again: done, and held until the VM is handed over; then that very
        // request gets the task.
        let again = tokio::spawn(ask(address, "mounts,warm-up"));
        assert_eq!(warm_up.finished().await, WarmUpState::Done);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!again.is_finished(), "held until handed over");
        let (session, _log) = GuestSession::new(SessionConfig::new("task"));
        session.set_task(Execute {
            command: vec!["the-task".into()],
            ..Execute::default()
        });
        warm_up.hand_over(session.clone());
        let (status, body) = again.await.unwrap();
        assert_eq!(status, 200);
        let task: Execute = serde_json::from_str(&body).unwrap();
        assert_eq!(task.command, ["the-task"]);
        assert!(!task.warm_up);
        assert_eq!(session.wait_taken().await, Ok(()));
        service.stop().await;
    }

    #[tokio::test]
    async fn an_agent_without_the_feature_is_never_handed_a_warm_up() {
        let warm_up = WarmUp::new(vec!["true".into()]);
        let (service, address) = service(&warm_up).await;
        let asked = tokio::spawn(ask(address, "mounts"));
        assert_eq!(warm_up.finished().await, WarmUpState::Unsupported);
        let (session, _log) = GuestSession::new(SessionConfig::new("task"));
        session.set_task(Execute {
            command: vec!["the-task".into()],
            ..Execute::default()
        });
        warm_up.hand_over(session);
        let (status, body) = asked.await.unwrap();
        assert_eq!(status, 200, "the task, never a warm-up");
        assert!(!serde_json::from_str::<Execute>(&body).unwrap().warm_up);
        service.stop().await;
    }
}
