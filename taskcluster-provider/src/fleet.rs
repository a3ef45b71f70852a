//! Membership of a worker-manager pool whose hosts an operator runs (the `static` provider):
//! the worker proves who it is with the secret the operator gave it at `createWorker`, gets
//! temporary credentials and the pool's `workerConfig` (`registerWorker`), renews the
//! credentials well before they expire (`reregisterWorker`, with the one-time secret of the last
//! answer), and watches its own state so that it drains once the operator removed it
//! (`removeWorker`): credentials it holds would go on claiming until they expire.

use std::fmt;
use std::time::{Duration, SystemTime};

use reqwest::Method;
use serde_json::{json, Value};
use thiserror::Error;
use tokio::sync::watch;

use crate::client::{CallError, Credentials, Service};

/// The provider of hosts an operator adds by hand.
pub const STATIC_PROVIDER: &str = "static";
/// How long a call to worker-manager may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the worker asks for its own state.
pub const STATE_INTERVAL: Duration = Duration::from_secs(5);
/// The longest wait between attempts while worker-manager cannot be reached.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The most of a worker-manager answer quoted in a message.
const QUOTED: usize = 200;

/// The secret a static worker proves itself with; never printed.
#[derive(Clone)]
pub struct StaticSecret(String);

impl StaticSecret {
    /// The secret `text` (surrounding white space removed); None when nothing is left.
    pub fn new(text: &str) -> Option<StaticSecret> {
        let text = text.trim();
        (!text.is_empty()).then(|| StaticSecret(text.to_owned()))
    }
}

impl fmt::Debug for StaticSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticSecret(…)")
    }
}

/// Who the worker is in worker-manager.
#[derive(Debug, Clone)]
pub struct StaticWorker {
    /// The deployment's root URL.
    pub root_url: String,
    /// The worker pool (also the task queue it claims from).
    pub worker_pool_id: String,
    /// The provider (`static`).
    pub provider_id: String,
    /// The worker's group.
    pub worker_group: String,
    /// The worker's id.
    pub worker_id: String,
    /// The secret given to `createWorker`.
    pub secret: StaticSecret,
}

/// What a registration or renewal gave.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Temporary credentials with the pool's scopes.
    pub credentials: Credentials,
    /// When they expire.
    pub expires: SystemTime,
    /// The one-time secret the next renewal needs.
    renewal_secret: String,
    /// The pool's `workerConfig` (registration only; null after a renewal).
    pub worker_config: Value,
}

impl Registration {
    /// When the credentials expire, as RFC 3339.
    pub fn expires_text(&self) -> String {
        chrono::DateTime::<chrono::Utc>::from(self.expires).to_rfc3339()
    }
}

/// Why registering failed.
#[derive(Debug, Error)]
pub enum FleetError {
    /// The static secret is not the one the worker was created with.
    #[error(
        "worker-manager refused the static secret of {worker} (TASKVM_STATIC_SECRET or \
         --static-secret-file): {message}"
    )]
    WrongSecret {
        /// `POOL/GROUP/ID`.
        worker: String,
        /// What worker-manager said.
        message: String,
    },
    /// No such pool, provider or worker.
    #[error("worker-manager does not know {what}: {message}")]
    Unknown {
        /// The pool, the provider or the worker.
        what: String,
        /// What worker-manager said.
        message: String,
    },
    /// Worker-manager refused for another reason (expired, removed, another provider).
    #[error("worker-manager refused to register {worker}: {message}")]
    Refused {
        /// `POOL/GROUP/ID`.
        worker: String,
        /// What worker-manager said.
        message: String,
    },
    /// Worker-manager did not answer.
    #[error("worker-manager at {root_url} cannot be reached: {message}")]
    Unreachable {
        /// The deployment.
        root_url: String,
        /// What went wrong.
        message: String,
    },
    /// It answered something that is not a registration.
    #[error("worker-manager's answer to {call} is not understood: {message}")]
    Malformed {
        /// Which call.
        call: &'static str,
        /// What is missing.
        message: String,
    },
}

