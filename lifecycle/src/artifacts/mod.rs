//! Copying a task's artifacts out of the guest through the agent: a file arrives as its
//! bytes, a directory as a tar stream that is unpacked here under strict rules — regular
//! files and directories only, relative names without `..`, nothing followed, modes not
//! kept — so that a hostile guest can write nothing outside the task's artifacts directory.
//! What all of a task's artifacts may cost (bytes, entries, time, rate, free disk) is its
//! [`Budget`] (`budget`); directories are read with the bounded tar reader (`directory`).

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use engine::network::session::GuestSession;
use schemas::protocol::{content_type, ActionKind, ReplyError};
use schemas::shown::quoted;
use schemas::{Artifact, ArtifactKind};
use thiserror::Error;

mod budget;
mod directory;

pub use self::budget::{Budget, Exceeded};
use self::budget::{GuestStream, SharedBudget};

/// How long the guest may take to start answering for one artifact (bounded by the task's
/// [`Budget`] deadline too).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// One collected artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collected {
    /// Its name (a path relative to the artifacts directory).
    pub name: String,
    /// Files written, relative to the artifacts directory.
    pub files: Vec<String>,
    /// Bytes written.
    pub bytes: u64,
    /// Entries of a directory that were left out: links, devices and the like, and names
    /// taskvm keeps for its own files (quoted and cut; at most [`SKIPPED_SHOWN`] of them).
    pub skipped: Vec<String>,
    /// How many entries were left out in all.
    pub skipped_count: u64,
}

/// Most left-out entries named in [`Collected::skipped`].
pub const SKIPPED_SHOWN: usize = 20;

/// The content types of artifact files by extension; any other name is
/// [`DEFAULT_CONTENT_TYPE`]. Markup is served as text, never rendered as a page of ours.
pub const CONTENT_TYPES: &[(&[&str], &str)] = &[
    (
        &["log", "txt", "html", "htm", "svg"],
        "text/plain; charset=utf-8",
    ),
    (&["png"], "image/png"),
    (&["json"], "application/json"),
    (&["tar"], "application/x-tar"),
    (&["zst"], "application/zstd"),
    (&["gz"], "application/gzip"),
];

/// The content type of an artifact whose extension [`CONTENT_TYPES`] does not name.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// The content type an artifact file is served and uploaded with, by its extension.
pub fn content_type(name: &str) -> &'static str {
    let extension = name.rsplit_once('.').map_or("", |(_, extension)| extension);
    CONTENT_TYPES
        .iter()
        .find(|(extensions, _)| extensions.contains(&extension))
        .map_or(DEFAULT_CONTENT_TYPE, |(_, content_type)| content_type)
}

/// A file as a stream of 256 KiB chunks, for an HTTP body of any size.
pub fn file_chunks(
    file: tokio::fs::File,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    futures::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buffer = vec![0u8; 256 * 1024];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(read) => {
                buffer.truncate(read);
                Some((Ok(bytes::Bytes::from(buffer)), file))
            }
            Err(error) => Some((Err(error), file)),
        }
    })
}

/// Why an artifact could not be collected.
#[derive(Debug, Error)]
pub enum ArtifactError {
    /// The guest could not read it (missing, unreadable, …); its reason names the path.
    #[error("the guest says: {}", quoted(.reason))]
    Guest {
        /// The path in the guest.
        path: String,
        /// The guest's reason.
        reason: String,
    },
    /// A file was asked for and a directory came, or the other way round.
    #[error("{} is a {found}, but the payload asks for a {expected}", quoted(.path))]
    WrongKind {
        /// The path in the guest.
        path: String,
        /// What the payload said.
        expected: &'static str,
        /// What the guest has.
        found: &'static str,
    },
    /// The guest did not answer in time, or went away.
    #[error("{}: the guest did not answer ({reason})", quoted(.path))]
    NoAnswer {
        /// The path in the guest.
        path: String,
        /// What happened.
        reason: String,
    },
    /// A bound of the task's artifact budget was hit.
    #[error("{}: {exceeded}", quoted(.path))]
    Exceeded {
        /// The path in the guest.
        path: String,
        /// The bound.
        exceeded: Exceeded,
    },
    /// A directory's tar stream has a header the reader refuses (too large, malformed).
    #[error("{}: {error}", quoted(.path))]
    Tar {
        /// The path in the guest.
        path: String,
        /// The reader's error.
        error: untar::TarError,
    },
    /// A directory's tar stream names something outside the directory.
    #[error("{}: the guest sent an entry with a forbidden name {}", quoted(.path), quoted(.entry))]
    UnsafeEntry {
        /// The path in the guest.
        path: String,
        /// The entry's name.
        entry: String,
    },
    /// Writing on the host failed, or the stream broke.
    #[error("{}: {source}", quoted(.path))]
    Io {
        /// The path in the guest.
        path: String,
        /// The cause.
        source: io::Error,
    },
}

