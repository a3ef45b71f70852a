//! The guest ↔ host contract of taskvm, in one crate that both sides link (the guest agent
//! links nothing else of taskvm's; the host side reaches it as `schemas::protocol`).
//!
//! The protocol: what the guest agent and the metadata service say to each
//! other over HTTP at `http://169.254.169.254/engine/v1/`.
//!
//! It keeps taskcluster-worker's shape, so its guest tools speak it too:
//!
//! | request | meaning |
//! |---|---|
//! | `GET  /engine/v1/execute` | long-polls for the task: 200 [`Execute`], or 204 to ask again |
//! | `POST /engine/v1/log` | the command's output, as a chunked body, streamed while it runs |
//! | `PUT  /engine/v1/success`, `PUT /engine/v1/failed` | the [`Report`]; a second report is 409 |
//! | `GET  /engine/v1/ping` | 200 while the service is up |
//! | `GET  /engine/v1/poll` | long-polls for an [`Action`]: 200 with one, or 204 to ask again |
//! | `POST /engine/v1/reply?id=ID` | the answer to action `ID`: file bytes, a tar stream, or JSON |
//!
//! Replies carry `Content-Type`: `application/octet-stream` (a file), `application/x-tar` (a
//! directory), `application/json` ([`FolderListing`] or [`ReplyError`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Path prefix of every protocol request.
pub const API_PREFIX: &str = "/engine/v1";
/// The metadata service's address as the guest sees it.
pub const METADATA_ADDRESS: &str = "169.254.169.254";

/// Kernel command-line parameters the engine sets and the agent (as PID 1) reads; each is
/// followed directly by its value.
pub mod kernel_parameter {
    /// The guest's address with its prefix length, e.g. `taskvm.ip=169.254.7.2/16` (the
    /// Debian cloud kernel ignores `ip=`).
    pub const ADDRESS: &str = "taskvm.ip=";
    /// The default gateway (and DNS server), given only to VMs with egress.
    pub const GATEWAY: &str = "taskvm.gw=";
    /// Another metadata URL than `http://METADATA_ADDRESS` (tests and debugging).
    pub const METADATA: &str = "taskvm.metadata=";
}

/// What the agent prints on the console (and the VGA screen) as it goes:
/// `taskvm-agent: WHAT`.
pub mod marker {
    /// What every line the agent prints begins with.
    pub const PREFIX: &str = "taskvm-agent: ";
    /// The agent is up and asks for its task: the moment a snapshot is taken.
    pub const READY: &str = "taskvm-agent: ready";
    /// A request for the task was cut off after it reached the metadata service (the
    /// service stopped under it): the agent holds no open request now and asks again. A
    /// snapshot is taken only after this line when the engine closed a request.
    pub const CUT_OFF: &str = "taskvm-agent: the metadata service closed the request; asking again";
}

/// The `Content-Type` of replies to actions (and of the agent's other requests).
pub mod content_type {
    /// A file's bytes.
    pub const FILE: &str = "application/octet-stream";
    /// A directory as a tar stream.
    pub const DIRECTORY: &str = "application/x-tar";
    /// A JSON document ([`super::Report`], [`super::FolderListing`], [`super::ReplyError`]).
    pub const JSON: &str = "application/json";
}

/// The task the guest is to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Execute {
    /// Argument vector; `command[0]` is looked up on `PATH`.
    pub command: Vec<String>,
    /// Environment variables, added to the agent's base environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run the command on a pseudo-terminal instead of pipes.
    #[serde(default)]
    pub tty: bool,
    /// What makes this VM's state its own, applied by the agent before the command runs (a
    /// VM restored from a snapshot would otherwise share its clock, random numbers and
    /// identity with every other copy; a booted one gets the same, so the two look alike).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fresh: Option<Freshness>,
    /// File systems the agent mounts before the command runs (and unmounts before the VM
    /// powers off). When one cannot be mounted the command does not run: the agent logs why
    /// and reports it ([`Report::not_run`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<GuestMount>,
    /// Not the task but a warm-up: the agent runs the command with its output dropped, then
    /// asks for its task again (nothing is reported). A worker warms a VM it keeps paused for
    /// a later task this way, so that the code a first command runs (the fork and exec path,
    /// the loader, the C library) has already run in that very VM; under TCG that code is
    /// otherwise translated during the task's first command. Only sent to an agent that lists
    /// [`feature::WARM_UP`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm_up: bool,
}

/// A disk the host attached for the task, and where the guest mounts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestMount {
    /// The disk's virtio serial number (`/sys/block/*/serial`), e.g. `taskvm-slot0`.
    pub serial: String,
    /// The absolute path it is mounted at (made when missing).
    pub path: String,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// The header of the agent's `GET execute` listing what it can do beyond the first protocol
/// (comma-separated [`feature`]s): a task that needs a feature is never handed to an agent
/// that does not list it.
pub const FEATURES_HEADER: &str = "taskvm-agent-features";

/// What an agent can do beyond the first protocol.
pub mod feature {
    /// It mounts [`super::Execute::mounts`] before the command runs.
    pub const MOUNTS: &str = "mounts";
    /// It runs a warm-up ([`super::Execute::warm_up`]) and asks for its task again.
    pub const WARM_UP: &str = "warm-up";
}

/// What the mount-slot disks are called: `PREFIX` and the slot's index.
pub const SLOT_SERIAL_PREFIX: &str = "taskvm-slot";

