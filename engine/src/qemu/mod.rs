//! QEMU itself, as the engine talks to it: the argument vector, the process, the QMP
//! connection and the screen.
//!
//! # Layout
//! - [`cmdline`]: the QEMU argument vector, a pure function (golden-file tested).
//! - [`process`]: starting QEMU as an unprivileged user in its own process group, tied to
//!   the worker's life; killing and reaping it.
//! - [`qmp`]: the QMP connection (bounded messages, timed commands) and its events.
//! - [`screenshot`]: the screen over VNC as an RGBA image or PNG.
//! - [`version`]: what `qemu --version` says, remembered per installed binary.

pub mod cmdline;
pub mod process;
pub mod qmp;
pub mod screenshot;
pub mod version;
