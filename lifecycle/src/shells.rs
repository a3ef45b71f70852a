//! Login shells in a guest, opened through its session with one patience for the agent.

use std::sync::Arc;
use std::time::Duration;

/// Opens login shells in a guest (one VM's [`engine::network::shell`]): a running task's,
/// or a resumed kept VM's.
#[derive(Clone)]
pub struct Shells(Arc<engine::network::session::GuestSession>);

/// How long a guest's agent has to connect a shell it was asked for.
const SHELL_PATIENCE: Duration = Duration::from_secs(10);

impl Shells {
    /// The shells of the guest on `session`.
    pub(crate) fn of(session: Arc<engine::network::session::GuestSession>) -> Self {
        Self(session)
    }

    /// A login shell on a terminal of `rows` × `cols`, connected.
    pub async fn open(
        &self,
        rows: u16,
        cols: u16,
    ) -> Result<engine::network::shell::ShellStream, engine::network::shell::ShellError> {
        self.0.open_shell(rows, cols, SHELL_PATIENCE).await
    }
}

impl std::fmt::Debug for Shells {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Shells")
    }
}

impl PartialEq for Shells {
    fn eq(&self, other: &Shells) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Shells {}
