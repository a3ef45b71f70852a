//! Runs queued tasks: up to `concurrency` at once, oldest first, each VM admitted only when
//! the host's capacity holds it. Knows every running task, so that it can be canceled,
//! watched (its VM's screen) and followed (its log).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tracing::Instrument;

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use super::store::{ArtifactFile, Claimed, FinishedRun, Store, StoreError};
use lifecycle::capacity::Capacity;
use lifecycle::host::Host;
use lifecycle::resolution::ExceptionReason;
use lifecycle::{run_payload, LiveVm, PayloadDocument, PayloadRun, TaskOutcome};

/// What a cancel request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// The queued task was resolved `exception/canceled`.
    Dequeued,
    /// The running task's VM is being killed; it resolves `exception/canceled` shortly.
    Stopping,
    /// The task had already been resolved.
    AlreadyResolved,
    /// No such task.
    Unknown,
}

struct Running {
    run_id: u32,
    stop: watch::Sender<Option<ExceptionReason>>,
    live: watch::Receiver<Option<LiveVm>>,
}

/// Stage durations since the server started, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct StageTotals {
    /// Stage name → (seconds in all, how many times).
    pub stages: BTreeMap<String, (f64, u64)>,
    /// Tasks from the start of their run to their resolution → (seconds in all, how many).
    pub total: (f64, u64),
}

/// The embedded queue's task runner.
pub struct Scheduler {
    host: Arc<Host>,
    store: Arc<Store>,
    capacity: Arc<Capacity>,
    concurrency: usize,
    tasks_dir: PathBuf,
    paused: bool,
    running: Mutex<HashMap<String, Running>>,
    wake: Notify,
    totals: Mutex<StageTotals>,
    /// Bumped whenever a run starts or ends or a run's log grows: what log followers wait on.
    activity: Arc<watch::Sender<u64>>,
}