impl StaticWorker {
    fn name(&self) -> String {
        format!(
            "{}/{}/{}",
            self.worker_pool_id, self.worker_group, self.worker_id
        )
    }

    fn service(&self, credentials: Option<&Credentials>) -> Result<Service, FleetError> {
        Service::new(&self.root_url, "worker-manager", credentials, CALL_TIMEOUT).map_err(|error| {
            FleetError::Unreachable {
                root_url: self.root_url.clone(),
                message: error.to_string(),
            }
        })
    }

    /// `registerWorker` with the static secret: needs no credentials.
    pub async fn register(&self) -> Result<Registration, FleetError> {
        let body = json!({
            "workerPoolId": self.worker_pool_id,
            "providerId": self.provider_id,
            "workerGroup": self.worker_group,
            "workerId": self.worker_id,
            "workerIdentityProof": { "staticSecret": self.secret.0 },
        });
        let answer = self
            .service(None)?
            .call(Method::POST, &["worker", "register"], Some(&body))
            .await
            .map_err(|error| self.registration_error(error))?;
        registration(&answer, "registerWorker")
    }

    fn registration_error(&self, error: CallError) -> FleetError {
        let message = error.message.clone();
        let has = |text: &str| message.contains(text);
        match error.status {
            None | Some(500..) => FleetError::Unreachable {
                root_url: self.root_url.clone(),
                message: error.to_string(),
            },
            Some(_) if has("staticSecret") => FleetError::WrongSecret {
                worker: self.name(),
                message,
            },
            Some(404) => FleetError::Unknown {
                what: if has("Worker pool") {
                    format!("the worker pool {}", self.worker_pool_id)
                } else if has("Provider") {
                    format!("the provider {}", self.provider_id)
                } else {
                    format!(
                        "the worker {}/{} in pool {} (an operator adds it with createWorker)",
                        self.worker_group, self.worker_id, self.worker_pool_id
                    )
                },
                message,
            },
            Some(_) => FleetError::Refused {
                worker: self.name(),
                message,
            },
        }
    }

    /// `reregisterWorker`: new credentials for `current`'s.
    pub async fn renew(&self, current: &Registration) -> Result<Registration, CallError> {
        let body = json!({
            "workerPoolId": self.worker_pool_id,
            "workerGroup": self.worker_group,
            "workerId": self.worker_id,
            "secret": current.renewal_secret,
        });
        let answer = self
            .service(Some(&current.credentials))
            .map_err(|error| CallError {
                status: None,
                message: error.to_string(),
            })?
            .call(Method::POST, &["worker", "reregister"], Some(&body))
            .await?;
        registration(&answer, "reregisterWorker").map_err(|error| CallError {
            status: None,
            message: error.to_string(),
        })
    }

    /// The worker's state in worker-manager (`running`, `stopping`, `stopped`, …).
    pub async fn state(&self, credentials: &Credentials) -> Result<String, CallError> {
        let answer = self
            .service(Some(credentials))
            .map_err(|error| CallError {
                status: None,
                message: error.to_string(),
            })?
            .call(
                Method::GET,
                &[
                    "workers",
                    &self.worker_pool_id,
                    &self.worker_group,
                    &self.worker_id,
                ],
                None,
            )
            .await?;
        Ok(answer
            .get("state")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .chars()
            .take(40)
            .collect())
    }
}

