//! Copying a task's artifacts out of the guest through the agent: a file arrives as its
//! bytes, a directory as a tar stream that is unpacked here under strict rules — regular
//! files and directories only, relative names without `..`, nothing followed, modes not
//! kept — so that a hostile guest can write nothing outside the task's artifacts directory.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use engine::session::{ActionReply, GuestSession};
use schemas::protocol::{ActionKind, ReplyError};
use schemas::{Artifact, ArtifactKind};
use thiserror::Error;
use tokio::sync::mpsc;

/// How much the guest may send, and how long it may take to start.
#[derive(Debug, Clone, Copy)]
pub struct ArtifactLimits {
    /// Most bytes of one artifact (a file, or all files of a directory).
    pub max_bytes: u64,
    /// How long the guest may take to start answering.
    pub answer_timeout: Duration,
}

impl Default for ArtifactLimits {
    fn default() -> Self {
        ArtifactLimits {
            max_bytes: 8 << 30,
            answer_timeout: Duration::from_secs(60),
        }
    }
}

/// One collected artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collected {
    /// Its name (a path relative to the artifacts directory).
    pub name: String,
    /// Files written, relative to the artifacts directory.
    pub files: Vec<String>,
    /// Bytes written.
    pub bytes: u64,
    /// Entries of a directory that were not regular files or directories (links, devices…),
    /// left out.
    pub skipped: Vec<String>,
}

/// The content type an artifact file is served and uploaded with, by its extension. Markup
/// is served as text, never rendered as a page of ours.
pub fn content_type(name: &str) -> &'static str {
    let extension = name.rsplit_once('.').map_or("", |(_, extension)| extension);
    match extension {
        "log" | "txt" | "html" | "htm" | "svg" => "text/plain; charset=utf-8",
        "png" => "image/png",
        "json" => "application/json",
        "tar" => "application/x-tar",
        "zst" => "application/zstd",
        "gz" => "application/gzip",
        _ => "application/octet-stream",
    }
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
    #[error("the guest says: {reason}")]
    Guest {
        /// The path in the guest.
        path: String,
        /// The guest's reason.
        reason: String,
    },
    /// A file was asked for and a directory came, or the other way round.
    #[error("{path} is a {found}, but the payload asks for a {expected}")]
    WrongKind {
        /// The path in the guest.
        path: String,
        /// What the payload said.
        expected: &'static str,
        /// What the guest has.
        found: &'static str,
    },
    /// The guest did not answer in time, or went away.
    #[error("{path}: the guest did not answer ({reason})")]
    NoAnswer {
        /// The path in the guest.
        path: String,
        /// What happened.
        reason: String,
    },
    /// More bytes than allowed.
    #[error("{path}: larger than the limit of {limit} bytes")]
    TooLarge {
        /// The path in the guest.
        path: String,
        /// The cap.
        limit: u64,
    },
    /// A directory's tar stream names something outside the directory.
    #[error("{path}: the guest sent an entry with a forbidden name {entry:?}")]
    UnsafeEntry {
        /// The path in the guest.
        path: String,
        /// The entry's name.
        entry: String,
    },
    /// Writing on the host failed, or the stream broke.
    #[error("{path}: {source}")]
    Io {
        /// The path in the guest.
        path: String,
        /// The cause.
        source: io::Error,
    },
}

/// Fetches `artifact` from the guest into `dir/<artifact.name>`.
pub async fn collect(
    session: &GuestSession,
    artifact: &Artifact,
    dir: &Path,
    limits: ArtifactLimits,
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
    let reply = tokio::time::timeout(limits.answer_timeout, request)
        .await
        .map_err(|_| no_answer(format!("nothing for {} s", limits.answer_timeout.as_secs())))?
        .map_err(|error| no_answer(error.to_string()))?;
    let found = match reply.content_type.as_str() {
        "application/x-tar" => ArtifactKind::Directory,
        "application/json" => {
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
    let max = limits.max_bytes;
    let result = tokio::task::spawn_blocking(move || match found {
        ArtifactKind::File => write_file(reply, &target, max).map(|bytes| Collected {
            files: vec![name.clone()],
            name,
            bytes,
            skipped: Vec::new(),
        }),
        ArtifactKind::Directory => unpack_directory(reply, &target, &name, max),
    })
    .await
    .map_err(|error| ArtifactError::Io {
        path: path.clone(),
        source: io::Error::other(error.to_string()),
    })?;
    result.map_err(|failure| failure.at(&path))
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
    TooLarge(u64),
    Unsafe(String),
    Io(io::Error),
}

impl Failure {
    fn at(self, path: &str) -> ArtifactError {
        let path = path.to_owned();
        match self {
            Failure::TooLarge(limit) => ArtifactError::TooLarge { path, limit },
            Failure::Unsafe(entry) => ArtifactError::UnsafeEntry { path, entry },
            Failure::Io(source) => ArtifactError::Io { path, source },
        }
    }
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Self {
        Failure::Io(error)
    }
}

/// A blocking reader over a reply's chunks (used on a blocking thread).
struct ChannelReader {
    body: mpsc::Receiver<io::Result<bytes::Bytes>>,
    current: bytes::Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.body.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let length = buffer.len().min(self.current.len());
        buffer[..length].copy_from_slice(&self.current.split_to(length));
        Ok(length)
    }
}

fn reader(reply: ActionReply) -> ChannelReader {
    ChannelReader {
        body: reply.body,
        current: bytes::Bytes::new(),
    }
}

/// Copies at most `max` bytes from `source` to a new file at `target`.
fn copy_capped(source: &mut impl Read, target: &Path, max: u64) -> Result<u64, Failure> {
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    let mut file = File::create(target)?;
    let copied = io::copy(&mut source.take(max + 1), &mut file)?;
    if copied > max {
        drop(file);
        let _ = fs::remove_file(target);
        return Err(Failure::TooLarge(max));
    }
    file.flush()?;
    Ok(copied)
}

fn write_file(reply: ActionReply, target: &Path, max: u64) -> Result<u64, Failure> {
    copy_capped(&mut reader(reply), target, max)
}

fn unpack_directory(
    reply: ActionReply,
    target: &Path,
    name: &str,
    max: u64,
) -> Result<Collected, Failure> {
    fs::create_dir_all(target)?;
    let mut archive = tar::Archive::new(reader(reply));
    let mut collected = Collected {
        name: name.to_owned(),
        files: Vec::new(),
        bytes: 0,
        skipped: Vec::new(),
    };
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let relative = safe_relative(&raw).ok_or_else(|| Failure::Unsafe(shown.clone()))?;
        let kind = entry.header().entry_type();
        if relative.as_os_str().is_empty() {
            continue; // the directory itself
        }
        let destination = target.join(&relative);
        if kind.is_dir() {
            fs::create_dir_all(&destination)?;
        } else if kind.is_file() {
            let room = max - collected.bytes;
            collected.bytes +=
                copy_capped(&mut entry, &destination, room).map_err(|failure| match failure {
                    Failure::TooLarge(_) => Failure::TooLarge(max),
                    other => other,
                })?;
            collected
                .files
                .push(format!("{name}/{}", relative.to_string_lossy()));
        } else {
            collected.skipped.push(shown);
        }
    }
    Ok(collected)
}

