//! The signals that stop a command: Ctrl-C or SIGTERM.

use lifecycle::resolution::ExceptionReason;

/// Ctrl-C or SIGTERM, for a command that stops on either.
pub async fn wait_for_signal_quietly() {
    wait_for_signal().await;
}

/// Ctrl-C or SIGTERM.
pub async fn wait_for_signal() -> ExceptionReason {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    let mut terminate = signal(SignalKind::terminate()).ok();
    tokio::select! {
        Some(()) = async { interrupt.as_mut()?.recv().await } => {}
        Some(()) = async { terminate.as_mut()?.recv().await } => {}
    }
    ExceptionReason::Canceled
}
