//! The reader against archives written by the `tar` crate (GNU long names, PAX, sparse files)
//! and against hostile headers built by hand.

use std::io::{Read, Seek, SeekFrom, Write};

use untar::{Archive, Kind, Limits, TarError};

/// Every entry as (name, kind, data).
fn read_all(bytes: &[u8], limits: Limits) -> Result<Vec<(String, Kind, Vec<u8>)>, TarError> {
    let mut archive = Archive::new(bytes, limits);
    let mut entries = Vec::new();
    while let Some(mut entry) = archive.next_entry()? {
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(TarError::Io)?;
        let header = entry.header();
        assert_eq!(data.len() as u64, header.size);
        entries.push((
            String::from_utf8(header.name.clone()).unwrap(),
            header.kind,
            data,
        ));
    }
    Ok(entries)
}

fn file_header(size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header
}

#[test]
fn what_the_tar_crate_writes_reads_back_the_same() {
    let long_name = format!("{}/file.txt", "d".repeat(180));
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_data(&mut file_header(5), "short.txt", &b"hello"[..])
        .unwrap();
    builder
        .append_data(&mut file_header(3), &long_name, &b"abc"[..])
        .unwrap();
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_size(0);
    builder.append_data(&mut dir, "sub/", &[][..]).unwrap();
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    builder
        .append_link(&mut link, "link", "x".repeat(150))
        .unwrap();
    // A ustar header whose name comes from a PAX record.
    let mut ustar = tar::Header::new_ustar();
    ustar.set_size(4);
    ustar.set_entry_type(tar::EntryType::Regular);
    ustar.set_path("placeholder").unwrap();
    ustar.set_cksum();
    builder
        .append_pax_extensions([("path", b"from/pax/name.bin".as_slice())])
        .unwrap();
    builder.append(&ustar, &b"pax!"[..]).unwrap();
    let bytes = builder.into_inner().unwrap();

    let entries = read_all(&bytes, Limits::default()).unwrap();
    let names: Vec<&str> = entries.iter().map(|(name, _, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "short.txt",
            long_name.as_str(),
            "sub/",
            "link",
            "from/pax/name.bin"
        ]
    );
    assert_eq!(entries[0].2, b"hello");
    assert_eq!(entries[1].2, b"abc");
    assert_eq!(entries[2].1, Kind::Directory);
    assert_eq!(entries[3].1, Kind::Symlink);
    assert_eq!(entries[4].2, b"pax!");

    let mut archive = Archive::new(&bytes[..], Limits::default());
    let mut headers = Vec::new();
    while let Some(entry) = archive.next_entry().unwrap() {
        headers.push(entry.header().clone()); // data left unread: skipped
    }
    assert_eq!(headers[3].link, "x".repeat(150).as_bytes());
}

#[test]
fn a_sparse_file_reads_back_with_its_holes_as_zeros() {
    let scratch = tempfile::tempdir().unwrap();
    let path = scratch.path().join("sparse.img");
    let mut file = std::fs::File::create(&path).unwrap();
    // Data at 0, 1 MiB and 5 MiB + 7 of an 8 MiB file: a map of several runs.
    for (at, byte) in [(0u64, 1u8), (1 << 20, 2), ((5 << 20) + 7, 3)] {
        file.seek(SeekFrom::Start(at)).unwrap();
        file.write_all(&vec![byte; 10_000]).unwrap();
    }
    file.set_len(8 << 20).unwrap();
    drop(file);
    let expected = std::fs::read(&path).unwrap();

    let mut builder = tar::Builder::new(Vec::new());
    builder.sparse(true);
    builder
        .append_file("disk.img", &mut std::fs::File::open(&path).unwrap())
        .unwrap();
    let bytes = builder.into_inner().unwrap();
    assert!(
        bytes.len() < 200_000,
        "written sparse: {} bytes",
        bytes.len()
    );
    let entries = read_all(&bytes, Limits::default()).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].2, expected);

    let mut archive = Archive::new(&bytes[..], Limits::default());
    assert!(archive.next_entry().unwrap().unwrap().header().sparse);
}

