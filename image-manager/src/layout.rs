//! The image format: which files an image tarball holds and what they may be called.

/// The machine definition, required.
pub const MACHINE_JSON: &str = "machine.json";
/// The raw root disk, required.
pub const DISK_IMG: &str = "disk.img";
/// An optional qcow2 layer whose backing file is exactly `disk.img` (raw).
pub const LAYER_QCOW2: &str = "layer.qcow2";

/// Whether `name` is a plain file name an image may contain: one path component of
/// `[A-Za-z0-9_][A-Za-z0-9._-]*`, at most 128 bytes (the same rule as `boot` file names).
pub fn is_plain_file_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The files an image holds, as found in its tarball.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFiles {
    /// Whether `layer.qcow2` is present.
    pub has_layer: bool,
    /// Kernel file name, from `machine.json`'s `boot`.
    pub kernel: Option<String>,
    /// Initrd file name, from `machine.json`'s `boot`.
    pub initrd: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::is_plain_file_name;

    #[test]
    fn plain_names_only() {
        for good in ["disk.img", "vmlinux-6.1", "_x", "A.b-c_d"] {
            assert!(is_plain_file_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "./disk.img",
            "a/b",
            "/etc/passwd",
            ".hidden",
            "a b",
            "é",
            "a\\b",
        ] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
        assert!(!is_plain_file_name(&"a".repeat(129)));
    }
}
