//! The command's stage: waiting for the guest to take its task within [`START_TIMEOUT`], then
//! for its report within `maxRunTime` (killing the command when that passes), while watching
//! for the VM ending and the task being stopped.

use std::time::Duration;

use engine::network::session::GuestSession;
use engine::VirtualMachine;
use schemas::protocol::{ActionKind, Report};
use schemas::Payload;

use super::exits::{ended_while_booting, ended_while_running, stopped};
use super::{Raced, Run, START_TIMEOUT};
use crate::resolution::Ending;

/// How the command's stage ended.
pub(super) struct Supervised {
    /// The task's ending so far.
    pub ending: Ending,
    /// Whether the guest is still up (the command ran to a report, or was killed at
    /// maxRunTime), so artifacts can be collected and the guest asked to power off.
    pub guest_alive: bool,
}

impl Supervised {
    fn over(ending: Ending) -> Supervised {
        Supervised {
            ending,
            guest_alive: false,
        }
    }

    fn ran(ending: Ending) -> Supervised {
        Supervised {
            ending,
            guest_alive: true,
        }
    }
}

impl Run {
    /// Runs the command's stage to its end.
    pub(super) async fn supervise(
        &mut self,
        vm: &mut VirtualMachine,
        session: &GuestSession,
        payload: &Payload,
        start_deadline: tokio::time::Instant,
    ) -> Supervised {
        let max = payload.max_run_time;
        match self.race(vm, start_deadline, session.wait_taken()).await {
            Raced::Done(Err(reason)) => return Supervised::over(Ending::malformed(reason)),
            Raced::Done(Ok(())) => self.stage_done(match self.timings.start {
                "snapshot" => "restore",
                "pool" | "pool-cold" => "resume",
                _ => "boot",
            }),
            Raced::TimedOut => {
                return Supervised::over(Ending::failed(format!(
                    "the guest did not ask for its task within {} s of starting (does the \
                     image start the taskvm agent?); the task failed",
                    START_TIMEOUT.as_secs()
                )))
            }
            Raced::VmEnded(kind) => return Supervised::over(ended_while_booting(&kind)),
            Raced::Stopped(reason) => return Supervised::over(stopped(reason)),
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(max));
        match self.race(vm, deadline, session.wait_report()).await {
            Raced::Done(Report {
                not_run: Some(why), ..
            }) => {
                self.stage_done("run");
                Supervised::ran(Ending::failed(format!(
                    "the command did not run: {}; the task failed",
                    schemas::shown::escaped(&why)
                )))
            }
            Raced::Done(Report { exit_code, .. }) => {
                self.stage_done("run");
                Supervised::ran(Ending::exited(exit_code))
            }
            Raced::TimedOut => {
                self.stage_done("run");
                self.log.note(&format!(
                    "maxRunTime of {max} s exceeded: killing the command"
                ));
                let kill = session.perform(ActionKind::KillProcess { signal: 9 });
                let _ = tokio::time::timeout(Duration::from_secs(5), kill).await;
                let report =
                    tokio::time::timeout(Duration::from_secs(10), session.wait_report()).await;
                let mut ending =
                    Ending::failed(format!("maxRunTime of {max} s exceeded; the task failed"));
                ending.exit_code = report.ok().map(|report| report.exit_code);
                Supervised::ran(ending)
            }
            Raced::VmEnded(kind) => Supervised::over(ended_while_running(&kind)),
            Raced::Stopped(reason) => Supervised::over(stopped(reason)),
        }
    }
}
