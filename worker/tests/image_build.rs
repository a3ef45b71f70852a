//! `taskvm image build` end to end: a real VM under TCG changes the minimal image, the result
//! is packaged, verified and run as a task; the cached base stays byte for byte the same; a
//! failing build writes nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testkit::guest::minimal_image;
use testkit::images::sha256_file;

fn taskvm(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_taskvm"));
    command.args(args);
    command
}

struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Scene {
        assert!(
            rustix::process::geteuid().is_root(),
            "builds boot VMs: tests need root"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Scene { dir }
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
