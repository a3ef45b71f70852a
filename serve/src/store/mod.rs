//! The embedded queue's records in SQLite: tasks in submission order and their runs (a task
//! that a worker shutdown interrupted runs again, as a new run). Artifacts are files beside
//! the database; only their names and sizes are here.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use thiserror::Error;

use lifecycle::resolution::{Ending, ExceptionReason, Resolution};

/// A store failure.
#[derive(Debug, Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("queue database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database directory could not be made.
    #[error("queue database directory {path}: {source}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A record is not what this version writes.
    #[error("queue database holds a record this version cannot read: {0}")]
    Corrupt(String),
}

/// Where a task is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting for a free slot.
    Queued,
    /// A run is under way.
    Running,
    /// Resolved completed.
    Completed,
    /// Resolved failed.
    Failed,
    /// Resolved with an exception.
    Exception,
}

impl TaskState {
    /// Every state, in lifecycle order.
    pub const ALL: [TaskState; 5] = [
        TaskState::Queued,
        TaskState::Running,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Exception,
    ];

    /// The state's name in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Exception => "exception",
        }
    }

    /// The state called `name`.
    pub fn from_name(name: &str) -> Option<TaskState> {
        TaskState::ALL
            .into_iter()
            .find(|state| state.as_str() == name)
    }

    /// Whether the task is over.
    pub fn is_resolved(self) -> bool {
        !matches!(self, TaskState::Queued | TaskState::Running)
    }

    fn of(resolution: Resolution) -> TaskState {
        match resolution {
            Resolution::Completed => TaskState::Completed,
            Resolution::Failed => TaskState::Failed,
            Resolution::Exception(_) => TaskState::Exception,
        }
    }
}

/// One artifact file of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct ArtifactFile {
    /// Its name (a relative path, as the payload named it or below a directory artifact).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A run that ended, as the store records it.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedRun {
    /// How it ended.
    pub ending: Ending,
    /// Stage durations in seconds, in order.
    pub stages: Vec<(String, f64)>,
    /// The run's files.
    pub artifacts: Vec<ArtifactFile>,
}

/// One run of a task.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    /// 0 for the first run.
    pub run_id: u32,
    /// `running`, or the resolution's state.
    pub state: TaskState,
    /// `completed`, `failed` or `exception/REASON` once resolved.
    pub resolution: Option<String>,
    /// Milliseconds since the epoch.
    pub started: i64,
    /// Milliseconds since the epoch.
    pub resolved: Option<i64>,
    /// The command's exit code.
    pub exit_code: Option<i32>,
    /// Why it ended so.
    pub reason: Option<String>,
    /// Stage durations in seconds.
    pub stages: Vec<(String, f64)>,
    /// The run's files.
    pub artifacts: Vec<ArtifactFile>,
}

/// A task and its runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord {
    /// The task's id.
    pub task_id: String,
    /// Where it is.
    pub state: TaskState,
    /// Milliseconds since the epoch.
    pub created: i64,
    /// The payload as submitted.
    pub payload: serde_json::Value,
    /// Runs, oldest first.
    pub runs: Vec<RunRecord>,
}

impl TaskRecord {
    /// The newest run.
    pub fn latest_run(&self) -> Option<&RunRecord> {
        self.runs.last()
    }
}

/// A task taken off the queue to run.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The task's id.
    pub task_id: String,
    /// The new run's id.
    pub run_id: u32,
    /// The payload text.
    pub payload: String,
}

/// What the start-up recovery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Interrupted runs put back in the queue.
    pub requeued: usize,
    /// Interrupted runs whose task had no attempt left.
    pub given_up: usize,
}

