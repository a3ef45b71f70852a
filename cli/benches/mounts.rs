//! `make bench`: what payload `mounts` cost and save, `taskvm run` under TCG, measured in one
//! run against baselines of the same run (`TASKVM_BENCH_TASKS` rounds, default 10):
//!
//! - start → first output of `echo` restored from a snapshot, with two mounts (a writable
//!   cache and read-only content, both warm) against none — the goal is ≤ 50 ms more;
//! - a task reading 100 MiB from a warm cache against a task that gets the same 100 MiB as
//!   content downloaded over loopback HTTP (a new archive each round, so each is fetched,
//!   checked, unpacked and made into a file system), process start → exit.
//!
//! Needs root (`taskvm run` gives each VM a network namespace).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::guest::minimal_image;
use testkit::http::{Behaviour, Server};
use testkit::images::{sha256_file, tar_bytes, zstd_bytes, Entry};
use testkit::stats::percentile;

/// Bytes the cache and content series read.
const BIG: usize = 100 << 20;

fn main() {
    if !rustix::process::geteuid().is_root() {
        println!("mounts benchmark skipped: taskvm run needs root");
        return;
    }
    let rounds = testkit::stats::bench_rounds();
    let scratch = testkit::process::root_scratch("VMs need root");
    let dir = scratch.path();
    let image = minimal_image().canonicalize().expect("image");
    let small = archive(dir, "small", &[("README", b"content\n".to_vec())]);
    let plain = payload(dir, "plain", &image, "echo first output", "");
    let mounted = payload(
        dir,
        "mounted",
        &image,
        "echo first output",
        &format!(
            r#", "mounts": [{{"cache": "deps", "path": "/deps"}},
               {{"content": {{"url": "file://{}", "sha256": "{}"}}, "format": "tar.zst", "path": "/src"}}]"#,
            small.0.display(),
            small.1
        ),
    );
    println!("mounts benchmark: {rounds} rounds, TCG, minimal image, snapshot starts");
    // Snapshots of both kinds made, the cache made, the content unpacked.
    run(&plain, dir);
    run(&mounted, dir);
    let mut none = Vec::new();
    let mut two = Vec::new();
    for _ in 0..rounds {
        none.push(run(&plain, dir).0);
        two.push(run(&mounted, dir).0);
    }
    let (none_median, two_median) = (percentile(&none, 50), percentile(&two, 50));
    report("start -> first output, no mounts", &none);
    report("start -> first output, a cache and content", &two);
    println!(
        "two mounts add {:+.0} ms to the median first output (goal <= 50 ms): {:.2}x",
        (two_median.as_secs_f64() - none_median.as_secs_f64()) * 1000.0,
        two_median.as_secs_f64() / none_median.as_secs_f64()
    );

    let fill = payload(
        dir,
        "fill",
        &image,
        "head -c 104857600 /dev/urandom > /deps/big && sync",
        r#", "mounts": [{"cache": "deps", "path": "/deps"}]"#,
    );
    run(&fill, dir);
    let read_cache = payload(
        dir,
        "read-cache",
        &image,
        "echo first output; dd if=/deps/big of=/dev/null bs=1M 2>&1 | tail -n 1",
        r#", "mounts": [{"cache": "deps", "path": "/deps"}]"#,
    );
    let server = Server::start();
    let mut cached = Vec::new();
    let mut downloaded = Vec::new();
    for round in 0..rounds {
        cached.push(run(&read_cache, dir).1);
        let name = format!("big-{round}");
        let (path, sha256) = archive(dir, &name, &[("big", incompressible(round))]);
        let bytes = std::fs::read(&path).expect("archive");
        let route = format!("/{name}.tar.zst");
        server.route(&route, Behaviour::Normal(bytes));
        let _ = std::fs::remove_file(&path);
        let download = payload(
            dir,
            "download",
            &image,
            "echo first output; dd if=/src/big of=/dev/null bs=1M 2>&1 | tail -n 1",
            &format!(
                r#", "mounts": [{{"content": {{"url": "{}", "sha256": "{sha256}"}}, "format": "tar.zst", "path": "/src"}}]"#,
                server.url(&route)
            ),
        );
        downloaded.push(run(&download, dir).1);
    }
    report("100 MiB read from a warm cache, start -> exit", &cached);
    report(
        "100 MiB as content downloaded over loopback HTTP, start -> exit",
        &downloaded,
    );
    println!(
        "a warm cache is {:.1}x faster than downloading the same 100 MiB",
        percentile(&downloaded, 50).as_secs_f64() / percentile(&cached, 50).as_secs_f64()
    );
}

/// A payload of the minimal image running `script`, with `extra` members.
fn payload(dir: &Path, name: &str, image: &Path, script: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{name}.json"));
    let command = serde_json::to_string(&["sh", "-c", script]).expect("json");
    std::fs::write(
        &path,
        format!(
            r#"{{"image": "file://{}", "command": {command}, "maxRunTime": 600,
                "screenshot": false{extra}}}"#,
            image.display()
        ),
    )
    .expect("payload");
    path
}

/// A tar.zst of `files` under `dir`, and its sha256.
fn archive(dir: &Path, name: &str, files: &[(&str, Vec<u8>)]) -> (PathBuf, String) {
    let entries: Vec<Entry> = files
        .iter()
        .map(|(file, data)| Entry::file(file, data.clone()))
        .collect();
    let path = dir.join(format!("{name}.tar.zst"));
    std::fs::write(&path, zstd_bytes(&tar_bytes(&entries))).expect("archive");
    let sha256 = sha256_file(&path);
    (path, sha256)
}

/// [`BIG`] bytes that zstd cannot shrink, different for each `seed`.
fn incompressible(seed: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ seed as u64;
    let mut bytes = Vec::with_capacity(BIG);
    while bytes.len() < BIG {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes
}

/// Runs one task (snapshot start); its start → first stdout byte and start → exit.
fn run(payload: &Path, dir: &Path) -> (Duration, Duration) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskvm"))
        .arg("run")
        .arg(payload)
        .arg("--cache")
        .arg(dir.join("cache"))
        .arg("--state")
        .arg(dir.join("state"))
        .args(["--accel", "tcg", "--start", "snapshot"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("taskvm run");
    let (first, status) = testkit::process::first_output_of(&mut child, started);
    assert!(status.success(), "{} completed", payload.display());
    (first, started.elapsed())
}

fn report(what: &str, times: &[Duration]) {
    println!(
        "{what}: median {:.3} s, p95 {:.3} s",
        percentile(times, 50).as_secs_f64(),
        percentile(times, 95).as_secs_f64()
    );
}
