//! A minimal HTTP/1.1 client for talking to the metadata service: one connection per request
//! (`Connection: close`), fixed-length or chunked request bodies, and responses delimited by
//! `Content-Length`, chunked encoding or the end of the connection.
//!
//! It needs no TLS and no name resolution: the service is always at an IP address.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Largest response body the agent accepts (actions and tasks are small).
const MAX_RESPONSE: u64 = 16 << 20;

/// Where the service is: `http://HOST:PORT` (the port defaults to 80).
#[derive(Debug, Clone)]
pub struct Endpoint {
    address: SocketAddr,
    host: String,
}

impl Endpoint {
    /// Parses `http://host[:port]` (a trailing `/` is allowed).
    pub fn parse(url: &str) -> io::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| invalid(format!("not an http:// URL: {url}")))?;
        let host = rest.trim_end_matches('/').to_owned();
        let with_port = if host.contains(':') {
            host.clone()
        } else {
            format!("{host}:80")
        };
        let address = with_port
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| invalid(format!("no address for {host}")))?;
        Ok(Endpoint { address, host })
    }

    /// Opens a connection and sends the request head.
    pub fn start(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<TcpStream> {
        self.start_with(method, path, "close", headers)
    }

    /// Opens a connection that asks to become a `protocol` byte stream; returns the stream
    /// once the service agreed (101), with whatever it already sent after its answer.
    pub fn upgrade(&self, path: &str, protocol: &str) -> io::Result<BufReader<TcpStream>> {
        let stream = self.start_with("GET", path, "upgrade", &[("Upgrade", protocol)])?;
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line)?;
        if status_line.split_whitespace().nth(1) != Some("101") {
            return Err(invalid(format!(
                "the service did not switch protocols: {:?}",
                status_line.trim_end()
            )));
        }
        let mut head = status_line.len();
        loop {
            let mut line = String::new();
            let read = reader.read_line(&mut line)?;
            head += read;
            if read == 0 || line == "\r\n" || line == "\n" {
                return Ok(reader);
            }
            if head > 16 * 1024 {
                return Err(invalid("the answer's head is over 16 KiB".to_owned()));
            }
        }
    }

    fn start_with(
        &self,
        method: &str,
        path: &str,
        connection: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<TcpStream> {
        // Short: the service is on the guest's own link. A VM restored from a snapshot taken
        // during a connection attempt retries after this instead of the kernel's 1 s SYN timer.
        let mut stream = TcpStream::connect_timeout(&self.address, Duration::from_millis(250))?;
        stream.set_nodelay(true)?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: {connection}\r\n",
            self.host
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        Ok(stream)
    }

    /// A request with an optional body of known length; returns the response.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> io::Result<Response> {
        let length = body.len().to_string();
        let mut stream = self.start(
            method,
            path,
            &[("Content-Type", content_type), ("Content-Length", &length)],
        )?;
        stream.write_all(body)?;
        stream.flush()?;
        Response::read(stream)
    }
}

/// A request body sent in chunks as it is produced.
pub struct ChunkedBody {
    stream: TcpStream,
}

impl ChunkedBody {
    /// Starts a chunked request.
    pub fn start(
        endpoint: &Endpoint,
        method: &str,
        path: &str,
        content_type: &str,
    ) -> io::Result<Self> {
        let stream = endpoint.start(
            method,
            path,
            &[
                ("Content-Type", content_type),
                ("Transfer-Encoding", "chunked"),
            ],
        )?;
        Ok(ChunkedBody { stream })
    }

    /// Sends one chunk now.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        // One write, so one segment: the chunk's size line, data and end go out together.
        let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
        chunk.reserve(data.len() + 2);
        chunk.extend_from_slice(data);
        chunk.extend_from_slice(b"\r\n");
        self.stream.write_all(&chunk)?;
        self.stream.flush()
    }

    /// Ends the body and reads the response.
    pub fn finish(mut self) -> io::Result<Response> {
        self.stream.write_all(b"0\r\n\r\n")?;
        self.stream.flush()?;
        Response::read(self.stream)
    }
}

impl Write for ChunkedBody {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Response {
    /// Reads the response to a request sent on `stream`.
    pub(crate) fn read(stream: TcpStream) -> io::Result<Self> {
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
        let mut length = None;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse::<u64>().ok();
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.eq_ignore_ascii_case("chunked");
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            read_chunked(&mut reader, &mut body)?;
        } else {
            let limit = length.unwrap_or(MAX_RESPONSE).min(MAX_RESPONSE);
            reader.take(limit).read_to_end(&mut body)?;
        }
        Ok(Response { status, body })
    }
}

fn read_chunked(reader: &mut impl BufRead, body: &mut Vec<u8>) -> io::Result<()> {
    loop {
        let mut size_line = String::new();
        reader.read_line(&mut size_line)?;
        let size_text = size_line.trim().split(';').next().unwrap_or("");
        let size = u64::from_str_radix(size_text, 16)
            .map_err(|_| invalid(format!("bad chunk size {size_line:?}")))?;
        if size == 0 {
            return Ok(());
        }
        if body.len() as u64 + size > MAX_RESPONSE {
            return Err(invalid("response too large".to_owned()));
        }
        let mut chunk = vec![0u8; size as usize];
        reader.read_exact(&mut chunk)?;
        body.extend_from_slice(&chunk);
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf)?;
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}