/// Reads a `registerWorker` or `reregisterWorker` answer.
fn registration(answer: &Value, call: &'static str) -> Result<Registration, FleetError> {
    let malformed = |message: &str| FleetError::Malformed {
        call,
        message: message.to_owned(),
    };
    let text = |value: Option<&Value>| value.and_then(Value::as_str).map(str::to_owned);
    let credentials = &answer["credentials"];
    let (Some(client_id), Some(access_token)) = (
        text(credentials.get("clientId")),
        text(credentials.get("accessToken")),
    ) else {
        return Err(malformed("no credentials"));
    };
    let credentials = match text(credentials.get("certificate")) {
        Some(certificate) => {
            Credentials::new_with_certificate(client_id, access_token, certificate)
        }
        None => Credentials::new(client_id, access_token),
    };
    let expires = text(answer.get("expires"))
        .and_then(|text| chrono::DateTime::parse_from_rfc3339(&text).ok())
        .map(|time| SystemTime::from(time.with_timezone(&chrono::Utc)))
        .ok_or_else(|| malformed("no expires"))?;
    let renewal_secret = text(answer.get("secret")).ok_or_else(|| malformed("no secret"))?;
    Ok(Registration {
        credentials,
        expires,
        renewal_secret,
        worker_config: answer.get("workerConfig").cloned().unwrap_or(Value::Null),
    })
}

/// Why a worker stopped being a member of its pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEnd {
    /// Worker-manager says the worker is no longer running (`removeWorker`).
    Removed {
        /// Its state there.
        state: String,
    },
    /// A renewal was refused.
    RenewalRefused {
        /// What worker-manager said.
        message: String,
    },
}

impl fmt::Display for MembershipEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MembershipEnd::Removed { state } => write!(
                f,
                "worker-manager has this worker {state} (removed from its pool): draining"
            ),
            MembershipEnd::RenewalRefused { message } => write!(
                f,
                "worker-manager refused to renew this worker's credentials ({}): draining",
                quoted(message)
            ),
        }
    }
}

