//! `taskvm image …`: fetch, list, collect, verify and pack images.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Subcommand;
use image_manager::{
    pack, verify_file, Cache, FetchKind, ImageError, ImageRequest, PackInputs, Progress,
};
use indicatif::{ProgressBar, ProgressStyle};
use schemas::config::CacheConfig;

use lifecycle::exit::Outcome;

use crate::sizes::{human_duration, human_size};

/// Subcommands of `taskvm image`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Fetch an image into the cache (or find it there) and print `sha256:<hex> <entry path>`.
    Fetch {
        /// http(s) URL, file URL or local path of an image tarball.
        reference: String,
        /// Refuse the image unless its compressed bytes have this sha256.
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// List cached images: digest, size, last use, in use, references.
    Ls {
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Remove least-recently-used images that no task is using.
    Gc {
        /// Keep the cache at most this big (bytes, or with K/M/G/T suffix); default: configured.
        #[arg(long, value_name = "SIZE", value_parser = crate::sizes::parse_size)]
        max_size: Option<u64>,
        /// Keep at least this much free on the cache's file system; default: configured.
        #[arg(long, value_name = "SIZE", value_parser = crate::sizes::parse_size)]
        min_free: Option<u64>,
        #[command(flatten)]
        cache: CacheArgs,
        /// State directory whose snapshots of removed images go too (default: configured).
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
    },
    /// Check an image file against every rule a fetch applies, without caching it.
    Verify {
        /// The image tarball.
        file: PathBuf,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Make the image's snapshot now, so that its first task restores instead of booting.
    Warm(crate::warm_cmd::WarmArgs),
    /// Boot an image, a disk of the host's or an installer ISO with a writable disk, run a
    /// build in it (through the agent, cloud-init user-data or the installer), and package the
    /// result as a new image (prints its sha256).
    Build(Box<crate::build_cmd::BuildArgs>),
    /// Build an image tarball from a disk, a machine.json and optional boot files.
    Pack {
        /// Root disk (raw or any format qemu-img reads; converted to raw).
        #[arg(long)]
        disk: PathBuf,
        /// Format of --disk; detected from its header when omitted.
        #[arg(long, value_name = "FORMAT")]
        disk_format: Option<String>,
        /// Kernel for direct boot (named by machine.json's boot.kernel).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initrd for direct boot (named by machine.json's boot.initrd).
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Machine definition.
        #[arg(long)]
        machine: PathBuf,
        /// Output file (.tar.zst).
        #[arg(short, long)]
        output: PathBuf,
        /// zstd compression level.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
    },
}

/// Where the cache is.
#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    /// Cache directory (default: the configuration's cache.dir).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Worker configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl CacheArgs {
    fn config(&self) -> Result<schemas::WorkerConfig, Outcome> {
        crate::documents::load_config(self.config.as_deref()).map_err(|violations| {
            eprintln!("taskvm: invalid configuration:\n{violations}");
            Outcome::Malformed
        })
    }

    fn settings(&self) -> Result<CacheConfig, Outcome> {
        let mut cache = self.config()?.cache;
        if let Some(dir) = &self.cache {
            cache.dir = dir.clone();
        }
        Ok(cache)
    }
}

/// Runs one `taskvm image` subcommand.
pub fn run(command: ImageCommand) -> Outcome {
    match execute(command) {
        Ok(()) => Outcome::Success,
        Err(outcome) => outcome,
    }
}

fn execute(command: ImageCommand) -> Result<(), Outcome> {
    match command {
        ImageCommand::Fetch {
            reference,
            sha256,
            cache,
        } => {
            let cache = open_cache(&cache)?;
            let request = ImageRequest::parse(&reference, sha256.as_deref())
                .map_err(|error| report(&reference, &error))?;
            let bar = ProgressReporter::new(&reference);
            let (lease, kind) = cache
                .fetch(&request, &|progress| bar.update(progress))
                .map_err(|error| report(&reference, &error))?;
            bar.finish();
            if kind == FetchKind::Downloaded {
                if let Err(error) = cache.gc_configured() {
                    eprintln!("taskvm: warning: garbage collection failed: {error}");
                }
            }
            println!("{} {}", lease.digest(), lease.dir().display());
            Ok(())
        }
        ImageCommand::Ls { cache } => {
            let cache = open_cache(&cache)?;
            let entries = cache.list().map_err(|error| report("cache", &error))?;
            println!(
                "{:<71}  {:>10}  {:<20}  {:<6}  REFERENCES",
                "DIGEST", "SIZE", "LAST USED", "IN USE"
            );
            for entry in entries {
                let age = entry.last_used.elapsed().map_or(0, |d| d.as_secs());
                println!(
                    "{:<71}  {:>10}  {:<20}  {:<6}  {}",
                    entry.digest.to_string(),
                    human_size(entry.allocated_bytes),
                    format!("{} ago", human_duration(age)),
                    match (entry.in_use, entry.pinned) {
                        (true, _) => "yes",
                        (false, true) => "kept",
                        (false, false) => "no",
                    },
                    entry.references.join(" ")
                );
            }
            Ok(())
        }
        ImageCommand::Gc {
            max_size,
            min_free,
            cache,
            state,
        } => {
            let state_dir = match state {
                Some(state) => state,
                None => cache.config()?.state_dir,
            };
            let cache = open_cache(&cache)?;
            let max_size = max_size.unwrap_or(cache.limits().max_size);
            let min_free = min_free.unwrap_or(cache.limits().min_free);
            let report_gc = cache
                .gc(max_size, min_free)
                .map_err(|error| report("cache", &error))?;
            for (digest, bytes) in &report_gc.removed {
                println!("removed {digest} ({})", human_size(*bytes));
            }
            // Snapshots of removed images go with them.
            let snapshots = engine::snapshot::store::snapshots_dir(&state_dir);
            let swept = engine::snapshot::store::sweep_snapshots(&snapshots);
            if swept > 0 {
                println!("removed {swept} snapshot(s) of removed images");
            }
            println!(
                "cache {} (max {}), {} free (min {}), {} in use kept, {} kept for kept VMs",
                human_size(report_gc.cache_bytes),
                human_size(max_size),
                human_size(report_gc.free_bytes),
                human_size(min_free),
                report_gc.skipped_in_use,
                report_gc.skipped_pinned
            );
            Ok(())
        }
        ImageCommand::Verify { file, cache } => {
            let settings = cache.settings()?;
            let name = file.display().to_string();
            let bar = ProgressReporter::new(&name);
            let streamed = verify_file(&file, &std::env::temp_dir(), &settings, &|p| bar.update(p))
                .map_err(|error| report(&name, &error))?;
            bar.finish();
            println!("ok {}", streamed.digest);
            Ok(())
        }
        ImageCommand::Warm(args) => match crate::warm_cmd::run(args) {
            Outcome::Success => Ok(()),
            failed => Err(failed),
        },
        ImageCommand::Build(args) => match crate::build_cmd::run(*args) {
            Outcome::Success => Ok(()),
            failed => Err(failed),
        },
        ImageCommand::Pack {
            disk,
            disk_format,
            kernel,
            initrd,
            machine,
            output,
            level,
        } => {
            let inputs = PackInputs {
                disk,
                disk_format,
                machine,
                kernel,
                initrd,
                level,
            };
            let digest = pack(&inputs, &output)
                .map_err(|error| report(&output.display().to_string(), &error))?;
            println!("{digest}");
            Ok(())
        }
    }
}

fn open_cache(args: &CacheArgs) -> Result<Cache, Outcome> {
    let settings = args.settings()?;
    let dir = settings.dir.display().to_string();
    Cache::open(settings).map_err(|error| report(&dir, &error))
}

/// Prints the one-line error and chooses the exit code: a bad image or reference is
/// malformed (2), anything else internal (3).
fn report(subject: &str, error: &ImageError) -> Outcome {
    eprintln!("taskvm: image {subject}: {error}");
    if lifecycle::image_error_is_the_payloads(error) {
        Outcome::Malformed
    } else {
        Outcome::Internal
    }
}

/// A progress bar on a terminal; otherwise a line per tenth, but only for transfers that take
/// long enough to need one (nothing before 2 s, then at most a line every 2 s).
struct ProgressReporter {
    bar: Option<ProgressBar>,
    name: String,
    started: std::time::Instant,
    last_line: std::sync::Mutex<(u64, std::time::Instant)>,
}

impl ProgressReporter {
    fn new(name: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_message(name.to_owned());
            bar
        });
        let now = std::time::Instant::now();
        ProgressReporter {
            bar,
            name: name.to_owned(),
            started: now,
            last_line: std::sync::Mutex::new((0, now)),
        }
    }

    fn update(&self, progress: Progress) {
        if let Some(bar) = &self.bar {
            if let Some(total) = progress.total {
                bar.set_length(total);
            }
            bar.set_position(progress.bytes);
        } else if let Some(total) = progress.total.filter(|t| *t > 0) {
            let pause = std::time::Duration::from_secs(2);
            let tenth = progress.bytes * 10 / total;
            let Ok(mut last) = self.last_line.lock() else {
                return;
            };
            if tenth > last.0 && self.started.elapsed() >= pause && last.1.elapsed() >= pause {
                *last = (tenth, std::time::Instant::now());
                eprintln!(
                    "taskvm: {}: {}% of {}",
                    self.name,
                    tenth * 10,
                    human_size(total)
                );
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
