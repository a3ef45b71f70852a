//! Starting a VM, as one list of named steps. Everything QEMU touches is made or opened by
//! the engine (root) in the VM's root-owned runtime directory and handed over as an inherited
//! descriptor: the root disk's layers and extra drives (`-add-fd`), the serial console
//! (`/dev/fdset/N`), QEMU's messages (its standard error), the QMP socket (a listening
//! descriptor), the tap, a saved state. With a jail, QEMU runs as a user of its own in
//! namespaces whose root is that directory ([`crate::sandbox::jail`]).

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rand::Rng;
use schemas::ResolvedMachine;

use crate::disk::drives::{open_for_qemu, BootSource, HostDisk};
use crate::disk::overlay::{create_empty_disk, create_overlay};
use crate::memory::GuestMemory;
use crate::network::netns::namespace_name;
use crate::network::VmNetwork;
use crate::qemu::cmdline::{
    qemu_args, Accelerator, BootFiles, DiskLayer, FdSet, LaunchDrive, LaunchSpec, MemoryBackend,
    Netdev,
};
use crate::qemu::process::{Confinement, QemuProcess, RunAs, PROCESSES_PER_VM};
use crate::qemu::qmp::Qmp;
use crate::sandbox::cgroup::{CgroupLimits, VmCgroup};
use crate::sandbox::ids::{IdError, VmIds};
use crate::sandbox::jail::{JailPlan, JailSettings};
use crate::sandbox::records::{process_start_ticks, RecordFile, VmRecord};
use crate::sandbox::runtime::RuntimeDir;
use crate::snapshot::format::Snapshot;
use crate::vm::{tail, VirtualMachine, VmError, VmSettings, STDERR_TAIL};

/// The descriptors QEMU inherits, each with the fd set it is put in (None: referred to by
/// number, like the tap and the QMP listener).
#[derive(Default)]
struct Inherited {
    files: Vec<(OwnedFd, Option<u32>)>,
    next_set: u32,
}

impl Inherited {
    /// Adds `fd` to a new fd set; returns the path QEMU opens it by.
    fn in_set(&mut self, fd: impl Into<OwnedFd>) -> String {
        let set = self.next_set;
        self.next_set += 1;
        self.files.push((fd.into(), Some(set)));
        format!("/dev/fdset/{set}")
    }

    /// Adds `fd`, referred to by its number; returns the number.
    fn by_number(&mut self, fd: impl Into<OwnedFd>) -> i32 {
        let fd: OwnedFd = fd.into();
        let number = fd.as_raw_fd();
        self.files.push((fd, None));
        number
    }

    fn fd_sets(&self) -> Vec<FdSet> {
        self.files
            .iter()
            .filter_map(|(fd, set)| {
                set.map(|set| FdSet {
                    fd: fd.as_raw_fd(),
                    set,
                })
            })
            .collect()
    }
}