/// A tar entry's name as a relative path of plain components (`.` dropped); None for
/// absolute names, `..`, or anything else that could leave the directory.
fn safe_relative(raw: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let path = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(relative)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_names_are_accepted() {
        assert_eq!(safe_relative(b"./a/b.txt"), Some(PathBuf::from("a/b.txt")));
        assert_eq!(safe_relative(b"."), Some(PathBuf::new()));
        assert_eq!(safe_relative(b"../etc/passwd"), None);
        assert_eq!(safe_relative(b"a/../../x"), None);
        assert_eq!(safe_relative(b"/etc/passwd"), None);
        let dir = Path::new("/artifacts");
        assert_eq!(
            destination(dir, "public/out"),
            Some(PathBuf::from("/artifacts/public/out"))
        );
        assert_eq!(destination(dir, "../x"), None);
        assert_eq!(destination(dir, "/x"), None);
        assert_eq!(destination(dir, ""), None);
    }

    fn tar_reply(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> ActionReply {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        let bytes = builder.into_inner().unwrap();
        let (sender, body) = mpsc::channel(4);
        std::thread::spawn(move || {
            for chunk in bytes.chunks(1000) {
                let _ = sender.blocking_send(Ok(bytes::Bytes::copy_from_slice(chunk)));
            }
        });
        ActionReply {
            content_type: "application/x-tar".into(),
            body,
        }
    }

    fn file_entry(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o4755);
        header.set_entry_type(tar::EntryType::Regular);
        // set_path refuses `..`; a hostile guest writes the raw bytes.
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }

    #[test]
    fn a_directory_stream_is_unpacked_inside_its_target_only() {
        let scratch = tempfile::tempdir().unwrap();
        let target = scratch.path().join("out");
        let reply = tar_reply(|b| {
            file_entry(b, "./a.txt", b"alpha");
            file_entry(b, "./sub/b.txt", b"beta");
            let mut link = tar::Header::new_gnu();
            link.set_entry_type(tar::EntryType::Symlink);
            link.set_path("evil").unwrap();
            link.set_link_name("/etc").unwrap();
            link.set_size(0);
            link.set_cksum();
            b.append(&link, &[][..]).unwrap();
        });
        let collected = unpack_directory(reply, &target, "out", 1 << 20)
            .ok()
            .unwrap();
        assert_eq!(collected.files, ["out/a.txt", "out/sub/b.txt"]);
        assert_eq!(collected.bytes, 9);
        assert_eq!(collected.skipped, ["evil"]);
        assert_eq!(fs::read(target.join("sub/b.txt")).unwrap(), b"beta");
        assert!(!target.join("evil").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(target.join("a.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7000, 0, "no setuid bits from the guest");

        let escape = tar_reply(|b| file_entry(b, "../escaped.txt", b"x"));
        let failure = unpack_directory(escape, &target, "out", 1 << 20)
            .err()
            .unwrap();
        assert!(matches!(failure, Failure::Unsafe(name) if name == "../escaped.txt"));
        assert!(!scratch.path().join("escaped.txt").exists());
    }

    #[test]
    fn a_directory_over_the_cap_is_refused() {
        let scratch = tempfile::tempdir().unwrap();
        let reply = tar_reply(|b| {
            file_entry(b, "one", &[1; 600]);
            file_entry(b, "two", &[2; 600]);
        });
        let failure = unpack_directory(reply, &scratch.path().join("o"), "o", 1000)
            .err()
            .unwrap();
        assert!(matches!(failure, Failure::TooLarge(1000)));
    }
}
