//! `taskvm image build` ([`lifecycle::build`]): boots a VM whose root disk is kept — a new overlay on a cached image
//! (`--from`) or on a disk of the host's (`--disk`), or a fresh empty disk with an installer
//! ISO (`--iso --size`) — sandboxed and on its own network like a task's VM, runs the build,
//! waits for the guest to power off and packages the disk into a new image.
//!
//! The build runs through the guest agent as root (`--script FILE` or a command after `--`,
//! output on stdout), or without any agent: cloud-init reads `--user-data` from a NoCloud
//! seed (and the metadata service), an installer runs from the ISO; the guest then powers
//! itself off, and its serial console is shown on stdout meanwhile. The base is never
//! written; nothing is left at `-o` unless the build succeeded.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lifecycle::build::base::{BaseOptions, BuildBase};
use lifecycle::build::{build_image, BuildRequest, USER_DATA_LIMIT};
use lifecycle::exit::Outcome;
use schemas::migrate_machine_definition;

use crate::documents::say;

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
    #[arg(long, value_name = "SIZE", value_parser = crate::sizes::parse_size)]
    size: Option<u64>,
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

/// Everything the command line gave, read and checked.
fn plan(args: &BuildArgs) -> Result<BuildRequest, String> {
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
        size: args.size,
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
    Ok(BuildRequest {
        base,
        machine,
        command,
        user_data,
        output: args.output.clone(),
        timeout: Duration::from_secs(args.timeout),
        level: args.level,
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
    let outcome = runtime.block_on(async {
        let host = match crate::documents::prepared_host(config, &say, "VMs") {
            Ok(host) => Arc::new(host),
            Err(outcome) => return outcome,
        };
        match build_image(host, plan, &say, write_stdout).await {
            Ok(digest) => {
                println!("{digest}");
                Outcome::Success
            }
            Err(outcome) => outcome,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

/// The guest's output, as it comes.
fn write_stdout(bytes: &[u8]) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(bytes).and_then(|()| stdout.flush());
}