/// The queue database.
pub struct Store {
    connection: Mutex<Connection>,
    max_runs: u32,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks(state, seq);
CREATE TABLE IF NOT EXISTS runs (
    task_id TEXT NOT NULL REFERENCES tasks(id),
    run INTEGER NOT NULL,
    resolution TEXT,
    started_ms INTEGER NOT NULL,
    resolved_ms INTEGER,
    exit_code INTEGER,
    reason TEXT,
    stages TEXT NOT NULL DEFAULT '[]',
    artifacts TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (task_id, run)
);
";

impl Store {
    /// Opens (creating) the database at `path`. A task may run at most `max_runs` times
    /// when worker shutdowns interrupt it.
    pub fn open(path: &Path, max_runs: u32) -> Result<Store, StoreError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| StoreError::Directory {
                path: parent.to_owned(),
                source,
            })?;
        }
        let connection = Connection::open(path)?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.execute_batch(SCHEMA)?;
        Ok(Store {
            connection: Mutex::new(connection),
            max_runs: max_runs.max(1),
        })
    }

    fn with<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let run = || {
            let mut connection = self
                .connection
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&mut connection)
        };
        // SQLite blocks (disk, and the lock other callers hold): on one of the runtime's worker
        // threads, the runtime is told first, and moves its other tasks elsewhere meanwhile.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(run)
            }
            _ => run(),
        }
    }

    /// Resolves the runs a dead process left running `exception/worker-shutdown` and queues
    /// their tasks again while they have attempts left. Call it once, before anything runs.
    pub fn recover(&self) -> Result<Recovered, StoreError> {
        let max_runs = self.max_runs;
        self.with(|connection| {
            let transaction = connection.transaction()?;
            let interrupted: Vec<(String, u32)> = {
                let mut statement = transaction.prepare(
                    "SELECT t.id, (SELECT COUNT(*) FROM runs r WHERE r.task_id = t.id)
                     FROM tasks t WHERE t.state = 'running' ORDER BY t.seq",
                )?;
                let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut recovered = Recovered::default();
            let now = now_ms();
            let shutdown = Resolution::Exception(ExceptionReason::WorkerShutdown).to_string();
            for (task_id, runs) in interrupted {
                transaction.execute(
                    "UPDATE runs SET resolution = ?1, resolved_ms = ?2, reason = ?3
                     WHERE task_id = ?4 AND resolution IS NULL",
                    params![
                        shutdown,
                        now,
                        "the worker stopped while the task ran",
                        task_id
                    ],
                )?;
                let state = if runs < max_runs {
                    recovered.requeued += 1;
                    TaskState::Queued
                } else {
                    recovered.given_up += 1;
                    TaskState::Exception
                };
                transaction.execute(
                    "UPDATE tasks SET state = ?1 WHERE id = ?2",
                    params![state.as_str(), task_id],
                )?;
            }
            transaction.commit()?;
            Ok(recovered)
        })
    }

    /// Adds a task to the end of the queue.
    pub fn submit(&self, task_id: &str, payload: &str) -> Result<(), StoreError> {
        self.with(|connection| {
            connection.execute(
                "INSERT INTO tasks (id, payload, state, created_ms) VALUES (?1, ?2, 'queued', ?3)",
                params![task_id, payload, now_ms()],
            )?;
            Ok(())
        })
    }

    /// Takes the oldest queued task and starts a new run of it.
    pub fn claim_next(&self) -> Result<Option<Claimed>, StoreError> {
        self.with(|connection| {
            let transaction = connection.transaction()?;
            let next: Option<(String, String)> = transaction
                .query_row(
                    "SELECT id, payload FROM tasks WHERE state = 'queued' ORDER BY seq LIMIT 1",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            let Some((task_id, payload)) = next else {
                return Ok(None);
            };
            let run_id: u32 = transaction.query_row(
                "SELECT COUNT(*) FROM runs WHERE task_id = ?1",
                [&task_id],
                |row| row.get(0),
            )?;
            transaction.execute(
                "INSERT INTO runs (task_id, run, started_ms) VALUES (?1, ?2, ?3)",
                params![task_id, run_id, now_ms()],
            )?;
            transaction.execute(
                "UPDATE tasks SET state = 'running' WHERE id = ?1",
                [&task_id],
            )?;
            transaction.commit()?;
            Ok(Some(Claimed {
                task_id,
                run_id,
                payload,
            }))
        })
    }

    /// Records how a run ended. A run ended by a worker shutdown puts its task back in the
    /// queue while it has attempts left.
    pub fn finish(
        &self,
        task_id: &str,
        run_id: u32,
        finished: &FinishedRun,
    ) -> Result<(), StoreError> {
        let ending = &finished.ending;
        let max_runs = self.max_runs;
        let stages = serde_json::to_string(&finished.stages)
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        let artifacts = serde_json::to_string(&finished.artifacts)
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        self.with(|connection| {
            let transaction = connection.transaction()?;
            transaction.execute(
                "UPDATE runs SET resolution = ?1, resolved_ms = ?2, exit_code = ?3, reason = ?4,
                 stages = ?5, artifacts = ?6 WHERE task_id = ?7 AND run = ?8",
                params![
                    ending.resolution.to_string(),
                    now_ms(),
                    ending.exit_code,
                    ending.reason,
                    stages,
                    artifacts,
                    task_id,
                    run_id
                ],
            )?;
            let again = ending.resolution == Resolution::Exception(ExceptionReason::WorkerShutdown)
                && run_id + 1 < max_runs;
            let state = if again {
                TaskState::Queued
            } else {
                TaskState::of(ending.resolution)
            };
            transaction.execute(
                "UPDATE tasks SET state = ?1 WHERE id = ?2",
                params![state.as_str(), task_id],
            )?;
            transaction.commit()?;
            Ok(())
        })
    }

    /// Resolves a queued task `exception/canceled` (as a run that never started). False when
    /// the task is not queued (any more).
    pub fn cancel_queued(&self, task_id: &str) -> Result<bool, StoreError> {
        self.with(|connection| {
            let transaction = connection.transaction()?;
            let changed = transaction.execute(
                "UPDATE tasks SET state = 'exception' WHERE id = ?1 AND state = 'queued'",
                [task_id],
            )?;
            if changed == 1 {
                let now = now_ms();
                transaction.execute(
                    "INSERT INTO runs (task_id, run, resolution, started_ms, resolved_ms, reason)
                     VALUES (?1, (SELECT COUNT(*) FROM runs WHERE task_id = ?1), ?2, ?3, ?3, ?4)",
                    params![
                        task_id,
                        Resolution::Exception(ExceptionReason::Canceled).to_string(),
                        now,
                        "canceled before it started"
                    ],
                )?;
            }
            transaction.commit()?;
            Ok(changed == 1)
        })
    }

    /// The task `task_id`.
    pub fn get(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.with(|connection| {
            let task = connection
                .query_row(
                    "SELECT id, state, created_ms, payload FROM tasks WHERE id = ?1",
                    [task_id],
                    |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, i64>(2)?,
                            row.get::<_, String>(3)?,
                        ))
                    },
                )
                .optional()?;
            let Some(task) = task else {
                return Ok(None);
            };
            let runs = runs_of(connection, task_id)?;
            Ok(Some(record(task, runs)?))
        })
    }

    /// Tasks, newest first, optionally only those in `state`; at most `limit`.
    pub fn list(
        &self,
        state: Option<TaskState>,
        limit: u32,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        self.with(|connection| {
            let tasks: Vec<(String, String, i64, String)> = {
                let mut statement = connection.prepare(
                    "SELECT id, state, created_ms, payload FROM tasks
                     WHERE ?1 IS NULL OR state = ?1 ORDER BY seq DESC LIMIT ?2",
                )?;
                let rows = statement
                    .query_map(params![state.map(TaskState::as_str), limit], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                    })?;
                rows.collect::<Result<_, _>>()?
            };
            tasks
                .into_iter()
                .map(|task| {
                    let runs = runs_of(connection, &task.0)?;
                    record(task, runs)
                })
                .collect()
        })
    }

    /// How many tasks are in each state.
    pub fn counts(&self) -> Result<Vec<(TaskState, u64)>, StoreError> {
        self.with(|connection| {
            let mut statement =
                connection.prepare("SELECT state, COUNT(*) FROM tasks GROUP BY state")?;
            let rows = statement.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })?;
            let found: Vec<(String, i64)> = rows.collect::<Result<_, _>>()?;
            Ok(TaskState::ALL
                .into_iter()
                .map(|state| {
                    let count = found
                        .iter()
                        .find(|(name, _)| name == state.as_str())
                        .map_or(0, |(_, count)| u64::try_from(*count).unwrap_or(0));
                    (state, count)
                })
                .collect())
        })
    }

    /// How many runs ended with each resolution.
    pub fn resolutions(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.with(|connection| {
            let mut statement = connection.prepare(
                "SELECT resolution, COUNT(*) FROM runs WHERE resolution IS NOT NULL
                 GROUP BY resolution ORDER BY resolution",
            )?;
            let rows = statement.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })?;
            let found: Vec<(String, i64)> = rows.collect::<Result<_, _>>()?;
            Ok(found
                .into_iter()
                .map(|(resolution, count)| (resolution, u64::try_from(count).unwrap_or(0)))
                .collect())
        })
    }
}

