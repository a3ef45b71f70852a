//! A shell between a client and the guest, whatever carries the client's side (the embedded
//! queue's websocket, a Taskcluster worker's): the client's keys become input frames and
//! its `{"rows","cols"}` texts resize frames, and the terminal's output goes back as it comes,
//! until either side closes.

use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use schemas::protocol::shell::{input, resize, TerminalSize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use engine::network::shell::ShellStream;

/// What a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromClient {
    /// Keys typed (a binary message).
    Keys(Bytes),
    /// A text message: the terminal's new size as `{"rows": R, "cols": C}` (anything else is
    /// ignored, as a terminal ignores what it cannot parse).
    Text(String),
    /// Something to skip (a ping).
    Nothing,
    /// The client is leaving.
    Close,
}

/// Carries `shell` between the client (`from_client`, `to_client`) and the guest until
/// either side closes; the client's sink is closed when the shell ends.
pub async fn bridge<Incoming, Outgoing>(
    shell: ShellStream,
    from_client: Incoming,
    mut to_client: Outgoing,
) where
    Incoming: Stream<Item = FromClient> + Unpin,
    Outgoing: Sink<Bytes> + Unpin,
{
    let (mut shell_read, mut shell_write) = tokio::io::split(shell);
    let mut from_client = from_client;
    let upstream = async {
        while let Some(message) = from_client.next().await {
            let framed = match message {
                FromClient::Keys(keys) => input(&keys),
                FromClient::Text(text) => match serde_json::from_str::<TerminalSize>(&text) {
                    Ok(size) => resize(size.rows, size.cols),
                    Err(_) => continue,
                },
                FromClient::Nothing => continue,
                FromClient::Close => break,
            };
            if shell_write.write_all(&framed).await.is_err() {
                break;
            }
        }
    };
    let downstream = async {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match shell_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    let chunk = Bytes::copy_from_slice(&buffer[..read]);
                    if to_client.send(chunk).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = to_client.close().await;
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}