/// Starts the VM: the steps below, in order; a failing step drops what the earlier ones made.
pub(crate) async fn launch(
    source: BootSource,
    machine: &ResolvedMachine,
    settings: &VmSettings,
    snapshot: Option<&Snapshot>,
    memory: GuestMemory,
) -> Result<VirtualMachine, VmError> {
    let (ids, owner) = qemu_user(settings.jail.as_ref(), settings.run_as)
        .map_err(|error| VmError::Setup(io::Error::other(error.to_string())))?;
    let runtime = RuntimeDir::create(&settings.runtime_parent, &settings.name, owner)
        .map_err(VmError::Setup)?;
    let cgroup = create_cgroup(machine, settings)?;
    let mut record = VmRecord {
        name: settings.name.clone(),
        pid: None,
        start_ticks: None,
        runtime_dir: runtime.path().to_path_buf(),
        cgroups: cgroup.as_ref().map_or(Vec::new(), |g| g.dirs().to_vec()),
        netns: settings
            .network
            .as_ref()
            .map(|_| namespace_name(&settings.name)),
        owner: crate::sandbox::records::this_owner(),
        uid: ids.as_ref().map(VmIds::uid),
    };
    // Recorded before anything else exists, so that a crash in between still gets it swept.
    let record_file = match &settings.state_dir {
        Some(state_dir) => Some(RecordFile::write(state_dir, &record).map_err(VmError::Setup)?),
        None => None,
    };
    let network = match &settings.network {
        Some(network) => Some(VmNetwork::create(&settings.name, network)?),
        None => None,
    };
    let jailed = settings.jail.as_ref().is_some_and(|jail| jail.namespaces);
    let mut plan = jailed.then(|| JailPlan::new(runtime.path()));
    let mut inherited = Inherited::default();
    let disk = root_disk_chain(&source, snapshot, &runtime, &mut inherited)?;
    let drives = extra_drives(settings, &mut inherited)?;
    let serial = runtime.create_file("serial.log").map_err(VmError::Setup)?;
    let serial_log = inherited.in_set(serial);
    let qmp_listener = listen_for_qmp(&runtime)?;
    let qmp_fd = inherited.by_number(qmp_listener);
    let state = match snapshot {
        Some(snapshot) => Some(
            inherited.by_number(fs::File::open(snapshot.state_path()).map_err(VmError::Setup)?),
        ),
        None => None,
    };
    let memory_backend = memory_backend(&memory, plan.as_mut(), &mut inherited)?;
    // With RAM in an object, the stream moves with `x-ignore-shared`, which QEMU takes only
    // over QMP: the load then starts once that is set (`-incoming defer`).
    let deferred_state = state.filter(|_| memory.in_object());
    let incoming = match deferred_state {
        Some(_) => Some("defer".to_owned()),
        None => state.map(|fd| format!("fd:{fd}")),
    };
    let tap = network.as_ref().map(|network| network.tap().as_raw_fd());
    let boot = boot_files(&source, machine, &runtime, plan.as_mut(), network.as_ref())
        .map_err(VmError::Setup)?;
    let m = machine.machine();
    let spec = LaunchSpec {
        name: settings.name.clone(),
        accelerator: settings.accelerator,
        disk,
        boot,
        uuid: match snapshot {
            Some(snapshot) => snapshot.uuid().to_owned(),
            None => m.uuid.clone().unwrap_or_else(random_uuid),
        },
        mac: match snapshot {
            Some(snapshot) => snapshot.mac().to_owned(),
            None => m.mac.clone().unwrap_or_else(random_mac),
        },
        netdev: match tap {
            Some(fd) => Netdev::TapFd(fd),
            None => settings.netdev.clone(),
        },
        serial_log,
        qmp_fd,
        vnc_socket: if jailed {
            "/run/vnc.sock".to_owned()
        } else {
            runtime.vnc_socket().display().to_string()
        },
        tsc_khz: settings.tsc_khz,
        incoming,
        fd_sets: inherited.fd_sets(),
        drives,
        memory: memory_backend,
    };
    let argv = qemu_args(machine, &spec)?;
    let (program, confinement) = confine(
        &settings.qemu,
        plan,
        settings.accelerator == Accelerator::Kvm,
        owner,
        ids.is_some(),
        settings.max_file_size,
    )
    .map_err(VmError::Setup)?;
    let start_error = |reason: String, runtime: &RuntimeDir| VmError::Start {
        reason,
        stderr_tail: tail(&runtime.qemu_log(), STDERR_TAIL),
        argv: format!("{} {}", settings.qemu, argv.join(" ")),
    };
    let stderr = runtime.create_file("qemu.log").map_err(VmError::Setup)?;
    let descriptors: Vec<BorrowedFd<'_>> = network
        .iter()
        .map(VmNetwork::tap)
        .chain(inherited.files.iter().map(|(fd, _)| fd.as_fd()))
        .collect();
    let mut qemu = QemuProcess::spawn(
        &program,
        &argv,
        &confinement,
        cgroup.as_ref(),
        &descriptors,
        stderr,
    )
    .map_err(|error| start_error(format!("cannot run {}: {error}", settings.qemu), &runtime))?;
    drop(descriptors);
    drop(inherited); // QEMU has its copies
    if let Some(file) = &record_file {
        record.pid = Some(qemu.pid());
        record.start_ticks = process_start_ticks(qemu.pid());
        file.update(&record).map_err(VmError::Setup)?;
    }
    let qmp_socket = runtime.qmp_socket();
    let qmp = tokio::select! {
        connected = Qmp::connect(&qmp_socket, settings.start_timeout) => connected,
        status = qemu.wait() => Err(io::Error::other(match status {
            Ok(status) => format!("QEMU exited at start: {status}"),
            Err(error) => error.to_string(),
        })),
    };
    let qmp = match (qmp, deferred_state) {
        (Ok(qmp), Some(fd)) => start_loading(&qmp, fd, &memory).await.map(|()| qmp),
        (qmp, None) => qmp,
        (Err(error), Some(_)) => Err(error),
    };
    let qmp = match qmp {
        Ok(qmp) => qmp,
        Err(error) => {
            qemu.kill();
            let _ = qemu.wait().await;
            return Err(start_error(error.to_string(), &runtime));
        }
    };
    Ok(VirtualMachine {
        qemu,
        qmp,
        killed: false,
        earlier_console: String::new(),
        uuid: spec.uuid.clone(),
        mac: spec.mac.clone(),
        jailed,
        argv,
        network,
        cgroup,
        runtime,
        _record: record_file,
        _ids: ids,
        source,
        max_file_size: settings.max_file_size,
        max_console_size: settings.max_console_size,
        memory,
    })
}