fn runs_of(connection: &Connection, task_id: &str) -> Result<Vec<RunRecord>, StoreError> {
    let mut statement = connection.prepare(
        "SELECT run, resolution, started_ms, resolved_ms, exit_code, reason, stages, artifacts
         FROM runs WHERE task_id = ?1 ORDER BY run",
    )?;
    let rows = statement.query_map([task_id], |row| {
        Ok((
            row.get::<_, u32>(0)?,
            row.get::<_, Option<String>>(1)?,
            row.get::<_, i64>(2)?,
            row.get::<_, Option<i64>>(3)?,
            row.get::<_, Option<i32>>(4)?,
            row.get::<_, Option<String>>(5)?,
            row.get::<_, String>(6)?,
            row.get::<_, String>(7)?,
        ))
    })?;
    let mut runs = Vec::new();
    for row in rows {
        let (run_id, resolution, started, resolved, exit_code, reason, stages, artifacts) = row?;
        let state = match &resolution {
            None => TaskState::Running,
            Some(text) => TaskState::of(text.parse().map_err(StoreError::Corrupt)?),
        };
        runs.push(RunRecord {
            run_id,
            state,
            resolution,
            started,
            resolved,
            exit_code,
            reason,
            stages: serde_json::from_str(&stages)
                .map_err(|error| StoreError::Corrupt(error.to_string()))?,
            artifacts: serde_json::from_str(&artifacts)
                .map_err(|error| StoreError::Corrupt(error.to_string()))?,
        });
    }
    Ok(runs)
}

fn record(
    (task_id, state, created, payload): (String, String, i64, String),
    runs: Vec<RunRecord>,
) -> Result<TaskRecord, StoreError> {
    Ok(TaskRecord {
        state: TaskState::from_name(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("task state {state:?}")))?,
        task_id,
        created,
        payload: serde_json::from_str(&payload)
            .map_err(|error| StoreError::Corrupt(error.to_string()))?,
        runs,
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests;
