//! Choosing the accelerator. `auto` asks: does a Linux guest actually boot under KVM here?
//! `/dev/kvm` existing is not enough — nested KVM on some hosts hangs guests early in boot —
//! so a probe VM boots a kernel under KVM with a watchdog and the verdict is cached per host.
//!
//! The probe guest is a kernel the host trusts (`sandbox.probeKernel`, by default the host's
//! own `/boot/vmlinuz-RELEASE`), never a task's: a task's kernel that hangs on purpose would
//! otherwise decide every later task's accelerator. It runs with no disk and no init: it
//! boots, fails to mount a root file system and panics, which with `panic=-1` and
//! `-no-reboot` ends QEMU. Reaching that panic proves the kernel came all the way up; a
//! watchdog catches a hang. The probe QEMU is jailed like a VM's. The verdict's key names the
//! probe kernel's digest, and the cached file is believed only when it is a regular file of
//! this user that nobody else may write.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use schemas::config::Accel;
use serde::{Deserialize, Serialize};

use crate::qemu::cmdline::Accelerator;
use crate::qemu::process::{QemuProcess, RunAs};
use crate::sandbox::jail::{JailPlan, JailSettings};
use crate::sandbox::runtime::RuntimeDir;

/// What the probe guest prints once its kernel is fully up (and panics on purpose).
const BOOTED_MARKER: &str = "Kernel panic";

/// How to run a probe boot.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    /// The QEMU binary.
    pub qemu: String,
    /// A Linux kernel (vmlinux or bzImage) the host trusts, to boot.
    pub kernel: PathBuf,
    /// The jail the VMs run in (the probe runs in one too: KVM access is per user).
    pub jail: Option<JailSettings>,
    /// The user the VMs run as without a jail.
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
    match ProbeVm::start(accelerator, spec) {
        Ok(probe) => probe.watch(spec.watchdog).await,
        Err(reason) => ProbeOutcome::Failed { reason },
    }
}

/// A running probe QEMU and what it owns (dropped in order: QEMU, directory, ids).
struct ProbeVm {
    qemu: QemuProcess,
    runtime: RuntimeDir,
    _ids: Option<crate::sandbox::ids::VmIds>,
    started: Instant,
}

impl ProbeVm {
    fn start(accelerator: Accelerator, spec: &ProbeSpec) -> Result<ProbeVm, String> {
        let name = format!("accel-probe-{}", std::process::id());
        let (ids, owner) = crate::launch::qemu_user(spec.jail.as_ref(), spec.run_as)
            .map_err(|error| error.to_string())?;
        let runtime = RuntimeDir::create(&spec.scratch, &name, owner)
            .map_err(|error| format!("probe directory: {error}"))?;
        let jailed = spec.jail.as_ref().is_some_and(|jail| jail.namespaces);
        let mut plan = jailed.then(|| JailPlan::new(runtime.path()));
        let kernel = match plan.as_mut() {
            Some(plan) => plan.add_file(&spec.kernel, "boot/kernel"),
            None => spec.kernel.display().to_string(),
        };
        let mut append = "console=ttyS0 panic=-1 loglevel=4 rdinit=/taskvm-probe-none".to_owned();
        if let Some(khz) = spec.tsc_khz {
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
        let accel = match accelerator {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg,thread=multi",
        };
        let failed = |what: &str, error: io::Error| format!("{what}: {error}");
        let serial: OwnedFd = runtime
            .create_file("serial.log")
            .map_err(|e| failed("probe console", e))?
            .into();
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
            &kernel,
            "-append",
            &append,
            "-add-fd",
            &format!("fd={},set=0", serial.as_raw_fd()),
            "-chardev",
            "file,id=serial0,path=/dev/fdset/0",
            "-serial",
            "chardev:serial0",
        ]
        .map(str::to_owned)
        .to_vec();
        let (program, confinement) = crate::launch::confine(
            &spec.qemu,
            plan,
            accelerator == Accelerator::Kvm,
            owner,
            ids.is_some(),
            Some(1 << 20),
        )
        .map_err(|e| failed("probe", e))?;
        let stderr = runtime
            .create_file("qemu.log")
            .map_err(|e| failed("probe log", e))?;
        let started = Instant::now();
        let qemu = QemuProcess::spawn(
            &program,
            &args,
            &confinement,
            None,
            &[serial.as_fd()],
            stderr,
        )
        .map_err(|error| format!("cannot run {}: {error}", spec.qemu))?;
        Ok(ProbeVm {
            qemu,
            runtime,
            _ids: ids,
            started,
        })
    }