/// Keeps the membership: renews the credentials (published on the returned channel, which
/// the claim loop reads before each claim) and watches the worker's state, until the worker
/// was removed or a renewal was refused. While worker-manager cannot be reached it tries again
/// with back-off; running tasks go on.
pub fn keep_membership(
    worker: StaticWorker,
    first: Registration,
    state_interval: Duration,
) -> (
    watch::Receiver<Credentials>,
    impl std::future::Future<Output = MembershipEnd> + Send + 'static,
) {
    let (publish, credentials) = watch::channel(first.credentials.clone());
    let membership = async move {
        let mut current = first;
        // Renewed at half of the shortest lifetime granted so far: the static provider grants
        // the pool's reregistration timeout at registration, but a fixed 96 h at renewals.
        let mut interval = half_life(&current);
        let mut renew_at = tokio::time::Instant::now() + interval;
        let mut backoff = Duration::from_secs(1);
        let mut watching = true;
        loop {
            let next_state = tokio::time::Instant::now() + state_interval;
            tokio::time::sleep_until(next_state.min(renew_at)).await;
            if tokio::time::Instant::now() >= renew_at {
                match worker.renew(&current).await {
                    Ok(renewed) => {
                        interval = interval.min(half_life(&renewed));
                        renew_at = tokio::time::Instant::now() + interval;
                        backoff = Duration::from_secs(1);
                        tracing::info!(
                            "renewed the worker's credentials with worker-manager; next renewal \
                             in {} s",
                            interval.as_secs()
                        );
                        publish.send_replace(renewed.credentials.clone());
                        current = renewed;
                    }
                    Err(error) if is_refusal(&error) => {
                        return MembershipEnd::RenewalRefused {
                            message: error.message,
                        }
                    }
                    Err(error) => {
                        tracing::info!(
                            "cannot renew with worker-manager ({error}); trying again in {} s",
                            backoff.as_secs()
                        );
                        renew_at = tokio::time::Instant::now() + backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
                continue;
            }
            if !watching {
                continue;
            }
            match worker.state(&current.credentials).await {
                Ok(state) if state == "running" => {}
                Ok(state) => return MembershipEnd::Removed { state },
                Err(error) if matches!(error.status, Some(401 | 403)) => {
                    tracing::info!(
                        "cannot watch this worker's state ({}); a removal is noticed at the next \
                         renewal only (the pool's role needs worker-manager:get-worker:{}/*)",
                        quoted(&error.message),
                        worker.worker_pool_id
                    );
                    watching = false;
                }
                Err(error) if error.status == Some(404) => {
                    return MembershipEnd::Removed {
                        state: "gone".into(),
                    }
                }
                Err(error) => {
                    tracing::info!("cannot ask worker-manager for this worker's state: {error}")
                }
            }
        }
    };
    (credentials, membership)
}

/// Half of what is left of `registration`'s lifetime, at least a second.
fn half_life(registration: &Registration) -> Duration {
    registration
        .expires
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .checked_div(2)
        .unwrap_or_default()
        .max(Duration::from_secs(1))
}

/// Whether worker-manager refused the call (4xx), which trying again does not change.
fn is_refusal(error: &CallError) -> bool {
    error
        .status
        .is_some_and(|status| (400..500).contains(&status))
}

/// `text` cut to a few hundred characters and escaped, for quoting a service's words.
fn quoted(text: &str) -> String {
    text.chars()
        .take(QUOTED)
        .flat_map(char::escape_default)
        .collect()
}

/// The pool's `workerConfig` laid over the configuration document `config` (objects merged key by
/// key, anything else replaced): the configuration a registered worker runs with.
pub fn merge_worker_config(config: &mut Value, worker_config: &Value) {
    match (config, worker_config) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                merge_worker_config(base.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (base, over) if !over.is_null() => *base = over.clone(),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_is_read_and_its_secret_never_printed() {
        let answer = json!({
            "expires": "2030-01-01T00:00:00.000Z",
            "credentials": {"clientId": "worker/static/p/g/i", "accessToken": "token", "certificate": "{}"},
            "workerConfig": {"warmPool": 1},
            "secret": "a".repeat(44),
        });
        let registration = registration(&answer, "registerWorker").unwrap();
        assert_eq!(registration.credentials.client_id, "worker/static/p/g/i");
        assert_eq!(registration.worker_config, json!({"warmPool": 1}));
        assert!(half_life(&registration) > Duration::from_secs(3600));
        let missing = registration_error_of(json!({"credentials": {}}));
        assert!(missing.contains("no credentials"), "{missing}");
        let secret = StaticSecret::new("  hidden-secret\n").unwrap();
        assert!(!format!("{secret:?}").contains("hidden"));
        assert!(StaticSecret::new(" \n").is_none());
    }

    fn registration_error_of(answer: Value) -> String {
        registration(&answer, "registerWorker")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_pool_worker_config_is_laid_over_the_file() {
        let mut config = json!({"warmPool": 0, "cache": {"dir": "/c", "maxSize": "1G"}});
        merge_worker_config(
            &mut config,
            &json!({"warmPool": 2, "cache": {"maxSize": "5G"}, "egress": null}),
        );
        assert_eq!(
            config,
            json!({"warmPool": 2, "cache": {"dir": "/c", "maxSize": "5G"}, "egress": null})
        );
    }

    #[test]
    fn refusals_are_told_apart() {
        let worker = StaticWorker {
            root_url: "http://127.0.0.1:1".into(),
            worker_pool_id: "p/q".into(),
            provider_id: STATIC_PROVIDER.into(),
            worker_group: "g".into(),
            worker_id: "i".into(),
            secret: StaticSecret::new("s").unwrap(),
        };
        let error = |status, message: &str| {
            worker
                .registration_error(CallError {
                    status,
                    message: message.into(),
                })
                .to_string()
        };
        assert!(
            error(Some(400), "bad staticSecret in workerIdentityProof").contains("static secret")
        );
        assert!(error(Some(404), "Worker pool p/q does not exist").contains("the worker pool p/q"));
        assert!(
            error(Some(404), "Worker g/i in worker pool p/q does not exist")
                .contains("createWorker")
        );
        assert!(error(None, "connection refused").contains("cannot be reached"));
        assert!(error(Some(400), "Worker g/i has expired").contains("refused to register"));
    }
}