impl Scheduler {
    /// A scheduler running the tasks of `store` on `host`, keeping runs' files under
    /// `tasks_dir`. A `paused` scheduler accepts tasks but starts none.
    pub fn new(
        host: Arc<Host>,
        store: Arc<Store>,
        capacity: Arc<Capacity>,
        concurrency: usize,
        tasks_dir: PathBuf,
        paused: bool,
    ) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            host,
            store,
            capacity,
            concurrency: concurrency.max(1),
            tasks_dir,
            paused,
            running: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            totals: Mutex::new(StageTotals::default()),
            activity: Arc::new(watch::channel(0).0),
        })
    }

    /// Changes whenever a run starts or ends or a run's log grows: a log follower waits on it
    /// instead of polling.
    pub fn activity(&self) -> watch::Receiver<u64> {
        self.activity.subscribe()
    }

    fn bump_activity(&self) {
        self.activity
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// The queue database.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The host tasks run on.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    /// The host capacity tasks share.
    pub fn capacity(&self) -> &Arc<Capacity> {
        &self.capacity
    }

    /// Largest number of tasks run at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Whether the scheduler starts tasks.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// The directory of run `run_id` of task `task_id` (its log and artifacts).
    pub fn run_dir(&self, task_id: &str, run_id: u32) -> PathBuf {
        self.tasks_dir.join(task_id).join(run_id.to_string())
    }

    /// Stage durations so far.
    pub fn totals(&self) -> StageTotals {
        self.lock_totals().clone()
    }

    /// Says a task was queued.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Whether run `run_id` of `task_id` is still under way.
    pub fn is_running(&self, task_id: &str, run_id: u32) -> bool {
        self.lock_running()
            .get(task_id)
            .is_some_and(|running| running.run_id == run_id)
    }

    /// How many tasks run now.
    pub fn running_count(&self) -> usize {
        self.lock_running().len()
    }

    /// The VM of a running task, while it has one.
    pub fn live_vm(&self, task_id: &str) -> Option<LiveVm> {
        self.lock_running()
            .get(task_id)
            .and_then(|running| running.live.borrow().clone())
    }

    /// Cancels `task_id`, queued or running.
    pub fn cancel(&self, task_id: &str) -> Result<Cancel, StoreError> {
        if let Some(running) = self.lock_running().get(task_id) {
            running.stop.send_replace(Some(ExceptionReason::Canceled));
            return Ok(Cancel::Stopping);
        }
        if self.store.cancel_queued(task_id)? {
            return Ok(Cancel::Dequeued);
        }
        // Claimed between the two looks: it is running now.
        if let Some(running) = self.lock_running().get(task_id) {
            running.stop.send_replace(Some(ExceptionReason::Canceled));
            return Ok(Cancel::Stopping);
        }
        Ok(match self.store.get(task_id)? {
            Some(_) => Cancel::AlreadyResolved,
            None => Cancel::Unknown,
        })
    }

    /// Starts queued tasks as slots free up until `shutdown` turns true; then stops the
    /// running tasks (`exception/worker-shutdown`, queued again) and returns when they have
    /// all been resolved.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tasks = JoinSet::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if !self.paused {
                while tasks.len() < self.concurrency {
                    match self.claim() {
                        Ok(Some((claimed, stop, live))) => {
                            let scheduler = self.clone();
                            let span = tracing::info_span!(
                                "task",
                                task_id = %claimed.task_id,
                                run_id = claimed.run_id
                            );
                            let run = scheduler.execute(claimed, stop, live);
                            tasks.spawn(run.instrument(span));
                        }
                        Ok(None) => break,
                        Err(error) => {
                            tracing::info!("cannot take the next task: {error}");
                            break;
                        }
                    }
                }
            }
            tokio::select! {
                () = self.wake.notified() => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = shutdown.changed() => {}
                // A safety net: a missed wake-up never stalls the queue for long.
                () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            }
        }
        for running in self.lock_running().values() {
            running
                .stop
                .send_replace(Some(ExceptionReason::WorkerShutdown));
        }
        while tasks.join_next().await.is_some() {}
    }

    fn claim(&self) -> Result<Option<ClaimedRun>, StoreError> {
        // Claimed and registered under one lock: whoever sees the run in the store and then
        // asks `is_running` sees it running.
        let mut running = self.lock_running();
        let Some(claimed) = self.store.claim_next()? else {
            return Ok(None);
        };
        let (stop, stop_signal) = watch::channel(None);
        let (live, live_view) = watch::channel(None);
        running.insert(
            claimed.task_id.clone(),
            Running {
                run_id: claimed.run_id,
                stop,
                live: live_view,
            },
        );
        drop(running);
        self.bump_activity();
        Ok(Some((claimed, stop_signal, live)))
    }

    async fn execute(
        self: Arc<Self>,
        claimed: Claimed,
        stop: watch::Receiver<Option<ExceptionReason>>,
        live: watch::Sender<Option<LiveVm>>,
    ) {
        let Claimed {
            task_id, run_id, ..
        } = &claimed;
        tracing::info!("task {task_id} run {run_id} started");
        let dir = self.run_dir(task_id, *run_id);
        let run = PayloadRun {
            payload: PayloadDocument::Text(claimed.payload.clone()),
            dir: dir.clone(),
            header: format!("task {task_id} run {run_id} on taskvm serve"),
            echo: lifecycle::log::Echo::Quiet,
            capacity: Some(self.capacity.clone()),
            live: Some(live),
            on_log: Some({
                let activity = self.activity.clone();
                Arc::new(move || activity.send_modify(|count| *count = count.wrapping_add(1)))
            }),
            scopes: None,
            task: Some(task_id.clone()),
        };
        let outcome = run_payload(self.host.clone(), run, stop).await;
        self.count_stages(&outcome);
        let finished = FinishedRun {
            ending: outcome.ending.clone(),
            stages: outcome
                .timings
                .stages
                .iter()
                .map(|(stage, took)| ((*stage).to_owned(), took.as_secs_f64()))
                .collect(),
            artifacts: artifact_files(&dir, &outcome),
        };
        if let Err(error) = self.store.finish(task_id, *run_id, &finished) {
            tracing::info!("task {task_id} run {run_id} could not be recorded: {error}");
        }
        self.lock_running().remove(task_id);
        self.bump_activity();
        tracing::info!(
            "task {task_id} run {run_id} resolved {}",
            finished.ending.resolution
        );
        self.wake();
    }

    fn count_stages(&self, outcome: &TaskOutcome) {
        let mut totals = self.lock_totals();
        for (stage, took) in &outcome.timings.stages {
            let entry = totals.stages.entry((*stage).to_owned()).or_default();
            entry.0 += took.as_secs_f64();
            entry.1 += 1;
        }
        totals.total.0 += outcome.timings.total.as_secs_f64();
        totals.total.1 += 1;
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_totals(&self) -> std::sync::MutexGuard<'_, StageTotals> {
        self.totals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A claimed run with its stop signal and the sender its VM is published on.
type ClaimedRun = (
    Claimed,
    watch::Receiver<Option<ExceptionReason>>,
    watch::Sender<Option<LiveVm>>,
);

/// Every file a run left in `dir`: the log and consoles, the screenshot, the payload's
/// artifacts — the only names the API serves.
fn artifact_files(dir: &std::path::Path, outcome: &TaskOutcome) -> Vec<ArtifactFile> {
    let standard = ["live.log", "serial.log", "qemu.log", "screenshot.png"];
    let collected = outcome
        .artifacts
        .iter()
        .flat_map(|artifact| artifact.files.iter().map(String::as_str));
    let mut files: Vec<ArtifactFile> = Vec::new();
    for name in standard.into_iter().chain(collected) {
        if files.iter().any(|file| file.name == name) {
            continue;
        }
        if let Ok(metadata) = std::fs::symlink_metadata(dir.join(name)) {
            if metadata.is_file() {
                files.push(ArtifactFile {
                    name: name.to_owned(),
                    size: metadata.len(),
                });
            }
        }
    }
    files
}
