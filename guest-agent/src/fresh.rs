//! Making the guest's state its own before the command runs, from what the host sent with the
//! task: the clock, the kernel's random number generator (the host's bytes added to the pool,
//! then a reseed) and `/etc/machine-id`. A VM restored from a snapshot would otherwise run on
//! the snapshot's clock and produce the same random numbers as every other copy of it.

use std::fs::OpenOptions;
use std::io;

use protocol::Freshness;

/// `_IOW('R', 0x03, int[2])`: add bytes to the entropy pool, crediting their entropy.
const RNDADDENTROPY: rustix::ioctl::Opcode = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the pool now.
const RNDRESEEDCRNG: rustix::ioctl::Opcode = 0x5207;
/// Host bytes used at most (the protocol sends 32).
const MAX_ENTROPY: usize = 64;

/// Applies `fresh`; returns what could not be done (each a line for the console).
pub fn apply(fresh: &Freshness) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(error) = set_clock(fresh.unix_time_ms) {
        problems.push(format!("setting the clock: {error}"));
    }
    match decode_hex(&fresh.entropy) {
        Some(bytes) => {
            if let Err(error) = reseed(&bytes) {
                problems.push(format!("reseeding the RNG: {error}"));
            }
        }
        None => problems.push("the host's entropy is not hex".to_owned()),
    }
    let id = &fresh.machine_id;
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        if let Err(error) = write_machine_id(id) {
            problems.push(format!("writing /etc/machine-id: {error}"));
        }
    } else {
        problems.push("the host's machine-id is not 32 hex digits".to_owned());
    }
    problems
}

/// Writes `/etc/machine-id` in place: the new id over the old one, cut to its length only when
/// it was longer. Truncating it first (a plain `fs::write`) took 30-90 ms in a pooled VM
/// under TCG, the largest step between the task's arrival and its command; this takes 2-5 ms.
fn write_machine_id(id: &str) -> io::Result<()> {
    use std::io::Write;
    let line = format!("{id}\n");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open("/etc/machine-id")?;
    file.write_all(line.as_bytes())?;
    if file.metadata()?.len() != line.len() as u64 {
        file.set_len(line.len() as u64)?;
    }
    Ok(())
}

fn set_clock(unix_time_ms: u64) -> io::Result<()> {
    let time = rustix::time::Timespec {
        tv_sec: (unix_time_ms / 1000) as i64,
        tv_nsec: ((unix_time_ms % 1000) * 1_000_000) as _,
    };
    rustix::time::clock_settime(rustix::time::ClockId::Realtime, time)?;
    Ok(())
}

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }` with `bytes`.
fn pool_info(bytes: &[u8]) -> [u8; 8 + MAX_ENTROPY] {
    let length = bytes.len().min(MAX_ENTROPY);
    let mut info = [0u8; 8 + MAX_ENTROPY];
    info[..4].copy_from_slice(&((length * 8) as i32).to_ne_bytes());
    info[4..8].copy_from_slice(&(length as i32).to_ne_bytes());
    info[8..8 + length].copy_from_slice(&bytes[..length]);
    info
}

#[allow(unsafe_code)]
fn reseed(bytes: &[u8]) -> io::Result<()> {
    let random = OpenOptions::new().write(true).open("/dev/random")?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info: two ints and then `buf_size` bytes, all
    // within the array passed; RNDRESEEDCRNG takes no argument.
    unsafe {
        let add =
            rustix::ioctl::Setter::<RNDADDENTROPY, [u8; 8 + MAX_ENTROPY]>::new(pool_info(bytes));
        rustix::ioctl::ioctl(&random, add)?;
        rustix::ioctl::ioctl(&random, rustix::ioctl::NoArg::<RNDRESEEDCRNG>::new())?;
    }
    Ok(())
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_info_carries_the_bytes_and_their_entropy_in_bits() {
        let info = pool_info(&[0xab; 32]);
        assert_eq!(i32::from_ne_bytes(info[..4].try_into().unwrap()), 256);
        assert_eq!(i32::from_ne_bytes(info[4..8].try_into().unwrap()), 32);
        assert_eq!(&info[8..40], &[0xab; 32]);
        assert!(info[40..].iter().all(|b| *b == 0));
        let capped = pool_info(&[1; 100]);
        assert_eq!(i32::from_ne_bytes(capped[4..8].try_into().unwrap()), 64);
    }

    #[test]
    fn hex_is_decoded_strictly() {
        assert_eq!(decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex("é1"), None);
    }
}