/// The backend object for `memory`, with its memory file (if any) inherited by QEMU and opened
/// through `/proc` (in a jail, its own: [`JailPlan::add_memory_file`]).
fn memory_backend(
    memory: &GuestMemory,
    plan: Option<&mut JailPlan>,
    inherited: &mut Inherited,
) -> Result<Option<MemoryBackend>, VmError> {
    if !memory.in_object() {
        return Ok(None);
    }
    let Some(file) = memory.file() else {
        return Ok(Some(MemoryBackend::Anonymous));
    };
    let fd = inherited.by_number(file.descriptor().map_err(VmError::Setup)?);
    let path = match plan {
        Some(plan) => plan.add_memory_file(fd),
        None => format!("/proc/self/fd/{fd}"),
    };
    Ok(Some(MemoryBackend::File {
        path,
        shared: matches!(memory, GuestMemory::ForSaving(_)),
    }))
}

/// Starts loading the saved state from the inherited descriptor `fd`, with `x-ignore-shared`
/// on as it was when the state was saved, once `memory`'s file has all its contents (copied in
/// while QEMU started).
async fn start_loading(qmp: &Qmp, fd: i32, memory: &GuestMemory) -> io::Result<()> {
    qmp.ignore_shared_memory().await?;
    if let Some(file) = memory.file() {
        file.wait_filled()
            .await
            .map_err(|error| io::Error::other(format!("loading the snapshot's RAM: {error}")))?;
    }
    qmp.execute(
        "migrate-incoming",
        serde_json::json!({ "uri": format!("fd:{fd}") }),
    )
    .await
    .map(|_| ())
}

/// The uid and gid a QEMU runs as (None: the worker's own).
pub(crate) type Owner = Option<(u32, u32)>;

/// Who a QEMU runs as (uid, gid): with a jail, a user of its own from the jail's range (held
/// while the returned ids live); without one, `run_as`.
pub(crate) fn qemu_user(
    jail: Option<&JailSettings>,
    run_as: Option<RunAs>,
) -> Result<(Option<VmIds>, Owner), IdError> {
    let Some(jail) = jail else {
        return Ok((None, run_as.map(|user| (user.uid, user.gid))));
    };
    let ids = jail.ids.allocate_in(&jail.id_locks)?;
    let owner = (ids.uid(), ids.gid());
    Ok((Some(ids), Some(owner)))
}

