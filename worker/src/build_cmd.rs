//! `taskvm image build --from REF -o OUT.tar.zst (--script FILE | -- COMMAND...)`: boots the
//! image on a writable overlay (sandboxed, on its own network, as a task's VM), runs the build
//! through the guest agent as root with its output on stdout, waits for the guest to power off,
//! and packages the disk into a new image. The cached base is never written; nothing is left at
//! `-o` unless the build succeeded.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::mutable::MutableImage;
use engine::session::{GuestSession, SessionConfig};
use engine::ExitKind;
use image_manager::ImageRequest;
use schemas::migrate_machine_definition;
use schemas::protocol::{ActionKind, Execute, Report};
use taskvm::exit::Outcome;
use taskvm::task::host::Host;

/// Arguments of `taskvm image build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The base image: http(s) URL, file URL or path of an image tarball (it needs the taskvm
    /// guest agent).
    #[arg(long, value_name = "REF")]
    from: String,
    /// Where the new image goes.
    #[arg(short = 'o', long = "output", value_name = "OUT.tar.zst")]
    output: PathBuf,
    /// A shell script run as root in the guest (`sh -c`).
    #[arg(long, value_name = "FILE", conflicts_with = "command")]
    script: Option<PathBuf>,
    /// The new image's machine.json (default: the base image's).
    #[arg(long, value_name = "FILE")]
    machine: Option<PathBuf>,
    /// Seconds the whole build may take, boot included.
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    timeout: u64,
    /// zstd level of the new image (1–19).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    level: i32,
    /// Image cache directory.
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// State directory (VM records for the crash sweep).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Worker configuration (limits, sandbox user…).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Accelerator.
    #[arg(long, value_enum)]
    accel: Option<crate::run_cmd::AccelArg>,
    /// The build command, instead of --script (after `--`).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "taskvm: {line}");
}

/// Runs `taskvm image build`. Exit status: 0 built, 1 the build failed in the guest, 2 bad
/// input, 3 anything else.
pub fn run(args: BuildArgs) -> Outcome {
    let overrides = crate::documents::HostOverrides {
        cache: args.cache.clone(),
        state: args.state.clone(),
        accel: args.accel.map(Into::into),
        start: None,
    };
    let config = match crate::documents::load_host_config(args.config.as_deref(), overrides) {
        Ok(config) => config,
        Err(outcome) => return outcome,
    };
    let command = match (&args.script, args.command.is_empty()) {
        (Some(path), true) => match std::fs::read_to_string(path) {
            Ok(script) => vec!["sh".to_owned(), "-c".to_owned(), script],
            Err(error) => {
                say(&format!("cannot read {}: {error}", path.display()));
                return Outcome::Malformed;
            }
        },
        (None, false) => args.command.clone(),
        _ => {
            say("give the build as --script FILE or after `--`");
            return Outcome::Malformed;
        }
    };
    let machine = match &args.machine {
        None => None,
        Some(path) => match crate::documents::read_document(path)
            .and_then(|value| migrate_machine_definition(&value))
        {
            Ok(machine) => Some(machine),
            Err(violations) => {
                say(&format!("{}:\n{violations}", path.display()));
                return Outcome::Malformed;
            }
        },
    };
    let request = match ImageRequest::parse(&args.from, None) {
        Ok(request) => request,
        Err(error) => {
            say(&format!("image {}: {error}", args.from));
            return Outcome::Malformed;
        }
    };
    let runtime = match crate::documents::vm_runtime() {
        Ok(runtime) => runtime,
        Err(outcome) => return outcome,
    };
    let outcome = runtime.block_on(async {
        let host = match Host::prepare(config, &say) {
            Ok(host) => Arc::new(host),
            Err(error) => {
                say(&format!("this host cannot run VMs: {error}"));
                return Outcome::Internal;
            }
        };
        let lease = match crate::documents::fetch_lease(&host, request, &args.from, &say).await {
            Ok(lease) => lease,
            Err(outcome) => return outcome,
        };
        let definition = machine.unwrap_or_else(|| lease.machine().clone());
        let resolved = match crate::documents::image_machine(&host, &definition, &say) {
            Ok(resolved) => resolved,
            Err(outcome) => return outcome,
        };
        let accelerator = host.accelerator(&lease, &say).await;
        let name = format!("build-{:08x}", rand::random::<u32>());
        let settings = host.vm_settings(&name, accelerator);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
        let (session, mut guest_log) = GuestSession::new(SessionConfig::new(&name));
        session.set_task(Execute {
            command,
            ..Execute::default()
        });
        let started = Instant::now();
        let mut image = match MutableImage::boot(lease, &resolved, &settings).await {
            Ok(image) => image,
            Err(error) => {
                say(&format!("the VM did not start: {error}"));
                return Outcome::Internal;
            }
        };
        image.vm().set_http_handler(session.handler());
        let forward = tokio::spawn(async move {
            use std::io::Write;
            while let Some(chunk) = guest_log.recv().await {
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(&chunk).and_then(|()| stdout.flush());
            }
        });
        let built = build(&mut image, &session, deadline, started).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), forward).await;
        if let Err(reason) = built {
            say(&reason);
            let serial = image.vm().serial_output();
            let tail: Vec<&str> = serial.lines().rev().take(20).collect();
            say("the guest's serial console ended with:");
            for line in tail.into_iter().rev() {
                say(&format!("  {line}"));
            }
            image.vm_mut().kill().await;
            return Outcome::Failed;
        }
        let packaging = Instant::now();
        let disk_size = image_manager::qemu_img::info(&image.vm().overlay(), "qcow2")
            .map_or(0, |info| info.virtual_size);
        let packaged =
            tokio::task::block_in_place(|| image.package(&definition, &args.output, args.level));
        match packaged {
            Ok(digest) => {
                let size = std::fs::metadata(&args.output).map_or(0, |meta| meta.len());
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
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

/// Runs the build to the guest's power-off; an error says why the build failed.
async fn build(
    image: &mut MutableImage,
    session: &GuestSession,
    deadline: tokio::time::Instant,
    started: Instant,
) -> Result<(), String> {
    tokio::select! {
        () = session.wait_taken() => {}
        kind = image.vm_mut().wait() => return Err(format!("the VM ended before the agent took the build ({kind:?})")),
        () = tokio::time::sleep_until(deadline) => return Err("the timeout passed while booting (does the image start the taskvm agent?)".into()),
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
