//! `taskvm image build`: boots a VM whose root disk is kept — a new overlay on a cached image
//! (`--from`) or on a disk of the host's (`--disk`), or a fresh empty disk with an installer
//! ISO (`--iso --size`) — sandboxed and on its own network like a task's VM, runs the build,
//! waits for the guest to power off and packages the disk into a new image.
//!
//! The build runs through the guest agent as root (`--script FILE` or a command after `--`,
//! output on stdout), or without any agent: cloud-init reads `--user-data` from a NoCloud
//! seed (and the metadata service), an installer runs from the ISO; the guest then powers
//! itself off, and its serial console is shown on stdout meanwhile. The base is never
//! written; nothing is left at `-o` unless the build succeeded.

mod base;
mod progress;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::drives::{BootSource, ExtraDrive};
use engine::mutable::MutableImage;
use engine::seed::NoCloudSeed;
use engine::session::{GuestSession, SessionConfig};
use engine::ExitKind;
use lifecycle::exit::Outcome;
use lifecycle::host::Host;
use schemas::migrate_machine_definition;
use schemas::protocol::{ActionKind, Execute, Report};

use base::{BaseOptions, BuildBase};
use progress::PackagingReport;

/// How often a long boot or build says it is still going.
const QUIET_TICK: Duration = Duration::from_secs(30);
/// The most user-data taken (it goes on the seed and is served from memory).
const USER_DATA_LIMIT: u64 = 16 << 20;

/// Arguments of `taskvm image build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The base image: http(s) URL, file URL or path of an image tarball.
    #[arg(long, value_name = "REF")]
    from: Option<String>,
    /// Instead of --from: a disk of the host's (any distribution), read-only under the build's
    /// overlay; needs --machine (and --kernel/--initrd when it boots directly).
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
    /// The format of --disk (default: from its first bytes).
    #[arg(long, value_parser = ["raw", "qcow2"])]
    format: Option<String>,
    /// Instead of --from: an installer ISO, booted first, installing onto a fresh empty disk of
    /// --size; needs --machine (chipset q35 or pc).
    #[arg(long, value_name = "FILE")]
    iso: Option<PathBuf>,
    /// The fresh disk's size with --iso: 8G, 512M, …
    #[arg(long, value_name = "SIZE")]
    size: Option<String>,
    /// The kernel for a direct boot of --disk or --iso (machine.json's boot.kernel).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// The initrd for a direct boot of --disk or --iso (machine.json's boot.initrd).
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// cloud-init user-data, given to the guest on a NoCloud seed (a CIDATA volume) and by the
    /// metadata service. Without --script or a command the build ends when the guest powers
    /// itself off (cloud-config `power_state: {mode: poweroff}`).
    #[arg(long, value_name = "FILE")]
    user_data: Option<PathBuf>,
    /// Where the new image goes.
    #[arg(short = 'o', long = "output", value_name = "OUT.tar.zst")]
    output: PathBuf,
    /// A shell script run as root in the guest through the taskvm agent (`sh -c`).
    #[arg(long, value_name = "FILE", conflicts_with = "command")]
    script: Option<PathBuf>,
    /// The new image's machine.json (default with --from: the base image's).
    #[arg(long, value_name = "FILE")]
    machine: Option<PathBuf>,
    /// Seconds the whole build may take, boot included.
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    timeout: u64,
    /// zstd level of the new image (1–19).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    level: i32,
    /// Configuration, cache, state and accelerator.
    #[command(flatten)]
    host: crate::documents::HostArgs,
    /// The build command, instead of --script (after `--`).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "taskvm: {line}");
}

/// Everything the command line gave, checked.
struct BuildPlan {
    base: BuildBase,
    machine: Option<schemas::Machine>,
    /// The agent's command; None: the guest powers itself off.
    command: Option<Vec<String>>,
    user_data: Option<Vec<u8>>,
}

