//! The QMP connection: QEMU's JSON control protocol, one message per line, with the few
//! commands taskvm uses and a record of the events that decide how a VM ended.
//!
//! QEMU counts as hostile (a guest may have escaped into it), so every message it sends is
//! bounded ([`MESSAGE_LIMIT`]) before it is buffered, and every command waits at most
//! [`COMMAND_TIMEOUT`] for its answer. A message over the bound, or one that is not JSON,
//! ends the connection: QEMU never sends either.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schemas::shown::escaped;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{oneshot, Notify};

/// The longest message taken from QEMU (its answers and events are well under 4 KiB).
pub const MESSAGE_LIMIT: usize = 1 << 20;

/// How long a command waits for QEMU's answer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What the events said so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventRecord {
    /// A SHUTDOWN event: `(guest initiated, cause)`.
    pub shutdown: Option<(bool, String)>,
    /// A GUEST_PANICKED event arrived.
    pub panicked: bool,
    /// Number of RESET events.
    pub resets: u32,
    /// Whether the VM is stopped (STOP without a later RESUME).
    pub stopped: bool,
    /// The connection has ended (QEMU closed it, normally by exiting).
    pub closed: bool,
}

/// What `query-migrate` says of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationInfo {
    /// QEMU's status name (`active`, `completed`, `failed`, …); none before any migration.
    pub status: Option<String>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

type Answer = Result<Value, String>;

/// What the reading task and the command side share.
#[derive(Default)]
struct Shared {
    record: Mutex<EventRecord>,
    commands: Mutex<Commands>,
    changed: Notify,
}

/// The commands waiting for an answer, and why the connection ended once it has: one lock,
/// so that no command starts waiting after the last answers were handed out.
#[derive(Default)]
struct Commands {
    waiting: HashMap<u64, oneshot::Sender<Answer>>,
    ended: Option<String>,
}

/// A negotiated QMP connection.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    next_id: AtomicU64,
    command_timeout: Duration,
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects to `socket` and negotiates capabilities, retrying the connection until QEMU
    /// has created the socket; all of it within `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> io::Result<Qmp> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(stream) => break stream,
                Err(error) if tokio::time::Instant::now() >= deadline => {
                    return Err(io::Error::new(
                        error.kind(),
                        format!("QMP at {}: {error}", socket.display()),
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        tokio::time::timeout_at(deadline, Qmp::negotiate(stream))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("QMP at {}: no greeting in {timeout:?}", socket.display()),
                )
            })?
    }

    /// Reads the greeting, enters command mode and starts the reading task.
    async fn negotiate(stream: UnixStream) -> io::Result<Qmp> {
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let greeting = read_message(&mut reader)
            .await?
            .ok_or_else(|| protocol_error("QEMU closed QMP before its greeting"))?;
        if greeting.get("QMP").is_none() {
            return Err(protocol_error("QEMU's first QMP message is not a greeting"));
        }
        write
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .await?;
        loop {
            let message = read_message(&mut reader)
                .await?
                .ok_or_else(|| protocol_error("QEMU closed QMP during negotiation"))?;
            if message.get("return").is_some() {
                break;
            }
            if let Some(error) = message.get("error") {
                return Err(protocol_error(&format!(
                    "qmp_capabilities was refused: {}",
                    error_text(error)
                )));
            }
        }
        let shared = Arc::new(Shared::default());
        let reader = tokio::spawn(read_messages(reader, shared.clone()));
        Ok(Qmp {
            writer: tokio::sync::Mutex::new(write),
            next_id: AtomicU64::new(1),
            command_timeout: COMMAND_TIMEOUT,
            shared,
            reader,
        })
    }

    /// Sets how long each command waits for its answer ([`COMMAND_TIMEOUT`] by default).
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// A copy of the events recorded so far.
    pub fn record(&self) -> EventRecord {
        self.shared
            .record
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Waits until the next event (or the end of the connection).
    pub async fn changed(&self) {
        self.shared.changed.notified().await;
    }

    /// Runs `command` with `arguments` and gives its `return` value; QEMU's error, a closed
    /// connection and no answer in time ([`Qmp::set_command_timeout`]) are errors naming the
    /// command.
    pub async fn execute(&self, command: &str, arguments: Value) -> io::Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer_tx, answer_rx) = oneshot::channel();
        {
            let mut commands = self.shared.commands.lock().map_err(|_| poisoned())?;
            if let Some(reason) = &commands.ended {
                return Err(io::Error::other(format!("{command}: {reason}")));
            }
            commands.waiting.insert(id, answer_tx);
        }
        let mut line = json!({ "execute": command, "arguments": arguments, "id": id }).to_string();
        line.push('\n');
        let sent = async {
            self.writer.lock().await.write_all(line.as_bytes()).await?;
            answer_rx
                .await
                .map_err(|_| io::Error::other("the QMP connection ended"))
        };
        let answer = tokio::time::timeout(self.command_timeout, sent).await;
        if let Ok(mut commands) = self.shared.commands.lock() {
            commands.waiting.remove(&id);
        }
        match answer {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(error))) => Err(io::Error::other(format!("{command}: {error}"))),
            Ok(Err(error)) => Err(io::Error::new(error.kind(), format!("{command}: {error}"))),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{command}: QEMU gave no answer in {:?}",
                    self.command_timeout
                ),
            )),
        }
    }

    /// `stop`: pauses the guest.
    pub async fn stop(&self) -> io::Result<()> {
        self.execute("stop", json!({})).await.map(drop)
    }

    /// `cont`: resumes a paused guest.
    pub async fn cont(&self) -> io::Result<()> {
        self.execute("cont", json!({})).await.map(drop)
    }

    /// `system_reset`.
    pub async fn system_reset(&self) -> io::Result<()> {
        self.execute("system_reset", json!({})).await.map(drop)
    }

    /// `screendump` of the first display into `filename` (a path as QEMU sees it).
    pub async fn screendump(&self, filename: &str) -> io::Result<()> {
        let arguments = json!({ "filename": filename });
        self.execute("screendump", arguments).await.map(drop)
    }

    /// `migrate-set-parameters` with the migration's bandwidth in bytes per second.
    pub async fn set_migration_bandwidth(&self, bytes_per_second: u64) -> io::Result<()> {
        let arguments = json!({ "max-bandwidth": bytes_per_second });
        let answer = self.execute("migrate-set-parameters", arguments).await;
        answer.map(drop)
    }

    /// Turns on the migration capability `x-ignore-shared`: RAM mapped shared from a file is
    /// left out of the stream (a restore maps the file instead). Both ends need it.
    pub async fn ignore_shared_memory(&self) -> io::Result<()> {
        let arguments = json!({
            "capabilities": [{ "capability": "x-ignore-shared", "state": true }]
        });
        self.execute("migrate-set-capabilities", arguments)
            .await
            .map(drop)
    }

    /// `migrate` to `uri` (it runs in the background: see [`Qmp::query_migrate`]).
    pub async fn migrate(&self, uri: &str) -> io::Result<()> {
        self.execute("migrate", json!({ "uri": uri }))
            .await
            .map(drop)
    }

    /// `query-migrate`.
    pub async fn query_migrate(&self) -> io::Result<MigrationInfo> {
        let info = self.execute("query-migrate", json!({})).await?;
        let text = |name: &str| info.get(name).and_then(Value::as_str).map(str::to_owned);
        Ok(MigrationInfo {
            status: text("status"),
            error: text("error-desc"),
        })
    }

    /// `query-status`: whether the guest runs, and QEMU's run state name.
    pub async fn status(&self) -> io::Result<(bool, String)> {
        let info = self.execute("query-status", json!({})).await?;
        let running = info.get("running").and_then(Value::as_bool);
        let state = info.get("status").and_then(Value::as_str);
        match (running, state) {
            (Some(running), Some(state)) => Ok((running, state.to_owned())),
            _ => Err(protocol_error(
                "query-status answered without running and status",
            )),
        }
    }
}

