//! The guest agent in the test images, booted for real under TCG by hand (the bare QEMU
//! command line the benchmarks compare the engine with; no engine code involved). `minimal`
//! with a metadata peer inside a network namespace of the test's own: the agent takes
//! `echo hello`, streams it, reports and powers off when told to. `display`: the agent's
//! banner is on the VGA screen, checked by pixel.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image_manager::{Cache, ImageRequest, Lease};
use schemas::config::CacheConfig;
use testkit::guest::{display_image, flavour_argv, minimal_image, BootFiles, Flavour};
use testkit::images::sha256_file;
use testkit::metadata::MetadataPeer;
use testkit::netns::{TestNetwork, TAP};

/// A leased test image with a fresh overlay in a scratch directory.
struct Guest {
    scratch: tempfile::TempDir,
    _cache: Cache,
    lease: Lease,
    overlay: PathBuf,
}

impl Guest {
    fn prepare(image: &Path) -> Guest {
        let scratch = tempfile::tempdir().unwrap();
        let cache = Cache::open(CacheConfig {
            dir: scratch.path().join("cache"),
            ..CacheConfig::default()
        })
        .unwrap();
        let (lease, _) = cache
            .fetch(
                &ImageRequest::parse(image.to_str().unwrap(), None).unwrap(),
                &|_| {},
            )
            .unwrap();
        let overlay = scratch.path().join("overlay.qcow2");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(lease.disk_path())
            .arg(&overlay)
            .status()
            .unwrap();
        assert!(status.success());
        Guest {
            scratch,
            _cache: cache,
            lease,
            overlay,
        }
    }

    fn argv(&self, flavour: Flavour, netdev: &str) -> Vec<String> {
        let (kernel, initrd) = (
            self.lease.kernel_path().unwrap(),
            self.lease.initrd_path().unwrap(),
        );
        let append = self
            .lease
            .machine()
            .boot
            .as_ref()
            .unwrap()
            .append
            .clone()
            .unwrap_or_default();
        let files = BootFiles {
            kernel: &kernel,
            initrd: &initrd,
            disk: &self.overlay,
            append: &append,
        };
        flavour_argv(flavour, &files, netdev)
    }
}

fn wait_exit(qemu: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = qemu.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            panic!("the guest did not power off in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn echo_hello_end_to_end_through_the_agent() {
    let guest = Guest::prepare(&minimal_image());
    let base_digest = sha256_file(&guest.lease.disk_path());
    let network = TestNetwork::create("169.254.169.254/16");
    let listener = network.bind("169.254.169.254:80");
    let peer = MetadataPeer::serve(
        listener,
        r#"{"command": ["sh", "-c", "echo hello; uname -r"]}"#,
    );
    let netdev = format!("tap,id=n0,ifname={TAP},script=no,downscript=no");
    let mut qemu = network
        .command("qemu-system-x86_64")
        .args(guest.argv(Flavour::Minimal, &netdev))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let seen = peer.wait_for(Duration::from_secs(90), |seen| !seen.reports.is_empty());
    let log = String::from_utf8_lossy(&seen.log).into_owned();
    assert!(log.starts_with("hello\n6.1."), "log: {log:?}");
    assert_eq!(
        seen.reports,
        [("success".to_owned(), r#"{"exitCode":0}"#.to_owned())]
    );

    peer.push_action(r#"{"id": "bye", "type": "shutdown"}"#);
    let status = wait_exit(&mut qemu, Duration::from_secs(60));
    let mut serial = String::new();
    qemu.stdout
        .take()
        .unwrap()
        .read_to_string(&mut serial)
        .unwrap();
    assert!(
        status.success(),
        "qemu exited with {status}; serial:\n{serial}"
    );
    for marker in [
        "taskvm-agent: ready",
        "taskvm-agent: running",
        "taskvm-agent: done exit=0",
    ] {
        assert!(
            serial.contains(marker),
            "{marker:?} missing from serial:\n{serial}"
        );
    }
    assert_eq!(
        sha256_file(&guest.lease.disk_path()),
        base_digest,
        "every write went to the overlay"
    );
}

#[test]
fn the_display_image_shows_the_agent_banner() {
    let guest = Guest::prepare(&display_image());
    let qmp_path = guest.scratch.path().join("qmp.sock");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(guest.argv(Flavour::Display, "user,id=n0,restrict=on"))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut serial = BufReader::new(qemu.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut line = String::new();
    while !line.contains("taskvm-agent: ready") {
        line.clear();
        assert!(
            serial.read_line(&mut line).unwrap() > 0 && Instant::now() < deadline,
            "no ready marker"
        );
    }
    // The banner is painted before the marker; give the console a moment to draw it.
    std::thread::sleep(Duration::from_millis(500));
    let dump = guest.scratch.path().join("screen.ppm");
    qmp_screendump(&qmp_path, &dump);
    let _ = qemu.kill();
    let _ = qemu.wait();

    let testkit::ppm::Ppm {
        width,
        height,
        rgb: pixels,
    } = testkit::ppm::read(&std::fs::read(&dump).unwrap());
    assert_eq!((width, height), (720, 400), "VGA text mode");
    let at = |x: usize, y: usize| {
        let i = (y * width + x) * 3;
        (pixels[i], pixels[i + 1], pixels[i + 2])
    };
    // Each text row is 16 pixels high: rows 0, 1 and 2 are the red, green and blue bars.
    for x in [0, 360, 719] {
        assert_eq!(at(x, 8), (168, 0, 0), "red bar at x={x}");
        assert_eq!(at(x, 24), (0, 168, 0), "green bar at x={x}");
        assert_eq!(at(x, 40), (0, 0, 168), "blue bar at x={x}");
    }
    assert_eq!(at(700, 300), (0, 0, 0), "the rest of the screen is black");
}

/// Asks QEMU for a screendump over QMP.
fn qmp_screendump(socket: &Path, file: &Path) {
    let stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap(); // greeting
    for command in [
        r#"{"execute": "qmp_capabilities"}"#.to_owned(),
        format!(
            r#"{{"execute": "screendump", "arguments": {{"filename": "{}"}}}}"#,
            file.display()
        ),
    ] {
        writeln!(writer, "{command}").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.contains("\"return\"") {
                break;
            }
            assert!(!line.contains("\"error\""), "QMP: {line}");
        }
    }
}
