//! taskvm's image cache: images arrive by URL, are checked entry by entry and file by file,
//! and are kept by the sha256 of their compressed bytes until garbage collection needs room.
//!
//! # Layout
//! - [`reference`]: image references ([`ImageRequest`]) and digests ([`Digest`]).
//! - [`source`]: opening a reference — HTTP with conditional requests, or a file.
//! - [`pipeline`]: the one streaming pass (hash ‖ decode + unpack) into a staging directory.
//! - [`unpack`]: the tarball rules and sparse writes; [`layout`] names the files.
//! - [`disk_check`]: validation of `disk.img` and `layer.qcow2` (headers, then `qemu-img`
//!   under limits, in [`qemu_img`]).
//! - [`cache`]: the on-disk cache ([`Cache`]): single-flight fetches, atomic commits, the
//!   startup sweep, listing and GC; [`lease`]: a [`Lease`] keeps an image from GC.
//! - [`pack`]: building an image tarball, reproducibly.
//!
//! Blocking I/O throughout: call it from threads (or `spawn_blocking`), not from async code.

#![warn(clippy::unwrap_used)]

pub mod cache;
pub mod content;
pub mod disk_check;
pub mod error;
pub mod layout;
pub mod lease;
mod lock;
pub mod pack;
mod pins;
pub mod pipeline;
pub mod qemu_img;
pub mod reference;
pub mod source;
pub mod unpack;

pub use cache::{Cache, EntryInfo, FetchKind, GcReport};
pub use error::{ArchiveError, ImageError};
pub use lease::Lease;
pub use pack::{detect_format, pack, pack_with_progress, verify_file, PackInputs, PackProgress};
pub use pipeline::Progress;
pub use reference::{Digest, FilePolicy, ImageRequest, Source};
