//! `taskvm worker`: the Taskcluster provider. Claims tasks from a Taskcluster queue up to its
//! capacity, runs each through the shared lifecycle with the claim kept alive, publishes the
//! log, consoles, screenshot and payload artifacts, and resolves the run with the claim's own
//! credentials.
//!
//! # Layout
//! - [`client`]: a Taskcluster service client (Hawk, retries, bounded answers).
//! - [`queue`]: the queue calls, with our errors.
//! - [`claim`]: one claim and the reclaim loop.
//! - [`fleet`]: membership of a worker-manager pool (`static` provider): register, renew,
//!   drain when removed.
//! - [`uploads`]: artifacts as `s3`, `error` and `reference` artifacts.
//! - [`livelog`]: the worker's HTTP server: each running task's log as it grows, and
//! - [`shells`]: interactive shells into running tasks' VMs (`interactive: true`).

#![warn(clippy::unwrap_used)]

pub mod claim;
pub mod client;
pub mod fleet;
pub mod livelog;
pub mod queue;
mod replies;
pub mod shells;
pub mod uploads;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

use tokio::sync::watch;
use tokio::task::JoinSet;

use self::claim::{keep_claimed, Claim};
use self::client::Credentials;
use self::livelog::{LiveLog, LiveLogServer};
use self::queue::{claim_work, report, QueueEndpoint, QueueError, Report};
use self::shells::InteractiveShell;
use self::uploads::{publish, publish_reference, Publish};
use lifecycle::capacity::{Capacity, Resources};
use lifecycle::host::Host;
use lifecycle::resolution::{ExceptionReason, Resolution};
use lifecycle::{run_payload, LiveVm, PayloadDocument, PayloadRun, TaskOutcome};

/// How the worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The queue and the worker's credentials.
    pub endpoint: QueueEndpoint,
    /// `provisionerId/workerType`.
    pub task_queue_id: String,
    /// This worker's group.
    pub worker_group: String,
    /// This worker's id.
    pub worker_id: String,
    /// Tasks run at once.
    pub capacity: usize,
    /// What VMs may hold together.
    pub resources: Resources,
    /// How long running tasks may go on after SIGTERM before they are resolved
    /// `exception/worker-shutdown`.
    pub shutdown_grace: Duration,
    /// Where running tasks' logs are served, when the operator gave an address.
    pub live_log: Option<Arc<LiveLogServer>>,
    /// Credentials that replace the endpoint's as they are renewed (a worker-manager member's,
    /// see [`fleet::keep_membership`]); None: the endpoint's are the worker's for good.
    pub renewed_credentials: Option<watch::Receiver<Credentials>>,
}

/// The log artifact clients read: a reference to the live log while the task runs, then to
/// [`BACKING_LOG`].
pub const LIVE_LOG: &str = "public/logs/live.log";
/// The task's whole log, uploaded when it ends.
pub const BACKING_LOG: &str = "public/logs/live_backing.log";
/// Where an interactive task's shell is: `{"url": "wss://…/shell/TOKEN"}`, readable with the
/// task's private artifacts' scopes only.
pub const SHELL_ARTIFACT: &str = "private/taskvm/shell.json";

