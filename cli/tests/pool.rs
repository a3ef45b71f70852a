//! The warm pool through the lifecycle library, in one process as a long-running worker uses
//! it (root only: real VMs under TCG on their own networks).

use std::sync::Arc;
use std::time::Duration;

use lifecycle::host::Host;
use lifecycle::log::{Echo, TaskLog};
use lifecycle::resolution::Resolution;
use lifecycle::{run_task, TaskOutcome, TaskRequest};
use schemas::config::{Accel, CacheConfig, ImageSourceConfig};
use schemas::{parse_payload, WorkerConfig};
use testkit::guest::minimal_image;

async fn run(host: &Arc<Host>, scratch: &std::path::Path, name: &str) -> (TaskOutcome, String) {
    let payload = parse_payload(&serde_json::json!({
        "image": format!("file://{}", minimal_image().canonicalize().unwrap().display()),
        "command": ["sh", "-c", "echo first; echo id=$(cat /etc/machine-id)"],
        "maxRunTime": 60,
    }))
    .unwrap();
    let dir = scratch.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let log = TaskLog::create(&dir.join("live.log"), Echo::Quiet).unwrap();
    let (_stop, stop_signal) = tokio::sync::watch::channel(None);
    let request = TaskRequest::new(
        payload,
        format!("{name}-{}", std::process::id()),
        dir.clone(),
    );
    let outcome = run_task(host.clone(), request, &log, stop_signal).await;
    (
        outcome,
        std::fs::read_to_string(dir.join("live.log")).unwrap(),
    )
}

async fn wait_for_ready(host: &Host) {
    for _ in 0..600 {
        if host.pool.ready() == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the pool did not fill");
}

/// CPU ticks (user + system) QEMU used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_pool_hands_out_paused_vms_that_cost_no_cpu_while_they_wait() {
    let scratch = testkit::process::root_scratch("VMs need root");
    let config = WorkerConfig {
        cache: CacheConfig {
            dir: scratch.path().join("cache"),
            ..CacheConfig::default()
        },
        state_dir: scratch.path().join("state"),
        accel: Accel::Tcg,
        warm_pool: 1,
        // A long-running worker takes file images only from directories it is told of.
        images: ImageSourceConfig {
            file_dirs: vec![testkit::guest::test_images_dir()],
        },
        ..WorkerConfig::default()
    };
    let host = Arc::new(Host::prepare(config, &|_| {}).unwrap());

    let (first, first_log) = run(&host, scratch.path(), "first").await;
    assert_eq!(
        first.ending.resolution,
        Resolution::Completed,
        "{first_log}"
    );
    assert!(first_log.contains("(start snapshot, "), "{first_log}");
    wait_for_ready(&host).await;
    let [pid] = host.pool.pids().try_into().unwrap();
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    assert!(used <= 5, "a paused VM used {used} ticks in 2 s");
    println!("pool memory: {} MiB", host.pool.resident_bytes() >> 20);

    let (second, second_log) = run(&host, scratch.path(), "second").await;
    assert_eq!(
        second.ending.resolution,
        Resolution::Completed,
        "{second_log}"
    );
    assert!(second_log.contains("(start pool, "), "{second_log}");
    let id = |log: &str| {
        log.lines()
            .find_map(|line| line.strip_prefix("id="))
            .unwrap()
            .to_owned()
    };
    assert_ne!(
        id(&first_log),
        id(&second_log),
        "a pooled VM gets its own machine-id"
    );
    println!(
        "pool start -> first output {:?}; {}",
        second.timings.first_output.unwrap(),
        second_log.lines().last().unwrap_or_default()
    );
    wait_for_ready(&host).await; // replaced in the background

    let pids = host.pool.pids();
    drop(host);
    for pid in pids {
        // Killed is what counts: a killed QEMU may stay a zombie (state Z) until tokio's
        // best-effort reaper of dropped children gets to it.
        let dead = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            matches!(process_state(pid), None | Some('Z'))
        });
        assert!(
            dead,
            "a pooled VM outlived its pool (state {:?})",
            process_state(pid)
        );
        if process_state(pid).is_some() {
            println!("pooled VM {pid} killed, not yet reaped");
        }
    }
}

/// The state letter of process `pid` (R, S, Z, …), None when it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}
