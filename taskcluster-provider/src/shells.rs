//! Interactive shells on Taskcluster (a payload's `interactive: true`, generic-worker's
//! `interactive` feature as the model): while the task runs, the worker's HTTP server (the
//! live log's) takes websockets at `/shell/TOKEN`, each a new login shell in the task's VM,
//! spoken as `taskvm serve`'s shell websocket is (binary keys in, `{"rows","cols"}` text to
//! resize, binary output out). The token, 256 random bits, is the only credential: it is
//! published in a private artifact and stops working when the task ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lifecycle::shell_bridge::{self, FromClient};
use lifecycle::LiveVm;
use schemas::protocol::shell::MAX_FRAME;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::replies::{new_token, text, Body};

/// The path of every shell, before its token.
pub const SHELL_PREFIX: &str = "/shell/";

/// The running tasks that offer shells, by token: where each one's VM is, once it runs.
pub(crate) type ShellRegistry = Mutex<HashMap<String, watch::Receiver<Option<LiveVm>>>>;

/// One task's shells being offered; the URL stops answering when this is dropped (open
/// shells end with the task's VM).
pub struct InteractiveShell {
    token: String,
    url: String,
    shells: Arc<ShellRegistry>,
}

impl InteractiveShell {
    pub(crate) fn offer(
        shells: &Arc<ShellRegistry>,
        base_url: &str,
        live: watch::Receiver<Option<LiveVm>>,
    ) -> InteractiveShell {
        let token = new_token();
        lock(shells).insert(token.clone(), live);
        let websocket_base = match base_url.split_once("://") {
            Some(("https", rest)) => format!("wss://{rest}"),
            Some((_, rest)) => format!("ws://{rest}"),
            None => base_url.to_owned(),
        };
        InteractiveShell {
            url: format!("{websocket_base}{SHELL_PREFIX}{token}"),
            token,
            shells: shells.clone(),
        }
    }

    /// The websocket URL (`ws://` or `wss://`) a client opens a shell at.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for InteractiveShell {
    fn drop(&mut self) {
        lock(&self.shells).remove(&self.token);
    }
}

fn lock(
    shells: &ShellRegistry,
) -> std::sync::MutexGuard<'_, HashMap<String, watch::Receiver<Option<LiveVm>>>> {
    shells
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Answers a request for `/shell/TOKEN[?rows=R&cols=C]`: opens a shell in the task's VM,
/// then switches the connection to a websocket carrying it.
pub(crate) async fn answer(
    shells: &ShellRegistry,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let token = request
        .uri()
        .path()
        .strip_prefix(SHELL_PREFIX)
        .unwrap_or_default();
    let Some(live) = lock(shells).get(token).cloned() else {
        return text(
            StatusCode::NOT_FOUND,
            "no shell here: its task has ended or never ran on this worker\n",
        );
    };
    let Some(accept) = websocket_accept(&request) else {
        return text(
            StatusCode::BAD_REQUEST,
            "this is a websocket (a terminal: binary input, {\"rows\",\"cols\"} text to resize)\n",
        );
    };
    let Some(vm) = live.borrow().clone() else {
        return text(
            StatusCode::CONFLICT,
            "the task's VM is not running yet (or any more)\n",
        );
    };
    let size = |name: &str, default: u16| {
        request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .and_then(|value| value.parse::<u16>().ok())
            .filter(|value| *value > 0)
            .unwrap_or(default)
    };
    let (rows, cols) = (size("rows", 24), size("cols", 80));
    let shell = match vm.shells.open(rows, cols).await {
        Ok(shell) => shell,
        Err(error) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no shell: {error}\n"),
            )
        }
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME))
            .max_frame_size(Some(MAX_FRAME));
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        bridge(socket, shell).await;
    });
    let mut response = text(StatusCode::SWITCHING_PROTOCOLS, "");
    let headers = response.headers_mut();
    headers.remove(header::CONTENT_TYPE);
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// The `Sec-WebSocket-Accept` of a well-formed websocket handshake, or None.
fn websocket_accept(request: &Request<Incoming>) -> Option<String> {
    let headers = request.headers();
    let has = |name: header::HeaderName, wanted: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| {
                value
                    .split(',')
                    .any(|item| item.trim().eq_ignore_ascii_case(wanted))
            })
    };
    let upgrading = has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade");
    let version = has(header::SEC_WEBSOCKET_VERSION, "13");
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?;
    (upgrading && version).then(|| derive_accept_key(key.as_bytes()))
}

/// Carries the shell between the client and the guest until either side closes.
async fn bridge(
    socket: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    shell: lifecycle::ShellStream,
) {
    let (to_client, from_client) = socket.split();
    let from_client = from_client.map(|message| match message {
        Ok(Message::Binary(keys)) => FromClient::Keys(keys),
        Ok(Message::Text(text)) => FromClient::Text(text.as_str().to_owned()),
        Ok(Message::Close(_)) | Err(_) => FromClient::Close,
        Ok(_) => FromClient::Nothing,
    });
    let to_client = to_client.with(|output| async { Ok::<_, WsError>(Message::Binary(output)) });
    shell_bridge::bridge(shell, from_client, Box::pin(to_client)).await;
}
