//! The host's TSC frequency, for the guest's `tsc_early_khz=`: without it, microvm guests
//! under TCG sometimes hang calibrating their delay loop.

/// The host's TSC frequency in kHz, from `/proc/cpuinfo` (`cpu MHz`); None when unknown.
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_mhz(&cpuinfo)
}

fn parse_cpu_mhz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|line| line.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    (mhz > 0.0).then_some((mhz * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_mhz;

    #[test]
    fn reads_the_first_cpu_mhz_line() {
        let text = "processor\t: 0\ncpu MHz\t\t: 2994.374\ncpu MHz\t\t: 1.0\n";
        assert_eq!(parse_cpu_mhz(text), Some(2_994_374));
        assert_eq!(parse_cpu_mhz("flags: fpu\n"), None);
        assert_eq!(parse_cpu_mhz("cpu MHz : fast\n"), None);
    }
}
