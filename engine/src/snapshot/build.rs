//! Making an image's snapshot: boot it, wait for its agent, save it.

use std::path::Path;
use std::time::Duration;

use image_manager::Lease;
use schemas::ResolvedMachine;

use super::format::{SavedRam, Snapshot};
use super::AGENT_READY;
use crate::network::warm_up::{WarmUp, WARM_UP_TIMEOUT};
use crate::vm::{VirtualMachine, VmError, VmSettings};
use schemas::protocol::marker::CUT_OFF;

/// How long the agent may take from ready to its first request.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to notice that the metadata service stopped under its request.
const CUT_OFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Boots a VM of `machine` on `lease` (with `settings`, which must give it a network), waits
/// until its agent is up and has run the warm-up command ([`WarmUp::standard`]) — no task is
/// ever set, so it holds no task data — and saves it into
/// the new directory `dir`. Gives up after `ready_timeout` (an image without our agent).
/// The guest's RAM goes to `ram.bin` ([`SavedRam::File`]).
pub async fn build(
    lease: Lease,
    machine: &ResolvedMachine,
    settings: &VmSettings,
    dir: &Path,
    ready_timeout: Duration,
) -> Result<Snapshot, VmError> {
    build_as(SavedRam::File, lease, machine, settings, dir, ready_timeout).await
}

/// Like [`build()`], with the guest's RAM saved as `ram` says: benchmarks compare the placements.
pub async fn build_as(
    ram: SavedRam,
    lease: Lease,
    machine: &ResolvedMachine,
    settings: &VmSettings,
    dir: &Path,
    ready_timeout: Duration,
) -> Result<Snapshot, VmError> {
    let mut vm = VirtualMachine::start_for_snapshot(ram, lease, machine, settings).await?;
    let warm_up = WarmUp::standard();
    vm.set_http_handler(warm_up.handler());
    if !vm.wait_for_serial(AGENT_READY, ready_timeout).await {
        return Err(VmError::Snapshot(format!(
            "the guest's agent did not report ready within {} s",
            ready_timeout.as_secs()
        )));
    }
    // The warm-up runs before the save, so every restored copy finds the shell, the loader and
    // the C library in its page cache (an agent without the feature is not given one). An
    // agent that does not ask within a moment is saved as it is, as before warm-ups.
    let asked = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, warm_up.asked())
        .await
        .is_ok();
    if asked
        && tokio::time::timeout(WARM_UP_TIMEOUT, warm_up.finished())
            .await
            .is_err()
    {
        return Err(VmError::Snapshot(format!(
            "the guest's agent did not finish its warm-up command within {} s",
            WARM_UP_TIMEOUT.as_secs()
        )));
    }
    // Let its request for a task arrive, then close the service under it: the agent is then in
    // its retry loop, with no request open, and finds the restored VM's service at once. A
    // request the stop cut off is left only when the guest has read that its connection
    // closed, which it says on the console; until then the close may still be in flight
    // (on the host's side of the tap) and would be lost in the saved state, leaving the
    // restored agent waiting on a connection that no longer exists.
    let Some(network) = vm.network_mut() else {
        return Err(VmError::Snapshot(
            "a snapshot needs the VM's own network".into(),
        ));
    };
    // Its request for a task (held by the warm-up's handler) is open at the service within a
    // moment; waiting for it makes every snapshot the same: saved after a request was cut off.
    let deadline = tokio::time::Instant::now() + FIRST_REQUEST_TIMEOUT;
    while asked && network.open_requests() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cut_off_before = vm.serial_output().matches(CUT_OFF).count();
    let cut_off = match vm.network_mut() {
        Some(network) => network.stop_service().await,
        None => 0,
    };
    if cut_off > 0 {
        let deadline = tokio::time::Instant::now() + CUT_OFF_TIMEOUT;
        while vm.serial_output().matches(CUT_OFF).count() == cut_off_before {
            if tokio::time::Instant::now() >= deadline {
                return Err(VmError::Snapshot(format!(
                    "the guest's agent did not leave the request the snapshot cut off within {} s",
                    CUT_OFF_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    vm.snapshot(dir).await
}
