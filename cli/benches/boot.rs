//! `make bench`: boot-to-ready of the minimal test image under TCG, against a bare boot of the
//! same kernel (busybox as init, printing a marker at once) with the same QEMU arguments, in
//! the same run, alternating. Prints median, max, hangs and the agent's overhead.
//!
//! `TASKVM_BENCH_BOOTS` sets the number of boots of each kind (default 10).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use image_manager::{Cache, ImageRequest};
use schemas::config::CacheConfig;
use testkit::guest::{minimal_image, tcg_argv, time_to_marker, BootFiles};
use testkit::stats::median;

/// A boot that has not reached its marker by then counts as a hang.
const HANG: Duration = Duration::from_secs(30);

fn main() {
    let boots: usize = std::env::var("TASKVM_BENCH_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let scratch = tempfile::tempdir().expect("scratch");
    let cache = Cache::open(CacheConfig {
        dir: scratch.path().join("cache"),
        ..CacheConfig::default()
    })
    .expect("cache");
    let image = minimal_image();
    let compressed = std::fs::metadata(&image).expect("image").len();
    let (lease, _) = cache
        .fetch(
            &ImageRequest::parse(image.to_str().expect("path"), None).expect("request"),
            &|_| {},
        )
        .expect("fetch");
    let bare_initrd = image.with_file_name("bare-initrd.img");
    let kernel = lease.kernel_path().expect("kernel");
    let initrd = lease.initrd_path().expect("initrd");
    let append = lease
        .machine()
        .boot
        .as_ref()
        .and_then(|b| b.append.clone())
        .unwrap_or_default();
    println!(
        "boot benchmark: minimal image {:.1} MiB compressed (goal <= 30 MiB), {boots} boots each, TCG",
        compressed as f64 / 1048576.0
    );

    let mut agent = Vec::new();
    let mut bare = Vec::new();
    let (mut agent_hangs, mut bare_hangs) = (0, 0);
    for round in 0..boots {
        let overlay = scratch.path().join(format!("overlay-{round}.qcow2"));
        make_overlay(&lease.disk_path(), &overlay);
        let files = BootFiles {
            kernel: &kernel,
            initrd: &bare_initrd,
            disk: &overlay,
            append: &append,
        };
        match boot_to(&files, "taskvm-bare: ready") {
            Some(time) => bare.push(time),
            None => bare_hangs += 1,
        }
        let files = BootFiles {
            initrd: &initrd,
            ..files
        };
        match boot_to(&files, "taskvm-agent: ready") {
            Some(time) => agent.push(time),
            None => agent_hangs += 1,
        }
        let _ = std::fs::remove_file(&overlay);
    }
    let (agent_median, bare_median) = (median(&agent), median(&bare));
    println!(
        "spawn -> taskvm-agent: ready   median {:.3} s  max {:.3} s  hangs {agent_hangs}/{boots}",
        agent_median.as_secs_f64(),
        agent
            .iter()
            .max()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
    );
    println!(
        "spawn -> bare busybox marker   median {:.3} s  max {:.3} s  hangs {bare_hangs}/{boots}",
        bare_median.as_secs_f64(),
        bare.iter().max().copied().unwrap_or_default().as_secs_f64()
    );
    println!(
        "agent image over bare boot: {:.2}x (+{:.0} %; goal <= +10 %), boot-to-ready goal <= 1.2 s median",
        agent_median.as_secs_f64() / bare_median.as_secs_f64(),
        (agent_median.as_secs_f64() / bare_median.as_secs_f64() - 1.0) * 100.0
    );
}

fn make_overlay(base: &Path, overlay: &Path) {
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay)
        .status()
        .expect("qemu-img");
    assert!(status.success());
}

/// Boots `files` and returns the time until `marker` appears on the serial console.
fn boot_to(files: &BootFiles<'_>, marker: &str) -> Option<Duration> {
    time_to_marker(&tcg_argv(files, "user,id=n0,restrict=on"), marker, HANG)
}
