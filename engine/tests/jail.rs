//! The jail against a hostile QEMU (run as root, real VMs under TCG). Two VMs run; the test
//! plays A's QEMU escaped into its process — A's user, inside A's namespaces (`nsenter`, then
//! `setpriv`) — and tries to reach B, the host's secrets, the image cache, a snapshot and a
//! service on the host's loopback. Every attempt must fail; the same attempts made by root on
//! the host succeed, so the attempts themselves are sound.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use engine::snapshot::{build, AGENT_READY};
use engine::VirtualMachine;
use testkit::guest::display_image;

mod common;
use common::{resolved, Fixture};

/// What the hostile process tries; each line of its output is `NAME ok` or `NAME ERROR`.
const ATTEMPTS: &str = r#"
import ctypes, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {}
for name, kind, arg in json.loads(sys.argv[1]):
    try:
        if kind == "connect_unix":
            s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(arg); s.close()
        elif kind == "connect_tcp":
            host, port = arg.split(":")
            s = socket.create_connection((host, int(port)), timeout=2); s.close()
        elif kind == "open_read":
            os.close(os.open(arg, os.O_RDONLY))
        elif kind == "open_write":
            os.close(os.open(arg, os.O_WRONLY))
        elif kind == "read":
            open(arg, "rb").read()
        elif kind == "kill0":
            os.kill(int(arg), 0)
        elif kind == "ptrace":
            if libc.ptrace(16, int(arg), 0, 0) != 0:  # PTRACE_ATTACH
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            libc.ptrace(17, int(arg), 0, 0)  # PTRACE_DETACH
        elif kind == "pwrite":
            fd = os.open(arg, os.O_RDWR)
            try: os.pwrite(fd, b"changed", 0)
            finally: os.close(fd)
        elif kind == "truncate":
            os.truncate(arg, 4096)
        elif kind == "chmod":
            os.chmod(arg, 0o644)
        elif kind == "create":
            os.close(os.open(arg, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)); os.unlink(arg)
        elif kind == "symlink":
            target, link = arg.split("|")
            os.symlink(target, link)
        elif kind == "listdir":
            out[name] = "ok " + ",".join(sorted(os.listdir(arg))); continue
        out[name] = "ok"
    except OSError as error:
        out[name] = "error " + (os.strerror(error.errno) if error.errno else str(error))
print(json.dumps(out))
"#;

/// Runs the attempts as `uid` (and gid), inside the namespaces of process `inside` when given.
fn attempt(
    uid: Option<u32>,
    inside: Option<u32>,
    attempts: &[(&str, &str, String)],
) -> BTreeMap<String, String> {
    let list = serde_json::to_string(
        &attempts
            .iter()
            .map(|(name, kind, arg)| (name, kind, arg))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let mut argv: Vec<String> = Vec::new();
    if let Some(pid) = inside {
        argv.extend(
            [
                "nsenter",
                "--target",
                &pid.to_string(),
                "--mount",
                "--net",
                "--ipc",
                "--uts",
                "--root",
                "--wd",
                "--",
            ]
            .map(str::to_owned),
        );
    }
    if let Some(uid) = uid {
        argv.extend(
            [
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
            ]
            .map(str::to_owned),
        );
    }
    argv.extend(["/usr/bin/python3", "-c", ATTEMPTS, &list].map(str::to_owned));
    let output = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("{error}: {}", String::from_utf8_lossy(&output.stdout)))
}

/// As `uid`, makes the symbolic link `link` to `target` (which must work: the user owns the
/// directory).
fn plant_link(uid: u32, target: &str, link: &std::path::Path) {
    let made = attempt(
        Some(uid),
        None,
        &[("link", "symlink", format!("{target}|{}", link.display()))],
    );
    assert_eq!(made["link"], "ok", "planting {}", link.display());
}

fn uid_of(pid: u32) -> u32 {
    std::fs::metadata(format!("/proc/{pid}")).unwrap().uid()
}

/// The hostile QEMU of VM A is contained: it reaches nothing of B's, nothing of the host's.
#[test]
fn a_hostile_qemu_reaches_no_other_vm_and_nothing_of_the_host() {
    // A credential in the worker's environment, which no QEMU may see.
    std::env::set_var("TASKCLUSTER_ACCESS_TOKEN", "worker-secret-token");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(hostile_qemu_is_contained());
}

