//! A client of a task's shell websocket (what `taskvm shell` uses), a `taskvm serve`'s or a
//! Taskcluster worker's: keys and sizes go in, the terminal's output comes out. Plain `ws://`
//! (a server behind a TLS proxy is reached on its own address).

use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use schemas::shown::escaped;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::client::ApiError;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Most bytes of one message from the server (a chunk of the terminal's output).
const MAX_MESSAGE: usize = 1 << 20;

/// Sends to the shell.
pub struct ShellInput(SplitSink<Socket, Message>);

/// Receives the shell's output.
pub struct ShellOutput(SplitStream<Socket>);

/// Opens a shell in task `task_id`'s running VM on the server at `server` (its base URL,
/// `http://`), with a terminal of `rows` × `cols`.
pub async fn connect(
    server: &str,
    token: Option<&str>,
    task_id: &str,
    rows: u16,
    cols: u16,
) -> Result<(ShellInput, ShellOutput), ApiError> {
    let path = format!("/api/tasks/{task_id}/shell?rows={rows}&cols={cols}");
    connect_to(&websocket_url(server, &path)?, token).await
}

/// Opens a shell in a fresh copy of kept VM `name` on the server at `server`, with a
/// terminal of `rows` × `cols`.
pub async fn connect_kept(
    server: &str,
    token: Option<&str>,
    name: &str,
    rows: u16,
    cols: u16,
) -> Result<(ShellInput, ShellOutput), ApiError> {
    if !crate::wire::is_kept_name(name) {
        return Err(ApiError::Other(format!(
            "{} is not the name of a kept VM (taskvm kept ls lists them)",
            escaped(name)
        )));
    }
    let path = format!("/api/kept/{name}/shell?rows={rows}&cols={cols}");
    connect_to(&websocket_url(server, &path)?, token).await
}

/// The `ws://` URL of `path` on the server at `server` (`http://…`).
fn websocket_url(server: &str, path: &str) -> Result<String, ApiError> {
    let base = server.trim_end_matches('/');
    let address = base.strip_prefix("http://").ok_or_else(|| {
        ApiError::Other(format!(
            "{}: the shell needs the server's http:// address",
            escaped(base)
        ))
    })?;
    Ok(format!("ws://{address}{path}"))
}

/// Opens the shell at the websocket URL `url` (`ws://…`: a Taskcluster worker's, from an
/// interactive task's `private/taskvm/shell.json`), with a terminal of `rows` × `cols`.
pub async fn connect_url(
    url: &str,
    rows: u16,
    cols: u16,
) -> Result<(ShellInput, ShellOutput), ApiError> {
    if !url.starts_with("ws://") {
        return Err(ApiError::Other(format!(
            "{}: a shell URL starts with ws:// (wss:// is not supported yet)",
            escaped(url)
        )));
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    connect_to(&format!("{url}{separator}rows={rows}&cols={cols}"), None).await
}

async fn connect_to(url: &str, token: Option<&str>) -> Result<(ShellInput, ShellOutput), ApiError> {
    // Errors name the server only: a worker's shell URL holds its secret in the path.
    let base = url.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
    let base = base.as_str();
    let mut request = url
        .into_client_request()
        .map_err(|error| ApiError::Other(format!("{base}: {error}")))?;
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| ApiError::Other("the token is not a header value".to_owned()))?;
        request.headers_mut().insert("authorization", value);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let connected = tokio::time::timeout(
        crate::client::REQUEST_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(request, Some(config), true),
    )
    .await
    .map_err(|_| ApiError::Other(format!("{base} did not open the shell in time")))?;
    let (socket, _) = connected.map_err(|error| refused(base, error))?;
    let (sink, stream) = socket.split();
    Ok((ShellInput(sink), ShellOutput(stream)))
}

fn refused(base: &str, error: WsError) -> ApiError {
    match error {
        WsError::Http(response) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let said = serde_json::from_str::<crate::wire::Error>(&body)
                .map(|error| error.error)
                .unwrap_or_else(|_| body.into_owned());
            ApiError::Other(format!(
                "the server answered {}: {}",
                response.status(),
                escaped(&said)
            ))
        }
        other => ApiError::Other(format!("cannot reach {base}: {other}")),
    }
}

impl ShellInput {
    /// Types `keys`.
    pub async fn keys(&mut self, keys: &[u8]) -> Result<(), ApiError> {
        self.send(Message::Binary(Bytes::copy_from_slice(keys)))
            .await
    }

    /// Says the terminal's new size.
    pub async fn resize(&mut self, rows: u16, cols: u16) -> Result<(), ApiError> {
        let size = serde_json::json!({ "rows": rows, "cols": cols }).to_string();
        self.send(Message::Text(size.into())).await
    }

    /// Hangs up.
    pub async fn close(mut self) {
        let _ = self.0.close().await;
    }

    async fn send(&mut self, message: Message) -> Result<(), ApiError> {
        self.0
            .send(message)
            .await
            .map_err(|error| ApiError::Other(format!("the shell's connection: {error}")))
    }
}

impl ShellOutput {
    /// The next piece of the terminal's output; None once the shell has ended.
    pub async fn next(&mut self) -> Option<Bytes> {
        while let Some(message) = self.0.next().await {
            match message {
                Ok(Message::Binary(bytes)) => return Some(bytes),
                Ok(Message::Text(text)) => return Some(Bytes::from(text.as_str().to_owned())),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
        None
    }
}
