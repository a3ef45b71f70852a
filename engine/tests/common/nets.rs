//! Helpers of the tests that put VMs on networks: VM names, guest shell tasks, logs, listeners
//! on the host and a "rest of the network" in a namespace of the test's own.
#![allow(dead_code)]

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use engine::network::session::GuestSession;
use schemas::protocol::{ActionKind, Execute};
use tokio::sync::mpsc;

/// A unique VM name per test process.
pub fn vm_name(base: &str) -> String {
    format!("{base}-{}", std::process::id())
}

/// A task running `script` with `sh -c`.
pub fn shell(script: &str) -> Execute {
    Execute {
        command: vec!["sh".into(), "-c".into(), script.into()],
        ..Execute::default()
    }
}

/// Collects a log channel into a string in the background.
pub fn collect_log(mut log: mpsc::Receiver<Bytes>) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut text = Vec::new();
        while let Some(chunk) = log.recv().await {
            text.extend_from_slice(&chunk);
        }
        String::from_utf8_lossy(&text).into_owned()
    })
}

/// Waits for the guest's report, shuts it down and returns its whole log.
pub async fn run_to_report(session: &GuestSession, log: mpsc::Receiver<Bytes>) -> String {
    let log = collect_log(log);
    tokio::time::timeout(Duration::from_secs(180), session.wait_report())
        .await
        .expect("the guest reported");
    session.perform(ActionKind::Shutdown).await.ok();
    tokio::time::timeout(Duration::from_secs(60), log)
        .await
        .expect("the log ended")
        .unwrap()
}

/// A listener answering every connection with a fixed line, on a thread.
pub fn serve_forever(listener: TcpListener) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nreached\n");
        }
    });
}

/// The host namespace's first global IPv4 address other than loopback.
pub fn host_address() -> Option<Ipv4Addr> {
    let output = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.contains(" 10.200."))
        .find_map(|line| {
            let cidr = line.split_whitespace().nth(3)?;
            cidr.split('/').next()?.parse().ok()
        })
}

/// A "rest of the network": a namespace of the test's own joined to the host namespace by a
/// veth pair, with a listener at 10.200.SUBNET.1:80 (the host side is 10.200.SUBNET.2).
/// Removed on drop.
pub struct RestOfNetwork {
    namespace: String,
    host_side: String,
    peer: String,
    subnet: u8,
}

impl RestOfNetwork {
    pub fn create(subnet: u8) -> RestOfNetwork {
        let id = std::process::id();
        let rest = RestOfNetwork {
            namespace: format!("taskvm-test-rest-{id}"),
            host_side: format!("tvr{id}"),
            peer: format!("tvp{id}"),
            subnet,
        };
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().unwrap();
            assert!(status.success(), "ip {args:?}");
        };
        let peer = format!("tvp{id}");
        ip(&["netns", "add", &rest.namespace]);
        ip(&[
            "link",
            "add",
            &rest.host_side,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &rest.namespace]);
        ip(&[
            "addr",
            "add",
            &format!("10.200.{subnet}.2/24"),
            "dev",
            &rest.host_side,
        ]);
        ip(&["link", "set", &rest.host_side, "up"]);
        ip(&[
            "-n",
            &rest.namespace,
            "addr",
            "add",
            &format!("10.200.{subnet}.1/24"),
            "dev",
            &peer,
        ]);
        ip(&["-n", &rest.namespace, "link", "set", &peer, "up"]);
        ip(&["-n", &rest.namespace, "link", "set", "lo", "up"]);
        rest.serve_inside(Ipv4Addr::new(10, 200, subnet, 1));
        rest
    }

    /// A listener at `address`:80 made inside the namespace, answering forever.
    fn serve_inside(&self, address: Ipv4Addr) {
        let path = format!("/run/netns/{}", self.namespace);
        let listener = std::thread::spawn(move || {
            let namespace = std::fs::File::open(path).unwrap();
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&namespace),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            TcpListener::bind((address, 80)).unwrap()
        })
        .join()
        .unwrap();
        serve_forever(listener);
    }
}

impl RestOfNetwork {
    /// Puts `address` (any network: it is not on a host interface, only routed there) on the
    /// namespace's side with a listener at port 80, and routes it from the host.
    pub fn add_far_address(&self, address: Ipv4Addr) {
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().unwrap();
            assert!(status.success(), "ip {args:?}");
        };
        let host = format!("{address}/32");
        ip(&[
            "-n",
            &self.namespace,
            "addr",
            "add",
            &host,
            "dev",
            &self.peer,
        ]);
        let via = format!("10.200.{}.1", self.subnet);
        ip(&["route", "add", &host, "via", &via, "dev", &self.host_side]);
        self.serve_inside(address);
    }
}

impl Drop for RestOfNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_side])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .status();
    }
}