/// Reads QEMU's messages until the connection ends: answers go to their command, events
/// into the record.
async fn read_messages<R: AsyncRead + Unpin>(mut reader: BufReader<R>, shared: Arc<Shared>) {
    let reason = loop {
        match read_message(&mut reader).await {
            Ok(Some(message)) => dispatch(&shared, message),
            Ok(None) => break "QEMU closed the QMP connection".to_owned(),
            Err(error) => break error.to_string(),
        }
        shared.changed.notify_waiters();
    };
    if let Ok(mut commands) = shared.commands.lock() {
        for (_, answer) in commands.waiting.drain() {
            let _ = answer.send(Err(reason.clone()));
        }
        commands.ended = Some(reason);
    }
    if let Ok(mut record) = shared.record.lock() {
        record.closed = true;
    }
    shared.changed.notify_waiters();
}

fn dispatch(shared: &Shared, message: Value) {
    if let Some(event) = message.get("event").and_then(Value::as_str) {
        if let Ok(mut record) = shared.record.lock() {
            apply(&mut record, event, message.get("data"));
        }
        return;
    }
    let Some(id) = message.get("id").and_then(Value::as_u64) else {
        return;
    };
    let answer = match (message.get("return"), message.get("error")) {
        (Some(value), _) => Ok(value.clone()),
        (None, Some(error)) => Err(error_text(error)),
        (None, None) => Err("an answer with neither return nor error".to_owned()),
    };
    let waiter = shared
        .commands
        .lock()
        .ok()
        .and_then(|mut commands| commands.waiting.remove(&id));
    if let Some(waiter) = waiter {
        let _ = waiter.send(answer);
    }
}

fn apply(record: &mut EventRecord, event: &str, data: Option<&Value>) {
    let field = |name: &str| data.and_then(|data| data.get(name));
    match event {
        "SHUTDOWN" => {
            let guest = field("guest").and_then(Value::as_bool).unwrap_or(false);
            let reason = field("reason").and_then(Value::as_str).unwrap_or("unknown");
            record.shutdown = Some((guest, escaped(reason)));
        }
        "GUEST_PANICKED" => record.panicked = true,
        "RESET" => record.resets = record.resets.saturating_add(1),
        "STOP" => record.stopped = true,
        "RESUME" => record.stopped = false,
        _ => {}
    }
}

