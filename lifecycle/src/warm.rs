//! Warming an image: its snapshot made ahead of its first task (the image's machine under the
//! host's limits and machine defaults, as a payload without a `machine` gets it), so that even
//! the first task restores instead of booting. `taskvm image warm` calls it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use image_manager::ImageRequest;

use crate::exit::Outcome;
use crate::host::Host;

/// What warming did.
#[derive(Debug, Clone)]
pub struct Warmed {
    /// The snapshot's key.
    pub key: String,
    /// The image's digest (`sha256:…`).
    pub image: String,
    /// How long making the snapshot took; None when it was there already.
    pub made_in: Option<Duration>,
}

/// Makes the snapshot of the image `request` (named `reference` in messages) on `host`; a
/// failure is told through `say` and yields the exit status.
pub async fn warm_image(
    host: &Arc<Host>,
    request: ImageRequest,
    reference: &str,
    say: &(dyn Fn(&str) + Sync),
) -> Result<Warmed, Outcome> {
    let lease = host.fetch_image(request, reference, say).await?;
    let machine = host.image_machine(lease.machine(), say)?;
    let accelerator = host.accelerator(say).await;
    let name = format!("warm-{:08x}", rand::random::<u32>());
    let settings = host.vm_settings(&name, accelerator);
    let started = Instant::now();
    let key = host.snapshot_key(&lease, &machine, &settings);
    match host.snapshot_for(&key, &lease, &machine, &settings).await {
        Ok(got) => Ok(Warmed {
            image: lease.digest().to_string(),
            made_in: got.built.then(|| started.elapsed()),
            key,
        }),
        Err(error) => {
            say(&format!("no snapshot could be made: {error}"));
            Err(Outcome::Internal)
        }
    }
}
