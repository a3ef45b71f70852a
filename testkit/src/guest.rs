//! Booting a test image by hand: the fast TCG command line (microvm, direct kernel boot of the
//! uncompressed vmlinux, initramfs stage 1, virtio-mmio disk and NIC), the same one that
//! `test-images/README.md` documents. The engine (issue 7) will own this for real.

use std::path::{Path, PathBuf};

/// The host's TSC frequency in kHz, from `/proc/cpuinfo` (`cpu MHz`), for `tsc_early_khz=`:
/// without it microvm guests sometimes hang calibrating their delay loop.
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = cpuinfo.lines().find(|line| line.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0) as u64)
}

/// Where the minimal test image is built (`make test-images`).
pub fn minimal_image() -> PathBuf {
    test_image("minimal")
}

/// Where the display test image is built (`make test-images`).
pub fn display_image() -> PathBuf {
    test_image("display")
}

/// Where the installer ISO of the image build tests is built (`make test-images`).
pub fn installer_iso() -> PathBuf {
    test_file("installer.iso", "make test-images")
}

/// The stock Debian with cloud-init and no taskvm agent (`make test-images-debian`): a
/// directory with `disk.img`, `vmlinuz`, `initrd.img` and `machine.json`.
pub fn debian_cloud() -> PathBuf {
    let dir = test_file("debian-cloud", "make test-images-debian");
    assert!(
        dir.join("machine.json").is_file(),
        "{} is incomplete: run `make test-images-debian`",
        dir.display()
    );
    dir
}

fn test_file(name: &str, make: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../test-images/out/{name}"));
    assert!(path.exists(), "{} is missing: run `{make}`", path.display());
    path
}

/// The directory the test images are built in (`test-images/out`), for `images.fileDirs`.
pub fn test_images_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../test-images/out");
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

/// A worker configuration (JSON) that lets `taskvm serve`/`worker` take `file://` images from
/// the test images' directory (`images.fileDirs`), with `extra` top-level fields added.
pub fn config_allowing_test_images(extra: &str) -> String {
    let dir = test_images_dir();
    let separator = if extra.is_empty() { "" } else { ", " };
    format!(
        r#"{{"images": {{"fileDirs": [{:?}]}}{separator}{extra}}}"#,
        dir.display().to_string()
    )
}

fn test_image(name: &str) -> PathBuf {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../test-images/out/{name}.tar.zst"));
    assert!(
        path.is_file(),
        "{} is missing: run `make test-images`",
        path.display()
    );
    path
}

/// What a hand boot needs.
pub struct BootFiles<'a> {
    /// Kernel (vmlinux).
    pub kernel: &'a Path,
    /// Initramfs.
    pub initrd: &'a Path,
    /// Root disk (a qcow2 overlay).
    pub disk: &'a Path,
    /// Kernel command line from the image's machine.json.
    pub append: &'a str,
}

/// Which of the test images' machines to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// `minimal`: microvm, virtio-mmio, no display.
    Minimal,
    /// `display`: q35, virtio-pci, standard VGA.
    Display,
}

/// QEMU arguments (after the program name) for a TCG boot of the minimal image's `files` with
/// `netdev` as the NIC's backend (e.g. `tap,id=n0,ifname=tap0,script=no,downscript=no`) and
/// the serial console on standard output.
pub fn tcg_argv(files: &BootFiles<'_>, netdev: &str) -> Vec<String> {
    flavour_argv(Flavour::Minimal, files, netdev)
}

/// Like [`tcg_argv`], for either test image.
pub fn flavour_argv(flavour: Flavour, files: &BootFiles<'_>, netdev: &str) -> Vec<String> {
    let mut append = files.append.to_owned();
    if let Some(khz) = host_tsc_khz() {
        append.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let (machine, vga, bus) = match flavour {
        Flavour::Minimal => ("microvm", "none", "device"),
        Flavour::Display => ("q35", "std", "pci"),
    };
    let fixed = "-accel tcg,thread=multi -cpu qemu64 -m 256 -smp 1 -nodefaults -no-user-config \
                 -no-reboot -display none -serial stdio";
    let mut argv: Vec<String> = vec!["-M".into(), machine.into(), "-vga".into(), vga.into()];
    argv.extend(fixed.split_whitespace().map(str::to_owned));
    argv.extend([
        "-kernel".into(),
        files.kernel.display().to_string(),
        "-initrd".into(),
        files.initrd.display().to_string(),
        "-append".into(),
        append,
        "-drive".into(),
        format!("id=root,file={},format=qcow2,if=none", files.disk.display()),
        "-device".into(),
        format!("virtio-blk-{bus},drive=root"),
        "-netdev".into(),
        netdev.to_owned(),
        "-device".into(),
        format!("virtio-net-{bus},netdev=n0"),
    ]);
    argv
}

/// Spawns `qemu-system-x86_64 ARGV` (serial console on standard output) and returns the time
/// until `marker` appears, or `None` when it does not within `timeout` (a hang). QEMU is killed
/// either way.
pub fn time_to_marker(
    argv: &[String],
    marker: &str,
    timeout: std::time::Duration,
) -> Option<std::time::Duration> {
    use std::io::Read;
    let started = std::time::Instant::now();
    let mut qemu = std::process::Command::new("qemu-system-x86_64")
        .args(argv)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = qemu.stdout.take()?;
    let (sender, receiver) = std::sync::mpsc::channel();
    let marker = marker.as_bytes().to_vec();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buffer) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buffer[..n]);
            if seen.windows(marker.len()).any(|w| w == marker) {
                let _ = sender.send(std::time::Instant::now());
                break;
            }
        }
    });
    let reached = receiver.recv_timeout(timeout).ok().map(|at| at - started);
    let _ = qemu.kill();
    let _ = qemu.wait();
    reached
}