fn plan(args: &BuildArgs) -> Result<BuildPlan, String> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))
    };
    let command = match (&args.script, args.command.is_empty()) {
        (Some(path), true) => {
            let script = String::from_utf8(read(path)?)
                .map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
            Some(vec!["sh".to_owned(), "-c".to_owned(), script])
        }
        (None, false) => Some(args.command.clone()),
        (None, true) => None,
        (Some(_), false) => {
            return Err("give the build as --script FILE or after `--`, not both".into())
        }
    };
    if let Some(path) = &args.user_data {
        let size = std::fs::metadata(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?
            .len();
        if size > USER_DATA_LIMIT {
            return Err(format!(
                "{}: {size} bytes of user-data; at most {USER_DATA_LIMIT}",
                path.display()
            ));
        }
    }
    let user_data = args.user_data.as_ref().map(read).transpose()?;
    let base = BuildBase::from_options(&BaseOptions {
        from: args.from.as_deref(),
        disk: args.disk.as_deref(),
        format: args.format.as_deref(),
        iso: args.iso.as_deref(),
        size: args.size.as_deref(),
        kernel: args.kernel.as_deref(),
        initrd: args.initrd.as_deref(),
    })?;
    if command.is_none() && user_data.is_none() && args.iso.is_none() {
        return Err(
            "nothing to build: give --script FILE, a command after `--`, --user-data FILE or --iso FILE"
                .into(),
        );
    }
    let machine = match &args.machine {
        None => None,
        Some(path) => Some(
            crate::documents::read_document(path)
                .and_then(|value| migrate_machine_definition(&value))
                .map_err(|violations| format!("{}:\n{violations}", path.display()))?,
        ),
    };
    if machine.is_none() && !matches!(base, BuildBase::Image { .. }) {
        return Err("--disk and --iso need --machine FILE (the new image's machine.json)".into());
    }
    Ok(BuildPlan {
        base,
        machine,
        command,
        user_data,
    })
}

