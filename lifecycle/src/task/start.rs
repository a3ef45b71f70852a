//! The stages before the command runs: waiting for host capacity, fetching the image, and
//! starting the VM — restored from the image's snapshot or a pooled VM, or booted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::network::session::GuestSession;
use engine::{VirtualMachine, VmError, VmSettings};
use image_manager::{FetchKind, ImageRequest, Lease, Progress};
use schemas::config::StartMode;
use schemas::shown::quoted;
use schemas::{Payload, ResolvedMachine};

use super::Run;
use crate::capacity::{self, Capacity, Resources};
use crate::host::Host;
use crate::images::image_error_is_the_payloads;
use crate::log::TaskLog;
use crate::pool;
use crate::resolution::Ending;

impl Run {
    /// Waits until the host can hold `machine` beside the VMs already running.
    pub(super) async fn reserve(
        &mut self,
        capacity: &Arc<Capacity>,
        machine: &ResolvedMachine,
    ) -> Result<capacity::Reservation, Ending> {
        let needed = Resources {
            memory_mib: u64::from(machine.memory_mib()),
            cpus: u64::from(machine.topology().vcpus()),
        };
        let waiting = Instant::now();
        let reserved = tokio::select! {
            reserved = capacity.reserve(needed) => reserved,
            reason = Self::stopped(&mut self.stop) => {
                return Err(Ending::stopped_while(reason, "while waiting for host capacity"));
            }
        };
        let reservation = reserved.map_err(|error| Ending::malformed(error.to_string()))?;
        if waiting.elapsed() > Duration::from_millis(100) {
            self.log.note(&format!(
                "waited {:.2} s for host capacity ({} MiB, {} vCPU(s))",
                waiting.elapsed().as_secs_f64(),
                needed.memory_mib,
                needed.cpus
            ));
            self.stage_done("capacity");
        }
        Ok(reservation)
    }

    /// Fetches the payload's image into the cache and leases it.
    pub(super) async fn fetch(
        &mut self,
        host: &Arc<Host>,
        payload: &Payload,
    ) -> Result<Lease, Ending> {
        let request = ImageRequest::from_payload(&payload.image)
            .and_then(|request| {
                request.check_file_policy(&host.file_policy)?;
                Ok(request)
            })
            .map_err(|error| Ending::malformed(format!("image: {error}")))?;
        self.log
            .note(&format!("image {}", quoted(payload.image.url())));
        let fetching = {
            let host = host.clone();
            let log = self.log.clone();
            let reference = payload.image.url().to_owned();
            tokio::task::spawn_blocking(move || {
                let progress = FetchProgress::new(&log);
                let fetched = host
                    .cache
                    .fetch(&request, &|step| progress.update(step, &reference));
                if let Ok((_, FetchKind::Downloaded)) = &fetched {
                    match host.cache.gc_configured() {
                        Ok(report) if !report.removed.is_empty() => {
                            host.vms.snapshots.sweep();
                        }
                        Ok(_) => {}
                        Err(error) => {
                            log.note(&format!("cache garbage collection failed: {error}"))
                        }
                    }
                }
                fetched
            })
        };
        let fetched = tokio::select! {
            fetched = fetching => fetched,
            reason = Self::stopped(&mut self.stop) => {
                return Err(Ending::stopped_while(reason, "while fetching the image"));
            }
        };
        let (lease, kind) = fetched
            .map_err(|error| Ending::internal(format!("image fetch thread: {error}")))?
            .map_err(|error| {
                if image_error_is_the_payloads(&error) {
                    Ending::malformed(format!("unusable image: {error}"))
                } else {
                    Ending::internal(format!("image: {error}"))
                }
            })?;
        self.log.note(&format!(
            "image sha256:{} ({})",
            lease.digest().hex(),
            match kind {
                FetchKind::Hit => "cached",
                FetchKind::Downloaded => "fetched into the cache",
            }
        ));
        Ok(lease)
    }

