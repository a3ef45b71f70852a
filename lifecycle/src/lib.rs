//! The task lifecycle that every queue provider shares (`taskvm run`, the embedded queue in
//! `serve` and the Taskcluster provider all call it): fetch and lease the image → resolve the
//! machine under the host's limits → start the VM on its isolated network → hand the command
//! to the agent → stream the log → collect artifacts and a screenshot → shut down → resolve.
//! Every stage is timed, and the timings end the log.
//!
//! # Layout
//! - [`exit`]: the exit codes of `taskvm run` and the outcome they map from.
//! - [`resolution`]: the vocabulary of endings and the exit codes.
//! - [`payload_run`]: [`payload_run::run_payload`], what every provider calls: an unvalidated
//!   payload to its outcome.
//! - [`host`]: what all tasks of a worker share, prepared once.
//! - [`log`]: the task log.
//! - [`artifacts`]: copying files and directories out of the guest.
//! - [`snapshots`]: the store of booted images' snapshots, for fast starts.
//! - [`pool`]: paused restored VMs kept ready for the most used image.
//! - [`capacity`]: the host's memory and CPUs, shared out among running tasks.

#![warn(clippy::unwrap_used)]

pub mod artifacts;
pub mod build;
pub mod capacity;
pub mod exit;
pub mod host;
pub mod images;
pub mod log;
pub mod payload_run;
pub mod pool;
pub mod resolution;
pub mod snapshots;
pub mod warm;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::session::{GuestSession, SessionConfig};
use engine::{ExitKind, VirtualMachine, VmError, VmSettings};
use image_manager::{FetchKind, ImageRequest, Lease, Progress};
use schemas::config::StartMode;
use schemas::machine::GraphicsAdapter;
use schemas::protocol::{ActionKind, Execute, Report};
use schemas::shown::quoted;
use schemas::{limit_violation, resolve_machine, MachineLayers, Payload, ResolvedMachine};
use tokio::sync::watch;

use self::artifacts::{collect, ArtifactError, Budget, Collected};
use self::capacity::{Capacity, Resources};
use self::host::Host;
pub use self::images::image_error_is_the_payloads;
use self::log::TaskLog;
pub use self::payload_run::{run_payload, PayloadDocument, PayloadRun};
use self::resolution::{ExceptionReason, Resolution};

/// Why a running task is being stopped from outside.
pub type StopSignal = watch::Receiver<Option<ExceptionReason>>;

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
        }
    }
}

/// A running task VM, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveVm {
    /// QEMU's VNC server (several clients may share it), reached through checked descriptors.
    pub vnc: engine::runtime::VncEndpoint,
    /// Whether the machine has a display to look at.
    pub has_display: bool,
}

/// How long a VM may take from its start to the guest asking for its task.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// How long each stage took.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Stages in order, with their durations.
    pub stages: Vec<(&'static str, Duration)>,
    /// From the start of the task to its resolution.
    pub total: Duration,
    /// From the start of the task to the guest's first output.
    pub first_output: Option<Duration>,
    /// How the VM started: `boot` or `snapshot` (empty when no VM started).
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

/// How a task ended.
#[derive(Debug, Clone)]
pub struct TaskOutcome {
    /// The resolution.
    pub resolution: Resolution,
    /// The command's exit code, when it reported one.
    pub exit_code: Option<i32>,
    /// Why it ended so, in one line (for failures and exceptions).
    pub reason: Option<String>,
    /// Stage timings.
    pub timings: Timings,
    /// Artifacts collected.
    pub artifacts: Vec<Collected>,
}

impl TaskOutcome {
    /// The ending of a task whose payload is malformed: `violations` (one per line) and the
    /// resolution go to `log`; no image is fetched and no VM starts.
    pub fn malformed_payload(log: &TaskLog, violations: &str) -> TaskOutcome {
        for line in violations.lines() {
            log.note(line);
        }
        let reason = "the payload is malformed".to_owned();
        log.note(&format!("resolved exception/malformed-payload: {reason}"));
        TaskOutcome {
            resolution: Resolution::Exception(ExceptionReason::MalformedPayload),
            exit_code: None,
            reason: Some(reason),
            timings: Timings::default(),
            artifacts: Vec::new(),
        }
    }
}

/// How long the guest gets to power off after the task before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

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
    let (resolution, exit_code, reason, artifacts) = match run.lifecycle(host, &request).await {
        Ok(ended) => ended,
        Err(early) => (early.resolution, None, Some(early.reason), Vec::new()),
    };
    let mut timings = run.timings;
    timings.total = run.started.elapsed();
    timings.first_output = log
        .first_output()
        .map(|first| first.saturating_duration_since(run.started));
    if let Some(reason) = &reason {
        log.note(reason);
    }
    log.note(&format!(
        "resolved {resolution} in {:.2} s ({})",
        timings.total.as_secs_f64(),
        timings.summary()
    ));
    log.sync();
    TaskOutcome {
        resolution,
        exit_code,
        reason,
        timings,
        artifacts,
    }
}

