//! Read-only content for mounts, from real archives (tar.zst, tar.gz and zip, the hostile ones
//! built byte by byte) to real ext4 images, read back with `debugfs`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use image_manager::content::{ContentFormat, ContentStore, MAX_ENTRIES};
use image_manager::error::{ArchiveError, ImageError};
use image_manager::reference::FilePolicy;
use schemas::config::CacheConfig;
use testkit::images::{sha256_file, zstd_bytes, Entry};

const DISK: u64 = 64 << 20;

fn store(dir: &Path) -> ContentStore {
    ContentStore::open(&dir.join("content"), CacheConfig::default(), u64::MAX).unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> (String, String) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    (format!("file://{}", path.display()), sha256_file(&path))
}

/// `debugfs -R REQUEST image`: what it printed.
fn debugfs(image: &Path, request: &str) -> String {
    let output = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A tar of a small tree: a file, an executable, a directory and a symbolic link.
fn tree_tar() -> Vec<u8> {
    testkit::images::tar_bytes(&[
        Entry::special("docs/", tar::EntryType::Directory, None).with_mode(0o755),
        Entry::file("docs/a.txt", "alpha\n"),
        Entry::file("bin/run", "#!/bin/sh\n").with_mode(0o755),
        Entry::special("link", tar::EntryType::Symlink, Some("/etc/shadow")),
    ])
}

/// A zip made by Python's zipfile from (name, data, unix mode) entries.
fn python_zip(dir: &Path, entries: &[(&str, &str, u32)]) -> Vec<u8> {
    let out = dir.join("made.zip");
    let listed: Vec<String> = entries
        .iter()
        .map(|(name, data, mode)| format!("({name:?}, {data:?}, 0o{mode:o})"))
        .collect();
    let script = format!(
        "import zipfile\n\
         with zipfile.ZipFile({out:?}, 'w', zipfile.ZIP_DEFLATED) as z:\n\
         \x20   for name, data, mode in [{}]:\n\
         \x20       info = zipfile.ZipInfo(name)\n\
         \x20       info.external_attr = mode << 16\n\
         \x20       info.compress_type = zipfile.ZIP_DEFLATED\n\
         \x20       z.writestr(info, data)\n",
        listed.join(", "),
        out = out.display().to_string()
    );
    let status = Command::new("python3")
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(&out).unwrap()
}

fn archive_error(result: Result<impl std::fmt::Debug, ImageError>) -> ArchiveError {
    match result {
        Err(ImageError::Archive(error)) => error,
        other => panic!("expected an archive error, got {other:?}"),
    }
}

fn checks_out(image: &Path) {
    let status = Command::new("e2fsck")
        .args(["-n", "-f"])
        .arg(image)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    assert_eq!(
        std::fs::metadata(image).unwrap().len(),
        DISK,
        "padded to the disk size"
    );
    assert_eq!(debugfs(image, "cat /docs/a.txt"), "alpha\n");
    assert!(debugfs(image, "stat /bin/run").contains("Mode:  0755"));
    assert!(debugfs(image, "stat /docs/a.txt").contains("Mode:  0644"));
    assert!(
        !debugfs(image, "ls -l /").contains("link"),
        "links are left out"
    );
}

#[test]
fn tar_zst_tar_gz_and_zip_become_the_same_read_only_tree_made_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let tar = tree_tar();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let zip = python_zip(
        dir.path(),
        &[
            ("docs/", "", 0o040_755),
            ("docs/a.txt", "alpha\n", 0o100_644),
            ("bin/run", "#!/bin/sh\n", 0o100_755),
            ("link", "/etc/shadow", 0o120_777),
        ],
    );
    for (name, bytes, format) in [
        ("tree.tar.zst", zstd_bytes(&tar), ContentFormat::TarZst),
        ("tree.tar.gz", gz.finish().unwrap(), ContentFormat::TarGz),
        ("tree.zip", zip, ContentFormat::Zip),
    ] {
        let (url, sha) = write(dir.path(), name, &bytes);
        let made = store
            .get(&url, &sha, format, &FilePolicy::Any, DISK)
            .unwrap();
        assert!(made.made, "{name}");
        assert_eq!(made.left_out, 1, "{name}: the link");
        checks_out(&made.path);
        let again = store
            .get(&url, &sha, format, &FilePolicy::Any, DISK)
            .unwrap();
        assert!(!again.made && again.path == made.path, "{name}");
    }
}