/// Claims and runs tasks until `shutdown` completes; then stops claiming, lets running tasks
/// finish within the grace and resolves the rest `exception/worker-shutdown`. An error means
/// the worker cannot work at all (its credentials are refused).
pub async fn run_worker(
    host: Arc<Host>,
    options: WorkerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), QueueError> {
    let options = Arc::new(options);
    // Runs a killed worker of this identity left: their tasks are the queue's again.
    let runs_dir = runs_dir(&host, &options);
    if runs_dir.exists() {
        let left = std::fs::read_dir(&runs_dir).map_or(0, |entries| entries.count());
        if let Err(error) = std::fs::remove_dir_all(&runs_dir) {
            tracing::info!("cannot remove {}: {error}", runs_dir.display());
        } else if left > 0 {
            tracing::info!("removed {left} run director(y/ies) a previous worker left");
        }
    }
    let capacity = Capacity::new(options.resources);
    let (shutting_down, mut shutdown_seen) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = shutting_down.send(true);
        std::future::pending::<()>().await;
    });
    let mut queue = options
        .endpoint
        .client(&options.endpoint.credentials, Duration::from_secs(60))?;
    let mut renewed = options.renewed_credentials.clone();
    let (stop_all, stop_signal) = watch::channel(None::<ExceptionReason>);
    let mut running = JoinSet::new();
    // A slot is a running VM: a run gives its slot back when its VM has ended, so the next
    // claim starts while the last one's artifacts go up and it is reported. Runs that are
    // only publishing are bounded by the capacity too.
    let slots = Arc::new(tokio::sync::Semaphore::new(options.capacity));
    let mut backoff = Duration::from_secs(1);
    let mut fatal = None;
    tracing::info!(
        "claiming from {} as {}/{} (capacity {})",
        options.task_queue_id,
        options.worker_group,
        options.worker_id,
        options.capacity
    );
    while !*shutdown_seen.borrow() {
        while running.try_join_next().is_some() {}
        if let Some(renewed) = renewed
            .as_mut()
            .filter(|r| r.has_changed().unwrap_or(false))
        {
            let credentials = renewed.borrow_and_update().clone();
            queue = options
                .endpoint
                .client(&credentials, Duration::from_secs(60))?;
        }
        let free = slots
            .available_permits()
            .min((2 * options.capacity).saturating_sub(running.len()));
        if free == 0 {
            // Waits for a run to end, or, when every slot is taken, for a VM to end.
            let all_taken = slots.available_permits() == 0;
            tokio::select! {
                _ = running.join_next() => {}
                Ok(permit) = slots.clone().acquire_owned(), if all_taken => drop(permit),
                _ = shutdown_seen.changed() => {}
            }
            continue;
        }
        let claimed = tokio::select! {
            claimed = claim_work(&queue, &options.task_queue_id, &options.worker_group, &options.worker_id, free) => claimed,
            // A shutdown does not wait for the long-poll.
            _ = shutdown_seen.changed() => break,
        };
        match claimed {
            Ok(entries) => {
                backoff = Duration::from_secs(1);
                for entry in entries {
                    match Claim::parse(&entry) {
                        Ok(claim) => {
                            tracing::info!("claimed task {} run {}", claim.task_id, claim.run_id);
                            let run = ClaimedRun {
                                host: host.clone(),
                                options: options.clone(),
                                capacity: capacity.clone(),
                                stop: stop_signal.clone(),
                                slot: slots.clone().try_acquire_owned().ok(),
                            };
                            let span = tracing::info_span!(
                                "task",
                                task_id = %claim.task_id,
                                run_id = claim.run_id
                            );
                            running.spawn(run.execute(claim).instrument(span));
                        }
                        Err(error) => tracing::info!("a claim could not be read: {error}"),
                    }
                }
            }
            Err(error) if matches!(error.status, Some(401 | 403)) => {
                tracing::info!("{error}; stopping (check the credentials and scopes)");
                fatal = Some(error);
                break;
            }
            Err(error) => {
                tracing::info!("{error}; trying again in {} s", backoff.as_secs());
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = shutdown_seen.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
    if !running.is_empty() {
        tracing::info!(
            "stopping: {} task(s) running get {} s to finish",
            running.len(),
            options.shutdown_grace.as_secs()
        );
        let finished = tokio::time::timeout(options.shutdown_grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            stop_all.send_replace(Some(ExceptionReason::WorkerShutdown));
            while running.join_next().await.is_some() {}
        }
    }
    match fatal {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Where this worker keeps its runs' files: `STATE/worker/GROUP/ID/`.
fn runs_dir(host: &Host, options: &WorkerOptions) -> PathBuf {
    host.config
        .state_dir
        .join("worker")
        .join(&options.worker_group)
        .join(&options.worker_id)
}

/// An interactive task's shells as offered (none on a worker without an HTTP address), and
/// the publication of their artifact.
type ShellOffer = (Option<InteractiveShell>, tokio::task::JoinHandle<()>);

/// What one claimed run needs.
struct ClaimedRun {
    host: Arc<Host>,
    options: Arc<WorkerOptions>,
    capacity: Arc<Capacity>,
    stop: watch::Receiver<Option<ExceptionReason>>,
    /// The run's slot, given back once its VM has ended.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl ClaimedRun {
    async fn execute(mut self, claim: Claim) {
        let (task_id, run_id) = (claim.task_id.clone(), claim.run_id);
        let dir = self.run_dir(&task_id, run_id);
        let credentials = Arc::new(Mutex::new(claim.credentials.clone()));
        let (done, done_signal) = watch::channel(false);
        let (lost, mut lost_signal) = watch::channel(None);
        let keeper = tokio::spawn(keep_claimed(
            self.options.endpoint.clone(),
            claim.clone(),
            credentials.clone(),
            done_signal,
            lost,
        ));
        // One stop for the task: the worker's shutdown or the claim's loss.
        let (stop, stop_signal) = watch::channel(None);
        let mut worker_stop = self.stop.clone();
        let relay = tokio::spawn(async move {
            tokio::select! {
                Ok(reason) = worker_stop.wait_for(Option::is_some) => {
                    let reason = *reason;
                    stop.send_replace(reason);
                }
                Ok(_) = lost_signal.wait_for(Option::is_some) => {
                    stop.send_replace(Some(ExceptionReason::Canceled));
                }
            }
            std::future::pending::<()>().await;
        });
        let live_log = self.announce_live_log(&claim, &dir, &credentials);
        let listener = live_log.as_ref().map(|(live, _)| live.listener());
        let (live_vm, offered) = self.offer_shells(&claim, &credentials);
        let outcome = self
            .run(&claim, &dir, stop_signal.clone(), listener, live_vm)
            .await;
        // The VM is gone: its slot is free for the next claim while this run is published.
        drop(self.slot.take());
        if let Some((shell, published)) = offered {
            // The task is over: its shell's URL stops answering. Its artifact must exist
            // before the run is resolved (the queue takes none after).
            drop(shell);
            let _ = published.await;
        }
        let _ = done.send(true);
        let _ = keeper.await;
        relay.abort();
        let lost = *stop_signal.borrow() == Some(ExceptionReason::Canceled);
        if lost {
            tracing::info!(
                "task {task_id} run {run_id}: the claim was lost (canceled or expired); the VM \
                 was killed and the task is left alone"
            );
        } else {
            self.resolve(&claim, &dir, &outcome, &credentials, live_log)
                .await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn run_dir(&self, task_id: &str, run_id: u32) -> PathBuf {
        runs_dir(&self.host, &self.options).join(format!("{task_id}-{run_id}"))
    }

    /// Starts serving the run's log and, in the background, points `public/logs/live.log` at
    /// it; the task does not wait for the queue. The handle says whether the queue took it.
    fn announce_live_log(
        &self,
        claim: &Claim,
        dir: &Path,
        credentials: &Arc<Mutex<Credentials>>,
    ) -> Option<(LiveLog, tokio::task::JoinHandle<bool>)> {
        let server = self.options.live_log.as_ref()?;
        let expires = claim.expires()?;
        let live = server.serve(dir.join("live.log"));
        let (endpoint, url) = (self.options.endpoint.clone(), live.url().to_owned());
        let (task_id, run_id) = (claim.task_id.clone(), claim.run_id);
        let current = lock(credentials).clone();
        let announced = tokio::spawn(async move {
            let queue = match endpoint.client(&current, Duration::from_secs(60)) {
                Ok(queue) => queue,
                Err(error) => {
                    tracing::info!("task {task_id} run {run_id}: the live log: {error}");
                    return false;
                }
            };
            let created =
                publish_reference(&queue, &task_id, run_id, &expires, LIVE_LOG, &url).await;
            if let Err(error) = &created {
                tracing::info!("task {task_id} run {run_id}: the live log: {error}");
            }
            created.is_ok()
        });
        Some((live, announced))
    }

    /// For a payload with `interactive: true`: offers shells into the task's VM on the
    /// worker's HTTP server and, in the background, publishes their URL as
    /// [`SHELL_ARTIFACT`] (or, on a worker without that server, an error artifact saying so).
    /// Returns where the run tells of its VM, the offer and the publication.
    fn offer_shells(
        &self,
        claim: &Claim,
        credentials: &Arc<Mutex<Credentials>>,
    ) -> (Option<watch::Sender<Option<LiveVm>>>, Option<ShellOffer>) {
        let asked =
            claim.task.pointer("/payload/interactive") == Some(&serde_json::Value::Bool(true));
        let Some(expires) = claim.expires().filter(|_| asked) else {
            return (None, None);
        };
        let (live, watched) = watch::channel(None);
        let shell = self
            .options
            .live_log
            .as_ref()
            .map(|server| server.offer_shells(watched));
        let artifact = match &shell {
            Some(shell) => Publish::Text {
                name: SHELL_ARTIFACT.to_owned(),
                text: serde_json::json!({ "url": shell.url() }).to_string(),
            },
            None => Publish::Missing {
                name: SHELL_ARTIFACT.to_owned(),
                message: "this worker offers no shells: it serves no HTTP (no --livelog-listen)"
                    .to_owned(),
            },
        };
        let (endpoint, current) = (self.options.endpoint.clone(), lock(credentials).clone());
        let (task_id, run_id) = (claim.task_id.clone(), claim.run_id);
        let published = tokio::spawn(async move {
            let queue = match endpoint.client(&current, Duration::from_secs(60)) {
                Ok(queue) => queue,
                Err(error) => {
                    tracing::info!("task {task_id} run {run_id}: {SHELL_ARTIFACT}: {error}");
                    return;
                }
            };
            let published = publish(&queue, &task_id, run_id, &expires, &[artifact]).await;
            for (name, error) in published.failed {
                tracing::info!("task {task_id} run {run_id}: {name}: {error}");
            }
        });
        (Some(live), Some((shell, published)))
    }

    async fn run(
        &self,
        claim: &Claim,
        dir: &Path,
        stop: watch::Receiver<Option<ExceptionReason>>,
        on_log: Option<lifecycle::log::LogListener>,
        live: Option<watch::Sender<Option<LiveVm>>>,
    ) -> TaskOutcome {
        let run = PayloadRun {
            payload: PayloadDocument::Json(claim.task.get("payload").cloned().unwrap_or_default()),
            dir: dir.to_owned(),
            header: format!(
                "task {} run {} on {}/{}",
                claim.task_id, claim.run_id, self.options.worker_group, self.options.worker_id
            ),
            echo: lifecycle::log::Echo::Quiet,
            capacity: Some(self.capacity.clone()),
            live,
            on_log,
            scopes: Some(task_scopes(&claim.task)),
            task: Some(format!("{}/{}", claim.task_id, claim.run_id)),
        };
        run_payload(self.host.clone(), run, stop).await
    }

    /// Publishes the artifacts, points the live log at the uploaded log (and stops serving
    /// it), and reports the resolution with the claim's credentials.
    async fn resolve(
        &self,
        claim: &Claim,
        dir: &Path,
        outcome: &TaskOutcome,
        credentials: &Arc<Mutex<Credentials>>,
        live_log: Option<(LiveLog, tokio::task::JoinHandle<bool>)>,
    ) {
        let (task_id, run_id) = (claim.task_id.as_str(), claim.run_id);
        let current = lock(credentials).clone();
        let queue = match self
            .options
            .endpoint
            .client(&current, Duration::from_secs(60))
        {
            Ok(queue) => queue,
            Err(error) => {
                tracing::info!("task {task_id} run {run_id}: {error}");
                return;
            }
        };
        let resolution = outcome.ending.resolution;
        if let Some(expires) = claim.expires() {
            let artifacts = artifacts_to_publish(claim, dir, outcome);
            let uploaded = publish(&queue, task_id, run_id, &expires, &artifacts).await;
            for (name, error) in &uploaded.failed {
                tracing::info!("task {task_id} run {run_id}: artifact {name}: {error}");
            }
            if let Some((live, announced)) = live_log {
                let backing_uploaded = uploaded.created.iter().any(|name| name == BACKING_LOG);
                if announced.await.unwrap_or(false) && backing_uploaded {
                    let backing = queue.url(&[
                        "task",
                        task_id,
                        "runs",
                        &run_id.to_string(),
                        "artifacts",
                        BACKING_LOG,
                    ]);
                    let pointed = match backing {
                        Ok(url) => {
                            publish_reference(
                                &queue,
                                task_id,
                                run_id,
                                &expires,
                                LIVE_LOG,
                                url.as_str(),
                            )
                            .await
                        }
                        Err(error) => Err(error.to_string()),
                    };
                    if let Err(error) = pointed {
                        tracing::info!("task {task_id} run {run_id}: {LIVE_LOG}: {error}");
                    }
                }
                // The queue no longer sends readers here: streams send what is left and end.
                drop(live);
            }
        }
        let reported = report(&queue, task_id, run_id, report_for(resolution)).await;
        match reported {
            Ok(()) => tracing::info!("task {task_id} run {run_id} resolved {resolution}"),
            Err(error) => tracing::info!(
                "task {task_id} run {run_id} ended {resolution} but could not be resolved: {error}"
            ),
        }
    }
}

/// How a resolution is reported. A cancel never reaches here (the queue canceled the run).
fn report_for(resolution: Resolution) -> Report {
    match resolution {
        Resolution::Completed => Report::Completed,
        Resolution::Failed => Report::Failed,
        Resolution::Exception(reason) => Report::Exception(match reason {
            ExceptionReason::Canceled => "worker-shutdown",
            other => other.as_str(),
        }),
    }
}

/// The logs, the screenshot and every file of the payload's artifacts (or an error artifact
/// for each one the run could not collect).
fn artifacts_to_publish(claim: &Claim, dir: &Path, outcome: &TaskOutcome) -> Vec<Publish> {
    let mut artifacts = Vec::new();
    let standard = [
        (BACKING_LOG, "live.log"),
        ("public/logs/serial.log", "serial.log"),
        ("public/screenshot.png", "screenshot.png"),
    ];
    for (name, file) in standard {
        let path = dir.join(file);
        if path.is_file() {
            artifacts.push(Publish::File {
                name: name.to_owned(),
                path,
            });
        }
    }
    for artifact in &outcome.artifacts {
        for file in &artifact.files {
            artifacts.push(Publish::File {
                name: file.clone(),
                path: dir.join(file),
            });
        }
    }
    let asked = claim
        .task
        .pointer("/payload/artifacts")
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default();
    for artifact in asked {
        let Some(name) = artifact.get("name").and_then(serde_json::Value::as_str) else {
            continue;
        };
        if !outcome.artifacts.iter().any(|done| done.name == name) {
            artifacts.push(Publish::Missing {
                name: name.to_owned(),
                message: format!("the task did not produce it (see {BACKING_LOG})"),
            });
        }
    }
    artifacts
}

/// The scopes of a task definition (none when it has no list of strings).
fn task_scopes(task: &serde_json::Value) -> Vec<String> {
    task.get("scopes")
        .and_then(serde_json::Value::as_array)
        .map(|scopes| {
            scopes
                .iter()
                .filter_map(|scope| scope.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn lock(credentials: &Mutex<Credentials>) -> std::sync::MutexGuard<'_, Credentials> {
    credentials
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
