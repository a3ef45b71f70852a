//! `taskvm image warm REF`: makes the image's snapshot ahead of its first task (the image's
//! machine under the configuration's limits and machine defaults, as a payload without a
//! `machine` gets), so that even the first task restores instead of booting.

use std::sync::Arc;
use std::time::Instant;

use image_manager::ImageRequest;
use lifecycle::exit::Outcome;
use lifecycle::host::Host;

/// Arguments of `taskvm image warm`.
#[derive(Debug, clap::Args)]
pub struct WarmArgs {
    /// http(s) URL, file URL or local path of an image tarball.
    reference: String,
    /// Refuse the image unless its compressed bytes have this sha256.
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
    /// Configuration, cache, state and accelerator.
    #[command(flatten)]
    host: crate::documents::HostArgs,
}

/// Runs `taskvm image warm`.
pub fn run(args: WarmArgs) -> Outcome {
    let config = match crate::documents::load_host_config(&args.host, None) {
        Ok(config) => config,
        Err(outcome) => return outcome,
    };
    let request = match ImageRequest::parse(&args.reference, args.sha256.as_deref()) {
        Ok(request) => request,
        Err(error) => {
            eprintln!("taskvm: image {}: {error}", args.reference);
            return Outcome::Malformed;
        }
    };
    let runtime = match crate::documents::vm_runtime() {
        Ok(runtime) => runtime,
        Err(outcome) => return outcome,
    };
    let say = |line: &str| eprintln!("taskvm: {line}");
    runtime.block_on(async {
        let host = match Host::prepare(config, &say) {
            Ok(host) => Arc::new(host),
            Err(error) => {
                say(&format!("this host cannot run VMs: {error}"));
                return Outcome::Internal;
            }
        };
        let lease = match crate::documents::fetch_lease(&host, request, &args.reference, &say).await
        {
            Ok(lease) => lease,
            Err(outcome) => return outcome,
        };
        let machine = match crate::documents::image_machine(&host, lease.machine(), &say) {
            Ok(machine) => machine,
            Err(outcome) => return outcome,
        };
        let accelerator = host.accelerator(&say).await;
        let name = format!("warm-{:08x}", rand::random::<u32>());
        let settings = host.vm_settings(&name, accelerator);
        let started = Instant::now();
        let key = host.snapshot_key(&lease, &machine, &settings);
        match host.snapshot_for(&key, &lease, &machine, &settings).await {
            Ok(got) => {
                println!(
                    "snapshot {} of {} ({})",
                    &key[..12],
                    lease.digest(),
                    if got.built {
                        format!("made in {:.2} s", started.elapsed().as_secs_f64())
                    } else {
                        "already there".to_owned()
                    }
                );
                Outcome::Success
            }
            Err(error) => {
                say(&format!("no snapshot could be made: {error}"));
                Outcome::Internal
            }
        }
    })
}
