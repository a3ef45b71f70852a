//! `taskvm worker`: claim and run tasks from a Taskcluster queue until SIGINT or SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use lifecycle::capacity::Resources;
use lifecycle::exit::Outcome;
use schemas::config::{QueueConfig, TaskclusterQueueConfig};
use taskcluster_provider::client::Credentials;
use taskcluster_provider::fleet::{self, Registration, StaticSecret, StaticWorker};
use taskcluster_provider::livelog::{LiveLogOptions, LiveLogServer};
use taskcluster_provider::queue::QueueEndpoint;
use taskcluster_provider::{run_worker, WorkerOptions};

use crate::documents::say;

/// Arguments of `taskvm worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Configuration, cache, state and accelerator.
    #[command(flatten)]
    host: crate::documents::HostArgs,
    /// Task queue to claim from (`provisionerId/workerType`).
    #[arg(long, value_name = "ID")]
    task_queue_id: Option<String>,
    /// This worker's group.
    #[arg(long, value_name = "GROUP")]
    worker_group: Option<String>,
    /// This worker's id (unique in its group).
    #[arg(long, value_name = "ID")]
    worker_id: Option<String>,
    /// Tasks run at once (default: the configuration's, else 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    capacity: Option<u32>,
    /// Seconds running tasks get after SIGTERM before they are resolved
    /// exception/worker-shutdown.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    shutdown_grace: u64,
    /// Memory all running VMs may hold together, in MiB (default: the host's less 1 GiB).
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// vCPUs all running VMs may hold together (default: the host's CPU count).
    #[arg(long, value_name = "N")]
    cpus: Option<u64>,
    /// Serve each running task's log on this address (`IP:PORT`), as
    /// `public/logs/live.log` (default: the configuration's `queue.liveLogListen`; none: the
    /// log is published when the task ends).
    #[arg(long, value_name = "ADDR:PORT")]
    livelog_listen: Option<std::net::SocketAddr>,
    /// The base URL clients reach that address by (default: the configuration's
    /// `queue.liveLogUrl`, else `http://ADDR:PORT`).
    #[arg(long, value_name = "URL")]
    livelog_url: Option<String>,
    /// Join this worker-manager pool instead of using client credentials: register with the
    /// static secret, claim from the pool's queue with the temporary credentials it hands out,
    /// renew them, and drain once the worker is removed.
    #[arg(long, value_name = "POOL")]
    worker_pool_id: Option<String>,
    /// The pool's provider (with a pool; default: the configuration's `queue.providerId`, else
    /// `static`).
    #[arg(long, value_name = "ID")]
    provider_id: Option<String>,
    /// File holding the static secret the worker was created with (with a pool; default: the
    /// configuration's `queue.staticSecretFile`, else the environment variable
    /// TASKVM_STATIC_SECRET).
    #[arg(long, value_name = "FILE")]
    static_secret_file: Option<std::path::PathBuf>,
}

/// The environment variable that may hold a static worker's secret.
const STATIC_SECRET_VARIABLE: &str = "TASKVM_STATIC_SECRET";
/// The largest static secret file read.
const STATIC_SECRET_LIMIT: u64 = 4096;

