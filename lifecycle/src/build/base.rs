//! What an image build starts from: a cached image (`--from`), a disk of the host's
//! (`--disk`), or a fresh empty disk with an installer ISO (`--iso --size`), checked before
//! any VM starts. Messages name the options of `taskvm image build`, which these are.

use std::path::{Path, PathBuf};

use engine::disk::drives::{HostDisk, HostFiles};
use image_manager::ImageRequest;

/// The base of a build, as the command line gave it.
#[derive(Debug)]
pub enum BuildBase {
    /// An image reference, fetched into the cache.
    Image {
        /// The parsed reference.
        request: ImageRequest,
        /// The reference as given, for messages.
        text: String,
    },
    /// Host files: an existing disk or a fresh one (with the ISO as an extra drive).
    Files {
        /// Disk and boot files.
        files: HostFiles,
        /// The installer ISO, when building from one.
        iso: Option<PathBuf>,
    },
}

/// The command line's base options.
pub struct BaseOptions<'a> {
    /// `--from`.
    pub from: Option<&'a str>,
    /// `--disk`.
    pub disk: Option<&'a Path>,
    /// `--format`.
    pub format: Option<&'a str>,
    /// `--iso`.
    pub iso: Option<&'a Path>,
    /// `--size`, in bytes.
    pub size: Option<u64>,
    /// `--kernel`.
    pub kernel: Option<&'a Path>,
    /// `--initrd`.
    pub initrd: Option<&'a Path>,
}

impl BuildBase {
    /// Checks the options and the files they name; an error is for the user.
    pub fn from_options(options: &BaseOptions<'_>) -> Result<BuildBase, String> {
        let given = [
            options.from.is_some(),
            options.disk.is_some(),
            options.iso.is_some(),
        ];
        if given.iter().filter(|&&g| g).count() != 1 {
            return Err("give exactly one of --from REF, --disk FILE or --iso FILE".into());
        }
        if options.format.is_some() && options.disk.is_none() {
            return Err("--format goes with --disk".into());
        }
        if options.size.is_some() != options.iso.is_some() {
            return Err(
                "--iso needs --size (the new disk's size, e.g. 8G), and --size needs --iso".into(),
            );
        }
        if let Some(from) = options.from {
            if options.kernel.is_some() || options.initrd.is_some() {
                return Err(
                    "--kernel and --initrd go with --disk or --iso (an image carries its own)"
                        .into(),
                );
            }
            let request = ImageRequest::parse(from, None)
                .map_err(|error| format!("image {from}: {error}"))?;
            return Ok(BuildBase::Image {
                request,
                text: from.to_owned(),
            });
        }
        for path in [options.kernel, options.initrd, options.iso, options.disk]
            .into_iter()
            .flatten()
        {
            if !path.is_file() {
                return Err(format!("{}: not a readable file", path.display()));
            }
        }
        let disk = match options.disk {
            Some(path) => {
                let format = match options.format {
                    Some(format) => format.to_owned(),
                    None => {
                        image_manager::detect_format(path).map_err(|error| error.to_string())?
                    }
                };
                check_host_disk(path, &format)?;
                HostDisk::Existing {
                    path: absolute(path)?,
                    format,
                }
            }
            // Without --disk, --iso and so --size were given (checked above).
            None => HostDisk::Empty {
                size: check_disk_size(options.size.unwrap_or_default())?,
            },
        };
        Ok(BuildBase::Files {
            files: HostFiles {
                disk,
                kernel: options.kernel.map(absolute).transpose()?,
                initrd: options.initrd.map(absolute).transpose()?,
            },
            iso: options.iso.map(absolute).transpose()?,
        })
    }
}

fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::fs::canonicalize(path).map_err(|error| format!("{}: {error}", path.display()))
}

/// A host disk must open in its format and stand alone (no backing file, no external data
/// file, not encrypted): the VM reaches only the one file.
fn check_host_disk(path: &Path, format: &str) -> Result<(), String> {
    if !matches!(format, "raw" | "qcow2") {
        return Err(format!("--format {format}: give raw or qcow2"));
    }
    let info = image_manager::qemu_img::info(path, format)
        .map_err(|error| format!("{}: {error}", path.display()))?;
    if info.backing_filename.is_some() {
        return Err(format!(
            "{}: has a backing file; flatten it first (qemu-img convert)",
            path.display()
        ));
    }
    let data_file = info
        .format_specific
        .as_ref()
        .and_then(|specific| specific.pointer("/data/data-file"))
        .is_some();
    if data_file || info.encrypted == Some(true) {
        return Err(format!(
            "{}: an external data file or encryption is not supported",
            path.display()
        ));
    }
    Ok(())
}

/// The size of a fresh disk for `--iso`: from 1 MiB to 16 TiB.
fn check_disk_size(bytes: u64) -> Result<u64, String> {
    if !(1 << 20..=16 << 40).contains(&bytes) {
        return Err(format!("--size {bytes}: between 1M and 16T"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_disk_is_between_1_mib_and_16_tib() {
        assert_eq!(check_disk_size(8 << 30), Ok(8 << 30));
        assert_eq!(check_disk_size(1 << 20), Ok(1 << 20));
        assert!(check_disk_size(1 << 10).is_err(), "below 1 MiB");
        assert!(check_disk_size(17 << 40).is_err());
        assert!(check_disk_size(0).is_err());
    }

    #[test]
    fn exactly_one_base_is_taken() {
        let none = BaseOptions {
            from: None,
            disk: None,
            format: None,
            iso: None,
            size: None,
            kernel: None,
            initrd: None,
        };
        assert!(BuildBase::from_options(&none)
            .unwrap_err()
            .contains("exactly one"));
        let both = BaseOptions {
            from: Some("x.tar.zst"),
            disk: Some(Path::new("/dev/null")),
            ..none
        };
        assert!(BuildBase::from_options(&both)
            .unwrap_err()
            .contains("exactly one"));
        let iso_without_size = BaseOptions {
            from: None,
            disk: None,
            iso: Some(Path::new("/dev/null")),
            ..both
        };
        assert!(BuildBase::from_options(&iso_without_size)
            .unwrap_err()
            .contains("--size"));
    }

    #[test]
    fn a_disk_with_a_backing_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).expect("write");
        let top = dir.path().join("top.qcow2");
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&top)
            .status()
            .expect("qemu-img");
        assert!(status.success());
        let options = BaseOptions {
            from: None,
            disk: Some(&top),
            format: None,
            iso: None,
            size: None,
            kernel: None,
            initrd: None,
        };
        let error = BuildBase::from_options(&options).unwrap_err();
        assert!(error.contains("backing file"), "{error}");
        let plain = BaseOptions {
            disk: Some(&base),
            ..options
        };
        match BuildBase::from_options(&plain) {
            Ok(BuildBase::Files { files, iso: None }) => match files.disk {
                HostDisk::Existing { format, .. } => assert_eq!(format, "raw"),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }
}
