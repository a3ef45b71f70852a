//! The image build behind `taskvm image build`: boots a VM whose root disk is kept — a new
//! overlay on a cached image, on a disk of the host's, or a fresh empty disk with an installer
//! ISO — sandboxed and on its own network like a task's VM, runs the build, waits for the
//! guest to power off and packages the disk into a new image.
//!
//! The build runs through the guest agent as root (its output goes to the console sink), or
//! without any agent: cloud-init reads the user-data from a NoCloud seed (and the metadata
//! service), an installer runs from the ISO; the guest then powers itself off, and its serial
//! console goes to the sink meanwhile. The base is never written; nothing is left at the
//! output path unless the build succeeded.
//!
//! # Layout
//! - [`base`]: what a build starts from, checked before any VM starts.
//! - [`progress`]: progress lines of the long stages.
//! - here: [`build_image`], the steps from boot to the packaged image.

pub mod base;
pub mod progress;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::disk::drives::{BootSource, ExtraDrive};
use engine::disk::seed::NoCloudSeed;
use engine::network::session::{GuestSession, SessionConfig};
use engine::vm::mutable::MutableImage;
use engine::ExitKind;
use schemas::protocol::{ActionKind, Execute, Report};

use crate::exit::Outcome;
use crate::host::Host;
use base::BuildBase;
use progress::PackagingReport;

/// How often a long boot or build says it is still going.
const QUIET_TICK: Duration = Duration::from_secs(30);
/// The most user-data taken (it goes on the seed and is served from memory).
pub const USER_DATA_LIMIT: u64 = 16 << 20;

/// Where the guest's output goes while it builds: the agent's log of the build, or the serial
/// console when there is no agent.
pub type ConsoleSink = fn(&[u8]);

/// One build, checked.
pub struct BuildRequest {
    /// What the build starts from.
    pub base: BuildBase,
    /// The new image's machine (None with an image base: the base image's).
    pub machine: Option<schemas::Machine>,
    /// The agent's command; None: the guest powers itself off.
    pub command: Option<Vec<String>>,
    /// cloud-init user-data (at most [`USER_DATA_LIMIT`] bytes).
    pub user_data: Option<Vec<u8>>,
    /// Where the new image goes.
    pub output: PathBuf,
    /// How long the whole build may take, boot included.
    pub timeout: Duration,
    /// zstd level of the new image.
    pub level: i32,
}

/// Runs `request` on `host` to a packaged image and returns its digest (`sha256:…`); what
/// happens is told through `say`, the guest's output goes to `console`. The error is the exit
/// status: 1 the build failed in the guest, 2 bad input, 3 anything else.
pub async fn build_image(
    host: Arc<Host>,
    request: BuildRequest,
    say: &(dyn Fn(&str) + Sync),
    console: ConsoleSink,
) -> Result<String, Outcome> {
    let BuildRequest {
        base,
        machine,
        command,
        user_data,
        output,
        timeout,
        level,
    } = request;
    let (source, definition, iso) = match base {
        BuildBase::Image { request, text } => {
            let lease = host.fetch_image(request, &text, say).await?;
            let definition = machine.unwrap_or_else(|| lease.machine().clone());
            (BootSource::Image(lease), definition, None)
        }
        BuildBase::Files { files, iso } => {
            // plan() made sure a machine was given.
            let Some(definition) = machine else {
                say("a build from host files needs the new image's machine");
                return Err(Outcome::Malformed);
            };
            (BootSource::Files(files), definition, iso)
        }
    };
    let resolved = host.image_machine(&definition, say)?;
    let accelerator = host.accelerator(say).await;
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
                return Err(Outcome::Internal);
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
    let deadline = tokio::time::Instant::now() + timeout;
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
            return Err(Outcome::Internal);
        }
    };
    image.vm().set_http_handler(session.handler());
    let (console_done, console_stop) = tokio::sync::oneshot::channel();
    let forward = if through_agent {
        tokio::spawn(async move {
            while let Some(chunk) = guest_log.recv().await {
                console(&chunk);
            }
        })
    } else {
        tokio::spawn(follow_file(
            image.vm().serial_log_path(),
            console,
            console_stop,
        ))
    };
    let built = if through_agent {
        build_through_agent(&mut image, &session, deadline, started, say).await
    } else {
        wait_for_power_off(&mut image, deadline, started, say).await
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
        image.release().await;
        return Err(Outcome::Failed);
    }
    let packaged = package(&image, &definition, &output, level, say);
    image.release().await;
    packaged
}

/// Packages the built disk into the image at `output`.
fn package(
    image: &MutableImage,
    definition: &schemas::Machine,
    output: &std::path::Path,
    level: i32,
    say: &(dyn Fn(&str) + Sync),
) -> Result<String, Outcome> {
    let packaging = Instant::now();
    let report = PackagingReport::new(say);
    let packaged = tokio::task::block_in_place(|| {
        image.package(definition, output, level, &|event| {
            report.observe(event);
        })
    });
    match packaged {
        Ok(digest) => {
            let size = std::fs::metadata(output).map_or(0, |meta| meta.len());
            let disk_size = image_manager::qemu_img::info(&image.vm().overlay(), "qcow2")
                .map_or(0, |info| info.virtual_size);
            let took = packaging.elapsed().as_secs_f64();
            say(&format!(
                "packaged in {took:.2} s: the {} MB disk flattened and compressed to {} MB \
                 ({:.0} MB/s of disk) in {}",
                disk_size / 1_000_000,
                size / 1_000_000,
                disk_size as f64 / took.max(0.001) / 1e6,
                output.display()
            ));
            Ok(digest.to_string())
        }
        Err(error) => {
            say(&format!("packaging failed: {error}"));
            Err(Outcome::Internal)
        }
    }
}

/// Copies what is appended to `path` to `console`; once `stop` fires, copies what is left and
/// returns.
async fn follow_file(
    path: PathBuf,
    console: ConsoleSink,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
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
                console(&buffer[..n]);
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
    say: &(dyn Fn(&str) + Sync),
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
        never = progress::tick(say, "the guest is still running", QUIET_TICK) => match never {},
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
    say: &(dyn Fn(&str) + Sync),
) -> Result<(), String> {
    tokio::select! {
        taken = session.wait_taken() => taken?,
        kind = image.vm_mut().wait() => return Err(format!("the VM ended before the agent took the build ({kind:?})")),
        () = tokio::time::sleep_until(deadline) => return Err("the timeout passed while booting (does the image start the taskvm agent?)".into()),
        never = progress::tick(say, "still booting", QUIET_TICK) => match never {},
    }
    say(&format!(
        "booted in {:.2} s; building",
        started.elapsed().as_secs_f64()
    ));
    let script_started = Instant::now();
    let Report { exit_code, .. } = tokio::select! {
        report = session.wait_report() => report,
        kind = image.vm_mut().wait() => return Err(format!("the VM ended during the build ({kind:?})")),
        () = tokio::time::sleep_until(deadline) => return Err("the build timed out".into()),
        never = progress::tick(say, "the build is still running", QUIET_TICK) => match never {},
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
