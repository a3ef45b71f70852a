//! `taskvm image build` end to end: a real VM under TCG changes the minimal image, the result
//! is packaged, verified and run as a task; the cached base stays byte for byte the same; a
//! failing build writes nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testkit::guest::minimal_image;
use testkit::images::sha256_file;
use testkit::process::root_scratch;

mod common;
use common::taskvm_command as taskvm;

struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Scene {
        Scene {
            dir: root_scratch("builds boot VMs: tests need root"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn dirs<'a>(&self, command: &'a mut Command) -> &'a mut Command {
        command
            .arg("--cache")
            .arg(self.path("cache"))
            .arg("--state")
            .arg(self.path("state"))
            .args(["--accel", "tcg"])
    }

    fn build(&self, script: &str, output: &Path) -> Output {
        let script_file = self.path("build.sh");
        std::fs::write(&script_file, script).unwrap();
        let base = minimal_image().canonicalize().unwrap();
        let mut command = taskvm(&["image", "build", "--from", base.to_str().unwrap()]);
        command
            .arg("-o")
            .arg(output)
            .arg("--script")
            .arg(&script_file);
        self.dirs(&mut command).output().unwrap()
    }

    /// The cached base image's disk (fetched into this scene's cache).
    fn cached_base_disk(&self) -> PathBuf {
        let base = minimal_image().canonicalize().unwrap();
        let mut command = taskvm(&["image", "fetch", base.to_str().unwrap(), "--cache"]);
        let output = command.arg(self.path("cache")).output().unwrap();
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8(output.stdout).unwrap();
        let entry = stdout.split_whitespace().nth(1).expect("entry path");
        Path::new(entry).join("disk.img")
    }
}

