//! `taskvm serve`: the embedded queue with its HTTP API and web UI, until SIGINT or SIGTERM.

use crate::documents::say;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use lifecycle::capacity::Resources;
use lifecycle::exit::Outcome;
use schemas::config::QueueConfig;
use serve::{serve, ServeOptions};

use crate::args::StartArg;

/// Where Debian's `novnc` package puts noVNC.
const DEBIAN_NOVNC: &str = "/usr/share/novnc";
/// Where `make deps` puts xterm.js in the checkout this binary was built from.
const CHECKOUT_XTERM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../serve/ui/terminal/node_modules/@xterm/xterm"
);
/// A file every xterm.js package directory has.
const XTERM_MODULE: &str = "lib/xterm.mjs";

/// Arguments of `taskvm serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration, cache, state and accelerator.
    #[command(flatten)]
    host: crate::documents::HostArgs,
    /// Address of the API and web UI (default: the configuration's queue.listen, else
    /// 127.0.0.1:8080). Anything but loopback requires the access token printed at start.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Largest number of tasks run at once (default: the configuration's concurrency).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: Option<u32>,
    /// How VMs start (default: the configuration's start).
    #[arg(long, value_enum)]
    start: Option<StartArg>,
    /// Memory all running VMs may hold together, in MiB (default: the host's memory less
    /// 1 GiB).
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// vCPUs all running VMs may hold together (default: the host's CPU count).
    #[arg(long, value_name = "N")]
    cpus: Option<u64>,
    /// Runs a task gets at most when worker shutdowns interrupt it.
    #[arg(long, value_name = "N", default_value_t = 3)]
    max_runs: u32,
    /// Accept and keep tasks but start none (to inspect or drain a host).
    #[arg(long)]
    paused: bool,
    /// Require the access token even on loopback.
    #[arg(long)]
    require_token: bool,
    /// noVNC's directory, for the console (default: /usr/share/novnc when present).
    #[arg(long, value_name = "DIR", env = "TASKVM_NOVNC_DIR")]
    novnc: Option<PathBuf>,
    /// xterm.js's package directory (npm's `@xterm/xterm`), for the shell's terminal in the
    /// UI (default: the one `make deps` put in the checkout taskvm was built from).
    #[arg(long, value_name = "DIR", env = "TASKVM_XTERM_DIR")]
    xterm: Option<PathBuf>,
}

/// Runs `taskvm serve`.
pub fn run(args: ServeArgs) -> Outcome {
    let config = match crate::documents::load_host_config(&args.host, args.start.map(Into::into)) {
        Ok(config) => config,
        Err(outcome) => return outcome,
    };
    let configured_listen = match &config.queue {
        Some(QueueConfig::Embedded(embedded)) => Some(embedded.listen.clone()),
        _ => None,
    };
    let listen = match args.listen {
        Some(listen) => listen,
        None => {
            let text = configured_listen.unwrap_or_else(|| "127.0.0.1:8080".to_owned());
            match text.parse() {
                Ok(listen) => listen,
                Err(error) => {
                    say(&format!("queue.listen {text:?} is not an address: {error}"));
                    return Outcome::Malformed;
                }
            }
        }
    };
    let novnc_dir = match args.novnc {
        Some(dir) if dir.join("core/rfb.js").is_file() => Some(dir),
        Some(dir) => {
            say(&format!(
                "{} holds no noVNC (core/rfb.js is missing)",
                dir.display()
            ));
            return Outcome::Malformed;
        }
        None => {
            let debian = PathBuf::from(DEBIAN_NOVNC);
            if debian.join("core/rfb.js").is_file() {
                Some(debian)
            } else {
                say(&format!(
                    "noVNC is not installed ({DEBIAN_NOVNC}); the console is off (make deps \
                     installs it)"
                ));
                None
            }
        }
    };
    let xterm_dir = match args.xterm {
        Some(dir) if dir.join(XTERM_MODULE).is_file() => Some(dir),
        Some(dir) => {
            say(&format!(
                "{} holds no xterm.js ({XTERM_MODULE} is missing)",
                dir.display()
            ));
            return Outcome::Malformed;
        }
        None => {
            let checkout = PathBuf::from(CHECKOUT_XTERM);
            if checkout.join(XTERM_MODULE).is_file() {
                Some(checkout)
            } else {
                say(
                    "xterm.js is not installed; the UI has no terminal for shells (make deps \
                     installs it; or pass --xterm DIR); `taskvm shell` works without it",
                );
                None
            }
        }
    };
    let options = ServeOptions {
        listen,
        concurrency: args.concurrency.unwrap_or(config.concurrency) as usize,
        capacity: Resources {
            memory_mib: args.memory.unwrap_or_else(default_memory_mib),
            cpus: args.cpus.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |count| count.get() as u64)
            }),
        },
        paused: args.paused,
        require_token: args.require_token,
        novnc_dir,
        xterm_dir,
        max_runs: args.max_runs,
    };
    let runtime = match crate::documents::vm_runtime() {
        Ok(runtime) => runtime,
        Err(outcome) => return outcome,
    };
    let announce = say;
    let outcome = runtime.block_on(async {
        let host = match crate::documents::prepared_host(config, &announce, "tasks") {
            Ok(host) => Arc::new(host),
            Err(outcome) => return outcome,
        };
        announce(&format!(
            "running up to {} task(s) at once in {} MiB and {} vCPU(s)",
            options.concurrency, options.capacity.memory_mib, options.capacity.cpus
        ));
        match serve(
            host,
            options,
            crate::signals::wait_for_signal_quietly(),
            &announce,
        )
        .await
        {
            Ok(()) => Outcome::Success,
            Err(error) => {
                announce(&error.to_string());
                Outcome::Internal
            }
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    outcome
}

/// The host's memory less 1 GiB for itself (at least 256 MiB).
pub fn default_memory_mib() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| engine::host::procfs::field_number(&text, "MemTotal:"))
        .unwrap_or(2 << 20);
    (total_kib / 1024).saturating_sub(1024).max(256)
}
