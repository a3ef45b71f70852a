//! `make bench`: `taskvm run` end to end under TCG, measured in one run against a baseline.
//!
//! - warm cache: from starting `taskvm run` to the guest's first output on stdout, and to the
//!   process's exit (the resolution), over `TASKVM_BENCH_TASKS` tasks (default 10);
//! - cold cache: the same with an empty cache each time (the image is fetched and unpacked
//!   from a local file);
//! - snapshot: warm cache, the VM restored from the image's snapshot (`--start snapshot`, the
//!   snapshot made before the series);
//! - baseline: bare `qemu-system-x86_64` with the same kernel, initrd and disk (hand-written
//!   argv, no sandbox, no network namespace) to the agent's `ready` marker;
//! - QEMU's resident memory in a booted and in a restored VM.
//!
//! Needs root (`taskvm run` gives each VM a network namespace).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use image_manager::{Cache, ImageRequest};
use schemas::config::CacheConfig;
use testkit::guest::{minimal_image, tcg_argv, time_to_marker, BootFiles};
use testkit::stats::percentile;

struct Task {
    first_output: Duration,
    resolved: Duration,
}

fn main() {
    if !rustix::process::geteuid().is_root() {
        println!("run benchmark skipped: taskvm run needs root");
        return;
    }
    let tasks = testkit::stats::bench_rounds();
    let scratch = testkit::process::root_scratch("VMs need root");
    let image = minimal_image().canonicalize().expect("image");
    let payload = scratch.path().join("task.json");
    std::fs::write(
        &payload,
        format!(
            r#"{{"image": "file://{}", "command": ["echo", "first output"], "maxRunTime": 60}}"#,
            image.display()
        ),
    )
    .expect("payload");
    println!("run benchmark: {tasks} tasks each, TCG, minimal image, `echo first output`");

    let warm_cache = scratch.path().join("warm-cache");
    run_task(&payload, &warm_cache, scratch.path(), "snapshot"); // fills the cache, makes the snapshot
    let mut warm = Vec::new();
    let mut cold = Vec::new();
    let mut restored = Vec::new();
    let mut bare = Vec::new();
    let baseline = Baseline::new(&image, scratch.path());
    for round in 0..tasks {
        warm.push(run_task(&payload, &warm_cache, scratch.path(), "boot"));
        let cold_cache = scratch.path().join(format!("cold-cache-{round}"));
        cold.push(run_task(&payload, &cold_cache, scratch.path(), "boot"));
        let _ = std::fs::remove_dir_all(&cold_cache);
        restored.push(run_task(&payload, &warm_cache, scratch.path(), "snapshot"));
        if let Some(time) = baseline.boot(round) {
            bare.push(time);
        }
    }
    report("boot, warm cache", &warm);
    report("boot, cold cache", &cold);
    report("snapshot restore", &restored);
    let bare_median = percentile(&bare, 50);
    println!(
        "bare qemu-system-x86_64 spawn -> agent ready: median {:.3} s, p95 {:.3} s ({} of {tasks} boots)",
        bare_median.as_secs_f64(),
        percentile(&bare, 95).as_secs_f64(),
        bare.len()
    );
    let warm_first = percentile(&warm.iter().map(|t| t.first_output).collect::<Vec<_>>(), 50);
    let ratio = warm_first.as_secs_f64() / bare_median.as_secs_f64();
    println!(
        "warm start -> first output over bare boot: {ratio:.2}x ({:+.0} %; goal <= +10 %); \
         warm first output median {:.3} s (goal <= 1.5 s)",
        (ratio - 1.0) * 100.0,
        warm_first.as_secs_f64()
    );
    let restored_first = percentile(
        &restored.iter().map(|t| t.first_output).collect::<Vec<_>>(),
        50,
    );
    println!(
        "snapshot restore -> first output median {:.3} s (goal <= 0.4 s): {:.1}x faster than a \
         boot (goal >= 5x)",
        restored_first.as_secs_f64(),
        warm_first.as_secs_f64() / restored_first.as_secs_f64()
    );
    let (pool_first, pool_rss) = warm_pool_series(tasks, &image, scratch.path());
    println!(
        "warm pool (in one worker process, from the task's start): start -> first output median {:.3} s, p95 {:.3} s (goal <= 50 ms); a paused \
         pooled VM holds {} MiB",
        percentile(&pool_first, 50).as_secs_f64(),
        percentile(&pool_first, 95).as_secs_f64(),
        pool_rss >> 20
    );
    let rss_boot = qemu_rss_kib(
        &payload_sleeping(scratch.path(), &image),
        &warm_cache,
        scratch.path(),
        "boot",
    );
    let rss_restored = qemu_rss_kib(
        &payload_sleeping(scratch.path(), &image),
        &warm_cache,
        scratch.path(),
        "snapshot",
    );
    println!(
        "QEMU resident memory while the task runs: booted {} MiB, restored {} MiB",
        rss_boot / 1024,
        rss_restored / 1024
    );
}

