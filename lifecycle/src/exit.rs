//! The exit codes `taskvm` promises, in one place.

use std::process::ExitCode;

/// How a `taskvm` command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The task completed, or the command did what was asked.
    Success = 0,
    /// The task ran and failed (non-zero exit, maxRunTime exceeded).
    Failed = 1,
    /// The payload (or another document the user gave) is malformed.
    Malformed = 2,
    /// Anything else went wrong: an internal error or another exception.
    Internal = 3,
}

impl From<Outcome> for ExitCode {
    fn from(outcome: Outcome) -> Self {
        ExitCode::from(outcome as u8)
    }
}
