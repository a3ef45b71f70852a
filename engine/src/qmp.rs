//! The QMP connection, through the `qapi` crate (commands and events typed from QEMU's own
//! schema), and a record of the events that decide how a VM ended.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp;
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::sync::Notify;

/// The command side of a QMP connection.
pub type QmpService = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;

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

/// A negotiated QMP connection.
pub struct Qmp {
    service: QmpService,
    record: Arc<Mutex<EventRecord>>,
    changed: Arc<Notify>,
}

impl Qmp {
    /// Connects to `socket`, retrying until QEMU has created it or `timeout` passes.
    pub async fn connect(socket: &Path, timeout: Duration) -> io::Result<Qmp> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match QmpStreamTokio::open_uds(socket).await {
                Ok(negotiation) => break negotiation.negotiate().await?,
                Err(error) if tokio::time::Instant::now() >= deadline => {
                    return Err(io::Error::new(
                        error.kind(),
                        format!("QMP at {}: {error}", socket.display()),
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let (service, mut events) = stream.into_parts();
        let record = Arc::new(Mutex::new(EventRecord::default()));
        let changed = Arc::new(Notify::new());
        let (task_record, task_changed) = (record.clone(), changed.clone());
        tokio::spawn(async move {
            while let Some(Ok(event)) = events.next().await {
                if let Ok(mut record) = task_record.lock() {
                    apply(&mut record, &event);
                }
                task_changed.notify_waiters();
            }
            if let Ok(mut record) = task_record.lock() {
                record.closed = true;
            }
            task_changed.notify_waiters();
        });
        Ok(Qmp {
            service,
            record,
            changed,
        })
    }

    /// The commands.
    pub fn service(&self) -> &QmpService {
        &self.service
    }

    /// A copy of the events recorded so far.
    pub fn record(&self) -> EventRecord {
        self.record.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Waits until the next event (or the end of the connection).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Runs `command` and maps QEMU's error to an I/O error.
    pub async fn execute<C>(&self, command: C) -> io::Result<C::Ok>
    where
        C: qapi::Command + qapi::qmp::QmpCommand,
    {
        self.service
            .execute(command)
            .await
            .map_err(|error| io::Error::other(error.to_string()))
    }

    /// `query-status`: whether the guest runs, and QEMU's run state name.
    pub async fn status(&self) -> io::Result<(bool, String)> {
        let info = self.execute(qmp::query_status {}).await?;
        let state = serde_json_name(&info.status);
        Ok((info.running, state))
    }
}

/// The name QEMU uses for an enum value (its serde name, e.g. `guest-shutdown`).
fn serde_json_name<T: serde::Serialize + std::fmt::Debug>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{value:?}"),
    }
}

fn apply(record: &mut EventRecord, event: &qmp::Event) {
    match event {
        qmp::Event::SHUTDOWN { data, .. } => {
            record.shutdown = Some((data.guest, serde_json_name(&data.reason)));
        }
        qmp::Event::GUEST_PANICKED { .. } => record.panicked = true,
        qmp::Event::RESET { .. } => record.resets += 1,
        qmp::Event::STOP { .. } => record.stopped = true,
        qmp::Event::RESUME { .. } => record.stopped = false,
        _ => {}
    }
}
