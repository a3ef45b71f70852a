//! A cloud-init NoCloud seed: a small FAT volume labelled `CIDATA` holding `user-data`,
//! `meta-data` and optionally `network-config`, which cloud-init finds by its label and reads
//! before any network is up. Written in-process (no mkfs or mtools needed).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// The volume label cloud-init looks for.
const LABEL: [u8; 11] = *b"CIDATA     ";
/// Room for the file system's own structures besides the files.
const OVERHEAD: u64 = 1 << 20;

/// What a NoCloud seed holds.
#[derive(Debug, Clone)]
pub struct NoCloudSeed {
    /// `user-data`: a `#cloud-config` document, a script, or any other format cloud-init takes.
    pub user_data: Vec<u8>,
    /// `meta-data`: at least `instance-id`.
    pub meta_data: Vec<u8>,
    /// `network-config`, when given.
    pub network_config: Option<Vec<u8>>,
}

impl NoCloudSeed {
    /// A seed with `user_data` and meta-data naming `instance_id` and `hostname`.
    pub fn new(user_data: Vec<u8>, instance_id: &str, hostname: &str) -> Self {
        NoCloudSeed {
            user_data,
            meta_data: format!("instance-id: {instance_id}\nlocal-hostname: {hostname}\n")
                .into_bytes(),
            network_config: None,
        }
    }

    /// Writes the seed as a raw FAT image at `path` (created, or truncated).
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let content = self.user_data.len()
            + self.meta_data.len()
            + self.network_config.as_ref().map_or(0, Vec::len);
        // FAT12/16 sizes: at least 2 MiB, rounded up to whole MiB.
        let size = (content as u64 + OVERHEAD).max(2 << 20).div_ceil(1 << 20) << 20;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size)?;
        fatfs::format_volume(
            &mut file,
            fatfs::FormatVolumeOptions::new().volume_label(LABEL),
        )?;
        {
            let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new())?;
            let mut entries: Vec<(&str, &[u8])> = vec![
                ("user-data", &self.user_data),
                ("meta-data", &self.meta_data),
            ];
            if let Some(config) = &self.network_config {
                entries.push(("network-config", config));
            }
            for (name, bytes) in entries {
                let mut entry = fs.root_dir().create_file(name)?;
                entry.truncate()?;
                entry.write_all(bytes)?;
                entry.flush()?;
            }
            fs.unmount()?;
        }
        File::sync_all(&file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_seed_reads_back_with_its_label_and_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seed.img");
        let seed = NoCloudSeed::new(b"#cloud-config\nruncmd: [true]\n".to_vec(), "i-1", "h");
        seed.write(&path).expect("write");
        let mut file = File::open(&path).expect("open");
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).expect("mount");
        assert_eq!(fs.volume_label(), "CIDATA");
        let mut text = String::new();
        fs.root_dir()
            .open_file("user-data")
            .expect("user-data")
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, "#cloud-config\nruncmd: [true]\n");
        let mut meta = String::new();
        fs.root_dir()
            .open_file("meta-data")
            .expect("meta-data")
            .read_to_string(&mut meta)
            .expect("read");
        assert!(meta.contains("instance-id: i-1"), "{meta}");
    }

    #[test]
    fn a_large_user_data_gets_a_larger_volume() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seed.img");
        let big = vec![b'x'; 5 << 20];
        NoCloudSeed::new(big.clone(), "i", "h")
            .write(&path)
            .expect("write");
        let mut file = File::open(&path).expect("open");
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).expect("mount");
        let mut back = Vec::new();
        fs.root_dir()
            .open_file("user-data")
            .expect("user-data")
            .read_to_end(&mut back)
            .expect("read");
        assert_eq!(back, big);
    }
}
