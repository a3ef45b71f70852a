//! `make bench` for the engine, measured in one run (TCG, minimal test image):
//! - spawn → QMP ready, and spawn → `taskvm-agent: ready` through `VirtualMachine` (sandbox,
//!   unprivileged user, overlay, QMP) against bare `qemu-system-x86_64` with the same kernel,
//!   initrd, disk and devices to the same marker (the engine's overhead; goal ≤ +10 %);
//! - the jail's cost: start → QMP ready and snapshot restore → resumed, jailed vs unjailed,
//!   interleaved (goal: ≤ +20 ms median to QMP ready, restore unchanged within noise);
//! - overlay creation on a 1 GiB and a 20 GiB sparse base (should be equal);
//! - a screenshot of the display image at 1024×768 through VNC (plus PNG encoding) and
//!   with QMP screendump (goal ≤ 50 ms).
//!
//! `TASKVM_BENCH_BOOTS` sets the number of boots of each kind (default 10).

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use engine::disk::overlay::create_overlay;
use engine::qemu::process::lookup_user;
use engine::sandbox::cgroup::CgroupHost;
use engine::{Accelerator, Netdev, VirtualMachine, VmSettings};
use image_manager::{Cache, ImageRequest};
use schemas::config::CacheConfig;
use schemas::{resolve_machine, MachineLayers, MachineLimits};
use testkit::guest::{
    display_image, flavour_argv, host_tsc_khz, minimal_image, time_to_marker, BootFiles, Flavour,
};

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let boots: usize = std::env::var("TASKVM_BENCH_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let scratch = tempfile::tempdir().expect("scratch");
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let cache = Cache::open(CacheConfig {
        dir: scratch.path().join("cache"),
        ..CacheConfig::default()
    })
    .expect("cache");
    let fetch = |path: std::path::PathBuf| {
        cache
            .fetch(
                &ImageRequest::parse(path.to_str().expect("path"), None).expect("ref"),
                &|_| {},
            )
            .expect("fetch")
            .0
    };
    let limits = MachineLimits {
        max_memory: 1024,
        max_cpus: 1,
        default_threads: 1,
    };
    let settings = |name: String| VmSettings {
        runtime_parent: scratch.path().join("run"),
        name,
        accelerator: Accelerator::Tcg,
        jail: rustix::process::geteuid()
            .is_root()
            .then(engine::sandbox::jail::JailSettings::default),
        run_as: rustix::process::geteuid()
            .is_root()
            .then(|| lookup_user("nobody").expect("nobody")),
        netdev: Netdev::RestrictedUser,
        qemu: "qemu-system-x86_64".into(),
        tsc_khz: host_tsc_khz(),
        cgroups: CgroupHost::detect().ok(),
        network: None,
        drives: Vec::new(),
        max_file_size: None,
        max_console_size: None,
        start_timeout: Duration::from_secs(10),
        state_dir: None,
    };
    println!("engine benchmark: {boots} boots each, TCG, minimal image");

    let (mut to_qmp, mut engine_ready, mut bare_ready) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..boots {
        let lease = fetch(minimal_image());
        let machine = resolve_machine(
            MachineLayers {
                image: Some(lease.machine()),
                ..MachineLayers::default()
            },
            &limits,
        )
        .expect("machine");
        let (kernel, initrd) = (
            lease.kernel_path().expect("kernel"),
            lease.initrd_path().expect("initrd"),
        );
        let append = lease
            .machine()
            .boot
            .as_ref()
            .and_then(|b| b.append.clone())
            .unwrap_or_default();
        let base = lease.disk_path();

        let started = Instant::now();
        let mut vm = VirtualMachine::start(lease, &machine, &settings(format!("bench-{round}")))
            .await
            .expect("start");
        to_qmp.push(started.elapsed());
        if vm
            .wait_for_serial("taskvm-agent: ready", Duration::from_secs(30))
            .await
        {
            engine_ready.push(started.elapsed());
        }
        vm.kill().await;
        drop(vm);

        let overlay = scratch.path().join("bare.qcow2");
        let _ = std::fs::remove_file(&overlay);
        create_overlay(&base, "raw", &overlay).expect("overlay");
        let files = BootFiles {
            kernel: &kernel,
            initrd: &initrd,
            disk: &overlay,
            append: &append,
        };
        let argv = flavour_argv(Flavour::Minimal, &files, "user,id=n0,restrict=on");
        if let Some(time) = time_to_marker(&argv, "taskvm-agent: ready", Duration::from_secs(30)) {
            bare_ready.push(time);
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "start (dir, overlay, spawn) -> QMP ready median {:7.1} ms  p95 {:7.1} ms",
        ms(pct(&to_qmp, 50)),
        ms(pct(&to_qmp, 95))
    );
    println!(
        "spawn -> agent ready (VirtualMachine)  median {:7.1} ms  p95 {:7.1} ms  ({} of {boots})",
        ms(pct(&engine_ready, 50)),
        ms(pct(&engine_ready, 95)),
        engine_ready.len()
    );
    println!(
        "spawn -> agent ready (bare QEMU)       median {:7.1} ms  p95 {:7.1} ms  ({} of {boots})",
        ms(pct(&bare_ready, 50)),
        ms(pct(&bare_ready, 95)),
        bare_ready.len()
    );
    let ratio = pct(&engine_ready, 50).as_secs_f64() / pct(&bare_ready, 50).as_secs_f64();
    println!(
        "engine overhead over bare QEMU: {ratio:.2}x ({:+.0} %; goal <= +10 %)",
        (ratio - 1.0) * 100.0
    );

    jail_overhead(&fetch, &limits, &settings, boots, scratch.path()).await;

    for gib in [1u64, 20] {
        let base = scratch.path().join(format!("base-{gib}.raw"));
        std::fs::File::create(&base)
            .expect("base")
            .set_len(gib << 30)
            .expect("truncate");
        let times: Vec<Duration> = (0..10)
            .map(|i| {
                let overlay = scratch.path().join(format!("ov-{gib}-{i}.qcow2"));
                let started = Instant::now();
                create_overlay(&base, "raw", &overlay).expect("overlay");
                started.elapsed()
            })
            .collect();
        println!(
            "overlay on a {gib:>2} GiB sparse base: median {:.1} ms",
            ms(pct(&times, 50))
        );
    }

    let lease = fetch(display_image());
    let display_limits = MachineLimits {
        max_memory: 512,
        max_cpus: 1,
        default_threads: 1,
    };
    // `vga=0x318` makes the kernel's real-mode setup switch to VESA 1024x768 before it
    // starts, so the screen has the size the goal is stated for.
    let mut display = lease.machine().clone();
    if let Some(boot) = display.boot.as_mut() {
        boot.append = Some(format!(
            "{} vga=0x318",
            boot.append.clone().unwrap_or_default()
        ));
    }
    let machine = resolve_machine(
        MachineLayers {
            image: Some(&display),
            ..MachineLayers::default()
        },
        &display_limits,
    )
    .expect("machine");
    let mut vm = VirtualMachine::start(lease, &machine, &settings("bench-display".into()))
        .await
        .expect("start");
    if vm
        .wait_for_serial("taskvm-agent: ready", Duration::from_secs(60))
        .await
    {
        let mut dump_times = Vec::new();
        let mut vnc_times = Vec::new();
        let mut png_times = Vec::new();
        let mut size = (0, 0);
        for _ in 0..10 {
            let started = Instant::now();
            vm.screendump().await.expect("screendump");
            dump_times.push(started.elapsed());
            let started = Instant::now();
            let screen = vm
                .screenshot(Duration::from_secs(10))
                .await
                .expect("VNC screenshot");
            vnc_times.push(started.elapsed());
            let started = Instant::now();
            engine::qemu::screenshot::encode_png(&screen).expect("png");
            png_times.push(started.elapsed());
            size = screen.dimensions();
        }
        let (width, height) = size;
        println!(
            "screenshot {width}x{height}: VNC median {:.1} ms (p95 {:.1}), +PNG encode {:.1} ms; \
             QMP screendump (PPM file) median {:.1} ms; VNC/screendump {:.2}x (goal <= 50 ms)",
            ms(pct(&vnc_times, 50)),
            ms(pct(&vnc_times, 95)),
            ms(pct(&png_times, 50)),
            ms(pct(&dump_times, 50)),
            ms(pct(&vnc_times, 50)) / ms(pct(&dump_times, 50)),
        );
    }
    vm.kill().await;
}

/// The jail's cost, measured in the same run: start → QMP ready, and snapshot restore →
/// resumed, each with the jail (a user of its own, namespaces, `pivot_root`) and without it
/// (QEMU as `nobody` in the host's namespaces), the two kinds interleaved.
async fn jail_overhead(
    fetch: &dyn Fn(std::path::PathBuf) -> image_manager::Lease,
    limits: &MachineLimits,
    settings: &dyn Fn(String) -> VmSettings,
    boots: usize,
    scratch: &std::path::Path,
) {
    if !rustix::process::geteuid().is_root() {
        println!("jail overhead: skipped (needs root)");
        return;
    }
    let unjailed = |mut settings: VmSettings| {
        settings.jail = None;
        settings
    };
    let networked = |mut settings: VmSettings| {
        settings.network = Some(engine::network::NetworkSettings::default());
        settings
    };
    let machine = |lease: &image_manager::Lease| {
        resolve_machine(
            MachineLayers {
                image: Some(lease.machine()),
                ..MachineLayers::default()
            },
            limits,
        )
        .expect("machine")
    };
    let (mut jailed_qmp, mut bare_qmp) = (Vec::new(), Vec::new());
    for round in 0..boots {
        for jailed in [true, false] {
            let lease = fetch(minimal_image());
            let machine = machine(&lease);
            let mut vm_settings = settings(format!("jail-{round}-{jailed}"));
            if !jailed {
                vm_settings = unjailed(vm_settings);
            }
            let started = Instant::now();
            let mut vm = VirtualMachine::start(lease, &machine, &vm_settings)
                .await
                .expect("start");
            let took = started.elapsed();
            vm.kill().await;
            if jailed {
                jailed_qmp.push(took);
            } else {
                bare_qmp.push(took);
            }
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let difference = ms(pct(&jailed_qmp, 50)) - ms(pct(&bare_qmp, 50));
    println!(
        "start -> QMP ready, jailed {:7.1} ms vs unjailed {:7.1} ms (medians): {difference:+.1} ms \
         ({:.2}x; goal <= +20 ms)",
        ms(pct(&jailed_qmp, 50)),
        ms(pct(&bare_qmp, 50)),
        ms(pct(&jailed_qmp, 50)) / ms(pct(&bare_qmp, 50)),
    );

    let lease = fetch(minimal_image());
    let machine = machine(&lease);
    let dir = scratch.join("jail-bench-snapshot");
    let snapshot = engine::snapshot::build(
        lease,
        &machine,
        &networked(settings("jail-snapshot".into())),
        &dir,
        Duration::from_secs(60),
    )
    .await
    .expect("snapshot");
    let (mut jailed_restore, mut bare_restore) = (Vec::new(), Vec::new());
    for round in 0..boots {
        for jailed in [true, false] {
            let mut vm_settings = networked(settings(format!("restore-{round}-{jailed}")));
            if !jailed {
                vm_settings = unjailed(vm_settings);
            }
            let lease = fetch(minimal_image());
            let started = Instant::now();
            let mut vm = VirtualMachine::restore(lease, &machine, &vm_settings, &snapshot)
                .await
                .expect("restore");
            let took = started.elapsed();
            vm.kill().await;
            if jailed {
                jailed_restore.push(took);
            } else {
                bare_restore.push(took);
            }
        }
    }
    println!(
        "snapshot restore -> resumed, jailed {:7.1} ms vs unjailed {:7.1} ms (medians): {:.2}x \
         (goal: unchanged within noise)",
        ms(pct(&jailed_restore, 50)),
        ms(pct(&bare_restore, 50)),
        ms(pct(&jailed_restore, 50)) / ms(pct(&bare_restore, 50)),
    );
}

fn pct(values: &[Duration], percent: usize) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) * percent / 100).min(sorted.len() - 1)]
}
