//! A scripted peer for the guest agent's protocol (`/engine/v1/…`) on a real socket, for the
//! agent's own tests: it hands out one task, records the log as it streams in, records the
//! report (409 on a second one), queues actions and collects replies.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the peer has seen.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Log bytes, in arrival order.
    pub log: Vec<u8>,
    /// `(success|failed, body)` of every report, including refused ones.
    pub reports: Vec<(String, String)>,
    /// Status answered to each report.
    pub report_statuses: Vec<u16>,
    /// Replies by action id: `(content type, body)`.
    pub replies: HashMap<String, (String, Vec<u8>)>,
    /// Whether the task was handed out.
    pub task_taken: bool,
}

#[derive(Default)]
struct Inner {
    task: Option<String>,
    actions: VecDeque<String>,
    seen: Seen,
}

/// A running peer; stops accepting when dropped.
pub struct MetadataPeer {
    url: String,
    inner: Arc<(Mutex<Inner>, Condvar)>,
    stop: Arc<AtomicBool>,
}

impl MetadataPeer {
    /// Serves on `listener` the task `task_json` (an `Execute` document).
    pub fn serve(listener: TcpListener, task_json: &str) -> MetadataPeer {
        let url = format!("http://{}", listener.local_addr().expect("address"));
        listener.set_nonblocking(true).expect("nonblocking");
        let inner = Arc::new((
            Mutex::new(Inner {
                task: Some(task_json.to_owned()),
                ..Inner::default()
            }),
            Condvar::new(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_inner, thread_stop) = (inner.clone(), stop.clone());
        std::thread::spawn(move || {
            while !thread_stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let inner = thread_inner.clone();
                        std::thread::spawn(move || handle(stream, &inner));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        MetadataPeer { url, inner, stop }
    }

    /// Binds 127.0.0.1 on a free port and serves `task_json`.
    pub fn start(task_json: &str) -> MetadataPeer {
        Self::serve(TcpListener::bind("127.0.0.1:0").expect("bind"), task_json)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Queues an action (an `Action` document) for the agent's next poll.
    pub fn push_action(&self, action_json: &str) {
        let (lock, signal) = &*self.inner;
        lock.lock()
            .expect("lock")
            .actions
            .push_back(action_json.to_owned());
        signal.notify_all();
    }

    /// A copy of what has been seen so far.
    pub fn seen(&self) -> Seen {
        self.inner.0.lock().expect("lock").seen.clone()
    }

    /// Waits until `done(seen)` holds or `timeout` passes; returns the last copy.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&Seen) -> bool) -> Seen {
        let (lock, signal) = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut inner = lock.lock().expect("lock");
        while !done(&inner.seen) && Instant::now() < deadline {
            inner = signal
                .wait_timeout(inner, Duration::from_millis(50))
                .expect("wait")
                .0;
        }
        inner.seen.clone()
    }
}

impl Drop for MetadataPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn handle(stream: TcpStream, inner: &(Mutex<Inner>, Condvar)) {
    let _ = stream.set_nonblocking(false);
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut length = 0usize;
    let mut chunked = false;
    let mut content_type = String::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().unwrap_or(0),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "content-type" => content_type = value.to_owned(),
                _ => {}
            }
        }
    }
    let (lock, signal) = inner;
    let respond = |status: u16, body: &str| {
        let mut stream = &stream;
        let _ = write!(
            stream,
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    match (method.as_str(), path) {
        ("GET", "/engine/v1/ping") => respond(200, ""),
        ("GET", "/engine/v1/execute") => {
            let task = {
                let mut inner = lock.lock().expect("lock");
                inner.seen.task_taken = true;
                inner.task.take()
            };
            signal.notify_all();
            match task {
                Some(task) => respond(200, &task),
                None => {
                    std::thread::sleep(Duration::from_millis(500));
                    respond(204, "")
                }
            }
        }
        ("POST", "/engine/v1/log") => {
            // Record each chunk as it arrives, so tests can see streaming.
            let sink = |bytes: &[u8]| {
                lock.lock().expect("lock").seen.log.extend_from_slice(bytes);
                signal.notify_all();
            };
            read_body(&mut reader, chunked, length, sink);
            respond(200, "")
        }
        ("PUT", "/engine/v1/success") | ("PUT", "/engine/v1/failed") => {
            let mut body = Vec::new();
            read_body(&mut reader, chunked, length, |b| body.extend_from_slice(b));
            let status = {
                let mut inner = lock.lock().expect("lock");
                let status = if inner.seen.reports.is_empty() {
                    200
                } else {
                    409
                };
                let kind = path.rsplit('/').next().unwrap_or("").to_owned();
                inner
                    .seen
                    .reports
                    .push((kind, String::from_utf8_lossy(&body).into_owned()));
                inner.seen.report_statuses.push(status);
                status
            };
            signal.notify_all();
            respond(status, "")
        }
        ("GET", "/engine/v1/poll") => {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut guard = lock.lock().expect("lock");
            while guard.actions.is_empty() && Instant::now() < deadline {
                guard = signal
                    .wait_timeout(guard, Duration::from_millis(50))
                    .expect("wait")
                    .0;
            }
            let action = guard.actions.pop_front();
            drop(guard);
            match action {
                Some(action) => respond(200, &action),
                None => respond(204, ""),
            }
        }
        ("POST", "/engine/v1/reply") => {
            let id = query.strip_prefix("id=").unwrap_or("").to_owned();
            let mut body = Vec::new();
            read_body(&mut reader, chunked, length, |b| body.extend_from_slice(b));
            lock.lock()
                .expect("lock")
                .seen
                .replies
                .insert(id, (content_type, body));
            signal.notify_all();
            respond(200, "")
        }
        _ => respond(404, ""),
    }
}

fn read_body(reader: &mut impl BufRead, chunked: bool, length: usize, mut sink: impl FnMut(&[u8])) {
    if !chunked {
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_ok() {
            sink(&body);
        }
        return;
    }
    loop {
        let mut size_line = String::new();
        if reader.read_line(&mut size_line).unwrap_or(0) == 0 {
            return;
        }
        let size = usize::from_str_radix(size_line.trim(), 16).unwrap_or(0);
        if size == 0 {
            let mut end = String::new();
            let _ = reader.read_line(&mut end);
            return;
        }
        let mut chunk = vec![0u8; size + 2];
        if reader.read_exact(&mut chunk).is_err() {
            return;
        }
        sink(&chunk[..size]);
    }
}
