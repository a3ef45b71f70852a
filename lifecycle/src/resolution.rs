//! How a task ends, in Taskcluster's vocabulary: the [`Resolution`], the one [`Ending`] that
//! carries it with its exit code and reason everywhere (the lifecycle's stages, the providers,
//! the queue's records), and the one mapping from resolutions to `taskvm run`'s exit codes.

use std::fmt;

use crate::exit::Outcome;

/// Why a task ended in an exception rather than completing or failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExceptionReason {
    /// The payload, its machine or its image is unusable: the task's fault, not the worker's.
    MalformedPayload,
    /// QEMU crashed or the host failed: the worker's fault.
    InternalError,
    /// Someone canceled the task.
    Canceled,
    /// The worker is shutting down and abandoned the task.
    WorkerShutdown,
}

impl ExceptionReason {
    /// Taskcluster's name for the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            ExceptionReason::MalformedPayload => "malformed-payload",
            ExceptionReason::InternalError => "internal-error",
            ExceptionReason::Canceled => "canceled",
            ExceptionReason::WorkerShutdown => "worker-shutdown",
        }
    }

    /// The reason Taskcluster calls `name`.
    pub fn from_name(name: &str) -> Option<ExceptionReason> {
        [
            ExceptionReason::MalformedPayload,
            ExceptionReason::InternalError,
            ExceptionReason::Canceled,
            ExceptionReason::WorkerShutdown,
        ]
        .into_iter()
        .find(|reason| reason.as_str() == name)
    }
}

/// A task's resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The command exited 0 and every artifact was collected.
    Completed,
    /// The command ran and failed: non-zero exit, maxRunTime exceeded, a missing artifact.
    Failed,
    /// The task could not be run as asked.
    Exception(ExceptionReason),
}

impl Resolution {
    /// The exit code `taskvm run` ends with.
    pub fn outcome(self) -> Outcome {
        match self {
            Resolution::Completed => Outcome::Success,
            Resolution::Failed => Outcome::Failed,
            Resolution::Exception(ExceptionReason::MalformedPayload) => Outcome::Malformed,
            Resolution::Exception(_) => Outcome::Internal,
        }
    }
}

impl std::str::FromStr for Resolution {
    type Err = String;

    /// Reads what `Display` writes: `completed`, `failed`, `exception/REASON`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "completed" => Ok(Resolution::Completed),
            "failed" => Ok(Resolution::Failed),
            _ => text
                .strip_prefix("exception/")
                .and_then(ExceptionReason::from_name)
                .map(Resolution::Exception)
                .ok_or_else(|| format!("not a resolution: {text:?}")),
        }
    }
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resolution::Completed => f.write_str("completed"),
            Resolution::Failed => f.write_str("failed"),
            Resolution::Exception(reason) => write!(f, "exception/{}", reason.as_str()),
        }
    }
}

/// How a task ended: its resolution, the command's exit code when it reported one, and why it
/// ended so, in one line (for failures and exceptions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// The resolution.
    pub resolution: Resolution,
    /// The command's exit code, when it reported one.
    pub exit_code: Option<i32>,
    /// Why it ended so, in one line.
    pub reason: Option<String>,
}

impl Ending {
    /// An ending without an exit code.
    pub fn new(resolution: Resolution, reason: impl Into<String>) -> Ending {
        Ending {
            resolution,
            exit_code: None,
            reason: Some(reason.into()),
        }
    }

    /// The command reported `exit_code`: completed on 0, failed otherwise.
    pub fn exited(exit_code: i32) -> Ending {
        Ending {
            resolution: if exit_code == 0 {
                Resolution::Completed
            } else {
                Resolution::Failed
            },
            exit_code: Some(exit_code),
            reason: (exit_code != 0).then(|| format!("the command exited with {exit_code}")),
        }
    }

    /// The task failed for `reason`.
    pub fn failed(reason: impl Into<String>) -> Ending {
        Ending::new(Resolution::Failed, reason)
    }

    /// The payload, its machine or its image is unusable.
    pub fn malformed(reason: impl Into<String>) -> Ending {
        Ending::new(
            Resolution::Exception(ExceptionReason::MalformedPayload),
            reason,
        )
    }

    /// The host failed.
    pub fn internal(reason: impl Into<String>) -> Ending {
        Ending::new(
            Resolution::Exception(ExceptionReason::InternalError),
            reason,
        )
    }

    /// Stopped from outside for `reason` while `doing` (e.g. `while fetching the image`).
    pub fn stopped_while(reason: ExceptionReason, doing: &str) -> Ending {
        Ending::new(
            Resolution::Exception(reason),
            format!("{} {doing}", reason.as_str()),
        )
    }

    /// Whether it is an exception (the command's result does not count).
    pub fn is_exception(&self) -> bool {
        matches!(self.resolution, Resolution::Exception(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_promise() {
        assert_eq!(Resolution::Completed.outcome() as u8, 0);
        assert_eq!(Resolution::Failed.outcome() as u8, 1);
        let malformed = Resolution::Exception(ExceptionReason::MalformedPayload);
        assert_eq!(malformed.outcome() as u8, 2);
        for reason in [
            ExceptionReason::InternalError,
            ExceptionReason::Canceled,
            ExceptionReason::WorkerShutdown,
        ] {
            assert_eq!(Resolution::Exception(reason).outcome() as u8, 3);
        }
        assert_eq!(malformed.to_string(), "exception/malformed-payload");
        for resolution in [Resolution::Completed, Resolution::Failed, malformed] {
            assert_eq!(resolution.to_string().parse(), Ok(resolution));
        }
        assert!("exception/nonsense".parse::<Resolution>().is_err());
    }
}