#[test]
fn hostile_archives_are_refused_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let get = |name: &str, bytes: &[u8], format: ContentFormat| {
        let (url, sha) = write(dir.path(), name, bytes);
        store
            .get(&url, &sha, format, &FilePolicy::Any, DISK)
            .map(|image| image.path)
    };
    let escape = zstd_bytes(&testkit::images::tar_bytes(&[Entry::file(
        "../escape",
        "x",
    )]));
    assert!(matches!(
        archive_error(get("escape.tar.zst", &escape, ContentFormat::TarZst)),
        ArchiveError::BadName { .. }
    ));
    let absolute = python_zip(dir.path(), &[("/etc/evil", "x", 0o100_644)]);
    assert!(matches!(
        archive_error(get("absolute.zip", &absolute, ContentFormat::Zip)),
        ArchiveError::BadName { .. }
    ));
    let conflicting = zstd_bytes(&testkit::images::tar_bytes(&[
        Entry::file("a", "file"),
        Entry::file("a/b", "below a file"),
    ]));
    let error = archive_error(get("conflict.tar.zst", &conflicting, ContentFormat::TarZst));
    assert!(
        error.to_string().contains("conflicts with another entry"),
        "{error}"
    );
    let big = zstd_bytes(&testkit::images::tar_bytes(&[Entry::file(
        "big",
        vec![0u8; (DISK + 4096) as usize],
    )]));
    assert!(matches!(
        archive_error(get("big.tar.zst", &big, ContentFormat::TarZst)),
        ArchiveError::ContentTooLarge { .. }
    ));
    assert!(matches!(
        archive_error(get(
            "lying.zip",
            &zip64_claiming(MAX_ENTRIES + 1),
            ContentFormat::Zip
        )),
        ArchiveError::TooManyContentEntries { .. }
    ));
    // A zip entry whose data was changed after it was written: its checksum no longer matches,
    // which the zip reader says while the entry is being copied.
    let mut damaged = python_zip(
        dir.path(),
        &[("f.txt", &"alpha beta ".repeat(4096), 0o100_644)],
    );
    let data_at = 30 + "f.txt".len();
    damaged[data_at + 8] ^= 0x55;
    assert!(matches!(
        archive_error(get("damaged.zip", &damaged, ContentFormat::Zip)),
        ArchiveError::Corrupt { .. }
    ));
    let (url, _) = write(dir.path(), "mismatch.tar.zst", &escape);
    assert!(matches!(
        store.get(
            &url,
            &"0".repeat(64),
            ContentFormat::TarZst,
            &FilePolicy::Any,
            DISK
        ),
        Err(ImageError::DigestMismatch { .. })
    ));
    let left: Vec<PathBuf> = std::fs::read_dir(dir.path().join("content"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| !path.to_string_lossy().ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(!dir.path().join("escape").exists());
}

/// The end records of a zip64 file claiming `entries` entries in a 46-byte central directory:
/// no entry is there; the claim alone must be refused.
fn zip64_claiming(entries: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    let record_at = bytes.len() as u64;
    bytes.extend_from_slice(&[0x50, 0x4b, 0x06, 0x06]);
    bytes.extend_from_slice(&44u64.to_le_bytes()); // size of the rest of the record
    bytes.extend_from_slice(&[45, 0, 45, 0]); // versions
    bytes.extend_from_slice(&[0; 8]); // disk numbers
    bytes.extend_from_slice(&entries.to_le_bytes()); // entries on this disk
    bytes.extend_from_slice(&entries.to_le_bytes()); // entries in all
    bytes.extend_from_slice(&46u64.to_le_bytes()); // directory size
    bytes.extend_from_slice(&0u64.to_le_bytes()); // directory offset
    bytes.extend_from_slice(&[0x50, 0x4b, 0x06, 0x07]); // locator
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&record_at.to_le_bytes());
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&[0x50, 0x4b, 0x05, 0x06]); // end of central directory
    bytes.extend_from_slice(&[0; 4]);
    bytes.extend_from_slice(&0xffffu16.to_le_bytes());
    bytes.extend_from_slice(&0xffffu16.to_le_bytes());
    bytes.extend_from_slice(&0xffff_ffffu32.to_le_bytes());
    bytes.extend_from_slice(&0xffff_ffffu32.to_le_bytes());
    bytes.extend_from_slice(&0u16.to_le_bytes());
    bytes
}
