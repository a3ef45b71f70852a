//! The task payload: what one task asks taskvm to run, and in which image.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::machine::Machine;

/// A task for taskvm: an image, a command to run in a fresh VM booted from it, and what to
/// collect afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "Payload")]
pub struct Payload {
    /// The VM image (a zstd-compressed tarball), by URL, optionally pinned by its sha256.
    pub image: ImageRef,
    /// The command to run in the guest, as an argument vector (no shell is involved unless
    /// the command names one).
    #[schemars(length(min = 1, max = 4096))]
    pub command: Vec<String>,
    /// Environment variables for the command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("propertyNames" = { "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,254}$" }))]
    pub env: BTreeMap<String, String>,
    /// Seconds the command may run before the task is resolved `failed`.
    #[schemars(range(min = 1, max = 86_400))]
    pub max_run_time: u32,
    /// Overrides of the image's machine definition (highest precedence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Machine>,
    /// Files and directories to copy out of the guest when the command ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub artifacts: Vec<Artifact>,
    /// Whether to capture a screenshot of the VM's display when the command ends.
    #[serde(default = "screenshot_default")]
    pub screenshot: bool,
    /// Disks mounted in the guest before the command runs (at most [`MAX_MOUNTS`]): writable
    /// caches kept on the worker between tasks, and read-only content unpacked from an
    /// archive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub mounts: Vec<Mount>,
    /// What follows from the command's exit status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_exit_status: Option<OnExitStatus>,
    /// Offer login shells into the running VM. On Taskcluster the worker then publishes the
    /// private artifact `private/taskvm/shell.json` with the shell's websocket URL, valid
    /// while the task runs (`taskvm shell --url URL`); `taskvm serve` offers shells into every
    /// running task to those with access to it, so this changes nothing there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interactive: bool,
    /// Help in debugging the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug: Option<DebugOptions>,
}

/// What a task asks for its debugging.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DebugOptions {
    /// When the command fails, keep its VM frozen — its memory, processes and disk, saved the
    /// way snapshots are — instead of discarding it, within the worker's `kept` limits, so
    /// that `taskvm debug` can resume that very machine. Not for tasks with mounts.
    #[serde(default)]
    pub keep_on_failure: bool,
}

/// Most mounts of one task: the number of mount slots a VM with mounts has.
pub const MAX_MOUNTS: usize = 4;

/// A disk mounted in the guest: either a writable `cache`, or read-only `content` with its
/// `format`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mount {
    /// A writable cache of this name, kept on the worker between tasks: the task gets a copy
    /// no other running task uses (a fresh, empty one when every kept copy is busy), and what
    /// it writes there is what the next task naming it sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"))]
    pub cache: Option<String>,
    /// Read-only content: an archive (by URL, pinned by the sha256 of its bytes) fetched once
    /// and unpacked into a file system every task naming it shares. Only directories and
    /// regular files are unpacked (links and special files are left out); files keep their
    /// executable bit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<PinnedImage>,
    /// How `content` is packed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ContentFormat>,
    /// Where the guest mounts it: an absolute path without `.` or `..` segments, not `/` and
    /// not below `/proc`, `/sys` or `/dev` (made when missing).
    #[schemars(regex(pattern = r"^/"), length(max = 1024))]
    pub path: String,
}

/// How a content archive is packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ContentFormat {
    /// A tar stream compressed with zstd.
    #[serde(rename = "tar.zst")]
    TarZst,
    /// A tar stream compressed with gzip.
    #[serde(rename = "tar.gz")]
    TarGz,
    /// A zip file (stored or deflated entries).
    #[serde(rename = "zip")]
    Zip,
}

/// What follows from the command's exit status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnExitStatus {
    /// Exit statuses after which the caches the task mounted are discarded (the next task
    /// naming them starts with an empty one), e.g. for a cache the command found corrupt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub purge_caches: Vec<u8>,
}

fn screenshot_default() -> bool {
    true
}

/// Where a task's image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ImageRef {
    /// An `http://`, `https://` or `file://` URL; the image is re-validated on each use.
    Url(
        #[schemars(
            regex(pattern = r"^(https?://[^\s]+|file:///[^\s]*)$"),
            length(max = 2048)
        )]
        String,
    ),
    /// A URL and the sha256 its compressed bytes must have.
    Pinned(PinnedImage),
}

/// A URL pinned by the sha256 digest of the compressed image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PinnedImage {
    /// An `http://`, `https://` or `file://` URL.
    #[schemars(
        regex(pattern = r"^(https?://[^\s]+|file:///[^\s]*)$"),
        length(max = 2048)
    )]
    pub url: String,
    /// Lower-case hex sha256 of the compressed tarball.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
}

impl ImageRef {
    /// The image's URL.
    pub fn url(&self) -> &str {
        match self {
            ImageRef::Url(url) => url,
            ImageRef::Pinned(pinned) => &pinned.url,
        }
    }

    /// The pinned digest, if any.
    pub fn sha256(&self) -> Option<&str> {
        match self {
            ImageRef::Url(_) => None,
            ImageRef::Pinned(pinned) => Some(&pinned.sha256),
        }
    }
}

/// One file or directory to collect from the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Whether `path` is a single file or a directory (collected as every file below it).
    #[serde(rename = "type")]
    pub kind: ArtifactKind,
    /// Absolute path in the guest.
    #[schemars(regex(pattern = r"^/"), length(max = 4096))]
    pub path: String,
    /// Name under which the artifact is stored: relative, `/`-separated, no `.` or `..`
    /// segments.
    #[schemars(
        regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$"),
        length(max = 255)
    )]
    pub name: String,
}

/// The names of the files taskvm writes beside a task's artifacts (its log, the consoles, the
/// screenshot) and publishes on Taskcluster. A payload's artifact may not have one of these
/// names or a name below one, and a directory artifact's entry that would land on one
/// is left out.
pub const RESERVED_ARTIFACT_NAMES: [&str; 8] = [
    "live.log",
    "serial.log",
    "qemu.log",
    "screenshot.png",
    "public/logs/live.log",
    "public/logs/live_backing.log",
    "public/logs/serial.log",
    "public/screenshot.png",
];

/// Whether an artifact called `name` would collide with a file of taskvm's own: it is one of
/// [`RESERVED_ARTIFACT_NAMES`], or a directory below one of them.
pub fn is_reserved_artifact_name(name: &str) -> bool {
    RESERVED_ARTIFACT_NAMES.iter().any(|reserved| {
        name == *reserved
            || name
                .strip_prefix(reserved)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// Kind of artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// A single regular file.
    File,
    /// A directory, collected recursively.
    Directory,
}
