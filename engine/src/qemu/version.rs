//! What `qemu --version` says. A snapshot's key holds it, so every `taskvm run` needs it;
//! running QEMU for it costs 10-20 ms (more on a busy host), so the answer is remembered in a
//! file beside the snapshots, with the identity of the binary it came from (device, inode,
//! size, modification and change times of the file the name resolves to). Any install or
//! upgrade of QEMU changes that identity, and the next call asks QEMU again.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The most of a remembered-version file that is read.
const REMEMBERED_LIMIT: u64 = 4096;

/// What `qemu --version` prints (trimmed; empty when it cannot run). The one place besides a
/// VM's start where the engine runs QEMU.
pub fn qemu_version(qemu: &str) -> String {
    std::process::Command::new(qemu)
        .arg("--version")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// [`qemu_version`], remembered in `file` for the binary `qemu` resolves to now: read from
/// there when that binary is the one it was asked of, else asked and written there (a write
/// that fails only costs the next call the question again).
pub fn remembered_qemu_version(qemu: &str, file: &Path) -> String {
    let Some(identity) = binary_identity(qemu) else {
        return qemu_version(qemu);
    };
    if let Some(version) = read_remembered(file, &identity) {
        return version;
    }
    let version = qemu_version(qemu);
    if !version.is_empty() {
        let _ = write_remembered(file, &identity, &version);
    }
    version
}

/// The resolved binary's path and its file's identity, one line.
fn binary_identity(qemu: &str) -> Option<String> {
    let path = crate::sandbox::jail::find_program(qemu)
        .ok()?
        .canonicalize()
        .ok()?;
    let meta = fs::metadata(&path).ok()?;
    Some(format!(
        "{} dev={} ino={} size={} mtime={}.{} ctime={}.{}",
        path.display(),
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    ))
    .filter(|line| !line.contains('\n'))
}

fn read_remembered(file: &Path, identity: &str) -> Option<String> {
    let mut text = String::new();
    fs::File::open(file)
        .ok()?
        .take(REMEMBERED_LIMIT)
        .read_to_string(&mut text)
        .ok()?;
    let (remembered_identity, version) = text.split_once('\n')?;
    (remembered_identity == identity && !version.trim().is_empty())
        .then(|| version.trim().to_owned())
}

/// Writes `identity` and `version` to `file` through a temporary file renamed over it, so a
/// reader never sees half of it.
fn write_remembered(file: &Path, identity: &str, version: &str) -> io::Result<()> {
    let temporary = file.with_extension(format!("tmp-{}", std::process::id()));
    fs::write(&temporary, format!("{identity}\n{version}\n"))?;
    fs::rename(&temporary, file).inspect_err(|_| {
        let _ = fs::remove_file(&temporary);
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A stand-in `qemu` that says `version` and counts its runs in `runs`.
    fn fake_qemu(dir: &Path, version: &str) -> String {
        let program = dir.join("fake-qemu");
        let runs = dir.join("runs");
        fs::write(
            &program,
            format!(
                "#!/bin/sh\necho x >> {}\necho '{version}'\n",
                runs.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).unwrap();
        program.display().to_string()
    }

    fn runs(dir: &Path) -> usize {
        fs::read_to_string(dir.join("runs"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    #[test]
    fn the_version_is_asked_once_per_installed_binary() {
        let dir = tempfile::tempdir().unwrap();
        let remembered = dir.path().join("qemu-version");
        let qemu = fake_qemu(dir.path(), "QEMU emulator version 7.2.0");
        assert_eq!(
            remembered_qemu_version(&qemu, &remembered),
            "QEMU emulator version 7.2.0"
        );
        assert_eq!(
            remembered_qemu_version(&qemu, &remembered),
            "QEMU emulator version 7.2.0"
        );
        assert_eq!(runs(dir.path()), 1, "the second answer was remembered");

        // An upgrade replaces the binary: asked again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let upgraded = dir.path().join("new-qemu");
        fs::copy(&qemu, &upgraded).unwrap();
        fs::write(
            &upgraded,
            fs::read_to_string(&qemu).unwrap().replace("7.2.0", "8.0.0"),
        )
        .unwrap();
        fs::rename(&upgraded, &qemu).unwrap();
        assert_eq!(
            remembered_qemu_version(&qemu, &remembered),
            "QEMU emulator version 8.0.0"
        );
        assert_eq!(runs(dir.path()), 2);
    }

    #[test]
    fn a_damaged_or_oversized_remembered_file_is_asked_over() {
        let dir = tempfile::tempdir().unwrap();
        let remembered = dir.path().join("qemu-version");
        let qemu = fake_qemu(dir.path(), "QEMU emulator version 7.2.0");
        fs::write(&remembered, vec![b'x'; 10_000]).unwrap();
        assert_eq!(
            remembered_qemu_version(&qemu, &remembered),
            "QEMU emulator version 7.2.0"
        );
        assert_eq!(runs(dir.path()), 1);
        assert!(fs::metadata(&remembered).unwrap().len() < 1000, "rewritten");
    }
}