    async fn watch(mut self, watchdog: Duration) -> ProbeOutcome {
        let serial = self.runtime.serial_log();
        let booted = || crate::vm::read_bounded(&serial, 1 << 20).contains(BOOTED_MARKER);
        let outcome = loop {
            if booted() {
                break ProbeOutcome::Booted {
                    elapsed: self.started.elapsed(),
                };
            }
            if !matches!(self.qemu.try_wait(), Ok(None)) {
                if booted() {
                    break ProbeOutcome::Booted {
                        elapsed: self.started.elapsed(),
                    };
                }
                let log = crate::vm::read_bounded(&self.runtime.qemu_log(), 64 << 10);
                let reason = log
                    .lines()
                    .rev()
                    .find(|line| !line.trim().is_empty())
                    .unwrap_or("QEMU exited before the guest came up")
                    .to_owned();
                break ProbeOutcome::Failed { reason };
            }
            if self.started.elapsed() >= watchdog {
                break ProbeOutcome::Hung;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.qemu.kill();
        let _ = self.qemu.wait().await;
        outcome
    }
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
        return tcg(
            "no trusted kernel to probe it with (set sandbox.probeKernel; a task's kernel is \
             never used), or set accel = \"kvm\" to force it"
                .into(),
        );
    };
    let host = match host_key(spec) {
        Ok(host) => host,
        Err(error) => {
            return tcg(format!(
                "the probe kernel {} cannot be read ({error}); set sandbox.probeKernel",
                spec.kernel.display()
            ))
        }
    };
    let cached = read_trusted(cache_file)
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
    let _ = fs::remove_file(&temporary);
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temporary)?;
        file.write_all(&serde_json::to_vec_pretty(verdict)?)?;
    }
    fs::rename(&temporary, cache_file)
}

/// The cached verdict's bytes, when the file can be believed: a regular file (not a link) of
/// this user, which no other user may write, of at most 64 KiB.
fn read_trusted(cache_file: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(cache_file)
        .ok()?;
    let meta = file.metadata().ok()?;
    let trusted = meta.is_file()
        && meta.uid() == rustix::process::geteuid().as_raw()
        && meta.mode() & 0o022 == 0;
    if !trusted {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(64 << 10).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// What a KVM verdict depends on: the probe (its version and kernel's digest), the host
/// kernel, the QEMU build, the CPU, who may open `/dev/kvm`, and how QEMU runs (jailed, or as
/// which user).
fn host_key(spec: &ProbeSpec) -> io::Result<String> {
    use sha2::Digest;
    use std::os::unix::fs::MetadataExt;
    let mut hasher = sha2::Sha256::new();
    io::copy(&mut fs::File::open(&spec.kernel)?, &mut hasher)?;
    let probe_kernel: String = hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map_or(String::new(), |(_, model)| model.trim().to_owned());
    let qemu_version = crate::qemu::version::qemu_version(&spec.qemu)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let device = fs::metadata("/dev/kvm")
        .map(|m| format!("{}:{}:{:o}", m.uid(), m.gid(), m.mode() & 0o777))
        .unwrap_or_default();
    let user = match (&spec.jail, spec.run_as) {
        (Some(jail), _) => format!(
            "jailed ids {}+{} namespaces {}",
            jail.ids.first, jail.ids.count, jail.namespaces
        ),
        (None, Some(user)) => format!("{}:{}", user.uid, user.gid),
        (None, None) => "self".to_owned(),
    };
    Ok(format!(
        "probe v2 kernel sha256:{probe_kernel} | {} | {} | {} | /dev/kvm {device} | user {user}",
        kernel.trim(),
        qemu_version.trim(),
        cpu.trim()
    ))
}