/// One message: a line of at most [`MESSAGE_LIMIT`] bytes holding a JSON object; `None` at
/// the end of the connection.
async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> io::Result<Option<Value>> {
    let mut line = Vec::new();
    let limit = MESSAGE_LIMIT as u64 + 1;
    let read = (&mut *reader)
        .take(limit)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(protocol_error(if line.len() > MESSAGE_LIMIT {
            "QEMU sent a QMP message over the 1 MiB bound"
        } else {
            "QEMU closed QMP in the middle of a message"
        }));
    }
    match serde_json::from_slice::<Value>(&line) {
        Ok(message) if message.is_object() => Ok(Some(message)),
        _ => Err(protocol_error(
            "QEMU sent a QMP message that is not a JSON object",
        )),
    }
}

/// QEMU's error object as `class: description`, cut and escaped.
fn error_text(error: &Value) -> String {
    let class = error
        .get("class")
        .and_then(Value::as_str)
        .unwrap_or("Error");
    let description = error.get("desc").and_then(Value::as_str).unwrap_or("");
    escaped(&format!("{class}: {description}"))
}

fn poisoned() -> io::Error {
    io::Error::other("the QMP connection's state was poisoned by a panic")
}

fn protocol_error(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A QEMU of the test's making on a real socket: it greets, accepts the capabilities,
    /// then does what `then` does with the connection.
    async fn fake_qemu<F, Fut>(then: F) -> (tempfile::TempDir, Qmp)
    where
        F: FnOnce(BufReader<tokio::net::unix::OwnedReadHalf>, OwnedWriteHalf) -> Fut
            + Send
            + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            write
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut line = String::new();
            read.read_line(&mut line).await.unwrap();
            assert!(line.contains("qmp_capabilities"), "{line}");
            write.write_all(b"{\"return\": {}}\n").await.unwrap();
            then(read, write).await;
        });
        let qmp = Qmp::connect(&socket, Duration::from_secs(10))
            .await
            .unwrap();
        (dir, qmp)
    }

    async fn request_id(read: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> u64 {
        let mut line = String::new();
        read.read_line(&mut line).await.unwrap();
        let request: Value = serde_json::from_str(&line).unwrap();
        request["id"].as_u64().unwrap()
    }

    #[tokio::test]
    async fn answers_reach_their_command_and_events_the_record() {
        let (_dir, qmp) = fake_qemu(|mut read, mut write| async move {
            let id = request_id(&mut read).await;
            let messages = format!(
                "{{\"event\": \"STOP\", \"timestamp\": {{}}}}\n\
                 {{\"event\": \"SHUTDOWN\", \"data\": {{\"guest\": true, \"reason\": \"guest-shutdown\"}}}}\n\
                 {{\"return\": {{\"running\": false, \"status\": \"paused\"}}, \"id\": {id}}}\n"
            );
            write.write_all(messages.as_bytes()).await.unwrap();
            let id = request_id(&mut read).await;
            let refusal = format!(
                "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"no\\nway\"}}, \"id\": {id}}}\n"
            );
            write.write_all(refusal.as_bytes()).await.unwrap();
        })
        .await;
        assert_eq!(qmp.status().await.unwrap(), (false, "paused".to_owned()));
        let record = qmp.record();
        assert!(record.stopped);
        assert_eq!(record.shutdown, Some((true, "guest-shutdown".to_owned())));
        let refused = qmp.cont().await.unwrap_err().to_string();
        assert_eq!(refused, "cont: GenericError: no\\nway");
    }

    #[tokio::test]
    async fn a_message_over_the_bound_ends_the_connection_and_fails_the_command() {
        let (_dir, qmp) = fake_qemu(|mut read, mut write| async move {
            request_id(&mut read).await;
            let chunk = vec![b'x'; 64 << 10];
            // Endless: only the reader's bound stops it.
            while write.write_all(&chunk).await.is_ok() {}
        })
        .await;
        let error = qmp.stop().await.unwrap_err().to_string();
        assert!(error.contains("over the 1 MiB bound"), "{error}");
        assert!(qmp.record().closed);
        let later = qmp.cont().await.unwrap_err().to_string();
        assert!(later.contains("over the 1 MiB bound"), "{later}");
    }

    #[tokio::test]
    async fn a_qemu_that_never_answers_times_the_command_out() {
        let (_dir, mut qmp) = fake_qemu(|mut read, write| async move {
            let _open = write;
            request_id(&mut read).await;
            std::future::pending::<()>().await;
        })
        .await;
        qmp.set_command_timeout(Duration::from_millis(300));
        let error = qmp.system_reset().await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(error
            .to_string()
            .starts_with("system_reset: QEMU gave no answer"));
    }

    #[tokio::test]
    async fn a_peer_that_never_greets_is_an_error_within_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let held = tokio::spawn(async move { listener.accept().await.map(|(stream, _)| stream) });
        let error = Qmp::connect(&socket, Duration::from_millis(300))
            .await
            .err()
            .unwrap();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        drop(held);
    }
}
