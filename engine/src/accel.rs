//! Choosing the accelerator. `auto` asks: does a Linux guest actually boot under KVM here?
//! `/dev/kvm` existing is not enough — nested KVM on some hosts hangs guests early in boot —
//! so a probe VM boots a kernel under KVM with a watchdog and the verdict is cached per host.
//!
//! The probe guest is the given kernel with no disk and no init: it boots, fails to mount a
//! root file system and panics, which with `panic=-1` and `-no-reboot` ends QEMU. Reaching
//! that panic proves the kernel came all the way up; a watchdog catches a hang.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use schemas::config::Accel;
use serde::{Deserialize, Serialize};

use crate::cmdline::Accelerator;
use crate::process::{QemuProcess, RunAs};
use crate::runtime::RuntimeDir;

/// What the probe guest prints once its kernel is fully up (and panics on purpose).
const BOOTED_MARKER: &str = "Kernel panic";

/// How to run a probe boot.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    /// The QEMU binary.
    pub qemu: String,
    /// A Linux kernel (vmlinux or bzImage) to boot.
    pub kernel: PathBuf,
    /// The user the VMs run as (the probe must run as that user: KVM access is per user).
    pub run_as: Option<RunAs>,
    /// Where the probe's private directory is made.
    pub scratch: PathBuf,
    /// The host's TSC frequency, for `tsc_early_khz=`.
    pub tsc_khz: Option<u64>,
    /// How long the guest may take to come up before KVM counts as hanging.
    pub watchdog: Duration,
}

/// The result of one probe boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The guest's kernel came up.
    Booted {
        /// From spawn to the kernel's panic message.
        elapsed: Duration,
    },
    /// The guest did not come up before the watchdog fired.
    Hung,
    /// QEMU refused or failed (e.g. no permission on `/dev/kvm`).
    Failed {
        /// QEMU's last words, or why it could not run.
        reason: String,
    },
}

