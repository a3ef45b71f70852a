//! The interactive shell: a websocket carrying a login shell in the guest. The browser (or
//! `taskvm shell`) sends the keys as binary messages and the terminal's size as a text
//! message `{"rows": R, "cols": C}`; the terminal's output comes back as binary messages.
//! Closing the websocket hangs the shell up; the shell exiting closes the websocket.

use std::collections::HashMap;

use axum::extract::ws::{Message, WebSocket};
use futures::{SinkExt, StreamExt};
use lifecycle::shell_bridge::{self, FromClient};
use schemas::protocol::shell::MAX_FRAME;

/// The largest websocket message a client may send: one frame of input.
pub const MAX_MESSAGE: usize = MAX_FRAME;

/// The terminal size a shell's URL asks for (`?rows=R&cols=C`); 24 × 80 where it does
/// not say, or says something other than a number from 1 to 65535.
pub fn terminal_size(query: &HashMap<String, String>) -> (u16, u16) {
    let size = |name: &str, default: u16| {
        query
            .get(name)
            .and_then(|value| value.parse::<u16>().ok())
            .filter(|value| *value > 0)
            .unwrap_or(default)
    };
    (size("rows", 24), size("cols", 80))
}

/// Carries the shell between the client and the guest until either side closes.
pub async fn bridge(websocket: WebSocket, shell: lifecycle::ShellStream) {
    let (to_client, from_client) = websocket.split();
    let from_client = from_client.map(|message| match message {
        Ok(Message::Binary(keys)) => FromClient::Keys(keys),
        Ok(Message::Text(text)) => FromClient::Text(text.as_str().to_owned()),
        Ok(Message::Ping(_) | Message::Pong(_)) => FromClient::Nothing,
        Ok(Message::Close(_)) | Err(_) => FromClient::Close,
    });
    let to_client =
        to_client.with(|output| async { Ok::<_, axum::Error>(Message::Binary(output)) });
    shell_bridge::bridge(shell, from_client, Box::pin(to_client)).await;
}
