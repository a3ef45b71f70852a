//! Making an image's snapshot: boot it, wait for its agent, save it.

use std::path::Path;
use std::time::Duration;

use image_manager::Lease;
use schemas::ResolvedMachine;

use super::format::Snapshot;
use super::AGENT_READY;
use crate::session::{GuestSession, SessionConfig};
use crate::vm::{VirtualMachine, VmError, VmSettings};

/// Boots a VM of `machine` on `lease` (with `settings`, which must give it a network), waits
/// until its agent is up — no task is ever set, so it holds no task data — and saves it into
/// the new directory `dir`. Gives up after `ready_timeout` (an image without our agent).
pub async fn build(
    lease: Lease,
    machine: &ResolvedMachine,
    settings: &VmSettings,
    dir: &Path,
    ready_timeout: Duration,
) -> Result<Snapshot, VmError> {
    let mut vm = VirtualMachine::start(lease, machine, settings).await?;
    let (session, _log) = GuestSession::new(SessionConfig::new(&settings.name));
    vm.set_http_handler(session.handler());
    if !vm.wait_for_serial(AGENT_READY, ready_timeout).await {
        return Err(VmError::Snapshot(format!(
            "the guest's agent did not report ready within {} s",
            ready_timeout.as_secs()
        )));
    }
    // Let its first request arrive, then close the service under it: the agent is then in
    // its retry loop, with no request open, and finds the restored VM's service at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    match vm.network_mut() {
        Some(network) => network.stop_service(),
        None => {
            return Err(VmError::Snapshot(
                "a snapshot needs the VM's own network".into(),
            ))
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    vm.snapshot(dir).await
}