/// The program to exec for `qemu` and how to confine it: with a `plan`, the binary as the jail
/// shows it (and `/dev/kvm` under KVM) and the prepared jail; without one, the binary found in
/// the worker's `PATH` (QEMU's own environment is empty). `own_user`: the user is QEMU's
/// alone, so a per-user process limit is a per-VM one.
pub(crate) fn confine(
    qemu: &str,
    plan: Option<JailPlan>,
    kvm: bool,
    owner: Owner,
    own_user: bool,
    max_file_size: Option<u64>,
) -> io::Result<(String, Confinement)> {
    let (program, jail) = match plan {
        Some(mut plan) => {
            if kvm {
                plan.add_device("kvm");
            }
            let program = plan.add_program(qemu)?;
            let jail = plan
                .prepare()
                .map_err(|error| io::Error::new(error.kind(), format!("the jail: {error}")))?;
            (program, Some(jail))
        }
        None => (
            crate::sandbox::jail::find_program(qemu)?
                .display()
                .to_string(),
            None,
        ),
    };
    let extra_groups = match owner {
        Some(_) if kvm => kvm_group().into_iter().collect(),
        _ => Vec::new(),
    };
    let confinement = Confinement {
        run_as: owner.map(|(uid, gid)| RunAs { uid, gid }),
        extra_groups,
        max_file_size,
        jail,
        max_processes: own_user.then_some(PROCESSES_PER_VM),
    };
    Ok((program, confinement))
}

fn create_cgroup(
    machine: &ResolvedMachine,
    settings: &VmSettings,
) -> Result<Option<VmCgroup>, VmError> {
    let Some(host) = &settings.cgroups else {
        return Ok(None);
    };
    let cpus = u64::from(machine.topology().vcpus());
    let limits = CgroupLimits::for_machine(u64::from(machine.memory_mib()), cpus);
    host.create(&settings.name, limits)
        .map(Some)
        .map_err(|error| VmError::Setup(io::Error::other(format!("control group: {error}"))))
}

/// The root disk's chain: a new overlay (root's, written by QEMU through its descriptor) on
/// the snapshot's disk or the source's layers, each layer opened here and inherited.
fn root_disk_chain(
    source: &BootSource,
    snapshot: Option<&Snapshot>,
    runtime: &RuntimeDir,
    inherited: &mut Inherited,
) -> Result<Vec<DiskLayer>, VmError> {
    let mut below: Vec<(PathBuf, String)> = Vec::new();
    if let Some(snapshot) = snapshot {
        below.push((snapshot.disk_path(), "qcow2".to_owned()));
    }
    below.extend(source.base_layers());
    let overlay = runtime.overlay();
    match (below.first(), source) {
        (Some((base, format)), _) => create_overlay(base, format, &overlay),
        (None, BootSource::Files(files)) => match files.disk {
            HostDisk::Empty { size } => create_empty_disk(&overlay, size),
            HostDisk::Existing { .. } => unreachable_layers(),
        },
        (None, BootSource::Image(_)) => unreachable_layers(),
    }
    .map_err(VmError::Setup)?;
    // `qemu-img create` made it in a directory only root writes: the name is still ours. The
    // guest's writes are for QEMU alone, which writes through its descriptor.
    fs::set_permissions(&overlay, fs::Permissions::from_mode(0o600)).map_err(VmError::Setup)?;
    let mut chain = vec![DiskLayer {
        file: inherited.in_set(open_for_qemu(&overlay, true).map_err(VmError::Setup)?),
        format: "qcow2".to_owned(),
    }];
    for (path, format) in below {
        chain.push(DiskLayer {
            file: inherited.in_set(open_for_qemu(&path, false).map_err(VmError::Setup)?),
            format,
        });
    }
    Ok(chain)
}

