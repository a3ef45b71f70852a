//! `taskvm image …` as a user runs it, against real files, a real loopback HTTP server and
//! real qemu-img.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::http::{Behaviour, Server};
use testkit::images::{image, incompressible_image, machine_json, valid_image, Entry};

mod common;
use common::{taskvm, taskvm_command};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `taskvm image fetch REFERENCE --cache CACHE EXTRA…`.
fn fetch(reference: &str, cache: &Path, extra: &[&str]) -> Output {
    let cache = cache.to_str().unwrap();
    let mut args = vec!["image", "fetch", reference, "--cache", cache];
    args.extend_from_slice(extra);
    taskvm(&args)
}

/// `taskvm image pack --disk D --machine M --kernel K -o OUT`.
fn pack_image(disk: &Path, machine: &Path, kernel: &Path, out: &Path) -> Output {
    let arg = |path: &Path| path.to_str().unwrap().to_owned();
    taskvm(&[
        "image",
        "pack",
        "--disk",
        &arg(disk),
        "--machine",
        &arg(machine),
        "--kernel",
        &arg(kernel),
        "-o",
        &arg(out),
    ])
}

#[test]
fn fetch_prints_the_digest_and_entry_then_ls_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("minimal.tar.zst");
    std::fs::write(&source, valid_image()).unwrap();
    let cache = dir.path().join("cache");
    let output = fetch(source.to_str().unwrap(), &cache, &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let (digest, entry) = stdout.trim().split_once(' ').unwrap();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{stdout}"
    );
    assert!(Path::new(entry).join("disk.img").is_file());

    let output = taskvm(&["image", "ls", "--cache", cache.to_str().unwrap()]);
    let listing = text(&output.stdout);
    assert!(
        listing.contains(digest) && listing.contains("minimal.tar.zst"),
        "{listing}"
    );
}

#[test]
fn a_hostile_image_is_one_line_naming_the_entry_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("evil.tar.zst");
    let mut entries = testkit::images::valid_entries();
    entries.push(Entry::file(
        "../../etc/cron.d/evil",
        b"* * * * * root true".to_vec(),
    ));
    std::fs::write(&source, image(&entries)).unwrap();
    let cache = dir.path().join("cache");
    let output = fetch(source.to_str().unwrap(), &cache, &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains("% of")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("evil.tar.zst") && lines[0].contains("../../etc/cron.d/evil"),
        "{stderr}"
    );
}

#[test]
fn a_metadata_bomb_is_refused_at_its_header_in_bounded_memory_time_and_text() {
    // Run alone in its process (nextest), so the children's usage is this fetch's.
    for (flag, kind) in [(b'L', "GNU long name (L)"), (b'x', "PAX extended (x)")] {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("bomb.tar.zst");
        // A 3 GiB name (or PAX record) of one letter: about 100 KB compressed.
        testkit::images::metadata_bomb_image(flag, 3 << 30, &source);
        let compressed = std::fs::metadata(&source).unwrap().len();
        assert!(compressed < 1 << 20, "{compressed} bytes");
        let before = testkit::process::children_usage();
        let started = Instant::now();
        let output = fetch(source.to_str().unwrap(), &dir.path().join("cache"), &[]);
        let wall = started.elapsed();
        let after = testkit::process::children_usage();
        let cpu = after.cpu_seconds - before.cpu_seconds;
        let stderr = text(&output.stderr);
        eprintln!(
            "{kind}: {compressed} bytes compressed, exit {:?}, wall {wall:?}, cpu {cpu:.3} s, \
             peak RSS {} KiB, stderr {} bytes",
            output.status.code(),
            after.peak_rss_bytes / 1024,
            stderr.len()
        );
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(kind) && stderr.contains("3221225472 bytes"),
            "{stderr}"
        );
        assert!(stderr.len() < 1024, "{} bytes of error", stderr.len());
        assert!(
            after.peak_rss_bytes < 100 << 20,
            "peak RSS {}",
            after.peak_rss_bytes
        );
        // Decompressing the 3 GiB alone takes more than 2 s of CPU here; refusing the header
        // takes a few milliseconds.
        assert!(cpu < 1.0, "{cpu} s of CPU");
        assert!(entries(&dir.path().join("cache").join("sha256")).is_empty());
    }
}

