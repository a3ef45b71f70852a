//! The protocol client: the agent's side of `protocol`.

use std::io::{self, BufReader, Read};
use std::net::TcpStream;
use std::thread::sleep;
use std::time::Duration;

use protocol::{content_type, Action, Execute, Report, API_PREFIX};

use crate::http::{ChunkedBody, Endpoint, Response};

/// What this agent can do beyond the first protocol, as `GET execute` says it: every
/// [`protocol::feature`] (a test holds the two together).
const FEATURES: &str = "mounts,warm-up";

/// First wait after a failed request while the service is unreachable.
const FIRST_RETRY: Duration = Duration::from_millis(10);
/// Longest wait between attempts: short, because a VM restored from a snapshot finds its
/// (new) metadata service only at its next attempt.
const MAX_RETRY: Duration = Duration::from_millis(20);

/// The longest a request for the task may go unanswered: the service answers a long poll
/// within 20 s (204, ask again), so a request silent for longer lost its service.
const LONG_POLL_BOUND: Duration = Duration::from_secs(30);

/// How one request for the task ended.
enum Asked {
    /// The task.
    Task(Execute),
    /// No task yet (a long poll ended): ask again at once.
    AgainNow,
    /// The service accepted the request and then went away without an answer.
    CutOff,
    /// No connection, or an answer that is not one.
    Unreachable,
}

/// Talks to the metadata service.
pub struct Client {
    endpoint: Endpoint,
}

impl Client {
    /// A client for the service at `url` (`http://host[:port]`).
    pub fn new(url: &str) -> io::Result<Self> {
        Ok(Client {
            endpoint: Endpoint::parse(url)?,
        })
    }

    fn path(name: &str) -> String {
        format!("{API_PREFIX}/{name}")
    }

    /// Asks for the task until one comes (a warm-up included: see [`Execute::warm_up`]). While the service is unreachable the agent retries
    /// with a back-off from 10 ms to 20 ms, so the first request goes out as soon as the
    /// network is up. A request that reached the service and was then cut off (the service
    /// stopped under it, as before a snapshot) is said on the console
    /// ([`protocol::marker::CUT_OFF`]); one that gets no answer within [`LONG_POLL_BOUND`]
    /// is given up and asked again, so no request can hang the agent.
    pub fn wait_for_task(&self) -> Execute {
        let mut delay = FIRST_RETRY;
        loop {
            match self.ask_for_task() {
                Asked::Task(task) => return task,
                Asked::AgainNow => {
                    delay = FIRST_RETRY;
                    continue;
                }
                Asked::CutOff => {
                    let line = protocol::marker::CUT_OFF;
                    crate::markers::marker(
                        line.strip_prefix(protocol::marker::PREFIX).unwrap_or(line),
                    );
                }
                Asked::Unreachable => {}
            }
            sleep(delay);
            delay = (delay * 2).min(MAX_RETRY);
        }
    }

    /// One `GET execute`.
    fn ask_for_task(&self) -> Asked {
        let Ok(stream) = self.endpoint.start(
            "GET",
            &Self::path("execute"),
            &[
                ("Content-Type", "text/plain"),
                ("Content-Length", "0"),
                (protocol::FEATURES_HEADER, FEATURES),
            ],
        ) else {
            return Asked::Unreachable;
        };
        if stream.set_read_timeout(Some(LONG_POLL_BOUND)).is_err() {
            return Asked::Unreachable;
        }
        match Response::read(stream) {
            Ok(response) if response.status == 200 => {
                match serde_json::from_slice::<Execute>(&response.body) {
                    Ok(task) => Asked::Task(task),
                    Err(error) => {
                        eprintln!("taskvm-agent: unreadable task: {error}");
                        Asked::Unreachable
                    }
                }
            }
            Ok(response) if response.status == 204 => Asked::AgainNow,
            Ok(_) => Asked::Unreachable,
            Err(_) => Asked::CutOff,
        }
    }

    /// Starts streaming the command's output.
    pub fn log(&self) -> io::Result<ChunkedBody> {
        ChunkedBody::start(
            &self.endpoint,
            "POST",
            &Self::path("log"),
            content_type::FILE,
        )
    }

    /// Reports how the command ended (`success` for exit code 0, else `failed`); returns the
    /// HTTP status (409 when a report was already made).
    pub fn report(&self, report: &Report) -> io::Result<u16> {
        let name = if report.exit_code == 0 {
            "success"
        } else {
            "failed"
        };
        let body = serde_json::to_vec(&report).map_err(io::Error::other)?;
        let response =
            self.endpoint
                .request("PUT", &Self::path(name), content_type::JSON, &body)?;
        Ok(response.status)
    }

    /// Long-polls for an action; `None` when the poll ended without one.
    pub fn next_action(&self) -> io::Result<Option<Action>> {
        let response = self
            .endpoint
            .request("GET", &Self::path("poll"), "text/plain", b"")?;
        match response.status {
            200 => serde_json::from_slice(&response.body)
                .map(Some)
                .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error)),
            _ => Ok(None),
        }
    }

    /// Answers action `id` with `body`, streamed.
    pub fn reply(&self, id: &str, content_type: &str, mut body: impl Read) -> io::Result<u16> {
        let path = format!("{}?id={}", Self::path("reply"), url_escape(id));
        let mut stream = ChunkedBody::start(&self.endpoint, "POST", &path, content_type)?;
        io::copy(&mut body, &mut stream)?;
        Ok(stream.finish()?.status)
    }

    /// Answers shell action `id` by opening its connection: what the worker sends (frames)
    /// and where the terminal's output goes.
    pub fn open_shell(&self, id: &str) -> io::Result<(BufReader<TcpStream>, TcpStream)> {
        let path = format!("{}?id={}", Self::path("shell"), url_escape(id));
        let input = self.endpoint.upgrade(&path, protocol::shell::UPGRADE)?;
        // Reads block until the worker types: no timeout on a shell.
        input.get_ref().set_read_timeout(None)?;
        let output = input.get_ref().try_clone()?;
        Ok((input, output))
    }

    /// Starts a streamed answer to action `id` (for tar streams written as they are made).
    pub fn reply_stream(&self, id: &str, content_type: &str) -> io::Result<ChunkedBody> {
        let path = format!("{}?id={}", Self::path("reply"), url_escape(id));
        ChunkedBody::start(&self.endpoint, "POST", &path, content_type)
    }
}

fn url_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_agent_lists_every_feature_of_the_protocol() {
        let listed: Vec<&str> = super::FEATURES.split(',').collect();
        assert_eq!(
            listed,
            [protocol::feature::MOUNTS, protocol::feature::WARM_UP]
        );
    }
}