/// Boots the probe guest under `accelerator` and reports how far it got.
pub async fn probe_boot(accelerator: Accelerator, spec: &ProbeSpec) -> ProbeOutcome {
    let name = format!("accel-probe-{}", std::process::id());
    let owner = spec.run_as.map(|user| (user.uid, user.gid));
    let runtime = match RuntimeDir::create(&spec.scratch, &name, owner) {
        Ok(runtime) => runtime,
        Err(error) => {
            return ProbeOutcome::Failed {
                reason: format!("probe directory: {error}"),
            }
        }
    };
    let mut append = "console=ttyS0 panic=-1 loglevel=4 rdinit=/taskvm-probe-none".to_owned();
    if let Some(khz) = spec.tsc_khz {
        append.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let accel = match accelerator {
        Accelerator::Kvm => "kvm",
        Accelerator::Tcg => "tcg,thread=multi",
    };
    let serial = runtime.serial_log();
    let args: Vec<String> = [
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-machine",
        "microvm",
        "-accel",
        accel,
        "-m",
        "256M",
        "-kernel",
        &spec.kernel.display().to_string(),
        "-append",
        &append,
        "-serial",
        &format!("file:{}", serial.display()),
    ]
    .map(str::to_owned)
    .to_vec();
    let extra_groups: Vec<u32> = match (accelerator, spec.run_as) {
        (Accelerator::Kvm, Some(_)) => crate::vm::kvm_group().into_iter().collect(),
        _ => Vec::new(),
    };
    let started = Instant::now();
    let confinement = crate::process::Confinement {
        run_as: spec.run_as,
        extra_groups,
        max_file_size: None,
    };
    let mut qemu = match QemuProcess::spawn(
        &spec.qemu,
        &args,
        &confinement,
        None,
        &[],
        &runtime.qemu_log(),
    ) {
        Ok(qemu) => qemu,
        Err(error) => {
            return ProbeOutcome::Failed {
                reason: format!("cannot run {}: {error}", spec.qemu),
            }
        }
    };
    let booted = || fs::read_to_string(&serial).is_ok_and(|text| text.contains(BOOTED_MARKER));
    let outcome = loop {
        if booted() {
            break ProbeOutcome::Booted {
                elapsed: started.elapsed(),
            };
        }
        if !matches!(qemu.try_wait(), Ok(None)) {
            if booted() {
                break ProbeOutcome::Booted {
                    elapsed: started.elapsed(),
                };
            }
            let log = fs::read_to_string(runtime.qemu_log()).unwrap_or_default();
            let reason = log
                .lines()
                .rev()
                .find(|line| !line.trim().is_empty())
                .unwrap_or("QEMU exited before the guest came up")
                .to_owned();
            break ProbeOutcome::Failed { reason };
        }
        if started.elapsed() >= spec.watchdog {
            break ProbeOutcome::Hung;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    qemu.kill();
    let _ = qemu.wait().await;
    outcome
}

/// The accelerator to use, and a one-line notice when the choice deserves one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The accelerator.
    pub accelerator: Accelerator,
    /// Why `auto` fell back to TCG (None when nothing needs saying).
    pub notice: Option<String>,
}

/// A cached verdict: valid while the host key is the same.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Verdict {
    host: String,
    kvm_usable: bool,
    reason: String,
    probed_at: u64,
}

/// Decides the accelerator for `choice`. `auto` reuses the verdict in `cache_file` when it
/// was made on this host (same kernel, QEMU, CPU, `/dev/kvm` and user), and otherwise probes
/// KVM with `spec` (no spec: no probe, TCG) and stores the verdict.
pub async fn decide(choice: Accel, cache_file: &Path, spec: Option<&ProbeSpec>) -> Decision {
    let forced = |accelerator| Decision {
        accelerator,
        notice: None,
    };
    match choice {
        Accel::Kvm => return forced(Accelerator::Kvm),
        Accel::Tcg => return forced(Accelerator::Tcg),
        Accel::Auto => {}
    }
    let tcg = |why: String| Decision {
        accelerator: Accelerator::Tcg,
        notice: Some(format!("KVM unusable ({why}); using TCG")),
    };
    if !Path::new("/dev/kvm").exists() {
        return tcg("no /dev/kvm".into());
    }
    let Some(spec) = spec else {
        return tcg("no kernel to probe it with; set accel = \"kvm\" to force it".into());
    };
    let host = host_key(&spec.qemu, spec.run_as);
    let cached = fs::read(cache_file)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Verdict>(&bytes).ok())
        .filter(|verdict| verdict.host == host);
    let verdict = match cached {
        Some(verdict) => verdict,
        None => {
            let (kvm_usable, reason) = match probe_boot(Accelerator::Kvm, spec).await {
                ProbeOutcome::Booted { elapsed } => (
                    true,
                    format!("probe guest booted in {} ms", elapsed.as_millis()),
                ),
                ProbeOutcome::Hung => (
                    false,
                    format!(
                        "a probe guest hung for {} s, as nested KVM does on some hosts",
                        spec.watchdog.as_secs()
                    ),
                ),
                ProbeOutcome::Failed { reason } => (false, reason),
            };
            let verdict = Verdict {
                host,
                kvm_usable,
                reason,
                probed_at: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            };
            let _ = store(cache_file, &verdict);
            verdict
        }
    };
    if verdict.kvm_usable {
        forced(Accelerator::Kvm)
    } else {
        tcg(format!(
            "{}; verdict cached in {}",
            verdict.reason,
            cache_file.display()
        ))
    }
}

fn store(cache_file: &Path, verdict: &Verdict) -> io::Result<()> {
    if let Some(dir) = cache_file.parent() {
        fs::create_dir_all(dir)?;
    }
    let temporary = cache_file.with_extension("tmp");
    fs::write(&temporary, serde_json::to_vec_pretty(verdict)?)?;
    fs::rename(&temporary, cache_file)
}

/// What a KVM verdict depends on: the host kernel, the QEMU build, the CPU, who may open
/// `/dev/kvm`, and the user QEMU runs as.
fn host_key(qemu: &str, run_as: Option<RunAs>) -> String {
    use std::os::unix::fs::MetadataExt;
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map_or(String::new(), |(_, model)| model.trim().to_owned());
    let qemu_version = std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default();
    let device = fs::metadata("/dev/kvm")
        .map(|m| format!("{}:{}:{:o}", m.uid(), m.gid(), m.mode() & 0o777))
        .unwrap_or_default();
    let user = run_as.map_or("self".to_owned(), |u| format!("{}:{}", u.uid, u.gid));
    format!(
        "{} | {} | {} | /dev/kvm {device} | user {user}",
        kernel.trim(),
        qemu_version.trim(),
        cpu.trim()
    )
}
