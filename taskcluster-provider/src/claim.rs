//! One claimed run: what `claimWork` answered, the claim's temporary credentials (renewed by
//! every reclaim) and the loop that keeps the claim alive.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::Credentials;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::watch;

use super::queue::{reclaim, QueueEndpoint};

/// A claim that `claimWork` answered with, parsed.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The task.
    pub task_id: String,
    /// The run this worker holds.
    pub run_id: u32,
    /// The task definition (its `payload`, `expires`, …).
    pub task: Value,
    /// Until when the claim holds.
    pub taken_until: DateTime<Utc>,
    /// The claim's temporary credentials.
    pub credentials: Credentials,
}

impl Claim {
    /// Reads one entry of `claimWork`'s `tasks`.
    pub fn parse(entry: &Value) -> Result<Claim, String> {
        let text = |pointer: &str| {
            entry
                .pointer(pointer)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("the claim has no {pointer}"))
        };
        let run_id = entry
            .pointer("/runId")
            .and_then(Value::as_u64)
            .and_then(|run| u32::try_from(run).ok())
            .ok_or("the claim has no /runId")?;
        Ok(Claim {
            task_id: text("/status/taskId")?,
            run_id,
            task: entry.get("task").cloned().unwrap_or(Value::Null),
            taken_until: parse_time(&text("/takenUntil")?)?,
            credentials: credentials(entry.get("credentials"))?,
        })
    }

    /// The task's `expires` (artifacts expire with it), or None.
    pub fn expires(&self) -> Option<String> {
        self.task
            .get("expires")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| format!("{text:?} is not a time: {error}"))
}

fn credentials(value: Option<&Value>) -> Result<Credentials, String> {
    let value = value.ok_or("the claim has no credentials")?;
    let field = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("the claim's credentials have no {name}"))
    };
    let (client_id, access_token) = (field("clientId")?, field("accessToken")?);
    Ok(match value.get("certificate").and_then(Value::as_str) {
        Some(certificate) => {
            Credentials::new_with_certificate(client_id, access_token, certificate)
        }
        None => Credentials::new(client_id, access_token),
    })
}

/// The claim's current credentials, shared by everything about the task.
pub type SharedCredentials = Arc<Mutex<Credentials>>;

/// When to reclaim: a third of the remaining time before `taken_until`, at least 2 s early.
pub fn reclaim_delay(taken_until: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    let remaining = (taken_until - now).to_std().unwrap_or_default();
    let margin = (remaining / 3).max(Duration::from_secs(2));
    remaining.saturating_sub(margin)
}

/// Keeps the claim alive until `done` turns true. When the queue refuses a reclaim (the task
/// was canceled, or the claim expired) `lost` is told at once, and the loop ends.
pub async fn keep_claimed(
    endpoint: QueueEndpoint,
    claim: Claim,
    shared: SharedCredentials,
    mut done: watch::Receiver<bool>,
    lost: watch::Sender<Option<String>>,
) {
    let mut taken_until = claim.taken_until;
    loop {
        let wait = reclaim_delay(taken_until, Utc::now());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = done.wait_for(|done| *done) => return,
        }
        let current = shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let answer = match endpoint.client(&current, Duration::from_secs(30)) {
            Ok(queue) => reclaim(&queue, &claim.task_id, claim.run_id).await,
            Err(error) => Err(error),
        };
        match answer {
            Ok(answer) => {
                if let Some(time) = answer
                    .get("takenUntil")
                    .and_then(Value::as_str)
                    .and_then(|text| parse_time(text).ok())
                {
                    taken_until = time;
                }
                if let Ok(renewed) = credentials(answer.get("credentials")) {
                    *shared
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) = renewed;
                }
            }
            Err(error) if error.is_refusal() => {
                lost.send_replace(Some(error.to_string()));
                return;
            }
            Err(error) if Utc::now() >= taken_until => {
                // The queue could not be reached before the claim ran out: it is gone.
                lost.send_replace(Some(format!("the claim ran out: {error}")));
                return;
            }
            // Transient (the client retried already); try again soon, before takenUntil.
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_claim_is_read_from_claim_work_and_reclaimed_a_third_early() {
        let entry = json!({
            "status": { "taskId": "fN1SbArXTPSVFNUvaOlinQ" },
            "runId": 1,
            "takenUntil": "2026-12-01T10:00:15.000Z",
            "task": { "payload": {}, "expires": "2027-12-01T10:00:00.000Z" },
            "credentials": { "clientId": "c", "accessToken": "t", "certificate": "{}" }
        });
        let claim = Claim::parse(&entry).unwrap();
        assert_eq!(
            (claim.task_id.as_str(), claim.run_id),
            ("fN1SbArXTPSVFNUvaOlinQ", 1)
        );
        assert_eq!(claim.credentials.certificate.as_deref(), Some("{}"));
        assert_eq!(claim.expires().as_deref(), Some("2027-12-01T10:00:00.000Z"));
        let now = parse_time("2026-12-01T10:00:00.000Z").unwrap();
        assert_eq!(
            reclaim_delay(claim.taken_until, now),
            Duration::from_secs(10)
        );
        let late = parse_time("2026-12-01T10:00:14.000Z").unwrap();
        assert_eq!(reclaim_delay(claim.taken_until, late), Duration::ZERO);
        assert!(Claim::parse(&json!({ "runId": 0 })).is_err());
    }
}
