//! taskvm's data model: every document a user or a host hands to taskvm, as serde types with
//! JSON Schemas, and the rules that combine them.
//!
//! # Layout
//! - [`payload`]: a task's [`Payload`] — image reference, command, env, maxRunTime, artifacts.
//! - [`machine`]: the virtual hardware, [`Machine`], a partial definition layered by
//!   [`precedence`] and sized by [`sizing`] against a host's [`MachineLimits`] ([`limits`]).
//! - [`config`]: the worker's [`WorkerConfig`].
//! - [`protocol`]: what the guest agent and the metadata service say to each other — the
//!   `taskvm-protocol` crate, re-exported (the guest agent links that crate alone).
//! - [`shown`]: quoting untrusted text in messages, bounded and escaped.
//! - [`migrate`]: reading `machine.json` files of any known version.
//! - [`document`]: the published JSON Schemas and parsing that reports every broken rule by
//!   JSON pointer ([`violations`]).
//!
//! This crate does no I/O: callers read files and hand it text or JSON values.

#![warn(clippy::unwrap_used)]

pub mod config;
pub mod document;
pub mod limits;
pub mod machine;
pub mod migrate;
pub mod payload;
pub mod precedence;
pub use protocol;
pub mod shown;
pub mod sizing;
mod string_enum;
pub mod violations;

pub use config::{Accel, StartMode, WorkerConfig};
pub use document::{
    check_structure, parse_config, parse_document, parse_json, parse_payload, DocumentKind,
};
pub use limits::MachineLimits;
pub use machine::{LinuxBoot, Machine, MACHINE_FORMAT_VERSION};
pub use migrate::migrate_machine_definition;
pub use payload::{Artifact, ArtifactKind, ImageRef, Payload};
pub use precedence::{limit_violation, resolve_machine, MachineLayers};
pub use sizing::{apply_limits, derive_limits, CpuTopology, LimitError, ResolvedMachine};
pub use violations::{Violation, Violations};