    /// Starts the task's VM as the configuration says: restored from the image's snapshot
    /// (made first when there is none), or booted — always booted when a snapshot fails.
    pub(super) async fn start_vm(
        &mut self,
        host: &Arc<Host>,
        lease: Lease,
        machine: &ResolvedMachine,
        settings: &VmSettings,
        session: &Arc<GuestSession>,
    ) -> Result<VirtualMachine, VmError> {
        let mode = host.config.start;
        if mode == StartMode::Boot {
            self.timings.start = "boot";
            return VirtualMachine::start(lease, machine, settings).await;
        }
        let key = host.snapshot_key(&lease, machine, settings);
        // A pooled VM has its disks already: a task with mounts restores its own VM.
        let with_mounts = !settings.drives.is_empty();
        if host.pool.enabled() && !with_mounts {
            if let Some(pooled) = host.pool.take(&key) {
                // The task is there before the guest runs again: the agent's request held by
                // the warm-up is answered with it.
                let vm = pooled.vm;
                vm.set_http_handler(session.handler());
                pooled.warm_up.hand_over(session.clone());
                match vm.resume().await {
                    Ok(()) => {
                        self.timings.start = if pooled.warmed { "pool" } else { "pool-cold" };
                        return Ok(vm);
                    }
                    Err(error) => self.log.note(&format!(
                        "a pooled VM did not resume ({error}); starting another"
                    )),
                }
            }
        }
        if mode == StartMode::Auto && host.vms.snapshots.is_unusable(&key) {
            self.timings.start = "boot";
            return VirtualMachine::start(lease, machine, settings).await;
        }
        let fresh_lease = || host.lease_again(&lease);
        let got = match host.snapshot_for(&key, &lease, machine, settings).await {
            Ok(got) => got,
            Err(error) => {
                let reason = format!("no snapshot could be made ({error})");
                if mode == StartMode::Auto {
                    host.vms.snapshots.mark_unusable(&key, &reason);
                }
                self.log.note(&format!("{reason}; booting instead"));
                self.timings.start = "boot";
                return VirtualMachine::start(fresh_lease()?, machine, settings).await;
            }
        };
        if got.built {
            self.log.note(&format!(
                "snapshot {} made for this image and machine",
                &key[..12]
            ));
            self.stage_done("snapshot");
        }
        if host.pool.enabled() && !with_mounts {
            let recipe = pool::Recipe {
                image: lease.digest().clone(),
                snapshot: got.snapshot.clone(),
                machine: machine.clone(),
                settings: settings.clone(),
            };
            host.pool.offer(&key, &recipe);
        }
        match VirtualMachine::restore(fresh_lease()?, machine, settings, &got.snapshot).await {
            Ok(vm) => {
                self.timings.start = "snapshot";
                Ok(vm)
            }
            Err(error @ VmError::Machine(_)) => Err(error),
            Err(error) => {
                self.log.note(&format!(
                    "snapshot {} did not restore ({error}); discarded, booting instead",
                    &key[..12]
                ));
                host.vms.snapshots.discard(&key);
                self.timings.start = "boot";
                VirtualMachine::start(fresh_lease()?, machine, settings).await
            }
        }
    }
}

/// Progress of an image download: a line every 10 % once it has taken 2 s.
struct FetchProgress {
    log: TaskLog,
    started: Instant,
    last: std::sync::Mutex<(u64, Instant)>,
}

impl FetchProgress {
    fn new(log: &TaskLog) -> Self {
        FetchProgress {
            log: log.clone(),
            started: Instant::now(),
            last: std::sync::Mutex::new((0, Instant::now())),
        }
    }

    fn update(&self, progress: Progress, reference: &str) {
        let Some(total) = progress.total.filter(|total| *total > 0) else {
            return;
        };
        let tenth = progress.bytes * 10 / total;
        let pause = Duration::from_secs(2);
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        if tenth > last.0 && self.started.elapsed() >= pause && last.1.elapsed() >= pause {
            *last = (tenth, Instant::now());
            let rate = progress.bytes as f64 / self.started.elapsed().as_secs_f64() / 1e6;
            self.log.note(&format!(
                "fetching {reference}: {}% of {} MB ({rate:.0} MB/s)",
                tenth * 10,
                total / 1_000_000
            ));
        }
    }
}
