//! A corpus of hostile and broken images: each is refused with its own error, through a real
//! fetch into a real cache, and nothing is left behind or written outside the cache.

use std::path::Path;

use image_manager::{ArchiveError, Cache, ImageError, ImageRequest};
use schemas::config::CacheConfig;
use tar::EntryType;
use testkit::images::{
    image, machine_json, qemu_img_create, raw_disk, valid_entries, zstd_bytes, Entry,
};

fn small_limits(dir: &Path) -> CacheConfig {
    CacheConfig {
        dir: dir.to_path_buf(),
        max_compressed_size: 8 << 20,
        max_unpacked_size: 16 << 20,
        max_file_size: 8 << 20,
        max_entries: 8,
        max_machine_json_size: 4096,
        ..CacheConfig::default()
    }
}

/// Fetches `bytes` (as a file, optionally pinned) into a fresh cache inside a fresh
/// directory; returns that directory with the outcome.
fn fetch_file(
    bytes: &[u8],
    sha256: Option<&str>,
) -> (tempfile::TempDir, Result<image_manager::Lease, ImageError>) {
    let sandbox = tempfile::tempdir().unwrap();
    let source = sandbox.path().join("image.tar.zst");
    std::fs::write(&source, bytes).unwrap();
    let cache = Cache::open(small_limits(&sandbox.path().join("cache"))).unwrap();
    let request = ImageRequest::parse(source.to_str().unwrap(), sha256).unwrap();
    let outcome = cache.fetch(&request, &|_| {}).map(|(lease, _)| lease);
    (sandbox, outcome)
}

/// Fetches `bytes` and returns the error, after checking that the cache is empty and that
/// nothing appeared beside it.
fn refuse(bytes: &[u8]) -> ImageError {
    refuse_pinned(bytes, None)
}

