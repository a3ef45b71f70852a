//! Reading the kernel command line, where the engine leaves the guest's parameters
//! ([`protocol::kernel_parameter`]) and the root disk (`root=`).

/// The value of `name` (e.g. `taskvm.ip=`) on the kernel command line.
pub fn parameter<'a>(cmdline: &'a str, name: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|word| word.strip_prefix(name))
}

#[cfg(test)]
mod tests {
    use super::parameter;

    #[test]
    fn reads_parameters_from_the_command_line() {
        let cmdline = "console=ttyS0 taskvm.ip=169.254.7.2/16 quiet\n";
        assert_eq!(parameter(cmdline, "taskvm.ip="), Some("169.254.7.2/16"));
        assert_eq!(parameter(cmdline, "taskvm.metadata="), None);
    }
}
