//! A network namespace of the test's own with a tap device in it, so that a test can boot a
//! guest whose only peer is a listener the test binds inside the namespace. Needs root.
//! Removed (with the tap) when dropped.

use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Name of the tap device inside every test namespace.
pub const TAP: &str = "tap0";

/// A namespace `taskvm-test-<pid>-<n>` holding `tap0` with `address`.
pub struct TestNetwork {
    name: String,
}

impl TestNetwork {
    /// Creates the namespace and its tap, with `address` (e.g. `169.254.169.254/16`) on the tap.
    pub fn create(address: &str) -> TestNetwork {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        assert!(
            rustix::process::geteuid().is_root(),
            "booting a guest on a tap needs root"
        );
        let name = format!(
            "taskvm-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let network = TestNetwork { name };
        run(&["ip", "netns", "add", &network.name]);
        network.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
        network.ip(&["addr", "add", address, "dev", TAP]);
        network.ip(&["link", "set", TAP, "up"]);
        network.ip(&["link", "set", "lo", "up"]);
        network
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn ip(&self, args: &[&str]) {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full);
    }

    /// Binds a TCP listener at `address` inside the namespace (the socket stays there).
    pub fn bind(&self, address: &str) -> TcpListener {
        let path = format!("/run/netns/{}", self.name);
        let address = address.to_owned();
        std::thread::spawn(move || {
            let namespace = std::fs::File::open(&path).expect("open netns");
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&namespace),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("setns");
            TcpListener::bind(&address).expect("bind inside the namespace")
        })
        .join()
        .expect("bind thread")
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("run ip");
    assert!(status.success(), "{args:?} failed");
}
