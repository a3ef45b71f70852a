//! A run's artifacts into the queue: each file as an `s3` artifact (created, then PUT to the
//! URL the queue returns, with its content type and length, retried on 5xx and connection
//! errors), each missing one as an `error` artifact.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;

use crate::queue::Queue;
use serde_json::{json, Value};

use super::queue::create_artifact;

/// What the uploads did.
#[derive(Debug, Default)]
pub struct Uploaded {
    /// Artifacts created.
    pub created: Vec<String>,
    /// Artifacts that could not be created or uploaded, with why.
    pub failed: Vec<(String, String)>,
}

/// One artifact to publish.
#[derive(Debug, Clone)]
pub enum Publish {
    /// A file of the run's directory under `name`.
    File {
        /// The artifact's name.
        name: String,
        /// The file.
        path: std::path::PathBuf,
    },
    /// A small text made by the worker (not the task), under `name`.
    Text {
        /// The artifact's name.
        name: String,
        /// Its content.
        text: String,
    },
    /// An artifact the payload asked for and the run could not collect.
    Missing {
        /// The artifact's name.
        name: String,
        /// Why.
        message: String,
    },
}

/// Publishes one artifact; returns its name and how it went.
async fn publish_one<'a>(
    queue: &Queue,
    http: &reqwest::Client,
    task_id: &str,
    run_id: u32,
    expires: &str,
    artifact: &'a Publish,
) -> (&'a String, Result<(), String>) {
    match artifact {
        Publish::File { name, path } => (
            name,
            upload_file(queue, http, task_id, run_id, expires, name, path).await,
        ),
        Publish::Text { name, text } => (
            name,
            upload_text(queue, http, task_id, run_id, expires, name, text).await,
        ),
        Publish::Missing { name, message } => {
            let request = json!({
                "storageType": "error",
                "expires": expires,
                "reason": "file-missing-on-worker",
                "message": message,
            });
            let created = create_artifact(queue, task_id, run_id, name, &request).await;
            (name, created.map(|_| ()).map_err(|error| error.to_string()))
        }
    }
}

/// How many artifacts are uploaded at once: a task's few small files (its log, its console)
/// go up together instead of one after the other.
const UPLOADS_AT_ONCE: usize = 4;

/// Publishes `artifacts` for the run, [`UPLOADS_AT_ONCE`] at a time; `expires` is the task's.
pub async fn publish(
    queue: &Queue,
    task_id: &str,
    run_id: u32,
    expires: &str,
    artifacts: &[Publish],
) -> Uploaded {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new());
    let uploads: Vec<_> = artifacts
        .iter()
        .map(|artifact| publish_one(queue, &http, task_id, run_id, expires, artifact))
        .collect();
    let results: Vec<(&String, Result<(), String>)> = futures::stream::iter(uploads)
        .buffered(UPLOADS_AT_ONCE)
        .collect()
        .await;
    let mut uploaded = Uploaded::default();
    for (name, result) in results {
        match result {
            Ok(()) => uploaded.created.push(name.clone()),
            Err(error) => uploaded.failed.push((name.clone(), error)),
        }
    }
    uploaded
}

/// Creates `s3` artifact `name`; returns where to PUT its bytes.
async fn create_s3_artifact(
    queue: &Queue,
    task_id: &str,
    run_id: u32,
    expires: &str,
    name: &str,
) -> Result<String, String> {
    let content_type = lifecycle::artifacts::content_type(name);
    let request = json!({ "storageType": "s3", "expires": expires, "contentType": content_type });
    let answer = create_artifact(queue, task_id, run_id, name, &request)
        .await
        .map_err(|error| error.to_string())?;
    answer
        .get("putUrl")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "the queue gave no putUrl".to_owned())
}

async fn upload_text(
    queue: &Queue,
    http: &reqwest::Client,
    task_id: &str,
    run_id: u32,
    expires: &str,
    name: &str,
    text: &str,
) -> Result<(), String> {
    let put_url = create_s3_artifact(queue, task_id, run_id, expires, name).await?;
    let bytes = bytes::Bytes::copy_from_slice(text.as_bytes());
    put_with_retries(http, &put_url, name, bytes.len() as u64, || async {
        Ok(reqwest::Body::from(bytes.clone()))
    })
    .await
}

async fn upload_file(
    queue: &Queue,
    http: &reqwest::Client,
    task_id: &str,
    run_id: u32,
    expires: &str,
    name: &str,
    path: &Path,
) -> Result<(), String> {
    let put_url = create_s3_artifact(queue, task_id, run_id, expires, name).await?;
    let length = tokio::fs::metadata(path)
        .await
        .map_err(|error| format!("{}: {error}", path.display()))?
        .len();
    put_with_retries(http, &put_url, name, length, || async {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|error| format!("{}: {error}", path.display()))?;
        Ok(reqwest::Body::wrap_stream(
            lifecycle::artifacts::file_chunks(file),
        ))
    })
    .await
}

/// PUTs the body `body` makes (afresh for each attempt), retried on 5xx and connection
/// errors with back-off.
async fn put_with_retries<Made>(
    http: &reqwest::Client,
    put_url: &str,
    name: &str,
    length: u64,
    body: impl Fn() -> Made,
) -> Result<(), String>
where
    Made: std::future::Future<Output = Result<reqwest::Body, String>>,
{
    let content_type = lifecycle::artifacts::content_type(name);
    let mut delay = Duration::from_millis(250);
    for attempt in 1..=5 {
        let body = body().await?;
        let sent = http
            .put(put_url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header(reqwest::header::CONTENT_LENGTH, length)
            .body(body)
            .send()
            .await;
        let retry = match sent {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) if response.status().is_client_error() => {
                return Err(format!("the upload was refused: {}", response.status()))
            }
            Ok(response) => format!("{}", response.status()),
            Err(error) => error.to_string(),
        };
        if attempt == 5 {
            return Err(format!("the upload failed 5 times, last: {retry}"));
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
    Err("the upload failed".to_owned())
}

/// Creates (or points elsewhere: the queue lets a `reference` artifact be replaced by
/// another) the reference artifact `name` to `url`.
pub async fn publish_reference(
    queue: &Queue,
    task_id: &str,
    run_id: u32,
    expires: &str,
    name: &str,
    url: &str,
) -> Result<(), String> {
    let request = json!({
        "storageType": "reference",
        "expires": expires,
        "contentType": lifecycle::artifacts::content_type(name),
        "url": url,
    });
    create_artifact(queue, task_id, run_id, name, &request)
        .await
        .map(drop)
        .map_err(|error| error.to_string())
}
