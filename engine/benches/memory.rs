//! `make bench`: what a restored VM costs in memory and time, with its RAM in the snapshot's
//! `ram.bin` mapped private (today's layout) against RAM in the migration stream (the layout
//! before), both measured in this run on snapshots of the minimal image (TCG, 256 MiB):
//! - restore → resumed, the two placements interleaved;
//! - resident (RSS) and proportional (PSS, `/proc/PID/smaps_rollup`) memory of each QEMU while
//!   `TASKVM_BENCH_COPIES` (default 8) restored copies run idle at once, and what the host holds
//!   besides them (the shared memory file, once per snapshot).
//!
//! `TASKVM_BENCH_ROUNDS` sets the restore rounds (default 10) and the rounds of idle copies
//! (a tenth of it, at least 2). `TASKVM_BENCH_DENSITY=N` also restores up to N idle copies at
//! once (RAM file) until one fails, and reports how many ran and what they held. Needs root
//! (VM networks).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use engine::network::NetworkSettings;
use engine::qemu::process::lookup_user;
use engine::sandbox::cgroup::CgroupHost;
use engine::snapshot::{build_as, SavedRam};
use engine::{Accelerator, Netdev, VirtualMachine, VmSettings};
use image_manager::{Cache, ImageRequest, Lease};
use schemas::config::CacheConfig;
use schemas::{resolve_machine, MachineLayers, MachineLimits, ResolvedMachine};
use testkit::guest::{host_tsc_khz, minimal_image};
use testkit::stats::percentile;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if !rustix::process::geteuid().is_root() {
        println!("memory benchmark: skipped (needs root)");
        return;
    }
    let number = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = number("TASKVM_BENCH_ROUNDS", 10);
    let copies = number("TASKVM_BENCH_COPIES", 8);
    let scratch = tempfile::tempdir().expect("scratch");
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let cache = Cache::open(CacheConfig {
        dir: scratch.path().join("cache"),
        ..CacheConfig::default()
    })
    .expect("cache");
    let lease = || -> Lease {
        let path = minimal_image();
        let request = ImageRequest::parse(path.to_str().expect("path"), None).expect("ref");
        cache.fetch(&request, &|_| {}).expect("fetch").0
    };
    let machine = resolved(&lease());
    let settings = |name: String| VmSettings {
        runtime_parent: scratch.path().join("run"),
        name,
        accelerator: Accelerator::Tcg,
        jail: Some(engine::sandbox::jail::JailSettings::default()),
        run_as: Some(lookup_user("nobody").expect("nobody")),
        netdev: Netdev::RestrictedUser,
        qemu: "qemu-system-x86_64".into(),
        tsc_khz: host_tsc_khz(),
        cgroups: CgroupHost::detect().ok(),
        network: Some(NetworkSettings::default()),
        drives: Vec::new(),
        max_file_size: None,
        max_console_size: None,
        start_timeout: Duration::from_secs(10),
        state_dir: None,
    };
    println!(
        "memory benchmark: {rounds} restores of each placement, {copies} idle copies at once, \
         TCG, minimal image, {} MiB",
        machine.memory_mib()
    );

    let placements = [
        ("RAM file", SavedRam::File),
        ("in stream", SavedRam::Stream),
    ];
    let mut snapshots = Vec::new();
    for (label, ram) in placements {
        let dir = scratch.path().join(format!("snapshot-{ram:?}"));
        let snapshot = build_as(
            ram,
            lease(),
            &machine,
            &settings(format!("mem-build-{ram:?}")),
            &dir,
            Duration::from_secs(90),
        )
        .await
        .expect("snapshot");
        let size = |path: std::path::PathBuf| std::fs::metadata(path).map_or(0, |m| m.len());
        let held = std::fs::metadata(snapshot.ram_path()).map_or(0, |m| m.blocks() * 512);
        println!(
            "{label:>9}: state.bin {:6.1} MiB, ram.bin {:6.1} MiB of data",
            mib(size(snapshot.state_path())),
            mib(held)
        );
        snapshots.push((label, snapshot, held));
    }

    let mut restores = vec![Vec::new(); snapshots.len()];
    for round in 0..rounds {
        for (index, (_, snapshot, _)) in snapshots.iter().enumerate() {
            let started = Instant::now();
            let mut vm = VirtualMachine::restore(
                lease(),
                &machine,
                &settings(format!("mem-restore-{round}-{index}")),
                snapshot,
            )
            .await
            .expect("restore");
            restores[index].push(started.elapsed());
            vm.kill().await;
        }
    }
    for ((label, _, _), times) in snapshots.iter().zip(&restores) {
        println!(
            "{label:>9}: restore -> resumed median {:6.1} ms  p95 {:6.1} ms",
            ms(percentile(times, 50)),
            ms(percentile(times, 95))
        );
    }
    println!(
        "restore, RAM file vs in stream: {:.2}x the time",
        percentile(&restores[0], 50).as_secs_f64() / percentile(&restores[1], 50).as_secs_f64()
    );

    let idle_rounds = (rounds / 10).max(2);
    let mut pss = vec![Vec::new(); snapshots.len()];
    for round in 0..idle_rounds {
        for (index, (label, snapshot, held)) in snapshots.iter().enumerate() {
            let mut vms = Vec::new();
            for copy in 0..copies {
                vms.push(
                    VirtualMachine::restore(
                        lease(),
                        &machine,
                        &settings(format!("mem-idle-{round}-{index}-{copy}")),
                        snapshot,
                    )
                    .await
                    .expect("restore"),
                );
            }
            // Idle: the agents wait for a task that never comes.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let mut round_pss = Vec::new();
            let mut round_rss = Vec::new();
            for vm in &vms {
                let (rss, proportional) = rollup(vm.pid());
                round_rss.push(rss);
                round_pss.push(proportional);
            }
            let total: u64 = round_pss.iter().sum::<u64>() + held;
            println!(
                "{label:>9}, round {round}: {copies} idle copies, per QEMU RSS median {:6.1} MiB, \
                 PSS median {:6.1} MiB p95 {:6.1} MiB; all of them with the memory file: {:7.1} MiB",
                mib(median(&round_rss)),
                mib(median(&round_pss)),
                mib(percentile_u64(&round_pss, 95)),
                mib(total)
            );
            pss[index].extend(round_pss);
            for mut vm in vms {
                vm.kill().await;
            }
        }
    }
    let (file, stream) = (median(&pss[0]), median(&pss[1]));
    println!(
        "PSS per idle copy ({} samples each): RAM file {:.1} MiB vs in stream {:.1} MiB: {:.2}x \
         (goal <= 0.5x)",
        pss[0].len(),
        mib(file),
        mib(stream),
        file as f64 / stream as f64
    );

    let density = number("TASKVM_BENCH_DENSITY", 0);
    if density > 0 {
        let (_, snapshot, held) = &snapshots[0];
        let before = mem_available();
        let started = Instant::now();
        let mut vms = Vec::new();
        let mut failure = None;
        for copy in 0..density {
            let restored = VirtualMachine::restore(
                lease(),
                &machine,
                &settings(format!("mem-dense-{copy}")),
                snapshot,
            )
            .await;
            match restored {
                Ok(vm) => vms.push(vm),
                Err(error) => {
                    failure = Some(error.to_string());
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut alive = 0;
        let mut total_pss = *held;
        for vm in &mut vms {
            if vm.status().await.is_ok_and(|(running, _)| running) {
                alive += 1;
            }
            total_pss += rollup(vm.pid()).1;
        }
        println!(
            "density: {} of {density} idle copies restored in {:.0} s ({}), {alive} running \
             after 5 s; PSS of all with the memory file {:.0} MiB ({:.1} MiB each); the host's \
             available memory went from {:.0} to {:.0} MiB",
            vms.len(),
            started.elapsed().as_secs_f64(),
            failure.as_deref().unwrap_or("no failure"),
            mib(total_pss),
            mib(total_pss) / vms.len().max(1) as f64,
            mib(before),
            mib(mem_available())
        );
        for mut vm in vms {
            vm.kill().await;
        }
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn mem_available() -> u64 {
    kib_field(
        &std::fs::read_to_string("/proc/meminfo").unwrap_or_default(),
        "MemAvailable:",
    )
}

/// The value of the `NAME: N kB` line `field` of a `/proc` file's `text`, in bytes (0 when absent).
fn kib_field(text: &str, field: &str) -> u64 {
    engine::host::procfs::field_number(text, field).map_or(0, |kib| kib * 1024)
}

fn resolved(lease: &Lease) -> ResolvedMachine {
    resolve_machine(
        MachineLayers {
            image: Some(lease.machine()),
            ..MachineLayers::default()
        },
        &MachineLimits {
            max_memory: 1024,
            max_cpus: 1,
            default_threads: 1,
        },
    )
    .expect("machine")
}

/// (RSS, PSS) of process `pid` in bytes.
fn rollup(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("smaps_rollup");
    (kib_field(&text, "Rss:"), kib_field(&text, "Pss:"))
}

fn median(values: &[u64]) -> u64 {
    percentile_u64(values, 50)
}

fn percentile_u64(values: &[u64], percent: usize) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted
        .get((sorted.len().saturating_sub(1)) * percent / 100)
        .copied()
        .unwrap_or(0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
