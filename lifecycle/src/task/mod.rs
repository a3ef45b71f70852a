//! One task on a host, from its validated payload to its [`TaskOutcome`]: [`run_task`].
//!
//! The steps, in order (each timed; the timings end the log):
//! 1. the payload's own machine checked against the host's limits (no image fetched if not);
//! 2. **fetch**: the image fetched into the cache and leased ([`start`]);
//! 3. the machine resolved: payload over image over worker defaults, under the limits;
//! 4. **capacity**: waiting until the host can hold the VM beside the others;
//!    **mounts**: a copy of each cache the payload mounts checked out, its content made
//!    ([`mounts`]);
//! 5. **start**: the VM restored from a pooled VM or the image's snapshot, or booted, with the
//!    task handed to the guest session;
//! 6. **boot/restore/resume**, then **run**: the guest takes its task, the command runs to its
//!    report or `maxRunTime` ([`supervise`]);
//! 7. **artifacts**, **screenshot**, **shutdown**: collected, taken, powered off ([`finish`]);
//! 8. the consoles kept with the artifacts, the caches given back (purged when the exit
//!    status says so), and the resolution logged.
//!
//! Every ending is an [`Ending`]; [`exits`] says what a VM's exit means at each step.

mod exits;
mod finish;
mod mounts;
pub mod outcome;
mod start;
mod supervise;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::network::session::{GuestSession, SessionConfig};
use engine::{ExitKind, VirtualMachine, VmError};
use image_manager::Lease;
use schemas::protocol::Execute;
use schemas::{limit_violation, resolve_machine, MachineLayers, Payload, ResolvedMachine};
use tokio::sync::watch;
use tracing::Instrument;

use self::exits::describe_exit;
use self::finish::{has_display, save_consoles, shut_down, take_screenshot};
use self::outcome::{TaskOutcome, Timings};
use crate::artifacts::Collected;
use crate::capacity::Capacity;
use crate::host::Host;
use crate::log::TaskLog;
use crate::resolution::{Ending, ExceptionReason, Resolution};
use crate::shells::Shells;

/// Why a running task is being stopped from outside.
pub type StopSignal = watch::Receiver<Option<ExceptionReason>>;

/// How long a VM may take from its start to the guest asking for its task.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the guest gets to power off after the task before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// One task to run.
pub struct TaskRequest {
    /// The validated payload.
    pub payload: Payload,
    /// A name unique on this host (the VM, its namespace and directories are named after it).
    pub name: String,
    /// Where artifacts go (the log, consoles, the payload's artifacts, the screenshot).
    pub artifacts_dir: PathBuf,
    /// The host capacity the task's VM must fit in before it starts (None: not counted).
    pub capacity: Option<Arc<Capacity>>,
    /// Told where the running VM can be watched while it runs, and `None` once it is gone.
    pub live: Option<watch::Sender<Option<LiveVm>>>,
    /// The provider's name for the task (a kept VM says which task it was).
    pub task: Option<String>,
}

impl TaskRequest {
    /// A task with nothing but its payload, name and artifacts directory.
    pub fn new(payload: Payload, name: String, artifacts_dir: PathBuf) -> TaskRequest {
        TaskRequest {
            payload,
            name,
            artifacts_dir,
            capacity: None,
            live: None,
            task: None,
        }
    }
}

/// A running task VM, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveVm {
    /// QEMU's VNC server (several clients may share it), reached through checked descriptors.
    pub vnc: engine::sandbox::runtime::VncEndpoint,
    /// Whether the machine has a display to look at.
    pub has_display: bool,
    /// Login shells in the guest, on request.
    pub shells: Shells,
}

/// Runs `request` on `host` to its resolution, writing `log`. `stop` turning `Some` cancels
/// the task (the VM is killed and every resource removed).
pub async fn run_task(
    host: Arc<Host>,
    request: TaskRequest,
    log: &TaskLog,
    stop: StopSignal,
) -> TaskOutcome {
    let mut run = Run {
        started: Instant::now(),
        stage_started: Instant::now(),
        timings: Timings::default(),
        log: log.clone(),
        stop,
    };
    let span = tracing::info_span!("vm", name = %request.name);
    let (ending, artifacts) = match run.steps(host, &request).instrument(span).await {
        Ok(ended) => ended,
        Err(early) => (early, Vec::new()),
    };
    let mut timings = run.timings;
    timings.total = run.started.elapsed();
    timings.first_output = log
        .first_output()
        .map(|first| first.saturating_duration_since(run.started));
    if let Some(reason) = &ending.reason {
        log.note(reason);
    }
    log.note(&format!(
        "resolved {} in {:.2} s ({})",
        ending.resolution,
        timings.total.as_secs_f64(),
        timings.summary()
    ));
    log.sync();
    TaskOutcome {
        ending,
        timings,
        artifacts,
    }
}

