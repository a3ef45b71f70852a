//! What a VM's exit means for its task: the words for each way a VM ends, and whose fault it
//! is at each point of the task.

use engine::ExitKind;

use crate::resolution::{Ending, ExceptionReason};

/// The VM's exit in words, with the setting that raises a bound that was hit.
pub fn describe_exit(kind: &ExitKind) -> String {
    match kind {
        ExitKind::PoweredOff => "the guest powered off".to_owned(),
        ExitKind::Rebooted => "the guest rebooted".to_owned(),
        ExitKind::Panicked => "the guest kernel panicked".to_owned(),
        ExitKind::Killed => "the VM was killed".to_owned(),
        ExitKind::FileTooLarge { file, bound, limit } => {
            let setting = match bound {
                engine::vm::FileBound::FileSize => "sandbox.maxFileSize",
                engine::vm::FileBound::Console => "sandbox.maxConsoleSize",
            };
            format!("the VM's {file} reached {limit} bytes ({setting})")
        }
        ExitKind::Crashed {
            status,
            stderr_tail,
        } => format!("QEMU ended unexpectedly ({status}): {stderr_tail}"),
    }
}

/// The VM ended before the guest took its task: the image cannot run tasks, unless QEMU
/// itself crashed.
pub fn ended_while_booting(kind: &ExitKind) -> Ending {
    match kind {
        ExitKind::Crashed { .. } | ExitKind::Killed => Ending::internal(describe_exit(kind)),
        _ => Ending::malformed(format!(
            "unusable image: {} before the guest asked for its task",
            describe_exit(kind)
        )),
    }
}

/// The VM ended while the command ran: the task's doing, unless QEMU itself crashed.
pub fn ended_while_running(kind: &ExitKind) -> Ending {
    match kind {
        ExitKind::Crashed { .. } | ExitKind::Killed => Ending::internal(describe_exit(kind)),
        _ => Ending::failed(format!(
            "{} before the command reported its exit; the task failed",
            describe_exit(kind)
        )),
    }
}

/// The task was stopped from outside while its VM ran.
pub fn stopped(reason: ExceptionReason) -> Ending {
    Ending::new(
        crate::resolution::Resolution::Exception(reason),
        match reason {
            ExceptionReason::Canceled => "the task was canceled; the VM was killed".to_owned(),
            ExceptionReason::WorkerShutdown => {
                "the worker is shutting down; the VM was killed".to_owned()
            }
            other => other.as_str().to_owned(),
        },
    )
}
