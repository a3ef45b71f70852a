//! Reading the documents a user hands to the CLI: files in JSON (or TOML for configuration),
//! checked by the `schemas` crate; and the set-up shared by the commands that start VMs.

use std::path::{Path, PathBuf};

use schemas::{parse_config, parse_json, Violations, WorkerConfig};
use taskvm::exit::Outcome;

/// Reads a file as JSON, or TOML when its name ends in `.toml`; any failure is a violation
/// naming the file.
pub fn read_document(path: &Path) -> Result<serde_json::Value, Violations> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| Violations::one("", format!("cannot read {}: {error}", path.display())))?;
    if path.extension().is_some_and(|ext| ext == "toml") {
        let value: toml::Value = toml::from_str(&text)
            .map_err(|error| Violations::one("", format!("not valid TOML: {}", error.message())))?;
        serde_json::to_value(value)
            .map_err(|error| Violations::one("", format!("cannot convert TOML: {error}")))
    } else {
        parse_json(&text)
    }
}

/// What a command line overrides in the configuration of a command that starts VMs.
#[derive(Debug, Default)]
pub struct HostOverrides {
    /// `--cache`.
    pub cache: Option<PathBuf>,
    /// `--state`.
    pub state: Option<PathBuf>,
    /// `--accel`.
    pub accel: Option<schemas::config::Accel>,
    /// `--start`.
    pub start: Option<schemas::config::StartMode>,
}

/// The worker configuration for a command that starts VMs: the file at `path` (or the
/// defaults) with what the command line overrides. An invalid file is reported and yields
/// the exit code.
pub fn load_host_config(
    path: Option<&Path>,
    overrides: HostOverrides,
) -> Result<WorkerConfig, Outcome> {
    let mut config = load_config(path).map_err(|violations| {
        eprintln!("taskvm: invalid configuration:\n{violations}");
        Outcome::Malformed
    })?;
    if let Some(cache) = overrides.cache {
        config.cache.dir = cache;
    }
    if let Some(state) = overrides.state {
        config.state_dir = state;
    }
    if let Some(accel) = overrides.accel {
        config.accel = accel;
    }
    if let Some(start) = overrides.start {
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

/// Reads the worker configuration at `path`, or the defaults when there is none.
pub fn load_config(path: Option<&Path>) -> Result<WorkerConfig, Violations> {
    match path {
        Some(path) => parse_config(&read_document(path)?),
        None => Ok(WorkerConfig::default()),
    }
}

/// Fetches `request` (named `reference` in messages) into the host's cache and leases it; a
/// failure is reported through `say` and yields the exit code (2 when the image is the
/// user's to fix).
pub async fn fetch_lease(
    host: &std::sync::Arc<taskvm::task::host::Host>,
    request: image_manager::ImageRequest,
    reference: &str,
    say: &(dyn Fn(&str) + Sync),
) -> Result<image_manager::Lease, Outcome> {
    let fetching = {
        let host = host.clone();
        tokio::task::spawn_blocking(move || host.cache.fetch(&request, &|_| {}))
    };
    match fetching.await {
        Ok(Ok((lease, _))) => Ok(lease),
        Ok(Err(error)) => {
            say(&format!("image {reference}: {error}"));
            Err(if taskvm::task::image_error_is_the_payloads(&error) {
                Outcome::Malformed
            } else {
                Outcome::Internal
            })
        }
        Err(error) => {
            say(&format!("image fetch thread: {error}"));
            Err(Outcome::Internal)
        }
    }
}

/// An image's machine (`machine.json`, or one given in its place) under the worker's machine
/// defaults and limits, as a payload without a `machine` gets it; a machine over the limits
/// is reported through `say` and yields exit code 2.
pub fn image_machine(
    host: &taskvm::task::host::Host,
    machine: &schemas::Machine,
    say: &dyn Fn(&str),
) -> Result<schemas::ResolvedMachine, Outcome> {
    let layers = schemas::MachineLayers {
        image: Some(machine),
        worker: host.config.machine.as_ref(),
        ..schemas::MachineLayers::default()
    };
    schemas::resolve_machine(layers, &host.config.limits).map_err(|error| {
        say(&schemas::limit_violation(&error, "/machine").to_string());
        Outcome::Malformed
    })
}
