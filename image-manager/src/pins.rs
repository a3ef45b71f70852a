//! Pins: an image kept out of garbage collection for as long as something outside the cache
//! needs it — a kept failed VM, whose disk is an overlay on the image's. A pin is a file
//! `pins/DIGEST.HOLDER_HASH` naming its holder, a path; it holds while that path exists, so
//! deleting the holder (a kept VM's directory) releases it with no further step, even after a
//! crash. Stale pins are removed when garbage collection comes across them.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::error::ImageError;
use crate::reference::Digest;

/// The pins' directory under cache root `root`.
fn pins_dir(root: &Path) -> PathBuf {
    root.join("pins")
}

/// Pins image `digest` for as long as `holder` exists.
pub(crate) fn pin(root: &Path, digest: &Digest, holder: &Path) -> Result<(), ImageError> {
    let dir = pins_dir(root);
    fs::create_dir_all(&dir).map_err(|e| ImageError::io_at("create", &dir, e))?;
    let holder = std::path::absolute(holder).map_err(|e| ImageError::io_at("pin", holder, e))?;
    let text = holder.to_string_lossy().into_owned();
    let hash = hex::encode(&Sha256::digest(text.as_bytes())[..8]);
    let path = dir.join(format!("{}.{hash}", digest.hex()));
    let partial = dir.join(format!(".{}.{hash}.partial", digest.hex()));
    fs::write(&partial, text.as_bytes()).map_err(|e| ImageError::io_at("write", &partial, e))?;
    fs::rename(&partial, &path).map_err(|e| ImageError::io_at("write", &path, e))
}

/// Whether image `digest` is pinned by a holder that still exists; the pins of holders that are
/// gone are removed on the way.
pub(crate) fn is_pinned(root: &Path, digest: &Digest) -> bool {
    let prefix = format!("{}.", digest.hex());
    let mut pinned = false;
    for entry in fs::read_dir(pins_dir(root)).into_iter().flatten().flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        match fs::read_to_string(entry.path()) {
            Ok(holder) if Path::new(&holder).exists() => pinned = true,
            Ok(_) => {
                let _ = fs::remove_file(entry.path());
            }
            // Unreadable: left alone, and counted as a pin (never remove what may be needed).
            Err(_) => pinned = true,
        }
    }
    pinned
}
