//! The cache against a real HTTP server on loopback: single-flight, revalidation, retries,
//! stalls, leases and garbage collection.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use image_manager::{Cache, Digest, FetchKind, ImageError, ImageRequest};
use schemas::config::CacheConfig;
use testkit::http::{Behaviour, Server};
use testkit::images::{image, machine_json, valid_image, Entry};

fn limits(dir: &Path) -> CacheConfig {
    CacheConfig {
        dir: dir.to_path_buf(),
        stall_timeout: 1,
        ..CacheConfig::default()
    }
}

fn distinct_image(tag: u8) -> Vec<u8> {
    let mut disk = vec![0u8; 1 << 20];
    disk[0] = tag;
    disk[4096] = 1;
    image(&[
        Entry::file("machine.json", machine_json()),
        Entry::file("disk.img", disk),
    ])
}

#[test]
fn eight_concurrent_fetches_of_one_url_make_one_get() {
    let server = Server::start();
    server.route(
        "/img",
        Behaviour::Slow(valid_image(), Duration::from_millis(20)),
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(limits(dir.path())).unwrap());
    let url = server.url("/img");
    let digests: Vec<Digest> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (cache, url) = (cache.clone(), url.clone());
                scope.spawn(move || {
                    let request = ImageRequest::parse(&url, None).unwrap();
                    let (lease, _) = cache.fetch(&request, &|_| {}).unwrap();
                    lease.digest().clone()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(digests.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        server.requests("/img"),
        1,
        "exactly one GET for eight concurrent fetches"
    );
}

#[test]
fn a_repeat_fetch_revalidates_with_the_etag_instead_of_downloading() {
    let server = Server::start();
    server.route("/img", Behaviour::Normal(valid_image()));
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(limits(dir.path())).unwrap();
    let request = ImageRequest::parse(&server.url("/img"), None).unwrap();
    let (first, kind) = cache.fetch(&request, &|_| {}).unwrap();
    assert_eq!(kind, FetchKind::Downloaded);
    drop(first);
    let (_second, kind) = cache.fetch(&request, &|_| {}).unwrap();
    assert_eq!(kind, FetchKind::Hit);
    assert_eq!(server.conditional_requests("/img"), 1);

    // The URL now serves another image: the next fetch sees it.
    server.route("/img", Behaviour::Normal(distinct_image(9)));
    let (third, kind) = cache.fetch(&request, &|_| {}).unwrap();
    assert_eq!(kind, FetchKind::Downloaded);
    assert_eq!(std::fs::read(third.disk_path()).unwrap()[0], 9);
}

#[test]
fn a_pinned_digest_already_cached_needs_no_request() {
    let server = Server::start();
    let bytes = valid_image();
    server.route("/img", Behaviour::Normal(bytes.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(limits(dir.path())).unwrap();
    let digest = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let request = ImageRequest::parse(&server.url("/img"), Some(&digest)).unwrap();
    cache.fetch(&request, &|_| {}).unwrap();
    let (_, kind) = cache.fetch(&request, &|_| {}).unwrap();
    assert_eq!(kind, FetchKind::Hit);
    assert_eq!(server.requests("/img"), 1);
}

#[test]
fn transient_errors_are_retried_and_client_errors_are_not() {
    let server = Server::start();
    server.route("/flaky", Behaviour::FlakyThenNormal(valid_image(), 2));
    server.route("/missing", Behaviour::Status(404));
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(limits(dir.path())).unwrap();
    let flaky = ImageRequest::parse(&server.url("/flaky"), None).unwrap();
    cache.fetch(&flaky, &|_| {}).unwrap();
    assert_eq!(server.requests("/flaky"), 3);

    let missing = ImageRequest::parse(&server.url("/missing"), None).unwrap();
    let error = cache.fetch(&missing, &|_| {}).unwrap_err();
    assert!(
        matches!(error, ImageError::HttpStatus { status: 404, .. }),
        "{error}"
    );
    assert_eq!(server.requests("/missing"), 1);
}

#[test]
fn a_connection_cut_mid_body_is_an_error_not_a_cache_entry() {
    let server = Server::start();
    let bytes = valid_image();
    let cut = bytes.len() / 2;
    server.route("/cut", Behaviour::Truncated(bytes, cut));
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(limits(dir.path())).unwrap();
    let request = ImageRequest::parse(&server.url("/cut"), None).unwrap();
    let error = cache.fetch(&request, &|_| {}).unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert_eq!(server.requests("/cut"), 4, "retried with back-off");
    assert_eq!(
        std::fs::read_dir(dir.path().join("sha256"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[test]
fn a_stalled_download_times_out() {
    let server = Server::start();
    let bytes = testkit::images::incompressible_image(512 * 1024);
    server.route("/stall", Behaviour::Slow(bytes, Duration::from_secs(3)));
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(limits(dir.path())).unwrap();
    let request = ImageRequest::parse(&server.url("/stall"), None).unwrap();
    let error = cache.fetch(&request, &|_| {}).unwrap_err();
    assert!(matches!(error, ImageError::Stalled { .. }), "{error}");
}

#[test]
fn a_trickling_download_ends_at_the_download_timeout() {
    let server = Server::start();
    let bytes = testkit::images::incompressible_image(1 << 20);
    // A 64 KiB piece every 400 ms never stalls, but takes 6 s in all.
    server.route(
        "/trickle",
        Behaviour::Slow(bytes, Duration::from_millis(400)),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = CacheConfig {
        stall_timeout: 5,
        download_timeout: 2,
        ..limits(dir.path())
    };
    let cache = Cache::open(config).unwrap();
    let request = ImageRequest::parse(&server.url("/trickle"), None).unwrap();
    let started = std::time::Instant::now();
    let error = cache.fetch(&request, &|_| {}).unwrap_err();
    assert!(
        matches!(error, ImageError::TooSlow { seconds: 2, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("cache.downloadTimeout"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn gc_removes_least_recently_used_and_never_a_leased_image() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(limits(dir.path())).unwrap();
    let mut digests = Vec::new();
    for tag in 1..=3u8 {
        let source = dir.path().join(format!("image{tag}.tar.zst"));
        std::fs::write(&source, distinct_image(tag)).unwrap();
        let request = ImageRequest::parse(source.to_str().unwrap(), None).unwrap();
        let (lease, _) = cache.fetch(&request, &|_| {}).unwrap();
        digests.push(lease.digest().clone());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Image 1 is the least recently used, but leased; image 2 is next.
    let held = cache.lease(&digests[0]).unwrap().unwrap();
    let report = cache.gc(0, 0).unwrap();
    let removed: Vec<&Digest> = report.removed.iter().map(|(d, _)| d).collect();
    assert_eq!(removed, [&digests[1], &digests[2]]);
    assert_eq!(report.skipped_in_use, 1);
    assert!(held.disk_path().is_file(), "the leased image survives");
    assert!(cache.lease(&digests[1]).unwrap().is_none());
    drop(held);
    let report = cache.gc(0, 0).unwrap();
    assert_eq!(report.removed.len(), 1);
    assert!(cache.list().unwrap().is_empty());
}

#[test]
fn a_pinned_image_survives_gc_until_its_holder_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(limits(dir.path())).unwrap();
    let source = dir.path().join("image.tar.zst");
    std::fs::write(&source, distinct_image(7)).unwrap();
    let request = ImageRequest::parse(source.to_str().unwrap(), None).unwrap();
    let (lease, _) = cache.fetch(&request, &|_| {}).unwrap();
    let digest = lease.digest().clone();
    let holder = dir.path().join("kept-vm");
    std::fs::create_dir(&holder).unwrap();
    cache.pin(&digest, &holder).unwrap();
    drop(lease);

    let report = cache.gc(0, 0).unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    assert_eq!(report.skipped_pinned, 1);
    assert!(cache.list().unwrap()[0].pinned);
    assert!(cache.lease(&digest).unwrap().is_some(), "still there");

    // The holder deleted (a kept VM's time is up): the pin no longer holds and goes too.
    std::fs::remove_dir(&holder).unwrap();
    let report = cache.gc(0, 0).unwrap();
    assert_eq!(report.removed.len(), 1, "{report:?}");
    assert!(cache.list().unwrap().is_empty());
    let pins = std::fs::read_dir(dir.path().join("pins")).map_or(0, |pins| pins.count());
    assert_eq!(pins, 0, "the stale pin was removed");
}

#[test]
fn a_lease_exposes_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let machine = br#"{"version": 1, "memory": 128, "boot": {"kernel": "vmlinux", "append": "console=ttyS0"}}"#;
    let bytes = image(&[
        Entry::file("machine.json", machine.to_vec()),
        Entry::file("disk.img", testkit::images::raw_disk()),
        Entry::file("vmlinux", b"not really a kernel".to_vec()),
    ]);
    let source = dir.path().join("image.tar.zst");
    std::fs::write(&source, bytes).unwrap();
    let cache = Cache::open(limits(&dir.path().join("cache"))).unwrap();
    let (lease, _) = cache
        .fetch(
            &ImageRequest::parse(source.to_str().unwrap(), None).unwrap(),
            &|_| {},
        )
        .unwrap();
    assert_eq!(lease.machine().memory, Some(128));
    assert_eq!(
        std::fs::read(lease.kernel_path().unwrap()).unwrap(),
        b"not really a kernel"
    );
    assert_eq!(lease.initrd_path(), None);
    assert_eq!(lease.boot_disk().1, "raw");
    assert_eq!(
        std::fs::read(lease.disk_path()).unwrap(),
        testkit::images::raw_disk()
    );
}

#[test]
fn opening_a_cache_sweeps_what_a_dead_process_left_in_tmp() {
    let dir = tempfile::tempdir().unwrap();
    Cache::open(limits(dir.path())).unwrap();
    let tmp = dir.path().join("tmp");
    // A staging dir whose owner died (its lock file is unlocked), and a half-removed GC dir.
    let leftover = tmp.join("unpack-deadbeef");
    std::fs::create_dir(&leftover).unwrap();
    std::fs::write(leftover.join("disk.img"), b"partial").unwrap();
    std::fs::write(tmp.join("unpack-deadbeef.lock"), b"").unwrap();
    std::fs::create_dir(tmp.join("gc-0123")).unwrap();
    // A staging dir whose owner is alive: its lock is held.
    let live = tmp.join("unpack-a11ce");
    std::fs::create_dir(&live).unwrap();
    let held = std::fs::File::create(tmp.join("unpack-a11ce.lock")).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).unwrap();

    Cache::open(limits(dir.path())).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["unpack-a11ce", "unpack-a11ce.lock"]);
}