/// Runs `taskvm worker`.
pub fn run(args: WorkerArgs) -> Outcome {
    let runtime = match crate::documents::vm_runtime() {
        Ok(runtime) => runtime,
        Err(outcome) => return outcome,
    };
    // A member of a worker-manager pool registers first: its credentials and the pool's
    // workerConfig come from the registration.
    let file_config = match crate::documents::load_host_config(&args.host, None) {
        Ok(config) => config,
        Err(outcome) => return outcome,
    };
    let file_section = taskcluster_section(&file_config);
    let pool = args.worker_pool_id.clone().or_else(|| {
        file_section
            .as_ref()
            .and_then(|section| section.worker_pool_id.clone())
    });
    let membership = match &pool {
        Some(pool) => match runtime.block_on(join_pool(&args, pool, file_section.as_ref())) {
            Ok(joined) => Some(joined),
            Err(outcome) => return outcome,
        },
        None if args.provider_id.is_some() || args.static_secret_file.is_some() => {
            say("--provider-id and --static-secret-file need a pool: pass --worker-pool-id");
            return Outcome::Malformed;
        }
        None => None,
    };
    // A pool's workerConfig is laid over the file, which is read again for it.
    let mut config = match &membership {
        Some((_, first)) => {
            let overlay = Some(&first.worker_config);
            match crate::documents::load_host_config_with(&args.host, None, overlay) {
                Ok(config) => config,
                Err(outcome) => return outcome,
            }
        }
        None => file_config,
    };
    let section = taskcluster_section(&config);
    let options = match &membership {
        Some((worker, first)) => Ok((
            QueueEndpoint {
                root_url: worker.root_url.clone(),
                credentials: first.credentials.clone(),
            },
            // The flag, else the section's queue when the section names the pool, else the pool.
            args.task_queue_id
                .clone()
                .or_else(|| {
                    section
                        .as_ref()
                        .filter(|section| section.worker_pool_id.is_some())
                        .map(|section| section.task_queue_id.clone())
                })
                .unwrap_or_else(|| worker.worker_pool_id.clone()),
            worker.worker_group.clone(),
            worker.worker_id.clone(),
        )),
        None => options(
            &args.task_queue_id,
            &args.worker_group,
            &args.worker_id,
            section.as_ref(),
        ),
    };
    let options = match options {
        Ok(partial) => partial,
        Err(message) => {
            say(&message);
            return Outcome::Malformed;
        }
    };
    let (endpoint, task_queue_id, worker_group, worker_id) = options;
    // Caches are the worker pool's: two pools on one host never share cache NAME.
    if config.mounts.cache_dir.is_none() {
        config.mounts.cache_dir = Some(
            config
                .state_dir
                .join("caches")
                .join("taskcluster")
                .join(&task_queue_id),
        );
    }
    let capacity = args
        .capacity
        .or(section.as_ref().map(|section| section.capacity))
        .unwrap_or(1) as usize;
    let options = WorkerOptions {
        endpoint,
        task_queue_id,
        worker_group,
        worker_id,
        capacity,
        resources: Resources {
            memory_mib: args
                .memory
                .unwrap_or_else(crate::serve_cmd::default_memory_mib),
            cpus: args.cpus.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |count| count.get() as u64)
            }),
        },
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        live_log: None,
        renewed_credentials: None,
    };
    let live_log = match live_log_options(&args, section.as_ref()) {
        Ok(options) => options,
        Err(message) => {
            say(&message);
            return Outcome::Malformed;
        }
    };
    let outcome = runtime.block_on(async {
        let host = match crate::documents::prepared_host(config, &|line| say(line), "tasks") {
            Ok(host) => Arc::new(host),
            Err(outcome) => return outcome,
        };
        let mut options = options;
        if let Some(live_log) = live_log {
            match LiveLogServer::start(live_log).await {
                Ok(server) => {
                    say(&format!(
                        "live logs are served at {}/log/…",
                        server.base_url()
                    ));
                    options.live_log = Some(Arc::new(server));
                }
                Err(error) => {
                    say(&error.to_string());
                    return Outcome::Internal;
                }
            }
        }
        let shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            match membership {
                Some((worker, first)) => {
                    let (renewed, member) =
                        fleet::keep_membership(worker, first, fleet::STATE_INTERVAL);
                    options.renewed_credentials = Some(renewed);
                    Box::pin(async move {
                        tokio::select! {
                            () = crate::signals::wait_for_signal_quietly() => {}
                            end = member => say(&end.to_string()),
                        }
                    })
                }
                None => Box::pin(crate::signals::wait_for_signal_quietly()),
            };
        match run_worker(host, options, shutdown).await {
            Ok(()) => {
                say("stopped");
                Outcome::Success
            }
            Err(error) => {
                say(&error.to_string());
                Outcome::Internal
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

/// Registers with worker-manager as a static worker of `pool`: the identity from the flags (or
/// the configuration's queue `section`), the secret from `--static-secret-file`,
/// `queue.staticSecretFile` or `TASKVM_STATIC_SECRET`. Any failure is said in one line and nothing is claimed.
async fn join_pool(
    args: &WorkerArgs,
    pool: &str,
    section: Option<&TaskclusterQueueConfig>,
) -> Result<(StaticWorker, Registration), Outcome> {
    let fail = |message: String, outcome: Outcome| {
        say(&message);
        outcome
    };
    let malformed = |message: String| fail(message, Outcome::Malformed);
    let root_url = root_url(section).map_err(malformed)?;
    let worker_group = pick(
        &args.worker_group,
        section.map(|s| s.worker_group.clone()),
        "worker-group",
    )
    .map_err(malformed)?;
    let worker_id = pick(
        &args.worker_id,
        section.map(|s| s.worker_id.clone()),
        "worker-id",
    )
    .map_err(malformed)?;
    let secret_file = args
        .static_secret_file
        .clone()
        .or_else(|| section.and_then(|section| section.static_secret_file.clone()));
    let secret = static_secret(secret_file.as_deref()).map_err(malformed)?;
    let worker = StaticWorker {
        root_url,
        worker_pool_id: pool.to_owned(),
        provider_id: args
            .provider_id
            .clone()
            .or_else(|| section.and_then(|section| section.provider_id.clone()))
            .unwrap_or_else(|| fleet::STATIC_PROVIDER.to_owned()),
        worker_group,
        worker_id,
        secret,
    };
    let registration = worker
        .register()
        .await
        .map_err(|error| fail(error.to_string(), Outcome::Internal))?;
    say(&format!(
        "registered with worker-manager as {}/{}/{} (credentials until {})",
        worker.worker_pool_id,
        worker.worker_group,
        worker.worker_id,
        registration.expires_text()
    ));
    Ok((worker, registration))
}

/// The static secret: from `file` when given (read bounded), else from the environment.
fn static_secret(file: Option<&std::path::Path>) -> Result<StaticSecret, String> {
    use std::io::Read;
    let text = match file {
        Some(path) => {
            let mut text = String::new();
            std::fs::File::open(path)
                .and_then(|file| file.take(STATIC_SECRET_LIMIT + 1).read_to_string(&mut text))
                .map_err(|error| format!("the static secret file {}: {error}", path.display()))?;
            if text.len() as u64 > STATIC_SECRET_LIMIT {
                return Err(format!(
                    "the static secret file {} is over {STATIC_SECRET_LIMIT} bytes",
                    path.display()
                ));
            }
            text
        }
        None => std::env::var(STATIC_SECRET_VARIABLE).unwrap_or_default(),
    };
    StaticSecret::new(&text).ok_or_else(|| {
        format!(
            "no static secret: pass --static-secret-file FILE or set {STATIC_SECRET_VARIABLE} \
             (never a flag: it would show in ps)"
        )
    })
}

/// A non-empty environment variable.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// The deployment's root URL: `TASKCLUSTER_ROOT_URL`, else the queue section's.
fn root_url(section: Option<&TaskclusterQueueConfig>) -> Result<String, String> {
    env("TASKCLUSTER_ROOT_URL")
        .or_else(|| section.and_then(|section| section.root_url.clone()))
        .ok_or_else(|| "no root URL: set TASKCLUSTER_ROOT_URL or queue.rootUrl".to_owned())
}

/// A part of the worker's identity: the flag `--WHAT`, else the queue section's value.
fn pick(flag: &Option<String>, configured: Option<String>, what: &str) -> Result<String, String> {
    flag.clone().or(configured).ok_or_else(|| {
        format!("no {what}: pass --{what} or set it in the configuration's queue section")
    })
}

/// The configuration's Taskcluster queue section, if it has one.
fn taskcluster_section(config: &schemas::WorkerConfig) -> Option<TaskclusterQueueConfig> {
    match &config.queue {
        Some(QueueConfig::Taskcluster(section)) => Some(section.clone()),
        _ => None,
    }
}

/// The live log's address and URL: flags over the configuration; none when neither names an
/// address.
fn live_log_options(
    args: &WorkerArgs,
    section: Option<&TaskclusterQueueConfig>,
) -> Result<Option<LiveLogOptions>, String> {
    let configured = section.and_then(|section| section.live_log_listen.as_deref());
    let listen = match (args.livelog_listen, configured) {
        (Some(listen), _) => listen,
        (None, Some(text)) => text.parse().map_err(|error| {
            format!("queue.liveLogListen {text:?} is not an IP:PORT address: {error}")
        })?,
        (None, None) if args.livelog_url.is_some() => {
            return Err("--livelog-url needs an address to serve on: pass --livelog-listen".into())
        }
        (None, None) => return Ok(None),
    };
    let url = args
        .livelog_url
        .clone()
        .or_else(|| section.and_then(|section| section.live_log_url.clone()));
    if let Some(url) = &url {
        let parsed = reqwest::Url::parse(url)
            .map_err(|error| format!("the live log URL {url:?}: {error}"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.query().is_some() {
            return Err(format!(
                "the live log URL {url:?} must be http(s) without a query"
            ));
        }
    }
    Ok(Some(LiveLogOptions::new(listen, url)))
}

type Identity = (QueueEndpoint, String, String, String);

/// The queue, credentials and identity: flags over the environment over the configuration.
fn options(
    task_queue_id: &Option<String>,
    worker_group: &Option<String>,
    worker_id: &Option<String>,
    section: Option<&TaskclusterQueueConfig>,
) -> Result<Identity, String> {
    let root_url = root_url(section)?;
    let client_id = env("TASKCLUSTER_CLIENT_ID")
        .or_else(|| section.and_then(|section| section.client_id.clone()))
        .ok_or("no client id: set TASKCLUSTER_CLIENT_ID or queue.clientId")?;
    let access_token = env("TASKCLUSTER_ACCESS_TOKEN")
        .or_else(|| section.and_then(|section| section.access_token.clone()))
        .ok_or("no access token: set TASKCLUSTER_ACCESS_TOKEN or queue.accessToken")?;
    let certificate = env("TASKCLUSTER_CERTIFICATE")
        .or_else(|| section.and_then(|section| section.certificate.clone()));
    let credentials = match certificate {
        Some(certificate) => {
            Credentials::new_with_certificate(client_id, access_token, certificate)
        }
        None => Credentials::new(client_id, access_token),
    };
    Ok((
        QueueEndpoint {
            root_url,
            credentials,
        },
        pick(
            task_queue_id,
            section.map(|s| s.task_queue_id.clone()),
            "task-queue-id",
        )?,
        pick(
            worker_group,
            section.map(|s| s.worker_group.clone()),
            "worker-group",
        )?,
        pick(worker_id, section.map(|s| s.worker_id.clone()), "worker-id")?,
    ))
}