/// Exit codes the agent reports for itself rather than for the command.
pub mod exit_code {
    /// A mount of the task's could not be made; the command did not run (the report's
    /// `notRun` says why).
    pub const MOUNT_FAILED: i32 = 125;
}

/// The host's contribution to a guest's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Freshness {
    /// The host's clock when the task was handed over: Unix time in milliseconds.
    pub unix_time_ms: u64,
    /// Random bytes from the host, as hex: added to the kernel's entropy pool, which is then
    /// reseeded.
    pub entropy: String,
    /// The VM's machine-id (32 lower-case hex digits), written to `/etc/machine-id`.
    pub machine_id: String,
}

/// How the command ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The exit code, or 128 + the signal number when a signal ended it.
    pub exit_code: i32,
    /// Why the command did not run at all (a mount could not be made); `exit_code` is then
    /// [`exit_code::MOUNT_FAILED`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_run: Option<String>,
}

/// Something the worker asks the guest to do while (or after) the command runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Action {
    /// Identifies the reply.
    pub id: String,
    /// What to do.
    #[serde(flatten)]
    pub kind: ActionKind,
}

/// The actions a guest agent performs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ActionKind {
    /// Send a file's bytes, or a directory as a tar stream.
    GetArtifact {
        /// Absolute path in the guest.
        path: String,
    },
    /// List a directory.
    ListFolder {
        /// Absolute path in the guest.
        path: String,
    },
    /// Send a signal to the command's process group.
    KillProcess {
        /// Signal number (default 9).
        #[serde(default = "default_signal")]
        signal: i32,
    },
    /// Flush file systems and power the VM off.
    Shutdown,
    /// Run `sh -c SCRIPT` (beside whatever else runs) and answer with an [`ExecResult`] once
    /// it has ended: for scripted debugging of a kept VM.
    Exec {
        /// The script.
        script: String,
    },
    /// Start a login shell on a new terminal of this size and connect it to the worker:
    /// the agent answers with `GET shell?id=ID`, upgraded to [`shell::UPGRADE`], and from
    /// then on that connection carries the terminal (see [`shell`]).
    Shell {
        /// Terminal rows.
        rows: u16,
        /// Terminal columns.
        cols: u16,
    },
}

/// An interactive shell's connection, once upgraded. The guest sends the terminal's output
/// as plain bytes; the worker sends frames: one byte of kind, a big-endian `u32` length, and
/// that many bytes of payload. Either side ends the shell by closing the connection.
pub mod shell {
    /// The `Upgrade` header's protocol name.
    pub const UPGRADE: &str = "taskvm-shell";
    /// A frame of keyboard input: the bytes typed.
    pub const FRAME_INPUT: u8 = 0;
    /// A frame saying the terminal's new size: rows and columns, each a big-endian `u16`.
    pub const FRAME_RESIZE: u8 = 1;
    /// The largest payload of one frame.
    pub const MAX_FRAME: usize = 64 * 1024;
    /// The header before each frame's payload.
    pub const FRAME_HEADER: usize = 5;

    /// A frame of `kind` with `payload` (at most [`MAX_FRAME`] bytes: longer input is cut
    /// into several frames by the caller).
    pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(FRAME_HEADER + payload.len());
        frame.push(kind);
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// `keys` as input frames (cut at [`MAX_FRAME`]).
    pub fn input(keys: &[u8]) -> Vec<u8> {
        keys.chunks(MAX_FRAME)
            .flat_map(|chunk| frame(FRAME_INPUT, chunk))
            .collect()
    }

    /// A terminal's size as a client of a shell's websocket says it: the text message
    /// `{"rows": R, "cols": C}` (keys are binary messages).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct TerminalSize {
        /// Rows.
        pub rows: u16,
        /// Columns.
        pub cols: u16,
    }

    /// A resize frame.
    pub fn resize(rows: u16, cols: u16) -> Vec<u8> {
        let mut size = [0u8; 4];
        size[..2].copy_from_slice(&rows.to_be_bytes());
        size[2..].copy_from_slice(&cols.to_be_bytes());
        frame(FRAME_RESIZE, &size)
    }
}

fn default_signal() -> i32 {
    9
}

/// How an [`ActionKind::Exec`] ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecResult {
    /// The exit code, or 128 + the signal number.
    pub exit_code: i32,
    /// Its standard output and error, at most [`EXEC_OUTPUT_LIMIT`] bytes of it (as UTF-8,
    /// invalid sequences replaced).
    pub output: String,
    /// Whether output past the limit was left out.
    #[serde(default)]
    pub truncated: bool,
}

/// Most output bytes an [`ExecResult`] carries.
pub const EXEC_OUTPUT_LIMIT: usize = 1 << 20;

/// Longest script an [`ActionKind::Exec`] carries: a worker refuses longer ones before
/// resuming anything.
pub const EXEC_SCRIPT_LIMIT: usize = 64 << 10;

/// The entries of a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FolderListing {
    /// Entries, sorted by name.
    pub entries: Vec<FolderEntry>,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FolderEntry {
    /// File name.
    pub name: String,
    /// Whether it is a directory.
    pub directory: bool,
    /// Size in bytes (files).
    pub size: u64,
}

/// An action that could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplyError {
    /// Why, e.g. `"/tmp/x: No such file or directory"`.
    pub error: String,
}
