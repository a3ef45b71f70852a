//! The interactive console: a websocket carrying the VM's VNC (RFB) stream both ways, for
//! noVNC in the browser. QEMU's VNC server takes several clients, so the console shares the
//! screen with screenshots.

use axum::extract::ws::{Message, WebSocket};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Connects to the VM's VNC server (through the checked socket file QEMU made).
pub async fn connect(vnc: &engine::sandbox::runtime::VncEndpoint) -> std::io::Result<UnixStream> {
    vnc.connect()
}

/// Carries bytes between the browser and the VNC server until either side closes.
pub async fn bridge(websocket: WebSocket, vnc: UnixStream) {
    let (mut to_browser, mut from_browser) = websocket.split();
    let (mut vnc_read, mut vnc_write) = vnc.into_split();
    let upstream = async {
        while let Some(Ok(message)) = from_browser.next().await {
            let bytes = match message {
                Message::Binary(bytes) => bytes,
                Message::Text(text) => text.as_bytes().to_vec().into(),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if vnc_write.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    let downstream = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match vnc_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    let chunk = bytes::Bytes::copy_from_slice(&buffer[..read]);
                    if to_browser.send(Message::Binary(chunk)).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = to_browser.send(Message::Close(None)).await;
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}
