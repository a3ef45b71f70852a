//! Opening an image's bytes: HTTP with conditional requests and a stall timeout, or a file.

use std::io::{self, Read};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::ImageError;
use crate::reference::Source;

/// What lets a later request ask "has it changed?" cheaply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Validators {
    /// HTTP `ETag`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// HTTP `Last-Modified`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    /// For files: modification time (ns since the epoch) and size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_stamp: Option<(u128, u64)>,
}

impl Validators {
    fn is_empty(&self) -> bool {
        self.etag.is_none() && self.last_modified.is_none() && self.file_stamp.is_none()
    }
}

/// An opened source.
pub enum Opened {
    /// The source still matches the given validators.
    NotModified,
    /// The bytes, with the validators to record.
    Body {
        /// The compressed stream.
        reader: Box<dyn Read + Send>,
        /// Total length when known (for progress).
        length: Option<u64>,
        /// Validators of this version.
        validators: Validators,
    },
}

/// Opens `source`; with `known`, answers `NotModified` when it has not changed.
pub fn open(
    source: &Source,
    known: Option<&Validators>,
    stall_timeout: Duration,
) -> Result<Opened, ImageError> {
    match source {
        Source::File(path) => open_file(path, known),
        Source::Http(url) => open_http(url, known, stall_timeout),
    }
}

fn open_file(path: &std::path::Path, known: Option<&Validators>) -> Result<Opened, ImageError> {
    // A file that is not there (or not a file) is the reference's fault, like an HTTP 404.
    let bad = |reason: String| ImageError::BadReference {
        reference: path.display().to_string(),
        reason,
    };
    // No symlink is followed and nothing blocks (a FIFO would wait for a writer forever);
    // only then does fstat decide, before any byte is read.
    use std::os::unix::fs::OpenOptionsExt;
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == rustix::io::Errno::LOOP.raw_os_error() => {
                bad("a symbolic link; name the file itself".into())
            }
            _ => match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => bad(e.to_string()),
                _ => ImageError::io_at("open", path, e),
            },
        })?;
    let metadata = file
        .metadata()
        .map_err(|e| ImageError::io_at("stat", path, e))?;
    if !metadata.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let kind = metadata.file_type();
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(bad(format!("{what}, not a regular file")));
    }
    let modified = metadata
        .modified()
        .ok()
        .and_then(|time| time.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |since| since.as_nanos());
    let validators = Validators {
        file_stamp: Some((modified, metadata.len())),
        ..Validators::default()
    };
    if known == Some(&validators) {
        return Ok(Opened::NotModified);
    }
    Ok(Opened::Body {
        reader: Box::new(file),
        length: Some(metadata.len()),
        validators,
    })
}

fn open_http(
    url: &str,
    known: Option<&Validators>,
    stall_timeout: Duration,
) -> Result<Opened, ImageError> {
    let client = reqwest::blocking::Client::builder()
        .user_agent(concat!("taskvm/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(30))
        // In the blocking client this bounds each operation, each read included: a stall.
        .timeout(stall_timeout)
        .build()
        .map_err(|error| transport(url, &error))?;
    let mut request = client.get(url);
    if let Some(known) = known.filter(|known| !known.is_empty()) {
        if let Some(etag) = &known.etag {
            request = request.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        if let Some(last_modified) = &known.last_modified {
            request = request.header(reqwest::header::IF_MODIFIED_SINCE, last_modified);
        }
    }
    let response = request.send().map_err(|error| {
        if error.is_timeout() {
            ImageError::Stalled {
                url: url.to_owned(),
                seconds: u32::try_from(stall_timeout.as_secs()).unwrap_or(u32::MAX),
            }
        } else {
            transport(url, &error)
        }
    })?;
    let status = response.status();
    if status == reqwest::StatusCode::NOT_MODIFIED && known.is_some() {
        return Ok(Opened::NotModified);
    }
    if !status.is_success() {
        return Err(ImageError::HttpStatus {
            url: url.to_owned(),
            status: status.as_u16(),
        });
    }
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|value: &reqwest::header::HeaderValue| value.to_str().ok())
            .map(str::to_owned)
    };
    let validators = Validators {
        etag: header(reqwest::header::ETAG),
        last_modified: header(reqwest::header::LAST_MODIFIED),
        file_stamp: None,
    };
    Ok(Opened::Body {
        length: response.content_length(),
        reader: Box::new(response),
        validators,
    })
}

fn transport(url: &str, error: &reqwest::Error) -> ImageError {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        message = format!("{message}: {inner}");
        source = inner.source();
    }
    ImageError::Transport {
        url: url.to_owned(),
        message,
        transient: error.is_connect()
            || error.is_timeout()
            || error.is_request()
            || error.is_body(),
    }
}

/// Turns a read error of a body into the matching image error.
pub fn read_error(url: &str, error: &io::Error, stall_timeout: Duration) -> ImageError {
    let mut message = error.to_string();
    let mut timed_out = error.kind() == io::ErrorKind::TimedOut;
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        message = format!("{message}: {inner}");
        timed_out |= inner
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::TimedOut)
            || inner.downcast_ref::<reqwest::Error>().is_some_and(reqwest::Error::is_timeout)
            // reqwest's own timeout type is private; its message is all there is to go on.
            || inner.to_string() == "operation timed out";
        source = inner.source();
    }
    if timed_out {
        ImageError::Stalled {
            url: url.to_owned(),
            seconds: u32::try_from(stall_timeout.as_secs()).unwrap_or(u32::MAX),
        }
    } else {
        ImageError::Transport {
            url: url.to_owned(),
            message,
            transient: true,
        }
    }
}