#[test]
fn a_built_image_has_what_the_script_made_and_the_base_is_untouched() {
    let scene = Scene::new();
    let base_disk = scene.cached_base_disk();
    let before = sha256_file(&base_disk);
    let output = scene.path("built.tar.zst");
    let built = scene.build(
        "set -e\n\
         echo made by the build > /built.txt\n\
         mkdir -p /usr/local/bin\n\
         printf '#!/bin/sh\\necho hello from the built image\\n' > /usr/local/bin/hello-built\n\
         chmod 755 /usr/local/bin/hello-built\n\
         echo build script done\n",
        &output,
    );
    let stdout = String::from_utf8_lossy(&built.stdout);
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("build script done"), "{stdout}");
    let digest = stdout.lines().last().unwrap_or_default();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{stdout}"
    );
    assert!(
        stderr.contains("booted in") && stderr.contains("packaged in"),
        "{stderr}"
    );
    assert_eq!(format!("sha256:{}", sha256_file(&output)), digest);
    assert_eq!(sha256_file(&base_disk), before, "the cached base changed");

    // The image passes every check a fetch applies.
    let verified = taskvm(&["image", "verify", output.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(verified.status.success(), "{verified:?}");

    // A task on the new image sees what the build made.
    let payload = scene.path("task.json");
    std::fs::write(
        &payload,
        serde_json::json!({
            "image": format!("file://{}", output.display()),
            "command": ["sh", "-c", "cat /built.txt; /usr/local/bin/hello-built"],
            "maxRunTime": 60
        })
        .to_string(),
    )
    .unwrap();
    let mut run = taskvm(&["run", payload.to_str().unwrap(), "--start", "boot"]);
    let ran = scene.dirs(&mut run).output().unwrap();
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert!(
        ran.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert!(stdout.contains("made by the build"), "{stdout}");
    assert!(stdout.contains("hello from the built image"), "{stdout}");
    assert_eq!(sha256_file(&base_disk), before, "the cached base changed");
}

#[test]
fn a_failing_build_exits_1_with_the_guest_log_and_writes_nothing() {
    let scene = Scene::new();
    let output = scene.path("never.tar.zst");
    let built = scene.build("echo about to fail; exit 5\n", &output);
    let stdout = String::from_utf8_lossy(&built.stdout);
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert_eq!(built.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("about to fail"), "{stdout}");
    assert!(stderr.contains("the build exited with 5"), "{stderr}");
    assert!(stderr.contains("serial console"), "{stderr}");
    assert!(!output.exists());
    let left: Vec<_> = std::fs::read_dir(scene.dir.path())
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name())
        .filter(|name| name.to_string_lossy().starts_with(".taskvm-package-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let runs: Vec<_> = std::fs::read_dir(scene.path("state/run"))
        .unwrap()
        .flatten()
        .collect();
    assert!(runs.is_empty(), "{runs:?}");
}

impl Scene {
    /// `taskvm image build ARGS…` with this scene's cache and state.
    fn image_build(&self, args: &[&std::ffi::OsStr]) -> Output {
        let mut command = taskvm(&["image", "build"]);
        // The directories first: a command after `--` has to come last.
        self.dirs(&mut command).args(args).output().unwrap()
    }

    /// The state's runtime directory holds nothing: no VM directory, no seed.
    fn assert_nothing_left(&self) {
        let runs: Vec<_> = std::fs::read_dir(self.path("state/run"))
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name())
            .collect();
        assert!(runs.is_empty(), "{runs:?}");
    }
}

/// `cat PATH` inside an ext2/3/4 disk image, None when the file is not there.
fn read_from_disk(disk: &Path, path: &str) -> Option<String> {
    let output = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(disk)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    (!stderr.contains("File not found")).then(|| String::from_utf8_lossy(&output.stdout).into())
}

/// The image's `disk.img`, unpacked into `into`.
fn unpacked_disk(image: &Path, into: &Path) -> PathBuf {
    std::fs::create_dir_all(into).unwrap();
    let status = Command::new("tar")
        .args(["--zstd", "-xf"])
        .arg(image)
        .arg("-C")
        .arg(into)
        .status()
        .unwrap();
    assert!(status.success());
    into.join("disk.img")
}

fn os(text: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(text)
}

#[test]
fn user_data_alone_builds_a_stock_debian_with_cloud_init_and_no_agent() {
    let scene = Scene::new();
    let debian = testkit::guest::debian_cloud();
    let disk = debian.join("disk.img");
    assert_eq!(read_from_disk(&disk, "/etc/taskvm-built"), None);
    let before = sha256_file(&disk);
    let user_data = scene.path("user-data");
    std::fs::write(
        &user_data,
        "#cloud-config\n\
         write_files:\n\
         \x20 - path: /etc/taskvm-built\n\
         \x20   content: \"written by user-data\\n\"\n\
         runcmd:\n\
         \x20 - [sh, -c, \"echo runcmd ran on $(hostname) > /var/lib/taskvm-runcmd\"]\n\
         power_state:\n\
         \x20 mode: poweroff\n\
         \x20 delay: now\n",
    )
    .unwrap();
    let output = scene.path("debian-built.tar.zst");
    let built = scene.image_build(&[
        os("--disk"),
        disk.as_os_str(),
        os("--machine"),
        debian.join("machine.json").as_os_str(),
        os("--kernel"),
        debian.join("vmlinuz").as_os_str(),
        os("--initrd"),
        debian.join("initrd.img").as_os_str(),
        os("--user-data"),
        user_data.as_os_str(),
        os("--timeout"),
        os("900"),
        os("-o"),
        output.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&built.stdout);
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "{stdout}\n{stderr}");
    // The console was followed: cloud-init ran from the NoCloud seed.
    assert!(stdout.contains("Cloud-init v."), "{stdout}");
    assert!(stderr.contains("the guest ended (PoweredOff)"), "{stderr}");
    let digest = stdout.lines().last().unwrap_or_default();
    assert_eq!(format!("sha256:{}", sha256_file(&output)), digest);
    let verified = taskvm(&["image", "verify", output.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(verified.status.success(), "{verified:?}");

    let built_disk = unpacked_disk(&output, &scene.path("unpacked"));
    assert_eq!(
        read_from_disk(&built_disk, "/etc/taskvm-built").as_deref(),
        Some("written by user-data\n")
    );
    let runcmd = read_from_disk(&built_disk, "/var/lib/taskvm-runcmd").unwrap_or_default();
    assert!(runcmd.starts_with("runcmd ran on "), "{runcmd:?}");
    assert_eq!(sha256_file(&disk), before, "the --disk file changed");
    scene.assert_nothing_left();
}

fn installer_machine(scene: &Scene) -> PathBuf {
    let machine = scene.path("installer-machine.json");
    std::fs::write(
        &machine,
        r#"{"version": 1, "chipset": "q35", "memory": 256, "network": "virtio-net-pci",
            "storage": "virtio-blk-pci", "graphics": "none"}"#,
    )
    .unwrap();
    machine
}

#[test]
fn an_installer_iso_installs_onto_a_fresh_disk_of_the_given_size() {
    let scene = Scene::new();
    let machine = installer_machine(&scene);
    let output = scene.path("installed.tar.zst");
    let built = scene.image_build(&[
        os("--iso"),
        testkit::guest::installer_iso().as_os_str(),
        os("--size"),
        os("96M"),
        os("--machine"),
        machine.as_os_str(),
        os("-o"),
        output.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&built.stdout);
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("taskvm-installer: done"), "{stdout}");
    let disk = unpacked_disk(&output, &scene.path("unpacked"));
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 96 << 20);
    assert_eq!(
        read_from_disk(&disk, "/installed.txt").as_deref(),
        Some("installed from the ISO\n")
    );
    scene.assert_nothing_left();
}

#[test]
fn a_build_that_never_powers_off_times_out_and_leaves_nothing() {
    let scene = Scene::new();
    let machine = installer_machine(&scene);
    let user_data = scene.path("user-data");
    std::fs::write(&user_data, "#cloud-config\n").unwrap();
    let output = scene.path("never.tar.zst");
    let built = scene.image_build(&[
        os("--iso"),
        testkit::guest::installer_iso().as_os_str(),
        os("--size"),
        os("64M"),
        os("--machine"),
        machine.as_os_str(),
        os("--user-data"),
        user_data.as_os_str(),
        os("--timeout"),
        os("1"),
        os("-o"),
        output.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert_eq!(built.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("without the guest powering off"),
        "{stderr}"
    );
    assert!(!output.exists());
    scene.assert_nothing_left();
}

#[test]
fn build_options_that_do_not_fit_are_refused_before_any_vm_starts() {
    let scene = Scene::new();
    let machine = installer_machine(&scene);
    let iso = testkit::guest::installer_iso();
    let out = scene.path("x.tar.zst");
    let cases: Vec<(Vec<&std::ffi::OsStr>, &str)> = vec![
        (
            vec![
                os("--iso"),
                iso.as_os_str(),
                os("--machine"),
                machine.as_os_str(),
            ],
            "--iso needs --size",
        ),
        (
            vec![os("--disk"), iso.as_os_str(), os("--"), os("true")],
            "need --machine",
        ),
        (
            vec![os("--from"), os("x.tar.zst"), os("--disk"), iso.as_os_str()],
            "exactly one of",
        ),
        (
            vec![
                os("--iso"),
                iso.as_os_str(),
                os("--size"),
                os("8Q"),
                os("--machine"),
                machine.as_os_str(),
            ],
            "unknown size unit",
        ),
        (
            vec![
                os("--disk"),
                iso.as_os_str(),
                os("--machine"),
                machine.as_os_str(),
            ],
            "nothing to build",
        ),
    ];
    for (args, expected) in cases {
        // `-o` first: a command after `--` has to come last.
        let args: Vec<&std::ffi::OsStr> = [os("-o"), out.as_os_str()]
            .into_iter()
            .chain(args)
            .collect();
        let refused = scene.image_build(&args);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!out.exists());
    }
}

#[test]
fn a_qcow2_disk_only_root_can_read_builds_through_the_agent_with_its_own_kernel() {
    let scene = Scene::new();
    // The minimal image's files, the disk as qcow2, in a directory the sandbox user cannot
    // enter: QEMU gets the disk as a descriptor and copies of the kernel and initrd.
    let files = scene.path("private");
    let unpacked = unpacked_disk(&minimal_image(), &files);
    std::fs::set_permissions(&files, std::fs::Permissions::from_mode(0o700)).unwrap();
    let disk = files.join("disk.qcow2");
    let converted = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&unpacked)
        .arg(&disk)
        .status()
        .unwrap();
    assert!(converted.success());
    let before = sha256_file(&disk);
    let output = scene.path("from-qcow2.tar.zst");
    let built = scene.image_build(&[
        os("-o"),
        output.as_os_str(),
        os("--disk"),
        disk.as_os_str(),
        os("--format"),
        os("qcow2"),
        os("--machine"),
        files.join("machine.json").as_os_str(),
        os("--kernel"),
        files.join("vmlinux").as_os_str(),
        os("--initrd"),
        files.join("initrd.img").as_os_str(),
        os("--"),
        os("sh"),
        os("-c"),
        os("echo from a host disk > /host-disk.txt; echo built"),
    ]);
    let stdout = String::from_utf8_lossy(&built.stdout);
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("built"), "{stdout}");
    assert_eq!(sha256_file(&disk), before, "the --disk file changed");
    let verified = taskvm(&["image", "verify", output.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(verified.status.success(), "{verified:?}");
    let built_disk = unpacked_disk(&output, &scene.path("built"));
    assert_eq!(
        read_from_disk(&built_disk, "/host-disk.txt").as_deref(),
        Some("from a host disk\n")
    );
    // The new image carries the kernel and initrd it was given.
    assert_eq!(
        sha256_file(&scene.path("built/vmlinux")),
        sha256_file(&files.join("vmlinux"))
    );
    scene.assert_nothing_left();
}