async fn hostile_qemu_is_contained() {
    let fixture = Fixture::new();
    // A descriptor the worker holds without close-on-exec: it must not reach QEMU.
    let marker = fixture.scratch.path().join("worker-private-marker");
    std::fs::write(&marker, "private").unwrap();
    let leaked = rustix::fs::open(
        &marker,
        rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();

    // A snapshot of the minimal image, then A (minimal) and B (display) running.
    let snapshot_dir = fixture.scratch.path().join("snapshot");
    let lease = fixture.lease();
    let machine = resolved(&lease);
    let settings = fixture.settings("jail-snap", Ipv4Addr::new(10, 0, 2, 15));
    let snapshot = build(
        lease,
        &machine,
        &settings,
        &snapshot_dir,
        Duration::from_secs(90),
    )
    .await
    .unwrap();
    for file in [snapshot.disk_path(), snapshot.state_path()] {
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(
            (meta.uid(), meta.mode() & 0o777),
            (0, 0o444),
            "{} is root's, read-only",
            file.display()
        );
    }
    let lease_a = fixture.lease();
    let machine_a = resolved(&lease_a);
    let mut vm_a = VirtualMachine::start(
        lease_a,
        &machine_a,
        &fixture.settings("jail-a", Ipv4Addr::new(10, 0, 2, 15)),
    )
    .await
    .unwrap();
    let lease_b = fixture.lease_of(&display_image());
    let image_dir = lease_b.dir().to_path_buf();
    let machine_b = resolved(&lease_b);
    let mut vm_b = VirtualMachine::start(
        lease_b,
        &machine_b,
        &fixture.settings("jail-b", Ipv4Addr::new(10, 0, 2, 15)),
    )
    .await
    .unwrap();
    for vm in [&mut vm_a, &mut vm_b] {
        assert!(
            vm.wait_for_serial(AGENT_READY, Duration::from_secs(90))
                .await,
            "{}",
            vm.serial_output()
        );
    }
    let (a, b) = (vm_a.pid(), vm_b.pid());
    let (uid_a, uid_b) = (uid_of(a), uid_of(b));
    assert_ne!(uid_a, uid_b, "two VMs never share a user");
    assert!(uid_a != 0 && uid_b != 0);

    // No variable of the worker's, no descriptor it did not mean.
    for pid in [a, b] {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(
            environ.is_empty(),
            "QEMU's environment: {}",
            String::from_utf8_lossy(&environ)
        );
        let mut files = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
        {
            let target = std::fs::read_link(entry.path()).unwrap_or_default();
            let text = target.display().to_string();
            assert!(
                !text.contains("worker-private-marker"),
                "the worker's descriptor leaked: {text}"
            );
            if text.starts_with('/') {
                files.push(text);
            }
        }
        let meant = [
            "/dev/null",
            "/dev/urandom",
            "/dev/random",
            "/dev/net/tun",
            "serial.log",
            "qemu.log",
            "disk.qcow2",
            "disk.img",
            "layer.qcow2",
        ];
        for file in &files {
            assert!(
                meant.iter().any(|name| file.ends_with(name)),
                "QEMU {pid} holds {file}, which the engine did not hand it (all: {files:?})"
            );
        }
    }
    drop(leaked);

    // What A's QEMU sees of the world: its jail, nothing else of the host's.
    let view = attempt(
        Some(uid_a),
        Some(a),
        &[
            ("its own directory", "listdir", "/run".into()),
            ("the jail's root", "listdir", "/".into()),
            ("/proc", "read", "/proc/self/status".into()),
            ("/etc", "read", "/etc/passwd".into()),
            ("/root", "listdir", "/root".into()),
            ("/tmp", "listdir", "/tmp".into()),
            ("/sys", "listdir", "/sys".into()),
            ("the worker's marker", "read", marker.display().to_string()),
        ],
    );
    assert!(view["its own directory"].starts_with("ok"), "{view:?}");
    for (name, outcome) in view.iter().filter(|(name, _)| *name != "its own directory") {
        assert!(
            outcome.starts_with("error"),
            "A's QEMU sees {name}: {outcome}"
        );
    }
    // A service on the host's loopback, like `taskvm serve`.
    let service = TcpListener::bind("127.0.0.1:0").unwrap();
    let service_address = service.local_addr().unwrap().to_string();
    let b_dir = vm_b.runtime_dir().to_path_buf();
    let a_dir = vm_a.runtime_dir().to_path_buf();
    let cache_entry = image_dir.join("hostile-file");
    let snapshot_disk = snapshot.disk_path().display().to_string();
    let attempts: Vec<(&str, &str, String)> = vec![
        (
            "B's QMP socket",
            "connect_unix",
            b_dir.join("qmp.sock").display().to_string(),
        ),
        (
            "B's VNC socket",
            "connect_unix",
            b_dir.join("run/vnc.sock").display().to_string(),
        ),
        (
            "B's overlay for reading",
            "open_read",
            b_dir.join("disk.qcow2").display().to_string(),
        ),
        (
            "B's overlay for writing",
            "open_write",
            b_dir.join("disk.qcow2").display().to_string(),
        ),
        ("B's environment", "read", format!("/proc/{b}/environ")),
        ("signal B", "kill0", b.to_string()),
        ("ptrace B", "ptrace", b.to_string()),
        ("chmod the snapshot's disk", "chmod", snapshot_disk.clone()),
        (
            "write into the image cache",
            "create",
            cache_entry.display().to_string(),
        ),
    ];
    let mut from_jail = attempts.clone();
    from_jail.push((
        "the host's loopback service",
        "connect_tcp",
        service_address.clone(),
    ));
    let jailed = attempt(Some(uid_a), Some(a), &from_jail);
    eprintln!("jailed: {jailed:#?}");
    for (name, outcome) in &jailed {
        assert!(
            outcome.starts_with("error"),
            "from A's jail, {name}: {outcome}"
        );
    }
    // Even outside its namespaces, A's user alone gets none of it.
    let outside = attempt(Some(uid_a), None, &attempts);
    eprintln!("outside: {outside:#?}");
    for (name, outcome) in &outside {
        assert!(
            outcome.starts_with("error"),
            "as A's user on the host, {name}: {outcome}"
        );
    }
    // Root on the host can do what was refused (QMP takes one client, the engine's; B has a
    // display, so its VNC socket exists): the attempts are real.
    let harmless = [
        "B's VNC socket",
        "B's overlay for reading",
        "B's environment",
        "signal B",
        "write into the image cache",
        "the host's loopback service",
    ];
    let control_attempts: Vec<_> = from_jail
        .iter()
        .filter(|(name, _, _)| harmless.contains(name))
        .cloned()
        .collect();
    let control = attempt(None, None, &control_attempts);
    for name in [
        "B's VNC socket",
        "B's overlay for reading",
        "B's environment",
        "signal B",
        "write into the image cache",
        "the host's loopback service",
    ] {
        assert_eq!(control[name], "ok", "as root: {name}");
    }
    let environ_b = std::fs::read(format!("/proc/{b}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ_b).contains("worker-secret-token"));

    // A's user cannot plant anything where root makes files: not in A's own runtime
    // directory, not as the directory of the next VM.
    let planted = attempt(
        Some(uid_a),
        None,
        &[
            (
                "a link as A's console",
                "symlink",
                format!("/etc/passwd|{}", a_dir.join("serial-next.log").display()),
            ),
            (
                "the next VM's directory",
                "create",
                a_dir
                    .parent()
                    .unwrap()
                    .join("jail-next")
                    .display()
                    .to_string(),
            ),
        ],
    );
    for (name, outcome) in &planted {
        assert!(outcome.starts_with("error"), "{name}: {outcome}");
    }

    // In the one directory A's user may write, a link planted where QEMU would make its VNC
    // socket leads the engine nowhere: the decoy host socket is never connected to.
    let decoy_dir = tempfile::tempdir().unwrap();
    let decoy_path = decoy_dir.path().join("host-service.sock");
    let decoy = std::os::unix::net::UnixListener::bind(&decoy_path).unwrap();
    decoy.set_nonblocking(true).unwrap();
    plant_link(
        uid_a,
        &decoy_path.display().to_string(),
        &a_dir.join("run/vnc.sock"),
    );
    let refused = vm_a
        .vnc()
        .connect()
        .expect_err("a link is not A's VNC server");
    assert!(
        refused.to_string().contains("refused") || refused.raw_os_error() == Some(40),
        "{refused}"
    );
    assert!(decoy.accept().is_err(), "nothing connected to the decoy");

    // A screendump B's QEMU is made to write through a link is not read back, and a secret
    // the link could point at is untouched.
    let secret = decoy_dir.path().join("secret");
    std::fs::write(&secret, "root's secret").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    plant_link(
        uid_b,
        "/run/elsewhere.ppm",
        &b_dir.join("run/screendump.ppm"),
    );
    let dump = vm_b.screendump().await;
    assert!(dump.is_err(), "a screendump through a link is refused");
    std::fs::remove_file(b_dir.join("run/screendump.ppm")).ok();
    std::fs::remove_file(b_dir.join("run/elsewhere.ppm")).ok();
    plant_link(
        uid_b,
        &secret.display().to_string(),
        &b_dir.join("run/screendump.ppm"),
    );
    assert!(vm_b.screendump().await.is_err());
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root's secret");
    let screen = vm_b.screenshot(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        screen.dimensions(),
        (720, 400),
        "B's own VNC server still works"
    );
    drop(service);

    // C, restored from the snapshot, maps its RAM private from the snapshot's memory file,
    // which every copy shares: C's QEMU cannot change it, and its `/proc` shows only itself.
    let lease_c = fixture.lease();
    let machine_c = resolved(&lease_c);
    let vm_c = VirtualMachine::restore(
        lease_c,
        &machine_c,
        &fixture.settings("jail-c", Ipv4Addr::new(10, 0, 2, 15)),
        &snapshot,
    )
    .await
    .unwrap();
    let c = vm_c.pid();
    let uid_c = uid_of(c);
    let ram_fd = std::fs::read_dir(format!("/proc/{c}/fd"))
        .unwrap()
        .flatten()
        .find(|entry| {
            std::fs::read_link(entry.path())
                .unwrap_or_default()
                .display()
                .to_string()
                .contains("memfd:taskvm-snapshot-ram")
        })
        .expect("C's QEMU holds the snapshot's memory file")
        .file_name()
        .into_string()
        .unwrap();
    let ram = format!("/proc/{c}/fd/{ram_fd}");
    let own_file = fixture.scratch.path().join("c-owns-this");
    std::fs::write(&own_file, "c").unwrap();
    std::os::unix::fs::chown(&own_file, Some(uid_c), Some(uid_c)).unwrap();
    let from_c = attempt(
        Some(uid_c),
        Some(c),
        &[
            ("write the snapshot's RAM", "pwrite", ram.clone()),
            ("shrink the snapshot's RAM", "truncate", ram.clone()),
            ("list /proc", "listdir", "/proc".into()),
        ],
    );
    eprintln!("from C: {from_c:#?}");
    for name in ["write the snapshot's RAM", "shrink the snapshot's RAM"] {
        assert!(
            from_c[name].starts_with("error"),
            "{name}: {}",
            from_c[name]
        );
    }
    let listed: Vec<&str> = from_c["list /proc"]
        .trim_start_matches("ok ")
        .split(',')
        .collect();
    for name in &listed {
        if ["self", "thread-self"].contains(name) {
            continue;
        }
        let pid: u32 = name
            .parse()
            .unwrap_or_else(|_| panic!("/proc shows {name}"));
        // The listing process itself has ended by now; every other one is C's user's.
        if let Ok(meta) = std::fs::metadata(format!("/proc/{pid}")) {
            assert_eq!(meta.uid(), uid_c, "C's /proc shows {pid}: {listed:?}");
        }
    }
    assert!(listed.contains(&c.to_string().as_str()), "{listed:?}");
    // The same writes to a file C's user owns work: the attempts are real.
    let own = attempt(
        Some(uid_c),
        None,
        &[
            ("pwrite", "pwrite", own_file.display().to_string()),
            ("truncate", "truncate", own_file.display().to_string()),
        ],
    );
    assert_eq!(
        (own["pwrite"].as_str(), own["truncate"].as_str()),
        ("ok", "ok")
    );
}