fn refuse_pinned(bytes: &[u8], sha256: Option<&str>) -> ImageError {
    let (sandbox, outcome) = fetch_file(bytes, sha256);
    let error = outcome.expect_err("hostile image must be refused");
    let cache_dir = sandbox.path().join("cache");
    for sub in ["sha256", "tmp", "leases", "refs"] {
        let left: Vec<_> = std::fs::read_dir(cache_dir.join(sub)).unwrap().collect();
        assert!(left.is_empty(), "{sub}/ not empty after refusing: {error}");
    }
    let mut around: Vec<String> = std::fs::read_dir(sandbox.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    around.sort();
    assert_eq!(
        around,
        ["cache", "image.tar.zst"],
        "something was written outside the cache"
    );
    error
}

fn archive_error(bytes: &[u8]) -> ArchiveError {
    match refuse(bytes) {
        ImageError::Archive(error) => error,
        other => panic!("expected an archive error, got: {other}"),
    }
}

fn with(extra: Entry) -> Vec<u8> {
    let mut entries = valid_entries();
    entries.push(extra);
    image(&entries)
}

#[test]
fn parent_directory_traversal() {
    let error = archive_error(&with(Entry::file("../escaped", b"x".to_vec())));
    assert_eq!(
        error,
        ArchiveError::BadName {
            name: "../escaped".into()
        }
    );
    let error = archive_error(&with(Entry::file("a/../../escaped", b"x".to_vec())));
    assert!(matches!(error, ArchiveError::BadName { .. }), "{error}");
}

#[test]
fn absolute_path() {
    let error = archive_error(&with(Entry::file("/tmp/escaped", b"x".to_vec())));
    assert_eq!(
        error,
        ArchiveError::BadName {
            name: "/tmp/escaped".into()
        }
    );
}

#[test]
fn symlink_hardlink_device_fifo_directory() {
    for (kind, expected) in [
        (EntryType::Symlink, "symbolic link"),
        (EntryType::Link, "hard link"),
        (EntryType::Char, "character device"),
        (EntryType::Block, "block device"),
        (EntryType::Fifo, "FIFO"),
        (EntryType::Directory, "directory"),
    ] {
        let error = archive_error(&with(Entry::special(
            "layer.qcow2",
            kind,
            Some("/etc/passwd"),
        )));
        assert_eq!(
            error,
            ArchiveError::NotRegularFile {
                name: "layer.qcow2".into(),
                kind: expected.into()
            }
        );
    }
}

#[test]
fn duplicate_entry() {
    let error = archive_error(&with(Entry::file("disk.img", raw_disk())));
    assert_eq!(
        error,
        ArchiveError::Duplicate {
            name: "disk.img".into()
        }
    );
    let error = archive_error(&with(Entry::file("./machine.json", machine_json())));
    assert_eq!(
        error,
        ArchiveError::Duplicate {
            name: "machine.json".into()
        }
    );
}

#[test]
fn unexpected_file() {
    let error = archive_error(&with(Entry::file("notes.txt", b"hi".to_vec())));
    assert_eq!(
        error,
        ArchiveError::Unexpected {
            name: "notes.txt".into()
        }
    );
}

#[test]
fn missing_machine_json_and_disk() {
    let error = archive_error(&image(&[Entry::file("disk.img", raw_disk())]));
    assert_eq!(
        error,
        ArchiveError::Missing {
            name: "machine.json".into()
        }
    );
    let error = archive_error(&image(&[Entry::file("machine.json", machine_json())]));
    assert_eq!(
        error,
        ArchiveError::Missing {
            name: "disk.img".into()
        }
    );
}

#[test]
fn boot_files_named_by_machine_json_must_be_present() {
    let machine = br#"{"version": 1, "boot": {"kernel": "vmlinux", "initrd": "initrd.img"}}"#;
    let entries = [
        Entry::file("machine.json", machine.to_vec()),
        Entry::file("disk.img", raw_disk()),
        Entry::file("vmlinux", b"kernel".to_vec()),
    ];
    assert_eq!(
        archive_error(&image(&entries)),
        ArchiveError::Missing {
            name: "initrd.img".into()
        }
    );
}

#[test]
fn oversized_machine_json() {
    let mut big = machine_json();
    big.extend(std::iter::repeat_n(b' ', 8192));
    let error = archive_error(&image(&[
        Entry::file("machine.json", big),
        Entry::file("disk.img", raw_disk()),
    ]));
    assert_eq!(
        error,
        ArchiveError::FileTooLarge {
            name: "machine.json".into(),
            limit: 4096,
            setting: "cache.maxMachineJsonSize",
        }
    );
}

#[test]
fn invalid_machine_json() {
    for (text, expected) in [
        (&br#"{"version": 1, "memory": "lots"}"#[..], "/memory"),
        (&br#"{"memory": 512}"#[..], "/version: required"),
        (&b"{not json"[..], "not valid JSON"),
    ] {
        let entries = [
            Entry::file("machine.json", text.to_vec()),
            Entry::file("disk.img", raw_disk()),
        ];
        match refuse(&image(&entries)) {
            ImageError::Machine(violations) => {
                assert!(violations.to_string().contains(expected), "{violations}")
            }
            other => panic!("expected a machine.json error, got {other}"),
        }
    }
}

fn disk_error(bytes: &[u8]) -> (String, String) {
    match refuse(bytes) {
        ImageError::Disk { file, reason } => (file, reason),
        other => panic!("expected a disk error, got: {other}"),
    }
}

fn with_layer(layer: Vec<u8>) -> Vec<u8> {
    with(Entry::file("layer.qcow2", layer))
}

/// Makes a layer with `qemu-img create ARGS layer.qcow2 1M` (ARGS space-separated), packs it
/// into an otherwise valid image and returns why it was refused.
fn layer_refusal(create_args: &str) -> String {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend(create_args.split(' '));
    args.extend(["layer.qcow2", "1M"]);
    let layer = qemu_img_create(&args, "layer.qcow2");
    let (file, reason) = disk_error(&with_layer(layer));
    assert_eq!(file, "layer.qcow2");
    reason
}

#[test]
fn qcow2_layer_backed_by_a_host_file() {
    let reason = layer_refusal("-F raw -b /etc/passwd -u");
    assert!(
        reason.contains("backing file is \"/etc/passwd\""),
        "{reason}"
    );
}

#[test]
fn qcow2_layer_backed_by_a_json_pseudo_protocol() {
    let reason = layer_refusal(r#"-F raw -b json:{"driver":"file","filename":"/etc/passwd"} -u"#);
    assert!(reason.contains("json:"), "{reason}");
}

#[test]
fn qcow2_layer_with_an_external_data_file() {
    let reason = layer_refusal("-o data_file=data.raw");
    assert!(reason.contains("external data file"), "{reason}");
}

#[test]
fn qcow2_layer_with_a_non_raw_backing_format() {
    let reason = layer_refusal("-F qcow2 -b disk.img -u");
    assert!(reason.contains("backing format"), "{reason}");
}

#[test]
fn a_valid_qcow2_layer_is_accepted() {
    let layer = qemu_img_create(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "disk.img",
            "layer.qcow2",
        ],
        "layer.qcow2",
    );
    let (_sandbox, outcome) = fetch_file(&with_layer(layer), None);
    let lease = outcome.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(lease.boot_disk().1, "qcow2");
}

#[test]
fn qcow2_disguised_as_disk_img() {
    let qcow2 = qemu_img_create(
        &["create", "-q", "-f", "qcow2", "fake.img", "1M"],
        "fake.img",
    );
    let entries = [
        Entry::file("machine.json", machine_json()),
        Entry::file("disk.img", qcow2),
    ];
    let (file, reason) = disk_error(&image(&entries));
    assert_eq!(file, "disk.img");
    assert!(reason.contains("qcow"), "{reason}");
}

#[test]
fn zstd_bomb() {
    // 256 MiB of zeros compress to a few KiB; the unpacked cap is 16 MiB.
    let mut tar = testkit::images::tar_bytes(&[Entry::file("machine.json", machine_json())]);
    tar.truncate(tar.len() - 1024);
    let mut header = tar::Header::new_gnu();
    header.set_path("disk.img").unwrap();
    header.set_size(256 << 20);
    header.set_mode(0o644);
    header.set_cksum();
    tar.extend_from_slice(header.as_bytes());
    tar.resize(tar.len() + (256 << 20) + 1024, 0);
    let bomb = zstd_bytes(&tar);
    assert!(bomb.len() < 1 << 20);
    let error = archive_error(&bomb);
    assert!(
        matches!(
            error,
            ArchiveError::FileTooLarge { .. } | ArchiveError::UnpackedTooLarge { .. }
        ),
        "{error}"
    );
}

#[test]
fn too_many_entries() {
    let mut entries = valid_entries();
    for i in 0..10 {
        entries.push(Entry::file(&format!("extra{i}"), b"x".to_vec()));
    }
    assert_eq!(
        archive_error(&image(&entries)),
        ArchiveError::TooManyEntries { limit: 8 }
    );
}

#[test]
fn truncated_stream() {
    let good = testkit::images::valid_image();
    let error = archive_error(&good[..good.len() / 2]);
    assert!(matches!(error, ArchiveError::Corrupt { .. }), "{error}");
}

#[test]
fn not_zstd_at_all() {
    let error = archive_error(b"this is not an image");
    assert!(matches!(error, ArchiveError::Corrupt { .. }), "{error}");
}

#[test]
fn data_after_the_archive() {
    let mut tar = testkit::images::tar_bytes(&valid_entries());
    tar.extend_from_slice(b"smuggled");
    let error = archive_error(&zstd_bytes(&tar));
    assert!(matches!(error, ArchiveError::Corrupt { .. }), "{error}");
}

#[test]
fn wrong_pinned_digest() {
    let error = refuse_pinned(&testkit::images::valid_image(), Some(&"0".repeat(64)));
    assert!(
        matches!(error, ImageError::DigestMismatch { .. }),
        "{error}"
    );
}
