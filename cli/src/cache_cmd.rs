//! `taskvm cache ls|rm|gc`: the writable caches payloads mount (payload `mounts`), as kept on
//! this host.

use std::path::PathBuf;

use clap::Subcommand;
use lifecycle::caches::CacheStore;
use lifecycle::exit::Outcome;
use schemas::shown::quoted;

use crate::sizes::{human_duration, human_size};

/// Subcommands of `taskvm cache`.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List the kept copies: name, copy, size on disk, last use, in use, checked next time.
    Ls {
        #[command(flatten)]
        place: CachePlace,
    },
    /// Remove every copy of a cache that no task holds (the next task starts it empty).
    Rm {
        /// The cache's name.
        name: String,
        #[command(flatten)]
        place: CachePlace,
    },
    /// Remove least recently used copies no task holds until the caches fit the budget.
    Gc {
        /// The budget (bytes, or with K/M/G/T suffix); default: mounts.cacheBudget.
        #[arg(long, value_name = "SIZE", value_parser = crate::sizes::parse_size)]
        max_size: Option<u64>,
        #[command(flatten)]
        place: CachePlace,
    },
}

/// Where the caches are.
#[derive(Debug, clap::Args)]
pub struct CachePlace {
    /// Worker configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (default: the configuration's stateDir); the caches are in
    /// STATE/caches unless mounts.cacheDir or --cache-dir says otherwise.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Directory of the caches.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

impl CachePlace {
    fn open(&self) -> Result<(CacheStore, u64), Outcome> {
        let mut config =
            crate::documents::load_config(self.config.as_deref()).map_err(|violations| {
                eprintln!("taskvm: invalid configuration:\n{violations}");
                Outcome::Malformed
            })?;
        if let Some(state) = &self.state {
            config.state_dir = state.clone();
        }
        if let Some(dir) = &self.cache_dir {
            config.mounts.cache_dir = Some(dir.clone());
        }
        let store = CacheStore::for_config(&config).map_err(|error| {
            eprintln!("taskvm: the caches: {error}");
            Outcome::Internal
        })?;
        Ok((store, config.mounts.cache_budget))
    }
}

/// Runs `taskvm cache …`.
pub fn run(command: CacheCommand) -> Outcome {
    let result = match command {
        CacheCommand::Ls { place } => place.open().map(|(store, _)| list(&store)),
        CacheCommand::Rm { name, place } => place.open().map(|(store, _)| remove(&store, &name)),
        CacheCommand::Gc { max_size, place } => place
            .open()
            .map(|(store, budget)| gc(&store, max_size.unwrap_or(budget))),
    };
    result.unwrap_or_else(|outcome| outcome)
}

fn list(store: &CacheStore) -> Outcome {
    println!(
        "{:<32}  {:>4}  {:>10}  {:<10}  {:<6}  CHECKED NEXT",
        "NAME", "COPY", "SIZE", "LAST USED", "IN USE"
    );
    for info in store.list() {
        let age = info.last_used.elapsed().map_or(0, |age| age.as_secs());
        println!(
            "{:<32}  {:>4}  {:>10}  {:<10}  {:<6}  {}",
            info.name,
            info.copy,
            human_size(info.bytes),
            format!("{} ago", human_duration(age)),
            if info.in_use { "yes" } else { "no" },
            if info.dirty && !info.in_use {
                "yes"
            } else {
                "no"
            },
        );
    }
    Outcome::Success
}

fn remove(store: &CacheStore, name: &str) -> Outcome {
    match store.remove(name) {
        (0, 0) => {
            eprintln!("taskvm: no cache {}", quoted(name));
            Outcome::Failed
        }
        (removed, 0) => {
            println!("removed {removed} cop{} of {name}", plural(removed));
            Outcome::Success
        }
        (removed, busy) => {
            eprintln!(
                "taskvm: removed {removed} cop{} of {name}; {busy} in use by a running task \
                 left alone",
                plural(removed)
            );
            Outcome::Failed
        }
    }
}

fn gc(store: &CacheStore, budget: u64) -> Outcome {
    let removed = store.gc(budget);
    let freed: u64 = removed.iter().map(|info| info.bytes).sum();
    for info in &removed {
        println!(
            "removed {} copy {} ({})",
            info.name,
            info.copy,
            human_size(info.bytes)
        );
    }
    let left: u64 = store.list().iter().map(|info| info.bytes).sum();
    println!(
        "freed {}; the caches take {} (budget {})",
        human_size(freed),
        human_size(left),
        human_size(budget)
    );
    Outcome::Success
}

fn plural(count: usize) -> &'static str {
    if count == 1 {
        "y"
    } else {
        "ies"
    }
}
