//! `taskvm image warm REF`: makes the image's snapshot ahead of its first task
//! ([`lifecycle::warm`]).

use std::sync::Arc;

use image_manager::ImageRequest;
use lifecycle::exit::Outcome;

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
    let say = crate::documents::say;
    runtime.block_on(async {
        let host = match crate::documents::prepared_host(config, &say, "VMs") {
            Ok(host) => Arc::new(host),
            Err(outcome) => return outcome,
        };
        match lifecycle::warm::warm_image(&host, request, &args.reference, &say).await {
            Ok(warmed) => {
                let how = match warmed.made_in {
                    Some(took) => format!("made in {:.2} s", took.as_secs_f64()),
                    None => "already there".to_owned(),
                };
                println!("snapshot {} of {} ({how})", &warmed.key[..12], warmed.image);
                Outcome::Success
            }
            Err(outcome) => outcome,
        }
    })
}