/// Runs `taskvm image build`. Exit status: 0 built, 1 the build failed in the guest, 2 bad
/// input, 3 anything else.
pub fn run(args: BuildArgs) -> Outcome {
    let config = match crate::documents::load_host_config(&args.host, None) {
        Ok(config) => config,
        Err(outcome) => return outcome,
    };
    let plan = match plan(&args) {
        Ok(plan) => plan,
        Err(reason) => {
            say(&reason);
            return Outcome::Malformed;
        }
    };
    let runtime = match crate::documents::vm_runtime() {
        Ok(runtime) => runtime,
        Err(outcome) => return outcome,
    };
    let outcome = runtime.block_on(build_and_package(&args, plan, config));
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

async fn build_and_package(
    args: &BuildArgs,
    plan: BuildPlan,
    config: schemas::config::WorkerConfig,
) -> Outcome {
    let host = match Host::prepare(config, &say) {
        Ok(host) => Arc::new(host),
        Err(error) => {
            say(&format!("this host cannot run VMs: {error}"));
            return Outcome::Internal;
        }
    };
    let BuildPlan {
        base,
        machine,
        command,
        user_data,
    } = plan;
    let (source, definition, iso) = match base {
        BuildBase::Image { request, text } => {
            let lease = match crate::documents::fetch_lease(&host, request, &text, &say).await {
                Ok(lease) => lease,
                Err(outcome) => return outcome,
            };
            let definition = machine.unwrap_or_else(|| lease.machine().clone());
            (BootSource::Image(lease), definition, None)
        }
        BuildBase::Files { files, iso } => {
            // plan() made sure a machine was given.
            let Some(definition) = machine else {
                return Outcome::Malformed;
            };
            (BootSource::Files(files), definition, iso)
        }
    };
    let resolved = match crate::documents::image_machine(&host, &definition, &say) {
        Ok(resolved) => resolved,
        Err(outcome) => return outcome,
    };
    let accelerator = host.accelerator(&say).await;
    let name = format!("build-{:08x}", rand::random::<u32>());
    let mut settings = host.vm_settings(&name, accelerator);
    let mut session_config = SessionConfig::new(&name);
    // The seed is written beside the VMs' runtime directories and removed once QEMU has it.
    let mut seed_dir = None;
    if let Some(user_data) = user_data {
        let seed = NoCloudSeed::new(
            user_data.clone(),
            &session_config.instance_id,
            &session_config.hostname,
        );
        let written = tempfile::Builder::new()
            .prefix(&format!(".{name}-seed-"))
            .tempdir_in(host.runtime_parent())
            .and_then(|dir| {
                let path = dir.path().join("cidata.img");
                seed.write(&path).map(|()| (dir, path))
            });
        let (dir, path) = match written {
            Ok(written) => written,
            Err(error) => {
                say(&format!("cannot write the NoCloud seed: {error}"));
                return Outcome::Internal;
            }
        };
        settings
            .drives
            .push(ExtraDrive::read_only_disk(path, "raw"));
        seed_dir = Some(dir);
        session_config.user_data = Some(user_data);
    }
    if let Some(iso) = iso {
        settings.drives.push(ExtraDrive::installer_cdrom(iso));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let (session, mut guest_log) = GuestSession::new(session_config);
    let through_agent = command.is_some();
    if let Some(command) = command {
        session.set_task(Execute {
            command,
            ..Execute::default()
        });
    }
    let started = Instant::now();
    let booted = MutableImage::boot(source, &resolved, &settings).await;
    // QEMU holds the seed open from its start: the file can go now, so that not even a crash
    // of this process leaves it behind.
    drop(seed_dir);
    let mut image = match booted {
        Ok(image) => image,
        Err(error) => {
            say(&format!("the VM did not start: {error}"));
            return Outcome::Internal;
        }
    };
    image.vm().set_http_handler(session.handler());
    let (console_done, console_stop) = tokio::sync::oneshot::channel();
    let forward = if through_agent {
        tokio::spawn(async move {
            while let Some(chunk) = guest_log.recv().await {
                write_stdout(&chunk);
            }
        })
    } else {
        tokio::spawn(follow_file(image.vm().serial_log_path(), console_stop))
    };
    let built = if through_agent {
        build_through_agent(&mut image, &session, deadline, started).await
    } else {
        wait_for_power_off(&mut image, deadline, started).await
    };
    // The agent's log ends with its session; the console follower reads to the end once
    // more when told to stop.
    let _ = console_done.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), forward).await;
    if let Err(reason) = built {
        say(&reason);
        if through_agent {
            let serial = image.vm().serial_output();
            let tail: Vec<&str> = serial.lines().rev().take(20).collect();
            say("the guest's serial console ended with:");
            for line in tail.into_iter().rev() {
                say(&format!("  {line}"));
            }
        }
        image.vm_mut().kill().await;
        return Outcome::Failed;
    }
    package(&image, &definition, args)
}

fn package(image: &MutableImage, definition: &schemas::Machine, args: &BuildArgs) -> Outcome {
    let packaging = Instant::now();
    let report = PackagingReport::new(&say);
    let packaged = tokio::task::block_in_place(|| {
        image.package(definition, &args.output, args.level, &|event| {
            report.observe(event);
        })
    });
    match packaged {
        Ok(digest) => {
            let size = std::fs::metadata(&args.output).map_or(0, |meta| meta.len());
            let disk_size = image_manager::qemu_img::info(&image.vm().overlay(), "qcow2")
                .map_or(0, |info| info.virtual_size);
            let took = packaging.elapsed().as_secs_f64();
            say(&format!(
                "packaged in {took:.2} s: the {} MB disk flattened and compressed to {} MB \
                 ({:.0} MB/s of disk) in {}",
                disk_size / 1_000_000,
                size / 1_000_000,
                disk_size as f64 / took.max(0.001) / 1e6,
                args.output.display()
            ));
            println!("{digest}");
            Outcome::Success
        }
        Err(error) => {
            say(&format!("packaging failed: {error}"));
            Outcome::Internal
        }
    }
}

