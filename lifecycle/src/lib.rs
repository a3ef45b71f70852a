//! The task lifecycle that every queue provider shares (`taskvm run`, the embedded queue in
//! `serve` and the Taskcluster provider all call [`run_payload`]): fetch and lease the image →
//! resolve the machine under the host's limits → start the VM on its isolated network → hand
//! the command to the agent → stream the log → collect artifacts and a screenshot → shut down
//! → resolve. Every stage is timed, and the timings end the log. The image-building pipelines
//! (`taskvm image build`, `image warm`) live here too: they start VMs as tasks do.
//!
//! # Layout
//! - [`payload_run`]: [`run_payload`], what every provider calls: an unvalidated payload to
//!   its outcome.
//! - [`task`]: [`run_task`], one validated task through its steps ([`task::outcome`]: what it
//!   hands back).
//! - [`resolution`]: the vocabulary of endings — [`resolution::Ending`], the one shape of "how
//!   it ended" — and the exit codes ([`exit`]).
//! - [`host`]: what all tasks of a worker share, prepared once; [`images`]: images fetched and
//!   sized for the commands outside a task.
//! - [`log`]: the task log.
//! - [`artifacts`]: copying files and directories out of the guest.
//! - [`shell_bridge`]: a shell in a running VM carried to a client, for the providers.
//! - [`pool`]: paused restored VMs kept ready for the most used image; [`kept`]: failed VMs
//!   kept frozen for debugging, and resumed.
//! - [`capacity`]: the host's memory and CPUs, shared out among running tasks.
//! - [`build`]: `taskvm image build`, a VM whose disk becomes a new image; [`warm`]: an image's
//!   snapshot made ahead of its first task.

#![warn(clippy::unwrap_used)]

pub mod artifacts;
pub mod build;
pub mod caches;
pub mod capacity;
pub mod exit;
pub mod host;
pub mod images;
pub mod kept;
pub mod log;
pub mod payload_run;
pub mod pool;
pub mod resolution;
pub mod shell_bridge;
pub mod shells;
pub mod task;
pub mod warm;

pub use self::images::image_error_is_the_payloads;
pub use self::payload_run::{run_payload, PayloadDocument, PayloadRun};
pub use self::shells::Shells;
pub use self::task::outcome::{TaskOutcome, Timings};
pub use self::task::{run_task, LiveVm, StopSignal, TaskRequest, START_TIMEOUT};
pub use engine::network::shell::{ShellError, ShellStream};
