//! Running `qemu-img` on untrusted files: explicit formats, JSON output, CPU-time and
//! address-space limits, and a wall-clock deadline.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::error::ImageError;

/// CPU seconds `qemu-img` may use on one file.
const CPU_SECONDS: u64 = 30;
/// Address space `qemu-img` may map.
const ADDRESS_SPACE: u64 = 1 << 30;
/// Wall-clock time before `qemu-img` is killed.
const DEADLINE: Duration = Duration::from_secs(60);

/// The parts of `qemu-img info --output=json` that validation reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// Format qemu-img opened the file as.
    pub format: String,
    /// Size of the disk the guest sees.
    pub virtual_size: u64,
    /// Backing file as recorded in the image.
    #[serde(default)]
    pub backing_filename: Option<String>,
    /// Backing file format as recorded in the image.
    #[serde(default)]
    pub backing_filename_format: Option<String>,
    /// Whether the image is encrypted.
    #[serde(default)]
    pub encrypted: Option<bool>,
    /// Format-specific details (for qcow2: `data.data-file`, …).
    #[serde(default)]
    pub format_specific: Option<serde_json::Value>,
}

/// `qemu-img info -f FORMAT --output=json FILE`, confined.
pub fn info(path: &Path, format: &str) -> Result<ImageInfo, ImageError> {
    let path_text = path.to_string_lossy();
    let output = run(
        &["info", "-f", format, "--output=json", &path_text],
        "info",
        true,
    )?;
    serde_json::from_slice(&output).map_err(|error| ImageError::QemuImg {
        action: "info".to_owned(),
        message: format!("unreadable JSON output: {error}"),
    })
}

/// Runs `qemu-img` with `args` and returns its stdout. `confined` (for untrusted files) adds
/// the CPU-time and address-space limits and the wall-clock deadline.
pub fn run(args: &[&str], action: &str, confined: bool) -> Result<Vec<u8>, ImageError> {
    run_watching(args, action, confined, &|_| {})
}

/// `qemu-img convert -p` of `source` (of `format`) into a raw `target`, sparse at 4 KiB, telling
/// `progress` the fraction done (0.0–1.0) as qemu-img reports it.
pub fn convert_to_raw(
    source: &Path,
    format: &str,
    target: &Path,
    progress: &(dyn Fn(f64) + Sync),
) -> Result<(), ImageError> {
    let (source, target) = (source.to_string_lossy(), target.to_string_lossy());
    let pending = std::sync::Mutex::new(Vec::new());
    let on_output = |bytes: &[u8]| {
        let Ok(mut pending) = pending.lock() else {
            return;
        };
        pending.extend_from_slice(bytes);
        // qemu-img -p rewrites one line: "    (12.34/100%)\r".
        while let Some(end) = pending.iter().position(|&b| b == b'\r' || b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Some(fraction) = parse_percent(&line) {
                progress(fraction);
            }
        }
    };
    run_watching(
        &[
            "convert", "-p", "-f", format, "-O", "raw", "-S", "4k", &source, &target,
        ],
        "convert",
        false,
        &on_output,
    )
    .map(drop)
}

fn parse_percent(line: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(line).ok()?.trim();
    let inner = text.strip_prefix('(')?.strip_suffix("/100%)")?;
    inner.parse::<f64>().ok().map(|percent| percent / 100.0)
}

fn run_watching(
    args: &[&str],
    action: &str,
    confined: bool,
    on_output: &(dyn Fn(&[u8]) + Sync),
) -> Result<Vec<u8>, ImageError> {
    let failure = |message: String| ImageError::QemuImg {
        action: action.to_owned(),
        message,
    };
    let mut command = Command::new("qemu-img");
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if confined {
        confine(&mut command);
    }
    let mut child = command
        .spawn()
        .map_err(|error| failure(format!("cannot start qemu-img: {error}")))?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    std::thread::scope(|scope| {
        let out_reader = scope.spawn(move || read_all_watching(stdout.as_mut(), on_output));
        let err_reader = scope.spawn(move || read_all_watching(stderr.as_mut(), &|_| {}));
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if confined && started.elapsed() > DEADLINE => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(failure(format!("killed after {} s", DEADLINE.as_secs())));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(error) => return Err(failure(error.to_string())),
            }
        };
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        if !status.success() {
            let text = String::from_utf8_lossy(&stderr);
            let last = text
                .lines()
                .last()
                .unwrap_or("no error output")
                .trim()
                .to_owned();
            return Err(failure(format!("{status}: {last}")));
        }
        Ok(stdout)
    })
}

fn read_all_watching(
    stream: Option<&mut impl Read>,
    on_output: &(dyn Fn(&[u8]) + Sync),
) -> Vec<u8> {
    let mut bytes = Vec::new();
    let Some(stream) = stream else {
        return bytes;
    };
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                on_output(&buffer[..n]);
                bytes.extend_from_slice(&buffer[..n]);
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    bytes
}

/// Applies the CPU-time and address-space limits in the child before `exec`.
#[allow(unsafe_code)]
fn confine(command: &mut Command) {
    use rustix::process::{setrlimit, Resource, Rlimit};
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec; it only calls setrlimit, which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            let cpu = Rlimit {
                current: Some(CPU_SECONDS),
                maximum: Some(CPU_SECONDS),
            };
            let memory = Rlimit {
                current: Some(ADDRESS_SPACE),
                maximum: Some(ADDRESS_SPACE),
            };
            setrlimit(Resource::Cpu, cpu).map_err(std::io::Error::from)?;
            setrlimit(Resource::As, memory).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}
