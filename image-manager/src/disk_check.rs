//! Validating the disk files of an unpacked image before it is committed to the cache.
//!
//! Hostile disk files attack the host through the tools that open them: a qcow2 whose backing
//! file or external data file names a host file (`/etc/passwd`, a `json:` pseudo-protocol), a
//! qcow2 or VMDK disguised as a raw disk so that format probing opens it as something else.
//! Headers are read here first, by this code, and `qemu-img` is only ever run with an
//! explicit format and under limits.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use schemas::config::CacheConfig;

use crate::error::ImageError;
use crate::layout::{DISK_IMG, LAYER_QCOW2};
use crate::qemu_img;

/// Magic bytes at offset 0 of image formats that must never pass as a raw disk.
const FOREIGN_MAGICS: &[(&[u8], &str)] = &[
    (b"QFI\xfb", "qcow/qcow2"),
    (b"QED\x00", "QED"),
    (b"KDMV", "VMDK"),
    (b"COWD", "VMDK3"),
    (b"# Disk DescriptorFile", "VMDK descriptor"),
    (b"vhdxfile", "VHDX"),
    (b"conectix", "VHD"),
    (b"LUKS\xba\xbe", "LUKS"),
    (b"WithoutFreeSpace", "Parallels"),
    (b"WithouFreSpacExt", "Parallels"),
    (b"<<< ", "VDI"),
    (b"cloop", "cloop"),
];

/// Checks `disk.img` (and `layer.qcow2` when present) in `dir`.
pub fn check_disks(dir: &Path, has_layer: bool, limits: &CacheConfig) -> Result<(), ImageError> {
    check_raw_disk(&dir.join(DISK_IMG))?;
    if has_layer {
        check_layer(&dir.join(LAYER_QCOW2), limits)?;
    }
    Ok(())
}

fn disk_error(file: &str, reason: impl Into<String>) -> ImageError {
    ImageError::Disk {
        file: file.to_owned(),
        reason: reason.into(),
    }
}

fn check_raw_disk(path: &Path) -> Result<(), ImageError> {
    let head = read_head(path, 512)?;
    if let Some((_, format)) = FOREIGN_MAGICS
        .iter()
        .find(|(magic, _)| head.starts_with(magic))
    {
        return Err(disk_error(
            DISK_IMG,
            format!("is a {format} image; disk.img must be raw"),
        ));
    }
    let info = qemu_img::info(path, "raw")?;
    if info.format != "raw" {
        return Err(disk_error(
            DISK_IMG,
            format!("opened as {}, not raw", info.format),
        ));
    }
    Ok(())
}

fn check_layer(path: &Path, limits: &CacheConfig) -> Result<(), ImageError> {
    let header = Qcow2Header::read(path)?;
    header.check()?;
    let info = qemu_img::info(path, "qcow2")?;
    let fail = |reason: String| Err(disk_error(LAYER_QCOW2, reason));
    if info.format != "qcow2" {
        return fail(format!("opened as {}, not qcow2", info.format));
    }
    if info.backing_filename.as_deref() != Some(DISK_IMG) {
        return fail(format!(
            "backing file is {:?}; it must be disk.img",
            info.backing_filename
        ));
    }
    if info.backing_filename_format.as_deref() != Some("raw") {
        return fail(format!(
            "backing format is {:?}; it must be raw",
            info.backing_filename_format
        ));
    }
    if info.encrypted == Some(true) {
        return fail("is encrypted".to_owned());
    }
    let data_file = info
        .format_specific
        .as_ref()
        .and_then(|specific| specific.pointer("/data/data-file"));
    if data_file.is_some() {
        return fail("has an external data file".to_owned());
    }
    if info.virtual_size > limits.max_file_size {
        return fail(format!(
            "virtual size {} exceeds the limit of {} bytes",
            info.virtual_size, limits.max_file_size
        ));
    }
    Ok(())
}

fn read_head(path: &Path, length: u64) -> Result<Vec<u8>, ImageError> {
    let mut head = Vec::new();
    File::open(path)
        .and_then(|file| file.take(length).read_to_end(&mut head))
        .map_err(|e| ImageError::io_at("read", path, e))?;
    Ok(head)
}

/// The fields of a qcow2 header (and its extensions) that decide whether it may be opened.
#[derive(Debug, Default)]
struct Qcow2Header {
    magic_ok: bool,
    version: u32,
    backing_file: Option<Vec<u8>>,
    backing_format: Option<Vec<u8>>,
    crypt_method: u32,
    incompatible_features: u64,
    data_file_extension: bool,
}

/// Bit of `incompatible_features` meaning "an external data file holds the guest data".
const QCOW2_EXTERNAL_DATA_FILE: u64 = 1 << 2;
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Header bytes read: enough for the fixed header, extensions and a backing file name.
const HEADER_READ: u64 = 64 * 1024;

impl Qcow2Header {
    fn read(path: &Path) -> Result<Self, ImageError> {
        let bytes = read_head(path, HEADER_READ)?;
        Ok(Self::parse(&bytes))
    }

    fn parse(bytes: &[u8]) -> Self {
        let be32 = |at: usize| {
            bytes
                .get(at..at + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        let be64 = |at: usize| Some((u64::from(be32(at)?) << 32) | u64::from(be32(at + 4)?));
        let mut header = Qcow2Header {
            magic_ok: bytes.starts_with(b"QFI\xfb"),
            version: be32(4).unwrap_or(0),
            crypt_method: be32(32).unwrap_or(u32::MAX),
            ..Qcow2Header::default()
        };
        if let (Some(offset), Some(size)) = (be64(8), be32(16)) {
            if offset != 0 {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let end = start.saturating_add(size as usize);
                header.backing_file =
                    Some(bytes.get(start..end).unwrap_or(b"<out of range>").to_vec());
            }
        }
        let header_length = if header.version >= 3 {
            header.incompatible_features = be64(72).unwrap_or(u64::MAX);
            be32(100).unwrap_or(0) as usize
        } else {
            72
        };
        let mut at = header_length;
        while let (Some(kind), Some(length)) = (be32(at), be32(at + 4)) {
            let data = bytes.get(at + 8..at + 8 + length as usize);
            match kind {
                EXT_END => break,
                EXT_BACKING_FORMAT => header.backing_format = data.map(<[u8]>::to_vec),
                EXT_DATA_FILE => header.data_file_extension = true,
                _ => {}
            }
            at += 8 + (length as usize).div_ceil(8) * 8;
        }
        header
    }

    fn check(&self) -> Result<(), ImageError> {
        let fail = |reason: &str| Err(disk_error(LAYER_QCOW2, reason));
        if !self.magic_ok || !(2..=3).contains(&self.version) {
            return fail("is not a qcow2 (version 2 or 3) image");
        }
        if self.crypt_method != 0 {
            return fail("is encrypted");
        }
        if self.incompatible_features & QCOW2_EXTERNAL_DATA_FILE != 0 || self.data_file_extension {
            return fail("has an external data file");
        }
        match &self.backing_file {
            Some(name) if name == DISK_IMG.as_bytes() => {}
            Some(name) => {
                let shown = String::from_utf8_lossy(name);
                return Err(disk_error(
                    LAYER_QCOW2,
                    format!("backing file is {shown:?}; it must be disk.img"),
                ));
            }
            None => return fail("has no backing file; it must be backed by disk.img"),
        }
        if self.backing_format.as_deref() != Some(b"raw") {
            return fail("backing format is not raw (it must be recorded as raw)");
        }
        Ok(())
    }
}
