//! Reading the documents a user hands to the CLI: files in JSON (or TOML for configuration),
//! checked by the `schemas` crate; and the set-up shared by the commands that start VMs.

use std::path::{Path, PathBuf};

use lifecycle::exit::Outcome;
use schemas::{parse_config, parse_json, Violations, WorkerConfig};

/// Largest document file read (payloads and configurations are a few KiB; `taskvm serve`
/// takes 1 MiB bodies).
const MAX_DOCUMENT: u64 = 16 << 20;

/// Reads a file as JSON, or TOML when its name ends in `.toml`; any failure is a violation
/// naming the file.
pub fn read_document(path: &Path) -> Result<serde_json::Value, Violations> {
    use std::io::Read;
    let cannot = |error: &dyn std::fmt::Display| {
        Violations::one("", format!("cannot read {}: {error}", path.display()))
    };
    let file = std::fs::File::open(path).map_err(|error| cannot(&error))?;
    let mut text = String::new();
    file.take(MAX_DOCUMENT + 1)
        .read_to_string(&mut text)
        .map_err(|error| cannot(&error))?;
    if text.len() as u64 > MAX_DOCUMENT {
        return Err(cannot(&format!("larger than {MAX_DOCUMENT} bytes")));
    }
    if path.extension().is_some_and(|ext| ext == "toml") {
        let value: toml::Value = toml::from_str(&text)
            .map_err(|error| Violations::one("", format!("not valid TOML: {}", error.message())))?;
        serde_json::to_value(value)
            .map_err(|error| Violations::one("", format!("cannot convert TOML: {error}")))
    } else {
        parse_json(&text)
    }
}

/// The flags every command that starts VMs has: its configuration file and what overrides it.
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// Worker configuration (limits, machine defaults, sandbox user, queue…).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Image cache directory (default: the configuration's cache.dir).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// State directory (default: the configuration's stateDir): VM records for the crash
    /// sweep, snapshots, the KVM verdict, and the command's own files (the queue database of
    /// `serve`, the runs of `worker`).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Directory of the writable caches payloads mount (default: the configuration's
    /// mounts.cacheDir, else STATE/caches; `worker`: STATE/caches/taskcluster/QUEUE).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Accelerator (default: the configuration's accel, `auto` unless set).
    #[arg(long, value_enum)]
    pub accel: Option<crate::args::AccelArg>,
}

/// The worker configuration for a command that starts VMs: the `--config` file (or the
/// defaults) with what the command line overrides (`start`: `--start`, where the command has
/// it). An invalid file is reported and yields the exit code.
pub fn load_host_config(
    host: &HostArgs,
    start: Option<schemas::config::StartMode>,
) -> Result<WorkerConfig, Outcome> {
    load_host_config_with(host, start, None)
}

/// Like [`load_host_config`], with `overlay` (a worker pool's `workerConfig`) laid over the
/// file before the command line's overrides: defaults, then the file, then the overlay, then
/// the flags. Unknown keys in the overlay are refused as in the file.
pub fn load_host_config_with(
    host: &HostArgs,
    start: Option<schemas::config::StartMode>,
    overlay: Option<&serde_json::Value>,
) -> Result<WorkerConfig, Outcome> {
    let invalid = |violations: Violations, what: &str| {
        eprintln!("taskvm: invalid {what}:\n{violations}");
        Outcome::Malformed
    };
    let mut config = match overlay.filter(|overlay| !overlay.is_null()) {
        None => load_config(host.config.as_deref())
            .map_err(|violations| invalid(violations, "configuration"))?,
        Some(overlay) => {
            let mut document = match host.config.as_deref() {
                Some(path) => read_document(path)
                    .map_err(|violations| invalid(violations, "configuration"))?,
                None => serde_json::json!({}),
            };
            taskcluster_provider::fleet::merge_worker_config(&mut document, overlay);
            parse_config(&document).map_err(|violations| {
                invalid(
                    violations,
                    "configuration with the worker pool's workerConfig",
                )
            })?
        }
    };
    if let Some(cache) = &host.cache {
        config.cache.dir = cache.clone();
    }
    if let Some(state) = &host.state {
        config.state_dir = state.clone();
    }
    if let Some(dir) = &host.cache_dir {
        config.mounts.cache_dir = Some(dir.clone());
    }
    if let Some(accel) = host.accel {
        config.accel = accel.into();
    }
    if let Some(start) = start {
        config.start = start;
    }
    Ok(config)
}

/// The async runtime of the commands that drive VMs (two worker threads: VMs are started
/// from them, never from short-lived blocking threads, because QEMU dies with its spawning
/// thread).
pub fn vm_runtime() -> Result<tokio::runtime::Runtime, Outcome> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| {
            eprintln!("taskvm: cannot start the async runtime: {error}");
            Outcome::Internal
        })
}

/// The host of `config`, prepared (its start-up sweep included), its notices said through
/// `notice`; when it cannot run `what` ("VMs", "tasks"), why is said the same way.
pub fn prepared_host(
    config: WorkerConfig,
    notice: &dyn Fn(&str),
    what: &str,
) -> Result<lifecycle::host::Host, Outcome> {
    lifecycle::host::Host::prepare(config, notice).map_err(|error| {
        notice(&format!("this host cannot run {what}: {error}"));
        Outcome::Internal
    })
}

/// Reads the worker configuration at `path`, or the defaults when there is none.
pub fn load_config(path: Option<&Path>) -> Result<WorkerConfig, Violations> {
    match path {
        Some(path) => parse_config(&read_document(path)?),
        None => Ok(WorkerConfig::default()),
    }
}

/// Tells the user one line, as every command does: an event of the command's log
/// ([`crate::logging`]), `taskvm: LINE` on standard error unless `--log-format json`.
pub fn say(line: &str) {
    tracing::info!("{line}");
}