/// What interrupted a wait.
enum Raced<T> {
    Done(T),
    VmEnded(ExitKind),
    TimedOut,
    Stopped(ExceptionReason),
}

/// A task on its way: what its stages share.
struct Run {
    started: Instant,
    stage_started: Instant,
    timings: Timings,
    log: TaskLog,
    stop: StopSignal,
}

/// A started VM with the guest session that hands it its task.
struct Started {
    vm: VirtualMachine,
    session: Arc<GuestSession>,
    /// Copies the guest's log into the task log until the session ends.
    forward: tokio::task::JoinHandle<()>,
    /// The bound of the start, counted from before the VM (or its snapshot) was made.
    deadline: tokio::time::Instant,
}

impl Run {
    fn stage_done(&mut self, stage: &'static str) {
        let now = Instant::now();
        self.timings
            .stages
            .push((stage, now.duration_since(self.stage_started)));
        self.stage_started = now;
    }

    async fn stopped(stop: &mut StopSignal) -> ExceptionReason {
        loop {
            if let Some(reason) = *stop.borrow_and_update() {
                return reason;
            }
            if stop.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits for `work`, unless the VM ends, the deadline passes or the task is stopped.
    async fn race<T>(
        &mut self,
        vm: &mut VirtualMachine,
        deadline: tokio::time::Instant,
        work: impl std::future::Future<Output = T>,
    ) -> Raced<T> {
        tokio::select! {
            value = work => Raced::Done(value),
            kind = vm.wait() => Raced::VmEnded(kind),
            () = tokio::time::sleep_until(deadline) => Raced::TimedOut,
            reason = Self::stopped(&mut self.stop) => Raced::Stopped(reason),
        }
    }

    /// The steps of the module documentation.
    async fn steps(
        &mut self,
        host: Arc<Host>,
        request: &TaskRequest,
    ) -> Result<(Ending, Vec<Collected>), Ending> {
        let payload = &request.payload;
        check_payload_machine(&host, payload)?;
        let lease = self.fetch(&host, payload).await?;
        self.stage_done("fetch");
        let machine = resolve_task_machine(&host, payload, &lease)?;
        let _reservation = match &request.capacity {
            Some(capacity) => Some(self.reserve(capacity, &machine).await?),
            None => None,
        };
        let mounts = self.prepare_mounts(&host, payload).await?;
        let digest = lease.digest().clone();
        let Started {
            mut vm,
            session,
            forward,
            deadline,
        } = self.start(&host, request, lease, &machine, &mounts).await?;
        let _watched = request.live.as_ref().map(|live| {
            LiveGuard::publish(
                live,
                LiveVm {
                    vnc: vm.vnc(),
                    has_display: has_display(&machine),
                    shells: Shells::of(session.clone()),
                },
            )
        });
        let supervised = self.supervise(&mut vm, &session, payload, deadline).await;
        let mut ending = supervised.ending;
        fail_at_file_bound(&vm, &mut ending);
        // The agent closes its log before it reports; let the last bytes land.
        let _ = tokio::time::timeout(Duration::from_secs(2), forward).await;
        let mut collected = Vec::new();
        let mut powered_off = false;
        if supervised.guest_alive {
            let dir = &request.artifacts_dir;
            collected = self
                .collect_artifacts(&host, &mut vm, &session, payload, dir, &mut ending)
                .await;
            let stopped = ending.is_exception();
            if payload.screenshot && !stopped {
                if has_display(&machine) {
                    take_screenshot(&vm, dir, &self.log).await;
                } else {
                    self.log
                        .note("no screenshot: the machine has no display (graphics \"none\")");
                }
                self.stage_done("screenshot");
            }
            let keep = payload
                .debug
                .as_ref()
                .is_some_and(|debug| debug.keep_on_failure)
                && ending.resolution == Resolution::Failed;
            if stopped {
                vm.kill().await;
            } else if keep && mounts.is_empty() {
                save_consoles(&vm, &request.artifacts_dir, &self.log);
                self.keep(&host, vm, request, &digest, &machine).await;
                self.stage_done("keep");
                return Ok((ending, collected));
            } else {
                if keep {
                    self.log
                        .note("not kept for debugging: a VM with mounts is not kept");
                }
                powered_off = shut_down(&mut vm, &session, SHUTDOWN_GRACE, &self.log).await;
            }
            self.stage_done("shutdown");
        } else {
            vm.kill().await;
        }
        save_consoles(&vm, &request.artifacts_dir, &self.log);
        vm.release().await;
        for note in mounts.release(payload, ending.exit_code, powered_off) {
            self.log.note(&note);
        }
        Ok((ending, collected))
    }

    /// Keeps the failed VM `vm` for debugging (see [`crate::kept`]), saying in the log how to
    /// resume it, or why it was not kept.
    async fn keep(
        &mut self,
        host: &Arc<Host>,
        vm: VirtualMachine,
        request: &TaskRequest,
        digest: &image_manager::Digest,
        machine: &ResolvedMachine,
    ) {
        // The accelerator is the host's, probed once: the one this VM runs on.
        let settings = host.vm_settings(&request.name, host.accelerator(&|_| {}).await);
        let snapshot_key = match host.cache.lease(digest) {
            Ok(Some(lease)) => host.snapshot_key(&lease, machine, &settings),
            _ => String::new(),
        };
        let meta = crate::kept::KeptMeta {
            name: request.name.clone(),
            payload: request.payload.clone(),
            task: request.task.clone(),
            image: digest.hex().to_owned(),
            snapshot_key,
            kept_at: 0,
        };
        match crate::kept::keep(host, vm, meta).await {
            Ok(kept) => self.log.note(&format!(
                "the failed VM is kept as {} for {} s: taskvm debug {} resumes it",
                kept.meta.name, host.config.kept.ttl, kept.meta.name
            )),
            Err(error) => self
                .log
                .note(&format!("the failed VM was not kept: {error}")),
        }
    }

    /// Starts the task's VM with the guest session holding its command.
    async fn start(
        &mut self,
        host: &Arc<Host>,
        request: &TaskRequest,
        lease: Lease,
        machine: &ResolvedMachine,
        mounts: &mounts::TaskMounts,
    ) -> Result<Started, Ending> {
        let log = self.log.clone();
        let accelerator = host.accelerator(&|line| log.note(line)).await;
        let mut settings = host.vm_settings(&request.name, accelerator);
        settings.drives.extend(mounts.drives());
        // The start (a snapshot made first included) has its own bound; maxRunTime is the
        // command's, counted from when the guest takes it.
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let (session, mut guest_log) = GuestSession::new(SessionConfig::new(&request.name));
        session.set_task(Execute {
            command: request.payload.command.clone(),
            env: request.payload.env.clone(),
            mounts: mounts.for_guest(),
            ..Execute::default()
        });
        let vm = match self
            .start_vm(host, lease, machine, &settings, &session)
            .await
        {
            Ok(vm) => vm,
            Err(VmError::Machine(error)) => {
                return Err(Ending::malformed(format!(
                    "the machine cannot be built: {error}"
                )))
            }
            Err(error) => return Err(Ending::internal(format!("the VM did not start: {error}"))),
        };
        let vm_line = format!(
            "VM {}: {} MiB, {} vCPU(s), {}",
            request.name,
            machine.memory_mib(),
            machine.topology().vcpus(),
            match accelerator {
                engine::Accelerator::Kvm => "KVM",
                engine::Accelerator::Tcg => "TCG",
            }
        );
        tracing::debug!(start = self.timings.start, "{vm_line}");
        self.log.note(&vm_line);
        vm.set_http_handler(session.handler());
        let forward = tokio::spawn(async move {
            while let Some(chunk) = guest_log.recv().await {
                log.output(&chunk);
            }
        });
        Ok(Started {
            vm,
            session,
            forward,
            deadline,
        })
    }
}

/// The payload's own machine alone may break the limits; then no image is fetched. (Its
/// explicit values are final, and the image can only add more of them.)
fn check_payload_machine(host: &Host, payload: &Payload) -> Result<(), Ending> {
    let layers = MachineLayers {
        payload: payload.machine.as_ref(),
        ..MachineLayers::default()
    };
    resolve_machine(layers, &host.config.limits)
        .map(|_| ())
        .map_err(|error| Ending::malformed(limit_violation(&error, "/machine").to_string()))
}

/// The task's machine: the payload's over the image's over the worker's defaults, under the
/// host's limits.
fn resolve_task_machine(
    host: &Host,
    payload: &Payload,
    lease: &Lease,
) -> Result<ResolvedMachine, Ending> {
    let layers = MachineLayers {
        payload: payload.machine.as_ref(),
        image: Some(lease.machine()),
        worker: host.config.machine.as_ref(),
    };
    resolve_machine(layers, &host.config.limits)
        .map_err(|error| Ending::malformed(limit_violation(&error, "/machine").to_string()))
}

/// A VM stopped because a file of its reached its bound fails the task (unless it already
/// ended in an exception).
fn fail_at_file_bound(vm: &VirtualMachine, ending: &mut Ending) {
    if let Some(over) = vm.file_at_bound() {
        if !ending.is_exception() {
            ending.resolution = Resolution::Failed;
            ending.reason = Some(format!("{}; the task failed", describe_exit(&over)));
        }
    }
}

/// Publishes a running VM to watchers, and withdraws it on drop.
struct LiveGuard<'a>(&'a watch::Sender<Option<LiveVm>>);

impl<'a> LiveGuard<'a> {
    fn publish(live: &'a watch::Sender<Option<LiveVm>>, vm: LiveVm) -> Self {
        live.send_replace(Some(vm));
        LiveGuard(live)
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.0.send_replace(None);
    }
}
