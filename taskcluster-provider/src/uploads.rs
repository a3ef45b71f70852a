//! A run's artifacts into the queue: each file as an `s3` artifact (created, then PUT to the
//! URL the queue returns, with its content type and length, retried on 5xx and connection
//! errors), each missing one as an `error` artifact.

use std::path::Path;
use std::time::Duration;

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
    /// An artifact the payload asked for and the run could not collect.
    Missing {
        /// The artifact's name.
        name: String,
        /// Why.
        message: String,
    },
}

/// Publishes `artifacts` for the run; `expires` is the task's.
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
    let mut uploaded = Uploaded::default();
    for artifact in artifacts {
        let (name, result) = match artifact {
            Publish::File { name, path } => (
                name,
                upload_file(queue, &http, task_id, run_id, expires, name, path).await,
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
        };
        match result {
            Ok(()) => uploaded.created.push(name.clone()),
            Err(error) => uploaded.failed.push((name.clone(), error)),
        }
    }
    uploaded
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
    let content_type = lifecycle::artifacts::content_type(name);
    let request = json!({ "storageType": "s3", "expires": expires, "contentType": content_type });
    let answer = create_artifact(queue, task_id, run_id, name, &request)
        .await
        .map_err(|error| error.to_string())?;
    let put_url = answer
        .get("putUrl")
        .and_then(Value::as_str)
        .ok_or("the queue gave no putUrl")?
        .to_owned();
    let length = tokio::fs::metadata(path)
        .await
        .map_err(|error| format!("{}: {error}", path.display()))?
        .len();
    let mut delay = Duration::from_millis(250);
    for attempt in 1..=5 {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|error| format!("{}: {error}", path.display()))?;
        let body = reqwest::Body::wrap_stream(lifecycle::artifacts::file_chunks(file));
        let sent = http
            .put(&put_url)
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
