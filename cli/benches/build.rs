//! `make bench`: `taskvm image build` from the minimal image, in one run:
//!
//! - the build's stages (boot, script, package) as `taskvm image build` reports them, for a
//!   script that writes 64 MiB of random data;
//! - packaging throughput on one overlay (64 MiB of random data written over the cached base
//!   with `qemu-io`): taskvm's writer (flatten + tar + zstd + sha256, as `build` runs it)
//!   against `qemu-img convert -O raw` followed by `zstd -T0` of the same overlay.
//!
//! Needs root (the build boots a VM on its own network).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use image_manager::{pack, Cache, ImageRequest, PackInputs};
use schemas::config::CacheConfig;
use testkit::guest::minimal_image;
use testkit::stats::median;

fn main() {
    if !rustix::process::geteuid().is_root() {
        println!("build benchmark skipped: taskvm image build needs root");
        return;
    }
    let scratch = testkit::process::root_scratch("VMs need root");
    let base = minimal_image().canonicalize().expect("image");
    println!("build benchmark: minimal image, TCG");

    // The build, stage by stage.
    let script = scratch.path().join("build.sh");
    std::fs::write(
        &script,
        "head -c 67108864 /dev/urandom > /data.bin; sync; echo written\n",
    )
    .expect("script");
    let output = scratch.path().join("built.tar.zst");
    let started = Instant::now();
    let built = Command::new(env!("CARGO_BIN_EXE_taskvm"))
        .args([
            "image",
            "build",
            "--from",
            base.to_str().expect("path"),
            "-o",
        ])
        .arg(&output)
        .arg("--script")
        .arg(&script)
        .arg("--cache")
        .arg(scratch.path().join("cache"))
        .arg("--state")
        .arg(scratch.path().join("state"))
        .args(["--accel", "tcg"])
        .output()
        .expect("taskvm image build");
    let wall = started.elapsed();
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "{stderr}");
    let stage = |marker: &str| {
        stderr
            .lines()
            .find_map(|line| line.split(marker).nth(1))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|seconds| seconds.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    println!(
        "stages: boot {:.2} s, script {:.2} s, package {:.2} s; whole command {:.2} s ({} MB image)",
        stage("booted in "),
        stage("the build ran in "),
        stage("packaged in "),
        wall.as_secs_f64(),
        std::fs::metadata(&output).map_or(0, |meta| meta.len()) / 1_000_000
    );

    // Packaging throughput on one overlay.
    let cache = Cache::open(CacheConfig {
        dir: scratch.path().join("pack-cache"),
        ..CacheConfig::default()
    })
    .expect("cache");
    let request = ImageRequest::parse(base.to_str().expect("path"), None).expect("request");
    let (lease, _) = cache.fetch(&request, &|_| {}).expect("fetch");
    let overlay = scratch.path().join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(lease.disk_path())
        .arg(&overlay));
    let random = scratch.path().join("random.bin");
    run(Command::new("head")
        .args(["-c", "67108864", "/dev/urandom"])
        .stdout(std::fs::File::create(&random).expect("random")));
    let pattern = format!("write -s {} 1048576 64M", random.display());
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &pattern])
        .arg(&overlay)
        .stdout(std::process::Stdio::null()));
    let machine = scratch.path().join("machine.json");
    std::fs::write(&machine, serde_json::to_vec(lease.machine()).expect("json")).expect("write");
    let disk_bytes = image_manager::qemu_img::info(&overlay, "qcow2")
        .expect("info")
        .virtual_size;
    let mut ours = Vec::new();
    let mut baseline = Vec::new();
    for round in 0..3 {
        let out = scratch.path().join(format!("ours-{round}.tar.zst"));
        let inputs = PackInputs {
            disk: overlay.clone(),
            disk_format: Some("qcow2".into()),
            machine: machine.clone(),
            kernel: lease.kernel_path(),
            initrd: lease.initrd_path(),
            level: 3,
        };
        let started = Instant::now();
        pack(&inputs, &out).expect("pack");
        ours.push(started.elapsed());
        let _ = std::fs::remove_file(&out);
        baseline.push(convert_and_compress(&overlay, scratch.path()));
    }
    let (ours, baseline) = (median(&ours), median(&baseline));
    let rate = |took: Duration| disk_bytes as f64 / took.as_secs_f64() / 1e6;
    println!(
        "package {} MB disk: taskvm {:.2} s ({:.0} MB/s) vs qemu-img convert -O raw + zstd -T0 \
         {:.2} s ({:.0} MB/s) -> {:.2}x the baseline's throughput (goal >= 0.9x)",
        disk_bytes / 1_000_000,
        ours.as_secs_f64(),
        rate(ours),
        baseline.as_secs_f64(),
        rate(baseline),
        baseline.as_secs_f64() / ours.as_secs_f64()
    );
}

fn run(command: &mut Command) {
    let status = command.status().expect("spawn");
    assert!(status.success(), "{command:?}");
}

fn convert_and_compress(overlay: &Path, scratch: &Path) -> Duration {
    let raw = scratch.join("baseline.raw");
    let compressed = scratch.join("baseline.raw.zst");
    let started = Instant::now();
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
        .arg(overlay)
        .arg(&raw));
    run(Command::new("zstd")
        .args(["-q", "-f", "-T0", "-3"])
        .arg(&raw)
        .arg("-o")
        .arg(&compressed));
    let took = started.elapsed();
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_file(&compressed);
    took
}