/// Fetches `artifact` from the guest into `dir/<artifact.name>`, charging it to `budget`.
/// On any error the artifact's partial files are removed.
pub async fn collect(
    session: &GuestSession,
    artifact: &Artifact,
    dir: &Path,
    budget: &mut Budget,
) -> Result<Collected, ArtifactError> {
    let path = artifact.path.clone();
    let no_answer = |reason: String| ArtifactError::NoAnswer {
        path: path.clone(),
        reason,
    };
    let target = destination(dir, &artifact.name).ok_or_else(|| ArtifactError::UnsafeEntry {
        path: path.clone(),
        entry: artifact.name.clone(),
    })?;
    let request = session.perform(ActionKind::GetArtifact { path: path.clone() });
    let answer_by = budget
        .deadline()
        .min(tokio::time::Instant::now() + ANSWER_TIMEOUT);
    let reply = match tokio::time::timeout_at(answer_by, request).await {
        Ok(reply) => reply.map_err(|error| no_answer(error.to_string()))?,
        Err(_) if answer_by == budget.deadline() => {
            let exceeded = budget.deadline_exceeded();
            return Err(ArtifactError::Exceeded { path, exceeded });
        }
        Err(_) => {
            return Err(no_answer(format!(
                "nothing for {} s",
                ANSWER_TIMEOUT.as_secs()
            )))
        }
    };
    let found = match reply.content_type.as_str() {
        content_type::DIRECTORY => ArtifactKind::Directory,
        content_type::JSON => {
            let body = reply
                .collect(64 * 1024)
                .await
                .map_err(|source| ArtifactError::Io {
                    path: path.clone(),
                    source,
                })?;
            let reason = serde_json::from_slice::<ReplyError>(&body)
                .map(|error| error.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ArtifactError::Guest { path, reason });
        }
        _ => ArtifactKind::File,
    };
    if found != artifact.kind {
        return Err(ArtifactError::WrongKind {
            path,
            expected: kind_name(artifact.kind),
            found: kind_name(found),
        });
    }
    let name = artifact.name.clone();
    let written = target.clone();
    let body = reply.body;
    let start = budget.clone();
    let runtime = tokio::runtime::Handle::current();
    let (result, spent) = tokio::task::spawn_blocking(move || {
        let shared: SharedBudget = Rc::new(RefCell::new(start));
        let mut stream = GuestStream::new(body, shared.clone(), runtime);
        let result = match found {
            ArtifactKind::File => {
                copy_into_file(&mut stream, &target, &shared).map(|bytes| Collected {
                    files: vec![name.clone()],
                    name,
                    bytes,
                    skipped: Vec::new(),
                    skipped_count: 0,
                })
            }
            ArtifactKind::Directory => directory::unpack(&mut stream, &target, &name, &shared),
        };
        drop(stream);
        let spent = shared.borrow().clone();
        (result, spent)
    })
    .await
    .map_err(|error| ArtifactError::Io {
        path: path.clone(),
        source: io::Error::other(error.to_string()),
    })?;
    *budget = spent;
    result.map_err(|failure| {
        remove_partial(&written);
        failure.at(&path)
    })
}

/// Removes what a failed artifact left: its file, or its directory tree.
fn remove_partial(target: &Path) {
    match fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => {
            let _ = fs::remove_dir_all(target);
        }
        Ok(_) => {
            let _ = fs::remove_file(target);
        }
        Err(_) => {}
    }
}

fn kind_name(kind: ArtifactKind) -> &'static str {
    match kind {
        ArtifactKind::File => "file",
        ArtifactKind::Directory => "directory",
    }
}

/// `dir/name`, when `name` is a plain relative path (the schema already insists on it).
fn destination(dir: &Path, name: &str) -> Option<PathBuf> {
    let relative = Path::new(name);
    let plain = relative
        .components()
        .all(|component| matches!(component, Component::Normal(_)));
    (plain && !name.is_empty()).then(|| dir.join(relative))
}

/// What went wrong while writing, before the guest path is attached.
enum Failure {
    Exceeded(Exceeded),
    Tar(untar::TarError),
    Unsafe(String),
    Io(io::Error),
}

impl Failure {
    fn at(self, path: &str) -> ArtifactError {
        let path = path.to_owned();
        match self {
            Failure::Exceeded(exceeded) => ArtifactError::Exceeded { path, exceeded },
            Failure::Tar(error) => ArtifactError::Tar { path, error },
            Failure::Unsafe(entry) => ArtifactError::UnsafeEntry { path, entry },
            Failure::Io(source) => ArtifactError::Io { path, source },
        }
    }
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Self {
        match Exceeded::from_io(&error) {
            Some(exceeded) => Failure::Exceeded(exceeded),
            None => Failure::Io(error),
        }
    }
}

impl From<Exceeded> for Failure {
    fn from(exceeded: Exceeded) -> Self {
        Failure::Exceeded(exceeded)
    }
}

impl From<untar::TarError> for Failure {
    fn from(error: untar::TarError) -> Self {
        match error {
            untar::TarError::Io(error) => error.into(),
            other => Failure::Tar(other),
        }
    }
}

/// Copies what is left of `source` into a new file at `target`, checking free space as it
/// goes (the bytes themselves are charged by the guest stream underneath).
fn copy_into_file(
    source: &mut impl Read,
    target: &Path,
    budget: &SharedBudget,
) -> Result<u64, Failure> {
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    let mut file = File::create(target)?;
    let mut buffer = vec![0u8; 256 * 1024];
    let mut copied = 0u64;
    loop {
        let read = match source.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error.into()),
        };
        budget.borrow_mut().reserve_space(read as u64)?;
        file.write_all(&buffer[..read])?;
        copied += read as u64;
    }
    file.flush()?;
    Ok(copied)
}
