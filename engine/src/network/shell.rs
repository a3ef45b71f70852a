//! Interactive shells, the worker's side: a shell is asked for as an action, and the guest's
//! agent answers with `GET /engine/v1/shell?id=ID` upgraded to
//! [`schemas::protocol::shell::UPGRADE`]; that connection is handed to whoever asked, as a
//! [`ShellStream`] (the terminal's output to read, frames to write).
//!
//! Bounds: a VM has at most [`MAX_SHELLS`] shells at once (each holds one of its metadata
//! service's connections); an upgrade is taken only for a shell that was asked for and not
//! yet connected; the guest gets [`ShellRequests::open`]'s patience to connect.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use schemas::protocol::shell::UPGRADE as SHELL_PROTOCOL;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::network::metadata::{text, Reply};

/// Shells one VM may have open at once.
pub const MAX_SHELLS: usize = 4;

/// A connected shell: read the terminal's output, write frames
/// ([`schemas::protocol::shell::frame`]). Dropping it hangs the shell up.
pub struct ShellStream {
    connection: TokioIo<Upgraded>,
    _slot: ShellSlot,
}

/// One of a VM's [`MAX_SHELLS`], given back when its shell ends.
struct ShellSlot(Arc<AtomicUsize>);

impl Drop for ShellSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AsyncRead for ShellStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.connection).poll_read(context, buffer)
    }
}

impl AsyncWrite for ShellStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.connection).poll_write(context, bytes)
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.connection).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.connection).poll_shutdown(context)
    }
}

/// Why no shell was opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShellError {
    /// [`MAX_SHELLS`] are open.
    #[error("the VM already has {0} shells open (at most {0})")]
    TooMany(usize),
    /// The agent did not connect in time.
    #[error(
        "the guest's agent did not open the shell within {0} s (an image whose agent \
         predates shells cannot; rebuild it with a current agent)"
    )]
    NotOpened(u64),
    /// The guest is gone.
    #[error("the guest is gone")]
    Gone,
}

/// The shells of one VM: asked for, and open.
#[derive(Default)]
pub struct ShellRequests {
    waiting: Mutex<HashMap<String, oneshot::Sender<ShellStream>>>,
    open: Arc<AtomicUsize>,
}

impl ShellRequests {
    /// Takes a slot for a shell about to be asked for as action `id`; the stream arrives on
    /// the receiver once the guest connects.
    pub fn reserve(&self, id: &str) -> Result<oneshot::Receiver<ShellStream>, ShellError> {
        let taken = self
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                (open < MAX_SHELLS).then_some(open + 1)
            });
        if taken.is_err() {
            return Err(ShellError::TooMany(MAX_SHELLS));
        }
        let (sender, receiver) = oneshot::channel();
        self.lock().insert(id.to_owned(), sender);
        Ok(receiver)
    }

    /// Gives back the slot of shell `id`, which never connected.
    pub fn forget(&self, id: &str) {
        if self.lock().remove(id).is_some() {
            self.open.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Answers the guest's `GET shell?id=ID`: switches protocols when shell `id` is awaited.
    pub fn accept(&self, mut request: Request<Incoming>) -> Reply {
        let id = query_id(&request);
        let asks_for_shell = request.headers().get(UPGRADE).is_some_and(|value| {
            value
                .as_bytes()
                .eq_ignore_ascii_case(SHELL_PROTOCOL.as_bytes())
        });
        if !asks_for_shell {
            return text(
                StatusCode::BAD_REQUEST,
                format!("a shell connection upgrades to {SHELL_PROTOCOL}\n"),
            );
        }
        let Some(waiting) = self.lock().remove(&id) else {
            return text(
                StatusCode::NOT_FOUND,
                "no such shell, or already connected\n",
            );
        };
        let slot = ShellSlot(self.open.clone());
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let _ = waiting.send(ShellStream {
                    connection: TokioIo::new(upgraded),
                    _slot: slot,
                });
            }
        });
        let mut reply = text(StatusCode::SWITCHING_PROTOCOLS, "");
        let headers = reply.headers_mut();
        headers.remove(hyper::header::CONTENT_TYPE);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static(SHELL_PROTOCOL));
        reply
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<ShellStream>>> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The `id` of a query string (`?id=…`), or empty.
pub(crate) fn query_id(request: &Request<Incoming>) -> String {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("id="))
        .unwrap_or_default()
        .to_owned()
}