/// A GNU header of `flag` declaring `size` bytes, with nothing after it.
fn lone_header(flag: u8, size: u64) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::new(flag));
    header.as_gnu_mut().unwrap().name[..12].copy_from_slice(b"././@LongLin");
    header.set_size(size);
    header.set_cksum();
    header.as_bytes().to_vec()
}

#[test]
fn metadata_headers_over_the_bound_fail_before_any_read() {
    for (flag, kind) in [
        (b'L', "GNU long name (L)"),
        (b'K', "GNU long link name (K)"),
        (b'x', "PAX extended (x)"),
        (b'g', "PAX global (g)"),
    ] {
        // 3 GiB declared, no data at all: an allocation or a read would fail differently.
        let bytes = lone_header(flag, 3 << 30);
        let error = read_all(&bytes, Limits::default()).unwrap_err();
        match error {
            TarError::MetadataTooLarge {
                kind: said,
                declared,
                limit,
            } => {
                assert_eq!((said, declared, limit), (kind, 3 << 30, 64 * 1024));
            }
            other => panic!("{flag}: {other}"),
        }
        assert!(error_text(&bytes).contains("3221225472 bytes"));
    }
}

fn error_text(bytes: &[u8]) -> String {
    read_all(bytes, Limits::default()).unwrap_err().to_string()
}

#[test]
fn a_sparse_map_longer_than_the_bound_is_refused() {
    // An S header saying "extended", followed by extension blocks each full of runs.
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::GNUSparse);
    header.set_size(0);
    header.as_gnu_mut().unwrap().name[..4].copy_from_slice(b"bomb");
    header.as_gnu_mut().unwrap().isextended[0] = 1;
    header.set_cksum();
    let mut bytes = header.as_bytes().to_vec();
    let mut offset = 0u64;
    let limits = Limits {
        max_sparse_blocks: 100,
        ..Limits::default()
    };
    for _ in 0..10 {
        let mut block = [0u8; 512];
        for slot in 0..21 {
            let entry = &mut block[slot * 24..slot * 24 + 24];
            entry[..11].copy_from_slice(format!("{offset:011o}").as_bytes());
            entry[12..23].copy_from_slice(format!("{:011o}", 0).as_bytes());
            offset += 512;
        }
        block[504] = 1;
        bytes.extend_from_slice(&block);
    }
    let error = read_all(&bytes, limits).unwrap_err();
    assert!(
        matches!(error, TarError::SparseMapTooLarge { limit: 100 }),
        "{error}"
    );
}

#[test]
fn broken_archives_are_errors_not_panics() {
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_data(&mut file_header(1000), "a.bin", &[7u8; 1000][..])
        .unwrap();
    let good = builder.into_inner().unwrap();

    let mut bad_sum = good.clone();
    bad_sum[0] ^= 1;
    assert!(matches!(
        read_all(&bad_sum, Limits::default()),
        Err(TarError::Checksum { offset: 0 })
    ));
    // Cut inside the header and inside the data.
    assert!(matches!(
        read_all(&good[..300], Limits::default()),
        Err(TarError::Truncated { .. })
    ));
    let cut = read_all(&good[..900], Limits::default()).unwrap_err();
    assert!(cut.to_string().contains("ends in the middle"), "{cut}");
    // A long name with no entry after it.
    let mut dangling = lone_header(b'L', 5);
    dangling.extend_from_slice(&[b'n'; 512]);
    dangling.extend_from_slice(&[0u8; 1024]);
    assert!(matches!(
        read_all(&dangling, Limits::default()),
        Err(TarError::DanglingMetadata { .. })
    ));
    // Two long names for one entry.
    let mut twice = lone_header(b'L', 5);
    twice.extend_from_slice(&[b'n'; 512]);
    twice.extend_from_slice(&lone_header(b'L', 5));
    twice.extend_from_slice(&[b'n'; 512]);
    assert!(matches!(
        read_all(&twice, Limits::default()),
        Err(TarError::DuplicateMetadata { .. })
    ));
    // Metadata headers chained past the bound.
    let mut chain = Vec::new();
    for _ in 0..9 {
        chain.extend_from_slice(&lone_header(b'g', 0));
    }
    assert!(matches!(
        read_all(&chain, Limits::default()),
        Err(TarError::TooManyMetadataHeaders { limit: 8 })
    ));
}