fn write_stdout(bytes: &[u8]) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(bytes).and_then(|()| stdout.flush());
}

/// Copies what is appended to `path` to stdout; once `stop` fires, copies what is left and
/// returns.
async fn follow_file(path: PathBuf, mut stop: tokio::sync::oneshot::Receiver<()>) {
    use tokio::io::AsyncReadExt;
    let mut file = None;
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        if file.is_none() {
            file = tokio::fs::File::open(&path).await.ok();
        }
        if let Some(file) = &mut file {
            while let Ok(n) = file.read(&mut buffer).await {
                if n == 0 {
                    break;
                }
                write_stdout(&buffer[..n]);
            }
        }
        if stop.try_recv().is_ok() || stop.is_terminated() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = &mut stop => {}
        }
    }
}

/// Waits for a build without the agent to end: the guest powers off (or, for an installer,
/// reboots, which ends QEMU too).
async fn wait_for_power_off(
    image: &mut MutableImage,
    deadline: tokio::time::Instant,
    started: Instant,
) -> Result<(), String> {
    say("booted; waiting for the guest to power itself off (its console follows)");
    let ended = tokio::select! {
        kind = image.wait() => kind,
        () = tokio::time::sleep_until(deadline) => {
            return Err(format!(
                "the timeout passed after {:.0} s without the guest powering off; no image was written",
                started.elapsed().as_secs_f64()
            ));
        }
        never = progress::tick(&say, "the guest is still running", QUIET_TICK) => match never {},
    };
    match ended {
        ExitKind::PoweredOff | ExitKind::Rebooted => {
            say(&format!(
                "the guest ended ({ended:?}) after {:.2} s",
                started.elapsed().as_secs_f64()
            ));
            Ok(())
        }
        other => Err(format!(
            "the guest ended badly ({other:?}); no image was written"
        )),
    }
}

/// Runs the build through the agent to the guest's power-off; an error says why the build
/// failed.
async fn build_through_agent(
    image: &mut MutableImage,
    session: &GuestSession,
    deadline: tokio::time::Instant,
    started: Instant,
) -> Result<(), String> {
    tokio::select! {
        () = session.wait_taken() => {}
        kind = image.vm_mut().wait() => return Err(format!("the VM ended before the agent took the build ({kind:?})")),
        () = tokio::time::sleep_until(deadline) => return Err("the timeout passed while booting (does the image start the taskvm agent?)".into()),
        never = progress::tick(&say, "still booting", QUIET_TICK) => match never {},
    }
    say(&format!(
        "booted in {:.2} s; building",
        started.elapsed().as_secs_f64()
    ));
    let script_started = Instant::now();
    let Report { exit_code } = tokio::select! {
        report = session.wait_report() => report,
        kind = image.vm_mut().wait() => return Err(format!("the VM ended during the build ({kind:?})")),
        () = tokio::time::sleep_until(deadline) => return Err("the build timed out".into()),
        never = progress::tick(&say, "the build is still running", QUIET_TICK) => match never {},
    };
    if exit_code != 0 {
        return Err(format!(
            "the build exited with {exit_code}; no image was written"
        ));
    }
    say(&format!(
        "the build ran in {:.2} s; powering the guest off",
        script_started.elapsed().as_secs_f64()
    ));
    let asked = tokio::time::timeout(
        Duration::from_secs(10),
        session.perform(ActionKind::Shutdown),
    )
    .await;
    if asked.is_err() {
        return Err("the agent did not take the shutdown".into());
    }
    match tokio::time::timeout(Duration::from_secs(60), image.wait()).await {
        Ok(ExitKind::PoweredOff) => Ok(()),
        Ok(other) => Err(format!("the guest did not power off cleanly ({other:?})")),
        Err(_) => Err("the guest did not power off within 60 s".into()),
    }
}