/// `tasks` tasks through the lifecycle in this process with a warm pool of one VM, each taken
/// from the pool once it has refilled; their start -> first output, and the pooled VM's RSS.
fn warm_pool_series(tasks: usize, image: &Path, scratch: &Path) -> (Vec<Duration>, u64) {
    use lifecycle::host::Host;
    use lifecycle::log::{Echo, TaskLog};
    use schemas::config::{Accel, CacheConfig};
    use std::sync::Arc;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let config = schemas::WorkerConfig {
            cache: CacheConfig {
                dir: scratch.join("pool-cache"),
                ..CacheConfig::default()
            },
            state_dir: scratch.join("pool-state"),
            accel: Accel::Tcg,
            warm_pool: 1,
            images: schemas::config::ImageSourceConfig {
                file_dirs: vec![testkit::guest::test_images_dir()],
            },
            ..schemas::WorkerConfig::default()
        };
        let host = Arc::new(Host::prepare(config, &|_| {}).expect("host"));
        let payload = schemas::parse_payload(&serde_json::json!({
            "image": format!("file://{}", image.display()),
            "command": ["echo", "first output"],
            "maxRunTime": 60,
        }))
        .expect("payload");
        let mut firsts = Vec::new();
        let mut rss = 0;
        for round in 0..=tasks {
            while round > 0 && host.pool.ready() == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if round > 0 {
                rss = rss.max(host.pool.resident_bytes());
            }
            let dir = scratch.join(format!("pool-task-{round}"));
            std::fs::create_dir_all(&dir).expect("dir");
            let log = TaskLog::create(&dir.join("live.log"), Echo::Quiet).expect("log");
            let (_stop, stop) = tokio::sync::watch::channel(None);
            let request =
                lifecycle::TaskRequest::new(payload.clone(), format!("pool-{round}"), dir);
            let outcome = lifecycle::run_task(host.clone(), request, &log, stop).await;
            // The first task makes the snapshot and fills the pool; it is not counted.
            if round > 0 {
                assert_eq!(outcome.timings.start, "pool");
                firsts.extend(outcome.timings.first_output);
            }
        }
        (firsts, rss)
    })
}

/// A task that prints and then sleeps, so its VM can be measured.
fn payload_sleeping(scratch: &Path, image: &Path) -> std::path::PathBuf {
    let payload = scratch.join("sleeping.json");
    std::fs::write(
        &payload,
        format!(
            r#"{{"image": "file://{}", "command": ["sh", "-c", "echo up; sleep 3"], "maxRunTime": 60}}"#,
            image.display()
        ),
    )
    .expect("payload");
    payload
}

/// QEMU's VmRSS during a task of `payload` started with `start`.
fn qemu_rss_kib(payload: &Path, cache: &Path, scratch: &Path, start: &str) -> u64 {
    let mut child = taskvm_run(payload, cache, scratch, start);
    let mut stdout = child.stdout.take().expect("stdout");
    let mut byte = [0u8; 1];
    let _ = stdout.read(&mut byte);
    std::thread::sleep(Duration::from_millis(500));
    let rss = std::fs::read_dir(scratch.join("state/vms"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .filter_map(|record| {
            record
                .lines()
                .find_map(|line| line.strip_prefix("pid="))
                .map(str::to_owned)
        })
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| engine::host::procfs::field_number(&status, "VmRSS:"))
        .max()
        .unwrap_or(0);
    let _ = std::io::copy(&mut stdout, &mut std::io::sink());
    let _ = child.wait();
    rss
}

fn taskvm_run(payload: &Path, cache: &Path, scratch: &Path, start: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_taskvm"))
        .arg("run")
        .arg(payload)
        .arg("--cache")
        .arg(cache)
        .arg("--state")
        .arg(scratch.join("state"))
        .arg("--accel")
        .arg("tcg")
        .arg("--start")
        .arg(start)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("taskvm run")
}

/// Runs one task started with `start`; times the first stdout byte and the exit.
fn run_task(payload: &Path, cache: &Path, scratch: &Path, start: &str) -> Task {
    let started = Instant::now();
    let mut child = taskvm_run(payload, cache, scratch, start);
    let (first_output, status) = testkit::process::first_output_of(&mut child, started);
    assert!(status.success(), "the task completed");
    Task {
        first_output,
        resolved: started.elapsed(),
    }
}

fn report(what: &str, tasks: &[Task]) {
    let first: Vec<Duration> = tasks.iter().map(|t| t.first_output).collect();
    let resolved: Vec<Duration> = tasks.iter().map(|t| t.resolved).collect();
    println!(
        "{what}: start -> first output median {:.3} s, p95 {:.3} s; start -> resolved median {:.3} s, p95 {:.3} s",
        percentile(&first, 50).as_secs_f64(),
        percentile(&first, 95).as_secs_f64(),
        percentile(&resolved, 50).as_secs_f64(),
        percentile(&resolved, 95).as_secs_f64(),
    );
}

/// The same kernel, initrd and disk booted by hand, to the agent's ready marker.
struct Baseline {
    lease: image_manager::Lease,
    scratch: std::path::PathBuf,
    _cache: Cache,
}

impl Baseline {
    fn new(image: &Path, scratch: &Path) -> Baseline {
        let cache = Cache::open(CacheConfig {
            dir: scratch.join("baseline-cache"),
            ..CacheConfig::default()
        })
        .expect("cache");
        let request = ImageRequest::parse(image.to_str().expect("path"), None).expect("request");
        let (lease, _) = cache.fetch(&request, &|_| {}).expect("fetch");
        Baseline {
            lease,
            scratch: scratch.to_owned(),
            _cache: cache,
        }
    }

    fn boot(&self, round: usize) -> Option<Duration> {
        let overlay = self.scratch.join(format!("baseline-{round}.qcow2"));
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(self.lease.disk_path())
            .arg(&overlay)
            .status()
            .expect("qemu-img");
        assert!(status.success());
        let append = self
            .lease
            .machine()
            .boot
            .as_ref()
            .and_then(|b| b.append.clone())
            .unwrap_or_default();
        let kernel = self.lease.kernel_path().expect("kernel");
        let initrd = self.lease.initrd_path().expect("initrd");
        let files = BootFiles {
            kernel: &kernel,
            initrd: &initrd,
            disk: &overlay,
            append: &append,
        };
        let argv = tcg_argv(&files, "user,id=n0,restrict=on");
        let time = time_to_marker(&argv, "taskvm-agent: ready", Duration::from_secs(30));
        let _ = std::fs::remove_file(&overlay);
        time
    }
}
