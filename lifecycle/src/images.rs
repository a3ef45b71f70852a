//! Images for the commands that start a VM outside a task (`taskvm image build`, `image
//! warm`): fetched into the host's cache and leased, their machine resolved under the host's
//! limits and machine defaults as a payload without a `machine` gets it — and whose fault a
//! failed fetch is.

use std::sync::Arc;

use image_manager::{ImageError, ImageRequest, Lease};

use crate::exit::Outcome;
use crate::host::Host;

impl Host {
    /// Fetches `request` (named `reference` in messages) into the cache and leases it; a
    /// failure is told through `say` and yields the exit status (2 when the image is the
    /// user's to fix).
    pub async fn fetch_image(
        self: &Arc<Self>,
        request: ImageRequest,
        reference: &str,
        say: &(dyn Fn(&str) + Sync),
    ) -> Result<Lease, Outcome> {
        let fetching = {
            let host = self.clone();
            tokio::task::spawn_blocking(move || host.cache.fetch(&request, &|_| {}))
        };
        match fetching.await {
            Ok(Ok((lease, _))) => Ok(lease),
            Ok(Err(error)) => {
                say(&format!("image {reference}: {error}"));
                Err(if image_error_is_the_payloads(&error) {
                    Outcome::Malformed
                } else {
                    Outcome::Internal
                })
            }
            Err(error) => {
                say(&format!("image fetch thread: {error}"));
                Err(Outcome::Internal)
            }
        }
    }

    /// An image's machine (`machine.json`, or one given in its place) under the host's machine
    /// defaults and limits; a machine over the limits is told through `say` and yields exit
    /// status 2.
    pub fn image_machine(
        &self,
        machine: &schemas::Machine,
        say: &dyn Fn(&str),
    ) -> Result<schemas::ResolvedMachine, Outcome> {
        let layers = schemas::MachineLayers {
            image: Some(machine),
            worker: self.config.machine.as_ref(),
            ..schemas::MachineLayers::default()
        };
        schemas::resolve_machine(layers, &self.config.limits).map_err(|error| {
            say(&schemas::limit_violation(&error, "/machine").to_string());
            Outcome::Malformed
        })
    }
}

/// Whether an image error is the payload's fault (a bad reference or image) rather than the
/// host's or the network's.
pub fn image_error_is_the_payloads(error: &ImageError) -> bool {
    match error {
        ImageError::Archive(_)
        | ImageError::Machine(_)
        | ImageError::Disk { .. }
        | ImageError::DigestMismatch { .. }
        | ImageError::BadReference { .. } => true,
        ImageError::HttpStatus { status, .. } => (400..500).contains(status),
        _ => false,
    }
}