fn unreachable_layers() -> io::Result<()> {
    Err(io::Error::other(
        "an image or existing disk without a layer",
    ))
}

fn extra_drives(
    settings: &VmSettings,
    inherited: &mut Inherited,
) -> Result<Vec<LaunchDrive>, VmError> {
    settings
        .drives
        .iter()
        .map(|drive| {
            Ok(LaunchDrive {
                file: inherited.in_set(drive.open().map_err(VmError::Setup)?),
                format: drive.format.clone(),
                media: drive.media,
                read_only: !drive.writable,
                boot_first: drive.boot_first,
                serial: drive.serial.clone(),
            })
        })
        .collect()
}

/// The QMP socket: bound by root in the runtime directory (0600, so only root connects),
/// QEMU gets the listening descriptor.
fn listen_for_qmp(runtime: &RuntimeDir) -> Result<std::os::unix::net::UnixListener, VmError> {
    let path = runtime.qmp_socket();
    let listener = std::os::unix::net::UnixListener::bind(&path).map_err(VmError::Setup)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(VmError::Setup)?;
    Ok(listener)
}

/// The kernel and initrd QEMU reads for a direct boot, as QEMU names them: in a jail, the
/// source's files shown read-only at `/boot/`; without one, an image's own files or copies of
/// the host's in the runtime directory (root's, readable).
fn boot_files(
    source: &BootSource,
    machine: &ResolvedMachine,
    runtime: &RuntimeDir,
    mut plan: Option<&mut JailPlan>,
    network: Option<&VmNetwork>,
) -> io::Result<Option<BootFiles>> {
    let Some(boot) = &machine.machine().boot else {
        return Ok(None);
    };
    let missing = |what: &str| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("the machine boots directly but no {what} was given"),
        )
    };
    let kernel = source
        .kernel(&boot.kernel)
        .ok_or_else(|| missing("kernel"))?;
    let initrd = match &boot.initrd {
        Some(name) => Some(source.initrd(name).ok_or_else(|| missing("initrd"))?),
        None => None,
    };
    let mut place = |from: &Path, name: &str| -> io::Result<String> {
        if let Some(plan) = plan.as_deref_mut() {
            return Ok(plan.add_file(from, &format!("boot/{name}")));
        }
        if source.lease().is_some() {
            return Ok(from.display().to_string());
        }
        let to = runtime.path().join(name);
        fs::copy(from, &to).map_err(|error| {
            io::Error::new(error.kind(), format!("{}: {error}", from.display()))
        })?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o444))?;
        Ok(to.display().to_string())
    };
    let kernel = place(&kernel, "kernel")?;
    let initrd = initrd.map(|path| place(&path, "initrd")).transpose()?;
    let mut append = boot.append.clone().unwrap_or_default();
    if let Some(network) = network {
        append = format!("{append} {}", network.kernel_parameter());
    }
    Ok(Some(BootFiles {
        kernel,
        initrd,
        append,
    }))
}

/// The group owning `/dev/kvm`, when it is not root's: the unprivileged QEMU needs it as a
/// supplementary group to use KVM.
pub(crate) fn kvm_group() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let gid = fs::metadata("/dev/kvm").ok()?.gid();
    (gid != 0).then_some(gid)
}

/// A random (version 4) UUID, lower case.
fn random_uuid() -> String {
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A random locally administered unicast MAC address.
fn random_mac() -> String {
    let mut bytes: [u8; 6] = rand::rng().random();
    bytes[0] = (bytes[0] & 0xfc) | 0x02;
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_match_the_machine_patterns() {
        for _ in 0..100 {
            let mac = random_mac();
            let first = u8::from_str_radix(&mac[..2], 16).unwrap();
            assert_eq!(first & 0x03, 0x02, "{mac}: locally administered unicast");
            let uuid = random_uuid();
            assert_eq!(uuid.len(), 36);
            assert_eq!(&uuid[14..15], "4");
        }
        assert_ne!(random_mac(), random_mac());
    }
}
