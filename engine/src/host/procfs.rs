//! Numbers from the kernel's `/proc` text files (`meminfo`, `PID/status`, `PID/smaps`), whose
//! lines read `Name:   1234 kB`.

/// The number on the first line of `text` that starts with `field` (`"VmRSS:"`, with its
/// colon), in the file's unit (kB for memory); None when there is no such line or no number.
pub fn field_number(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// The resident memory of process `pid` (`VmRSS`), in bytes; 0 when it cannot be read.
pub fn resident_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| field_number(&status, "VmRSS:"))
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_is_read_in_its_unit_and_a_missing_or_odd_one_is_none() {
        let text =
            "MemTotal:       24576000 kB\nMemFree:  12 kB\nHugePages_Total:   0\nOdd: x kB\n";
        assert_eq!(field_number(text, "MemTotal:"), Some(24_576_000));
        assert_eq!(field_number(text, "MemFree:"), Some(12));
        assert_eq!(field_number(text, "HugePages_Total:"), Some(0));
        assert_eq!(field_number(text, "Odd:"), None);
        assert_eq!(field_number(text, "Absent:"), None);
        assert!(resident_bytes(std::process::id()) > 0);
    }
}
