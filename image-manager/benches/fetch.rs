//! `make bench` for the image cache. Measures, in one run on this machine:
//!
//! - cold fetch of a ~1 GiB image (half zeros, half random) over loopback HTTP into an empty
//!   cache, against the baseline `curl -s URL | zstd -dc | tar -xS` into a scratch directory
//!   followed by `sync -f` since the cache fsyncs what it commits (goal: ≥ 0.9× the
//!   baseline's throughput);
//! - a cache hit: leasing an already cached, pinned image (goal: ≤ 20 ms).
//!
//! Each side runs `ROUNDS` times, alternating, and the medians are compared.
//! `TASKVM_BENCH_IMAGE_MIB` changes the image size (default 1024).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use image_manager::{pack, Cache, ImageRequest, PackInputs};
use schemas::config::CacheConfig;
use testkit::http::{Behaviour, Server};
use testkit::stats::median;

const ROUNDS: usize = 3;

fn main() {
    let mib: usize = std::env::var("TASKVM_BENCH_IMAGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let scratch = tempfile::Builder::new()
        .prefix("taskvm-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("scratch dir");
    println!("image-manager benchmark: {mib} MiB disk (half zeros, half random), {ROUNDS} rounds");

    let image_path = build_image(scratch.path(), mib);
    let bytes = std::fs::read(&image_path).expect("read image");
    let compressed = bytes.len() as f64;
    let unpacked = (mib as f64) * 1024.0 * 1024.0;
    println!("packed: {:.1} MiB compressed", compressed / 1048576.0);
    let server = Server::start();
    server.route("/image.tar.zst", Behaviour::Normal(bytes));
    let url = server.url("/image.tar.zst");

    let mut ours = Vec::new();
    let mut baseline = Vec::new();
    for round in 0..ROUNDS {
        baseline.push(run_baseline(
            &url,
            &scratch.path().join(format!("baseline-{round}")),
        ));
        ours.push(run_ours(
            &url,
            &scratch.path().join(format!("cache-{round}")),
        ));
    }
    let (ours, baseline) = (median(&ours), median(&baseline));
    let rate = |d: Duration| unpacked / d.as_secs_f64() / 1048576.0;
    println!(
        "cold fetch:  taskvm {:.2} s ({:.0} MiB/s unpacked)   baseline curl|zstd|tar {:.2} s ({:.0} MiB/s)",
        ours.as_secs_f64(),
        rate(ours),
        baseline.as_secs_f64(),
        rate(baseline)
    );
    let ratio = baseline.as_secs_f64() / ours.as_secs_f64();
    println!("cold fetch throughput ratio (taskvm / baseline): {ratio:.2}x  (goal >= 0.90x)");

    let hit = cache_hit(&url, &scratch.path().join("cache-0"));
    println!(
        "cache hit (pinned, leased): median {:.2} ms  (goal <= 20 ms)",
        hit.as_secs_f64() * 1000.0
    );
}

fn build_image(dir: &Path, mib: usize) -> std::path::PathBuf {
    let disk = dir.join("disk.raw");
    let half = (mib / 2) as u64 * 1048576;
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {half} /dev/urandom > '{0}' && truncate -s {1} '{0}'",
            disk.display(),
            half * 2
        ))
        .status()
        .expect("make disk");
    assert!(status.success());
    let machine = dir.join("machine.json");
    std::fs::write(&machine, br#"{"version": 1}"#).expect("machine.json");
    let out = dir.join("image.tar.zst");
    let inputs = PackInputs {
        disk: disk.clone(),
        disk_format: Some("raw".into()),
        machine,
        kernel: None,
        initrd: None,
        level: 3,
    };
    pack(&inputs, &out).expect("pack");
    std::fs::remove_file(disk).expect("remove raw disk");
    out
}

fn run_baseline(url: &str, dest: &Path) -> Duration {
    std::fs::create_dir_all(dest).expect("baseline dir");
    let started = Instant::now();
    // `sync -f` because the cache fsyncs what it commits: both sides pay for durability.
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "curl -sf '{url}' | zstd -dcq | tar -xS -C '{0}' && sync -f '{0}'",
            dest.display()
        ))
        .status()
        .expect("run baseline");
    let elapsed = started.elapsed();
    assert!(status.success(), "baseline pipeline failed");
    std::fs::remove_dir_all(dest).ok();
    elapsed
}

fn run_ours(url: &str, dir: &Path) -> Duration {
    let cache = Cache::open(CacheConfig {
        dir: dir.to_path_buf(),
        max_size: u64::MAX,
        min_free: 0,
        ..CacheConfig::default()
    })
    .expect("open cache");
    let request = ImageRequest::parse(url, None).expect("request");
    let started = Instant::now();
    let (lease, _) = cache.fetch(&request, &|_| {}).expect("fetch");
    let elapsed = started.elapsed();
    drop(lease);
    elapsed
}

fn cache_hit(url: &str, dir: &Path) -> Duration {
    let cache = Cache::open(CacheConfig {
        dir: dir.to_path_buf(),
        ..CacheConfig::default()
    })
    .expect("open cache");
    let (lease, _) = cache
        .fetch(&ImageRequest::parse(url, None).expect("request"), &|_| {})
        .expect("fetch");
    let pinned = ImageRequest::parse(url, Some(lease.digest().hex())).expect("pinned request");
    drop(lease);
    let times: Vec<Duration> = (0..20)
        .map(|_| {
            let started = Instant::now();
            let (lease, _) = cache.fetch(&pinned, &|_| {}).expect("hit");
            let elapsed = started.elapsed();
            drop(lease);
            elapsed
        })
        .collect();
    median(&times)
}