#[test]
fn verify_checks_without_caching() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.tar.zst");
    std::fs::write(&good, valid_image()).unwrap();
    let output = taskvm(&["image", "verify", good.to_str().unwrap()]);
    assert!(
        text(&output.stdout).starts_with("ok sha256:"),
        "{}",
        text(&output.stderr)
    );

    let bad = dir.path().join("bad.tar.zst");
    let qcow2 =
        testkit::images::qemu_img_create(&["create", "-q", "-f", "qcow2", "x.img", "1M"], "x.img");
    std::fs::write(
        &bad,
        image(&[
            Entry::file("machine.json", machine_json()),
            Entry::file("disk.img", qcow2),
        ]),
    )
    .unwrap();
    let output = taskvm(&["image", "verify", bad.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("disk.img: is a qcow/qcow2 image"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn pack_is_reproducible_and_its_output_fetches() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "64M"])
        .status()
        .unwrap();
    assert!(status.success());
    let machine = dir.path().join("machine.json");
    std::fs::write(
        &machine,
        br#"{"version": 1, "boot": {"kernel": "vmlinux"}}"#,
    )
    .unwrap();
    let kernel = dir.path().join("bzImage");
    std::fs::write(&kernel, b"kernel bytes").unwrap();
    let pack = |out: &str| {
        let out = dir.path().join(out);
        let output = pack_image(&disk, &machine, &kernel, &out);
        assert!(output.status.success(), "{}", text(&output.stderr));
        (text(&output.stdout).trim().to_owned(), out)
    };
    let (first, first_path) = pack("a.tar.zst");
    let (second, second_path) = pack("b.tar.zst");
    assert_eq!(first, second);
    assert_eq!(
        std::fs::read(&first_path).unwrap(),
        std::fs::read(&second_path).unwrap()
    );
    assert!(
        std::fs::metadata(&first_path).unwrap().len() < 64 * 1024,
        "64 MiB of zeros packs small"
    );

    let cache = dir.path().join("cache");
    let output = fetch(
        first_path.to_str().unwrap(),
        &cache,
        &["--sha256", &first[7..]],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let entry = text(&output.stdout)
        .trim()
        .split_once(' ')
        .unwrap()
        .1
        .to_owned();
    assert_eq!(
        std::fs::metadata(Path::new(&entry).join("disk.img"))
            .unwrap()
            .len(),
        64 << 20
    );
    assert_eq!(
        std::fs::read(Path::new(&entry).join("vmlinux")).unwrap(),
        b"kernel bytes"
    );
    assert!(
        entries(dir.path())
            .iter()
            .all(|name| !name.contains("pack")),
        "no staging left"
    );
}

#[test]
fn pack_refuses_boot_files_machine_json_does_not_name() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let machine = dir.path().join("machine.json");
    std::fs::write(&machine, machine_json()).unwrap();
    let out = dir.path().join("out.tar.zst");
    let output = pack_image(&disk, &machine, &disk, &out);
    assert_eq!(output.status.code(), Some(2));
    assert!(!out.exists());
}

#[test]
fn kill_9_mid_fetch_then_a_new_fetch_leaves_a_valid_cache() {
    let server = Server::start();
    server.route(
        "/big",
        Behaviour::Slow(incompressible_image(4 << 20), Duration::from_millis(30)),
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let url = server.url("/big");
    let mut child = taskvm_command(&[])
        .args(["image", "fetch", &url, "--cache", cache.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the unpack has started writing, then kill without warning.
    let deadline = Instant::now() + Duration::from_secs(30);
    while entries(&cache.join("tmp")).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !entries(&cache.join("tmp")).is_empty(),
        "the fetch never started unpacking"
    );
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        entries(&cache.join("sha256")).is_empty(),
        "no entry from a killed fetch"
    );

    server.route("/big", Behaviour::Normal(incompressible_image(4 << 20)));
    let output = fetch(&url, &cache, &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        entries(&cache.join("tmp")).is_empty(),
        "the new process swept the dead one's tmp"
    );
    assert_eq!(entries(&cache.join("sha256")).len(), 1);
}

#[test]
fn gc_with_sizes_reports_what_it_removed() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("a.tar.zst");
    std::fs::write(&source, valid_image()).unwrap();
    let cache = dir.path().join("cache");
    assert!(fetch(source.to_str().unwrap(), &cache, &[])
        .status
        .success());
    let output = taskvm(&[
        "image",
        "gc",
        "--max-size",
        "1G",
        "--min-free",
        "0",
        "--cache",
        cache.to_str().unwrap(),
    ]);
    assert!(
        !text(&output.stdout).contains("removed"),
        "{}",
        text(&output.stdout)
    );
    let output = taskvm(&[
        "image",
        "gc",
        "--max-size",
        "0",
        "--min-free",
        "0",
        "--cache",
        cache.to_str().unwrap(),
    ]);
    assert!(
        text(&output.stdout).starts_with("removed sha256:"),
        "{}",
        text(&output.stdout)
    );
    let output = taskvm(&[
        "image",
        "gc",
        "--max-size",
        "12Q",
        "--cache",
        cache.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
}
