//! A directory artifact: the guest's tar stream unpacked with the bounded reader, regular
//! files and directories only, plain relative names only, every entry charged to the task's
//! budget, names taskvm keeps for its own files left out.

use std::fs;
use std::io::Read;
use std::path::Path;

use schemas::payload::is_reserved_artifact_name;
use schemas::shown::quoted_bytes;
use untar::{Archive, Kind, Limits};

use super::budget::SharedBudget;
use super::{copy_into_file, Collected, Failure, SKIPPED_SHOWN};

/// Unpacks the tar stream `source` into `target`, the artifact called `name`.
pub(super) fn unpack(
    source: &mut impl Read,
    target: &Path,
    name: &str,
    budget: &SharedBudget,
) -> Result<Collected, Failure> {
    fs::create_dir_all(target)?;
    let mut archive = Archive::new(source, Limits::default());
    let mut collected = Collected {
        name: name.to_owned(),
        files: Vec::new(),
        bytes: 0,
        skipped: Vec::new(),
        skipped_count: 0,
    };
    while let Some(mut entry) = archive.next_entry()? {
        let header = entry.header();
        let relative = untar::plain_relative(&header.name)
            .ok_or_else(|| Failure::Unsafe(quoted_bytes(&header.name)))?;
        if relative.as_os_str().is_empty() {
            continue; // the directory itself
        }
        budget.borrow_mut().charge_entry()?;
        let full_name = format!("{name}/{}", relative.to_string_lossy());
        let kind = header.kind;
        let keep = matches!(kind, Kind::Regular | Kind::Directory)
            && !is_reserved_artifact_name(&full_name);
        if !keep {
            collected.skipped_count += 1;
            if collected.skipped.len() < SKIPPED_SHOWN {
                collected.skipped.push(quoted_bytes(&header.name));
            }
            continue;
        }
        let destination = target.join(&relative);
        if kind == Kind::Directory {
            fs::create_dir_all(&destination)?;
        } else {
            collected.bytes += copy_into_file(&mut entry, &destination, budget)?;
            collected.files.push(full_name);
        }
    }
    Ok(collected)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use schemas::config::ArtifactConfig;

    use std::path::PathBuf;

    use super::*;
    use crate::artifacts::{destination, Budget, Exceeded};

    #[test]
    fn artifact_destinations_stay_inside_the_artifacts_directory() {
        let dir = Path::new("/artifacts");
        assert_eq!(
            destination(dir, "public/out"),
            Some(PathBuf::from("/artifacts/public/out"))
        );
        assert_eq!(destination(dir, "../x"), None);
        assert_eq!(destination(dir, "/x"), None);
        assert_eq!(destination(dir, ""), None);
    }

    fn budget(dir: &Path, max_bytes: u64, max_entries: u32) -> SharedBudget {
        let config = ArtifactConfig {
            max_bytes,
            max_entries,
            ..ArtifactConfig::default()
        };
        Rc::new(RefCell::new(Budget::new(&config, 0, dir)))
    }

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().unwrap()
    }

    fn file_entry(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o4755);
        header.set_entry_type(tar::EntryType::Regular);
        // set_path refuses `..`; a hostile guest writes the raw bytes.
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }

    #[test]
    fn a_directory_stream_is_unpacked_inside_its_target_only() {
        let scratch = tempfile::tempdir().unwrap();
        let target = scratch.path().join("out");
        let bytes = tar_of(|b| {
            file_entry(b, "./a.txt", b"alpha");
            file_entry(b, "./sub/b.txt", b"beta");
            let mut link = tar::Header::new_gnu();
            link.set_entry_type(tar::EntryType::Symlink);
            link.set_path("evil").unwrap();
            link.set_link_name("/etc").unwrap();
            link.set_size(0);
            link.set_cksum();
            b.append(&link, &[][..]).unwrap();
        });
        let shared = budget(scratch.path(), 1 << 20, 100);
        let collected = unpack(&mut &bytes[..], &target, "out", &shared)
            .ok()
            .unwrap();
        assert_eq!(collected.files, ["out/a.txt", "out/sub/b.txt"]);
        assert_eq!(collected.bytes, 9);
        assert_eq!(collected.skipped, ["\"evil\""]);
        assert_eq!(fs::read(target.join("sub/b.txt")).unwrap(), b"beta");
        assert!(!target.join("evil").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(target.join("a.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7000, 0, "no setuid bits from the guest");

        let escape = tar_of(|b| file_entry(b, "../escaped.txt", b"x"));
        let failure = unpack(&mut &escape[..], &target, "out", &shared)
            .err()
            .unwrap();
        assert!(matches!(failure, Failure::Unsafe(name) if name == "\"../escaped.txt\""));
        assert!(!scratch.path().join("escaped.txt").exists());
    }

    #[test]
    fn names_taskvm_keeps_are_left_out_of_a_directory() {
        let scratch = tempfile::tempdir().unwrap();
        let bytes = tar_of(|b| {
            file_entry(b, "logs/live.log", b"forged log");
            file_entry(b, "logs/other.log", b"fine");
            file_entry(b, "screenshot.png", b"forged png");
        });
        let shared = budget(scratch.path(), 1 << 20, 100);
        let target = scratch.path().join("public");
        let collected = unpack(&mut &bytes[..], &target, "public", &shared)
            .ok()
            .unwrap();
        assert_eq!(collected.files, ["public/logs/other.log"]);
        assert_eq!(collected.skipped_count, 2);
    }

    #[test]
    fn entries_and_bytes_over_the_budget_are_refused() {
        let scratch = tempfile::tempdir().unwrap();
        let many = tar_of(|b| {
            for index in 0..50 {
                let mut dir = tar::Header::new_gnu();
                dir.set_entry_type(tar::EntryType::Directory);
                dir.set_size(0);
                b.append_data(&mut dir, format!("d{index}/"), &[][..])
                    .unwrap();
            }
        });
        let shared = budget(scratch.path(), 1 << 20, 10);
        let failure = unpack(&mut &many[..], &scratch.path().join("o"), "o", &shared)
            .err()
            .unwrap();
        assert!(matches!(failure, Failure::Exceeded(Exceeded::Entries(10))));
    }
}