/// An ending before the command ran.
struct Early {
    resolution: Resolution,
    reason: String,
}

fn malformed(reason: String) -> Early {
    Early {
        resolution: Resolution::Exception(ExceptionReason::MalformedPayload),
        reason,
    }
}

fn internal(reason: String) -> Early {
    Early {
        resolution: Resolution::Exception(ExceptionReason::InternalError),
        reason,
    }
}

type Ended = (Resolution, Option<i32>, Option<String>, Vec<Collected>);

/// What interrupted a wait.
enum Raced<T> {
    Done(T),
    VmEnded(ExitKind),
    TimedOut,
    Stopped(ExceptionReason),
}

struct Run {
    started: Instant,
    stage_started: Instant,
    timings: Timings,
    log: TaskLog,
    stop: StopSignal,
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

    async fn lifecycle(&mut self, host: Arc<Host>, request: &TaskRequest) -> Result<Ended, Early> {
        let payload = &request.payload;
        // The payload's own machine alone may break the limits; then no image is fetched.
        // (Its explicit values are final, and the image can only add more of them.)
        resolve_machine(
            MachineLayers {
                payload: payload.machine.as_ref(),
                ..MachineLayers::default()
            },
            &host.config.limits,
        )
        .map_err(|error| malformed(limit_violation(&error, "/machine").to_string()))?;
        let lease = self.fetch(&host, payload).await?;
        self.stage_done("fetch");
        let machine = resolve_machine(
            MachineLayers {
                payload: payload.machine.as_ref(),
                image: Some(lease.machine()),
                worker: host.config.machine.as_ref(),
            },
            &host.config.limits,
        )
        .map_err(|error| malformed(limit_violation(&error, "/machine").to_string()))?;
        let _reservation = match &request.capacity {
            Some(capacity) => Some(self.reserve(capacity, &machine).await?),
            None => None,
        };
        let log = self.log.clone();
        let accelerator = host.accelerator(&|line| log.note(line)).await;
        let settings = host.vm_settings(&request.name, accelerator);
        // The start (a snapshot made first included) has its own bound; maxRunTime is the
        // command's, counted from when the guest takes it.
        let start_deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let (session, mut guest_log) = GuestSession::new(SessionConfig::new(&request.name));
        session.set_task(Execute {
            command: payload.command.clone(),
            env: payload.env.clone(),
            ..Execute::default()
        });
        let started = self
            .start_vm(&host, lease, &machine, &settings, &session)
            .await;
        let mut vm = match started {
            Ok(vm) => vm,
            Err(VmError::Machine(error)) => {
                return Err(malformed(format!("the machine cannot be built: {error}")))
            }
            Err(error) => return Err(internal(format!("the VM did not start: {error}"))),
        };
        self.log.note(&format!(
            "VM {}: {} MiB, {} vCPU(s), {}",
            request.name,
            machine.memory_mib(),
            machine.topology().vcpus(),
            match accelerator {
                engine::Accelerator::Kvm => "KVM",
                engine::Accelerator::Tcg => "TCG",
            }
        ));
        vm.set_http_handler(session.handler());
        let _watched = request.live.as_ref().map(|live| {
            LiveGuard::publish(
                live,
                LiveVm {
                    vnc: vm.vnc(),
                    has_display: has_display(&machine),
                },
            )
        });
        let forward = {
            let log = self.log.clone();
            tokio::spawn(async move {
                while let Some(chunk) = guest_log.recv().await {
                    log.output(&chunk);
                }
            })
        };

        let ended = self
            .supervise(&mut vm, &session, payload, start_deadline)
            .await;
        let (mut resolution, exit_code, mut reason, guest_alive) = match ended {
            Supervised::Ran {
                resolution,
                exit_code,
                reason,
            } => (resolution, exit_code, reason, true),
            Supervised::Over(early) => (early.resolution, None, Some(early.reason), false),
        };
        if let Some(over) = vm.file_at_bound() {
            if !matches!(resolution, Resolution::Exception(_)) {
                resolution = Resolution::Failed;
                reason = Some(format!("{}; the task failed", describe_exit(&over)));
            }
        }
        // The agent closes its log before it reports; let the last bytes land.
        let _ = tokio::time::timeout(Duration::from_secs(2), forward).await;

        let mut collected = Vec::new();
        if guest_alive {
            let dir = request.artifacts_dir.clone();
            let log = self.log.clone();
            let budget = Budget::new(&host.config.artifacts, host.config.cache.min_free, &dir);
            // The budget's own deadline ends the collection; this one only backs it up.
            let backstop = budget.deadline() + Duration::from_secs(5);
            let work = collect_all(&session, payload, &dir, &log, budget);
            match self.race(&mut vm, backstop, work).await {
                Raced::Done((done, missing)) => {
                    collected = done;
                    if let Some(missing) = missing {
                        if resolution == Resolution::Completed {
                            resolution = Resolution::Failed;
                            reason = Some(missing);
                        }
                    }
                }
                Raced::Stopped(why) => {
                    resolution = Resolution::Exception(why);
                    reason = Some(format!("{} while collecting artifacts", why.as_str()));
                }
                Raced::VmEnded(kind) => {
                    self.log.note(&format!(
                        "the VM ended while artifacts were collected ({})",
                        describe_exit(&kind)
                    ));
                }
                Raced::TimedOut => {
                    resolution = Resolution::Failed;
                    reason = Some(format!(
                        "collecting the task's artifacts took longer than {} s (artifacts.timeout)",
                        host.config.artifacts.timeout
                    ));
                }
            }
            self.stage_done("artifacts");
            let stopped = matches!(resolution, Resolution::Exception(_));
            if payload.screenshot && !stopped {
                if has_display(&machine) {
                    take_screenshot(&vm, &dir, &log).await;
                } else {
                    log.note("no screenshot: the machine has no display (graphics \"none\")");
                }
                self.stage_done("screenshot");
            }
            if stopped {
                vm.kill().await;
            } else {
                shut_down(&mut vm, &session, SHUTDOWN_GRACE, &self.log).await;
            }
            self.stage_done("shutdown");
        } else {
            vm.kill().await;
        }
        save_consoles(&vm, &request.artifacts_dir, &self.log);
        drop(vm);
        Ok((resolution, exit_code, reason, collected))
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

/// How the command phase ended.
enum Supervised {
    /// The command ran to a report or was killed at maxRunTime; the guest is still up.
    Ran {
        resolution: Resolution,
        exit_code: Option<i32>,
        reason: Option<String>,
    },
    /// The task is over and the guest is gone or must go.
    Over(Early),
}

impl Run {
    /// Waits until the host can hold `machine` beside the VMs already running.
    async fn reserve(
        &mut self,
        capacity: &Arc<Capacity>,
        machine: &ResolvedMachine,
    ) -> Result<capacity::Reservation, Early> {
        let needed = Resources {
            memory_mib: u64::from(machine.memory_mib()),
            cpus: u64::from(machine.topology().vcpus()),
        };
        let waiting = Instant::now();
        let reserved = tokio::select! {
            reserved = capacity.reserve(needed) => reserved,
            reason = Self::stopped(&mut self.stop) => {
                return Err(Early {
                    resolution: Resolution::Exception(reason),
                    reason: format!("{} while waiting for host capacity", reason.as_str()),
                })
            }
        };
        let reservation = reserved.map_err(|error| malformed(error.to_string()))?;
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

    async fn fetch(&mut self, host: &Arc<Host>, payload: &Payload) -> Result<Lease, Early> {
        let request = ImageRequest::from_payload(&payload.image)
            .and_then(|request| {
                request.check_file_policy(&host.file_policy)?;
                Ok(request)
            })
            .map_err(|error| malformed(format!("image: {error}")))?;
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
                            host.snapshots.sweep();
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
                return Err(Early {
                    resolution: Resolution::Exception(reason),
                    reason: format!("{} while fetching the image", reason.as_str()),
                })
            }
        };
        let (lease, kind) = fetched
            .map_err(|error| internal(format!("image fetch thread: {error}")))?
            .map_err(|error| {
                if image_error_is_the_payloads(&error) {
                    malformed(format!("unusable image: {error}"))
                } else {
                    internal(format!("image: {error}"))
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
    async fn start_vm(
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
        if host.pool.enabled() {
            if let Some(vm) = host.pool.take(&key) {
                // The task is there before the guest runs again: no retry spent on it.
                vm.set_http_handler(session.handler());
                match vm.resume().await {
                    Ok(()) => {
                        self.timings.start = "pool";
                        return Ok(vm);
                    }
                    Err(error) => self.log.note(&format!(
                        "a pooled VM did not resume ({error}); starting another"
                    )),
                }
            }
        }
        if mode == StartMode::Auto && host.snapshots.is_unusable(&key) {
            self.timings.start = "boot";
            return VirtualMachine::start(lease, machine, settings).await;
        }
        let fresh_lease = || host.lease_again(&lease);
        let got = match host.snapshot_for(&key, &lease, machine, settings).await {
            Ok(got) => got,
            Err(error) => {
                let reason = format!("no snapshot could be made ({error})");
                if mode == StartMode::Auto {
                    host.snapshots.mark_unusable(&key, &reason);
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
        if host.pool.enabled() {
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
                host.snapshots.discard(&key);
                self.timings.start = "boot";
                VirtualMachine::start(fresh_lease()?, machine, settings).await
            }
        }
    }

    async fn supervise(
        &mut self,
        vm: &mut VirtualMachine,
        session: &GuestSession,
        payload: &Payload,
        start_deadline: tokio::time::Instant,
    ) -> Supervised {
        let max = payload.max_run_time;
        match self.race(vm, start_deadline, session.wait_taken()).await {
            Raced::Done(()) => self.stage_done(match self.timings.start {
                "snapshot" => "restore",
                "pool" => "resume",
                _ => "boot",
            }),
            Raced::TimedOut => {
                return Supervised::Over(Early {
                    resolution: Resolution::Failed,
                    reason: format!(
                        "the guest did not ask for its task within {} s of starting (does the \
                         image start the taskvm agent?); the task failed",
                        START_TIMEOUT.as_secs()
                    ),
                })
            }
            Raced::VmEnded(kind) => return Supervised::Over(ended_while_booting(&kind)),
            Raced::Stopped(reason) => return Supervised::Over(stopped(reason)),
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(max));
        match self.race(vm, deadline, session.wait_report()).await {
            Raced::Done(Report { exit_code }) => {
                self.stage_done("run");
                Supervised::Ran {
                    resolution: if exit_code == 0 {
                        Resolution::Completed
                    } else {
                        Resolution::Failed
                    },
                    exit_code: Some(exit_code),
                    reason: (exit_code != 0)
                        .then(|| format!("the command exited with {exit_code}")),
                }
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
                Supervised::Ran {
                    resolution: Resolution::Failed,
                    exit_code: report.ok().map(|report| report.exit_code),
                    reason: Some(format!("maxRunTime of {max} s exceeded; the task failed")),
                }
            }
            Raced::VmEnded(kind) => Supervised::Over(ended_while_running(&kind)),
            Raced::Stopped(reason) => Supervised::Over(stopped(reason)),
        }
    }
}

fn stopped(reason: ExceptionReason) -> Early {
    Early {
        resolution: Resolution::Exception(reason),
        reason: match reason {
            ExceptionReason::Canceled => "the task was canceled; the VM was killed".to_owned(),
            ExceptionReason::WorkerShutdown => {
                "the worker is shutting down; the VM was killed".to_owned()
            }
            other => other.as_str().to_owned(),
        },
    }
}

fn describe_exit(kind: &ExitKind) -> String {
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
fn ended_while_booting(kind: &ExitKind) -> Early {
    match kind {
        ExitKind::Crashed { .. } | ExitKind::Killed => internal(describe_exit(kind)),
        _ => malformed(format!(
            "unusable image: {} before the guest asked for its task",
            describe_exit(kind)
        )),
    }
}

/// The VM ended while the command ran: the task's doing, unless QEMU itself crashed.
fn ended_while_running(kind: &ExitKind) -> Early {
    match kind {
        ExitKind::Crashed { .. } | ExitKind::Killed => internal(describe_exit(kind)),
        _ => Early {
            resolution: Resolution::Failed,
            reason: format!(
                "{} before the command reported its exit; the task failed",
                describe_exit(kind)
            ),
        },
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

fn has_display(machine: &ResolvedMachine) -> bool {
    !matches!(
        machine.machine().graphics,
        None | Some(GraphicsAdapter::None)
    )
}

async fn take_screenshot(vm: &VirtualMachine, dir: &Path, log: &TaskLog) {
    let shot = vm.screenshot(Duration::from_secs(10)).await;
    let png = shot.and_then(|image| {
        engine::screenshot::encode_png(&image).map(|png| (png, image.dimensions()))
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
async fn shut_down(
    vm: &mut VirtualMachine,
    session: &GuestSession,
    grace: Duration,
    log: &TaskLog,
) {
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
            return;
        }
    }
    log.note("the guest did not power off in time; the VM was killed");
    vm.kill().await;
}

/// Keeps the serial console and QEMU's messages with the artifacts.
fn save_consoles(vm: &VirtualMachine, dir: &Path, log: &TaskLog) {
    for (name, text) in [
        ("serial.log", vm.serial_output()),
        ("qemu.log", vm.qemu_output()),
    ] {
        if let Err(error) = std::fs::write(dir.join(name), text) {
            log.note(&format!("{name} not saved: {error}"));
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
