//! Test helpers shared by taskvm's crates (never a dependency of shipped code).
//!
//! - [`http`]: a real HTTP/1.1 server on 127.0.0.1 that serves byte blobs, counts requests,
//!   answers conditional requests and can misbehave on purpose (slow, truncated, 5xx).
//! - [`images`]: image tarballs built entry by entry, hostile ones included, and real disk
//!   files made with `qemu-img`.
//! - [`metadata`]: a scripted peer for the guest agent's protocol.
//! - [`netns`]: a network namespace with a tap device, for booting a guest in a test.
//! - [`ppm`]: QEMU's `screendump` files read, the tests' own view of a screen.
//! - [`guest`]: the QEMU command line that boots a test image by hand (until the engine does).
//! - [`process`]: a long-running taskvm process under test, its standard error collected.
//! - [`stats`]: percentiles of timed series, for the benchmarks.

pub mod guest;
pub mod http;
pub mod images;
pub mod metadata;
pub mod netns;
pub mod ppm;
pub mod process;
pub mod stats;
