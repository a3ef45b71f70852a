//! A small HTTP/1.1 server on loopback for tests: real sockets, real requests.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a served path behaves.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Serve the bytes with an ETag, answering `If-None-Match` with 304.
    Normal(Vec<u8>),
    /// Serve the bytes in 64 KiB pieces with a pause after each.
    Slow(Vec<u8>, Duration),
    /// Announce the full length but close the connection after `cut` bytes.
    Truncated(Vec<u8>, usize),
    /// Answer with this status and no body.
    Status(u16),
    /// Answer with a 503 `failures` times, then serve the bytes.
    FlakyThenNormal(Vec<u8>, usize),
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Behaviour>,
    requests: HashMap<String, usize>,
    conditional: HashMap<String, usize>,
}

/// A running server; stops when dropped.
pub struct Server {
    address: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Starts a server on 127.0.0.1 with a free port.
    pub fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let address = listener.local_addr().expect("address").to_string();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_state, thread_stop) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            while !thread_stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let state = thread_state.clone();
                        std::thread::spawn(move || serve(stream, &state));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Server {
            address,
            state,
            stop,
        }
    }

    /// Serves `behaviour` at `path` (which starts with `/`).
    pub fn route(&self, path: &str, behaviour: Behaviour) {
        self.state
            .lock()
            .expect("lock")
            .routes
            .insert(path.to_owned(), behaviour);
    }

    /// The full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// GET requests received for `path`.
    pub fn requests(&self, path: &str) -> usize {
        *self
            .state
            .lock()
            .expect("lock")
            .requests
            .get(path)
            .unwrap_or(&0)
    }

    /// Conditional GET requests (with `If-None-Match`) received for `path`.
    pub fn conditional_requests(&self, path: &str) -> usize {
        *self
            .state
            .lock()
            .expect("lock")
            .conditional
            .get(path)
            .unwrap_or(&0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn etag_of(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    format!("\"{hash:016x}-{}\"", bytes.len())
}

fn serve(stream: TcpStream, state: &Mutex<State>) {
    let _ = stream.set_nonblocking(false);
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_owned();
    let mut if_none_match = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("if-none-match") {
                if_none_match = Some(value.trim().to_owned());
            }
        }
    }
    let behaviour = {
        let mut state = state.lock().expect("lock");
        *state.requests.entry(path.clone()).or_default() += 1;
        if if_none_match.is_some() {
            *state.conditional.entry(path.clone()).or_default() += 1;
        }
        let behaviour = state.routes.get(&path).cloned();
        if let Some(Behaviour::FlakyThenNormal(bytes, failures)) = &behaviour {
            let next = if *failures == 0 {
                Behaviour::Normal(bytes.clone())
            } else {
                Behaviour::FlakyThenNormal(bytes.clone(), failures - 1)
            };
            state.routes.insert(path.clone(), next);
        }
        behaviour
    };
    let mut stream = stream;
    let head = |status: &str, length: usize, etag: &str| {
        format!("HTTP/1.1 {status}\r\nContent-Length: {length}\r\nETag: {etag}\r\nConnection: close\r\n\r\n")
    };
    let _ = match behaviour {
        None => stream.write_all(head("404 Not Found", 0, "\"none\"").as_bytes()),
        Some(Behaviour::Status(code)) => {
            stream.write_all(head(&format!("{code} Status"), 0, "\"none\"").as_bytes())
        }
        Some(Behaviour::FlakyThenNormal(_, failures)) if failures > 0 => {
            stream.write_all(head("503 Service Unavailable", 0, "\"none\"").as_bytes())
        }
        Some(Behaviour::Normal(bytes)) | Some(Behaviour::FlakyThenNormal(bytes, _)) => {
            let etag = etag_of(&bytes);
            if if_none_match.as_deref() == Some(etag.as_str()) {
                stream.write_all(head("304 Not Modified", 0, &etag).as_bytes())
            } else {
                stream
                    .write_all(head("200 OK", bytes.len(), &etag).as_bytes())
                    .and_then(|()| stream.write_all(&bytes))
            }
        }
        Some(Behaviour::Slow(bytes, pause)) => {
            let etag = etag_of(&bytes);
            let mut outcome = stream.write_all(head("200 OK", bytes.len(), &etag).as_bytes());
            for piece in bytes.chunks(64 * 1024) {
                if outcome.is_err() {
                    break;
                }
                outcome = stream.write_all(piece).and_then(|()| stream.flush());
                std::thread::sleep(pause);
            }
            outcome
        }
        Some(Behaviour::Truncated(bytes, cut)) => {
            let etag = etag_of(&bytes);
            stream
                .write_all(head("200 OK", bytes.len(), &etag).as_bytes())
                .and_then(|()| stream.write_all(&bytes[..cut.min(bytes.len())]))
        }
    };
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
