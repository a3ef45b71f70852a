//! What a finished task hands back: its [`Ending`], how long each stage took, and the
//! artifacts collected.

use std::time::Duration;

use crate::artifacts::Collected;
use crate::log::TaskLog;
use crate::resolution::Ending;

/// How long each stage took.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Stages in order, with their durations.
    pub stages: Vec<(&'static str, Duration)>,
    /// From the start of the task to its resolution.
    pub total: Duration,
    /// From the start of the task to the guest's first output.
    pub first_output: Option<Duration>,
    /// How the VM started: `boot`, `snapshot` or `pool` (empty when no VM started).
    pub start: &'static str,
}

impl Timings {
    /// `fetch 0.01 s, boot 2.10 s, …`.
    pub fn summary(&self) -> String {
        let start = (!self.start.is_empty()).then(|| format!("start {}", self.start));
        let mut parts: Vec<String> = start.into_iter().collect();
        parts.extend(
            self.stages
                .iter()
                .map(|(stage, took)| format!("{stage} {:.2} s", took.as_secs_f64())),
        );
        if let Some(first) = self.first_output {
            parts.push(format!("first output after {:.2} s", first.as_secs_f64()));
        }
        parts.join(", ")
    }
}

/// How a task ended, with its timings and artifacts.
#[derive(Debug, Clone)]
pub struct TaskOutcome {
    /// The resolution, exit code and reason.
    pub ending: Ending,
    /// Stage timings.
    pub timings: Timings,
    /// Artifacts collected.
    pub artifacts: Vec<Collected>,
}

impl TaskOutcome {
    /// A task that ended before any stage ran.
    pub fn before_start(ending: Ending) -> TaskOutcome {
        TaskOutcome {
            ending,
            timings: Timings::default(),
            artifacts: Vec::new(),
        }
    }

    /// The ending of a task whose payload is malformed: `violations` (one per line) and the
    /// resolution go to `log`; no image is fetched and no VM starts.
    pub fn malformed_payload(log: &TaskLog, violations: &str) -> TaskOutcome {
        for line in violations.lines() {
            log.note(line);
        }
        let ending = Ending::malformed("the payload is malformed");
        log.note(&format!(
            "resolved {}: the payload is malformed",
            ending.resolution
        ));
        TaskOutcome::before_start(ending)
    }
}
