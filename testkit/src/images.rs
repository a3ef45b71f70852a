//! Image tarballs for tests, built entry by entry so that hostile ones can be made too.

use std::path::Path;
use std::process::Command;

/// One tar entry, written exactly as described (names are not sanitised).
#[derive(Debug, Clone)]
pub struct Entry {
    /// Raw name bytes.
    pub name: Vec<u8>,
    /// Entry type.
    pub kind: tar::EntryType,
    /// File contents (regular files).
    pub data: Vec<u8>,
    /// Link target (links).
    pub link: Option<Vec<u8>>,
    /// Permission bits (0o644 unless [`Entry::with_mode`] says otherwise).
    pub mode: u32,
}

impl Entry {
    /// A regular file.
    pub fn file(name: &str, data: impl Into<Vec<u8>>) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            kind: tar::EntryType::Regular,
            data: data.into(),
            link: None,
            mode: 0o644,
        }
    }

    /// An entry of another type (symlink, hard link, FIFO, device, directory).
    pub fn special(name: &str, kind: tar::EntryType, link: Option<&str>) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            kind,
            data: Vec::new(),
            link: link.map(|l| l.as_bytes().to_vec()),
            mode: 0o644,
        }
    }

    /// This entry with permission bits `mode` (e.g. 0o755 for an executable).
    pub fn with_mode(self, mode: u32) -> Entry {
        Entry { mode, ..self }
    }
}

/// A tar stream of `entries`, uncompressed.
pub fn tar_bytes(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        {
            let old = header.as_old_mut();
            old.name = [0; 100];
            old.name[..entry.name.len()].copy_from_slice(&entry.name);
            if let Some(link) = &entry.link {
                old.linkname = [0; 100];
                old.linkname[..link.len()].copy_from_slice(link);
            }
        }
        header.set_entry_type(entry.kind);
        header.set_size(entry.data.len() as u64);
        header.set_mode(entry.mode);
        header.set_mtime(0);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&entry.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// zstd-compresses `bytes`.
pub fn zstd_bytes(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).expect("zstd encode")
}

/// An image tarball (tar.zst) of `entries`.
pub fn image(entries: &[Entry]) -> Vec<u8> {
    zstd_bytes(&tar_bytes(entries))
}

/// A valid machine.json.
pub fn machine_json() -> Vec<u8> {
    br#"{"version": 1, "memory": 256}"#.to_vec()
}

/// A small raw disk: 1 MiB with a recognisable first sector.
pub fn raw_disk() -> Vec<u8> {
    let mut disk = vec![0u8; 1 << 20];
    disk[..16].copy_from_slice(b"taskvm test disk");
    disk
}

/// The entries of a valid minimal image.
pub fn valid_entries() -> Vec<Entry> {
    vec![
        Entry::file("machine.json", machine_json()),
        Entry::file("disk.img", raw_disk()),
    ]
}

/// A valid minimal image.
pub fn valid_image() -> Vec<u8> {
    image(&valid_entries())
}

/// Runs `qemu-img create` with `args` in a fresh directory holding `disk.img`, and returns
/// the bytes of the file it made (`out`).
pub fn qemu_img_create(args: &[&str], out: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("disk.img"), raw_disk()).expect("write disk");
    run_qemu_img(dir.path(), args);
    std::fs::read(dir.path().join(out)).expect("read created image")
}

fn run_qemu_img(dir: &Path, args: &[&str]) {
    let status = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .status()
        .expect("run qemu-img");
    assert!(status.success(), "qemu-img {args:?} failed");
}

/// A valid image whose disk holds `bytes` of incompressible data (so its tarball is about that
/// big), for tests that need a transfer to take several reads.
pub fn incompressible_image(bytes: usize) -> Vec<u8> {
    let mut disk = vec![0u8; bytes.div_ceil(4096) * 4096];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for byte in disk.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    image(&[
        Entry::file("machine.json", machine_json()),
        Entry::file("disk.img", disk),
    ])
}

/// The sha256 of a file, in hex (with `sha256sum`, so the check does not share code with the
/// cache it checks).
pub fn sha256_file(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(output.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// An uncompressed tar stream, written into `out`, whose first entry is a metadata header of
/// type `flag` (`L`, `K`, `x`, `g`) declaring `declared` bytes, followed by that many bytes of
/// one letter, a file entry and the end marker: the metadata bomb that the `tar` crate reads
/// whole into memory. Streamed: nothing of `declared` size is ever held.
pub fn write_metadata_bomb(flag: u8, declared: u64, out: &mut impl std::io::Write) {
    let mut header = tar::Header::new_gnu();
    header.as_gnu_mut().expect("gnu").name[..13].copy_from_slice(b"././@LongLink");
    header.set_entry_type(tar::EntryType::new(flag));
    header.set_size(declared);
    header.set_mode(0o644);
    header.set_cksum();
    out.write_all(header.as_bytes()).expect("write");
    // For a PAX header, the data is one record whose value is the letter repeated.
    let chunk = vec![b'a'; 1 << 20];
    let mut left = declared;
    if flag == b'x' || flag == b'g' {
        let prefix = format!("{declared} path=");
        out.write_all(prefix.as_bytes()).expect("write");
        left -= prefix.len() as u64 + 1;
    }
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        out.write_all(&chunk[..n]).expect("write");
        left -= n as u64;
    }
    if flag == b'x' || flag == b'g' {
        out.write_all(b"\n").expect("write");
    }
    let padding = (512 - declared % 512) % 512;
    out.write_all(&vec![0u8; padding as usize]).expect("write");
    out.write_all(&tar_bytes(&valid_entries())).expect("write");
}

/// [`write_metadata_bomb`] compressed with zstd into the file at `path` (a 3 GiB name makes
/// a file of about 100 KB).
pub fn metadata_bomb_image(flag: u8, declared: u64, path: &Path) {
    let file = std::fs::File::create(path).expect("create bomb");
    let mut encoder = zstd::Encoder::new(file, 1).expect("zstd");
    write_metadata_bomb(flag, declared, &mut encoder);
    encoder.finish().expect("zstd finish");
}
