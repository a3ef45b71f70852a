//! The stages after the command: collecting the artifacts under one budget, the screenshot,
//! powering the guest off (or killing it), and keeping the consoles with the artifacts.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use engine::network::session::GuestSession;
use engine::{ExitKind, VirtualMachine};
use schemas::machine::GraphicsAdapter;
use schemas::protocol::ActionKind;
use schemas::{Payload, ResolvedMachine};

use super::exits::describe_exit;
use super::{Raced, Run};
use crate::artifacts::{collect, ArtifactError, Budget, Collected};
use crate::host::Host;
use crate::log::TaskLog;
use crate::resolution::{Ending, Resolution};

impl Run {
    /// Collects the payload's artifacts into `dir`; a missing one fails a completed task, and
    /// a stop or the collection's bound decides the ending.
    pub(super) async fn collect_artifacts(
        &mut self,
        host: &Arc<Host>,
        vm: &mut VirtualMachine,
        session: &GuestSession,
        payload: &Payload,
        dir: &Path,
        ending: &mut Ending,
    ) -> Vec<Collected> {
        let budget = Budget::new(&host.config.artifacts, host.config.cache.min_free, dir);
        // The budget's own deadline ends the collection; this one only backs it up.
        let backstop = budget.deadline() + Duration::from_secs(5);
        let log = self.log.clone();
        let work = collect_all(session, payload, dir, &log, budget);
        let collected = match self.race(vm, backstop, work).await {
            Raced::Done((done, missing)) => {
                if let Some(missing) = missing {
                    if ending.resolution == Resolution::Completed {
                        ending.resolution = Resolution::Failed;
                        ending.reason = Some(missing);
                    }
                }
                done
            }
            Raced::Stopped(why) => {
                ending.resolution = Resolution::Exception(why);
                ending.reason = Some(format!("{} while collecting artifacts", why.as_str()));
                Vec::new()
            }
            Raced::VmEnded(kind) => {
                self.log.note(&format!(
                    "the VM ended while artifacts were collected ({})",
                    describe_exit(&kind)
                ));
                Vec::new()
            }
            Raced::TimedOut => {
                ending.resolution = Resolution::Failed;
                ending.reason = Some(format!(
                    "collecting the task's artifacts took longer than {} s (artifacts.timeout)",
                    host.config.artifacts.timeout
                ));
                Vec::new()
            }
        };
        self.stage_done("artifacts");
        collected
    }
}

/// Collects every artifact under one budget; the second value names the first one missing.
/// Once a bound of the budget is hit the rest are not asked for: the task has failed.
async fn collect_all(
    session: &GuestSession,
    payload: &Payload,
    dir: &Path,
    log: &TaskLog,
    mut budget: Budget,
) -> (Vec<Collected>, Option<String>) {
    let mut collected = Vec::new();
    let mut missing = None;
    for artifact in &payload.artifacts {
        match collect(session, artifact, dir, &mut budget).await {
            Ok(done) => {
                let left_out = match done.skipped_count {
                    0 => String::new(),
                    count => format!(
                        " ({count} entries left out: links, devices or names taskvm keeps; {})",
                        done.skipped.join(", ")
                    ),
                };
                log.note(&format!(
                    "artifact {}: {} file(s), {} bytes{left_out}",
                    done.name,
                    done.files.len(),
                    done.bytes,
                ));
                collected.push(done);
            }
            Err(error) => {
                log.note(&format!("artifact {} is missing: {error}", artifact.name));
                missing.get_or_insert_with(|| {
                    format!(
                        "artifact {} is missing: {error}; the task failed",
                        artifact.name
                    )
                });
                if matches!(error, ArtifactError::Exceeded { .. }) {
                    break;
                }
            }
        }
    }
    (collected, missing)
}

/// Whether the machine has a display to look at.
pub(super) fn has_display(machine: &ResolvedMachine) -> bool {
    !matches!(
        machine.machine().graphics,
        None | Some(GraphicsAdapter::None)
    )
}

/// Saves `screenshot.png` of the VM's display in `dir`.
pub(super) async fn take_screenshot(vm: &VirtualMachine, dir: &Path, log: &TaskLog) {
    let shot = vm.screenshot(Duration::from_secs(10)).await;
    let png = shot.and_then(|image| {
        engine::qemu::screenshot::encode_png(&image).map(|png| (png, image.dimensions()))
    });
    match png {
        Ok((png, (width, height))) => match std::fs::write(dir.join("screenshot.png"), &png) {
            Ok(()) => log.note(&format!("screenshot.png: {width}x{height}")),
            Err(error) => log.note(&format!("screenshot not saved: {error}")),
        },
        Err(error) => log.note(&format!("no screenshot: {error}")),
    }
}

/// Asks the agent to power the guest off; kills the VM when it does not in time.
/// Returns whether the guest powered off by itself.
pub(super) async fn shut_down(
    vm: &mut VirtualMachine,
    session: &GuestSession,
    grace: Duration,
    log: &TaskLog,
) -> bool {
    let asked = tokio::time::timeout(
        Duration::from_secs(5),
        session.perform(ActionKind::Shutdown),
    )
    .await;
    if asked.is_ok() {
        if let Ok(kind) = tokio::time::timeout(grace, vm.wait()).await {
            if kind != ExitKind::PoweredOff {
                log.note(&format!("at shutdown: {}", describe_exit(&kind)));
            }
            return kind == ExitKind::PoweredOff;
        }
    }
    log.note("the guest did not power off in time; the VM was killed");
    vm.kill().await;
    false
}

/// Keeps the serial console and QEMU's messages with the artifacts.
pub(super) fn save_consoles(vm: &VirtualMachine, dir: &Path, log: &TaskLog) {
    for (name, text) in [
        ("serial.log", vm.serial_output()),
        ("qemu.log", vm.qemu_output()),
    ] {
        if let Err(error) = std::fs::write(dir.join(name), text) {
            log.note(&format!("{name} not saved: {error}"));
        }
    }
}
