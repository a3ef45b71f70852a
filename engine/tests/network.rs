//! The isolated VM network and its metadata service, with real VMs under TCG (root only:
//! namespaces and taps). Traffic goes only to loopback and to namespaces these tests create.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use engine::network::session::{GuestSession, SessionConfig};
use engine::network::NetworkSettings;
use engine::{ExitKind, VirtualMachine};
use schemas::protocol::{ActionKind, Execute};
use tokio::sync::mpsc;

mod common;

use common::nets::{
    collect_log, host_address, run_to_report, serve_forever, shell, vm_name, RestOfNetwork,
};
use common::{resolved, Fixture};

/// Starts a VM on the isolated network running `task`.
async fn start(
    fixture: &Fixture,
    name: &str,
    guest_address: Ipv4Addr,
    config: SessionConfig,
    task: Execute,
) -> (VirtualMachine, Arc<GuestSession>, mpsc::Receiver<Bytes>) {
    let lease = fixture.lease();
    let machine = resolved(&lease);
    let vm = VirtualMachine::start(lease, &machine, &fixture.settings(name, guest_address))
        .await
        .unwrap();
    let (session, log) = GuestSession::new(config);
    session.set_task(task);
    vm.set_http_handler(session.handler());
    (vm, session, log)
}

fn namespaces() -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_runs_its_task_through_the_metadata_service_then_powers_off() {
    let fixture = Fixture::new();
    let name = vm_name("task");
    let (mut vm, session, log) = start(
        &fixture,
        &name,
        Ipv4Addr::new(169, 254, 0, 2),
        SessionConfig::new(&name),
        shell("echo hello from the guest; exit 3"),
    )
    .await;
    let namespace = vm.network().unwrap().namespace().to_owned();
    assert!(namespaces().contains(&namespace));
    let log = collect_log(log);
    let report = tokio::time::timeout(Duration::from_secs(120), session.wait_report())
        .await
        .unwrap_or_else(|_| panic!("no report; serial:\n{}", vm.serial_output()));
    assert_eq!(report.exit_code, 3);

    let shutdown = session.perform(ActionKind::Shutdown).await;
    let ended = tokio::time::timeout(Duration::from_secs(60), vm.wait()).await;
    let ended = ended.unwrap_or_else(|_| {
        panic!(
            "no power-off after {shutdown:?}; serial:\n{}\nQEMU:\n{}",
            vm.serial_output(),
            vm.qemu_output()
        )
    });
    assert_eq!(ended, ExitKind::PoweredOff);
    drop(vm);
    assert!(log.await.unwrap().contains("hello from the guest"));
    assert!(
        !namespaces().contains(&namespace),
        "namespace deleted with the VM"
    );
}

fn reachable_from_here(address: &str) -> bool {
    TcpStream::connect_timeout(&address.parse().unwrap(), Duration::from_secs(2)).is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_guest_reaches_its_metadata_service_and_nothing_else() {
    let fixture = Fixture::new();
    let loopback = TcpListener::bind("127.0.0.1:0").unwrap();
    let loopback_address = loopback.local_addr().unwrap().to_string();
    serve_forever(loopback);
    let host = host_address().map(|address| {
        let listener = TcpListener::bind((address, 0)).unwrap();
        let bound = listener.local_addr().unwrap().to_string();
        serve_forever(listener);
        bound
    });
    let _rest = RestOfNetwork::create(0);

    // A second VM, running concurrently, serving HTTP on its own address.
    let neighbour_name = vm_name("neighbour");
    let (_neighbour, neighbour_session, neighbour_log) = start(
        &fixture,
        &neighbour_name,
        Ipv4Addr::new(169, 254, 0, 3),
        SessionConfig::new(&neighbour_name),
        shell(
            "mkdir -p /tmp/www && echo neighbour > /tmp/www/index.html && \
             httpd -p 8080 -h /tmp/www && \
             wget -q -O - http://169.254.0.3:8080/ && echo LISTENING && sleep 600",
        ),
    )
    .await;
    let mut neighbour_log = neighbour_log;
    let mut seen = String::new();
    while !seen.contains("LISTENING") {
        let chunk = tokio::time::timeout(Duration::from_secs(120), neighbour_log.recv())
            .await
            .expect("the neighbour listens")
            .expect("the neighbour's log is open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        seen.contains("neighbour"),
        "the neighbour serves itself: {seen}"
    );

    let mut targets = vec![
        loopback_address.clone(),
        "10.200.0.1:80".to_owned(),
        "169.254.0.3:8080".to_owned(),
    ];
    targets.extend(host.clone());
    // Each target is reachable from the host namespace (so a failure from the guest means
    // isolation, not a dead listener), except the neighbour, which lives in its own namespace.
    for target in targets.iter().filter(|t| !t.starts_with("169.254.")) {
        assert!(reachable_from_here(target), "{target} answers on the host");
    }
    // The guest tries hard: a default route via the metadata address, then each target.
    let probes: String = targets
        .iter()
        .map(|target| {
            format!(
                "if timeout 3 wget -q -O /dev/null http://{target}/; \
                 then echo REACHED {target}; else echo BLOCKED {target}; fi; "
            )
        })
        .collect();
    let script = format!(
        "ip route add default via 169.254.169.254 dev eth0; {probes} \
         echo metadata says $(timeout 3 wget -q -O - \
            --header 'X-Forwarded-For: 169.254.0.3' --header 'Host: {neighbour_name}' \
            http://169.254.169.254/latest/meta-data/instance-id)"
    );
    let name = vm_name("prober");
    let (_prober, session, log) = start(
        &fixture,
        &name,
        Ipv4Addr::new(169, 254, 0, 2),
        SessionConfig::new(&name),
        shell(&script),
    )
    .await;
    let text = run_to_report(&session, log).await;
    for target in &targets {
        assert!(
            text.contains(&format!("BLOCKED {target}")),
            "{target} must be unreachable from the guest:\n{text}"
        );
    }
    assert!(
        text.contains(&format!("metadata says {name}")),
        "the metadata service answers, with this VM's identity despite spoofed headers:\n{text}"
    );
    assert!(
        neighbour_session.report().is_none(),
        "the neighbour still runs its own task"
    );
}

/// Sends one raw HTTP request to the metadata service from inside `namespace`.
fn request_in(namespace: &str, raw: Vec<u8>) -> String {
    let path = format!("/run/netns/{namespace}");
    std::thread::spawn(move || {
        let handle = std::fs::File::open(path).unwrap();
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&handle),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        let mut stream = TcpStream::connect("169.254.169.254:80").unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.write_all(&raw).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    })
    .join()
    .unwrap()
}

fn put(path: &str, body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "PUT {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra_headers}Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_enforces_one_report_body_caps_and_header_timeouts() {
    let _fixture = Fixture::new();
    let network = engine::network::VmNetwork::create(
        &vm_name("proto"),
        &NetworkSettings {
            limits: engine::network::metadata::ServiceLimits {
                header_timeout: Duration::from_millis(500),
                ..Default::default()
            },
            ..NetworkSettings::default()
        },
    )
    .unwrap();
    let namespace = network.namespace().to_owned();
    let (session, _log) = GuestSession::new(SessionConfig::new("proto"));
    network.set_handler(session.handler());

    let spoofed = "X-Forwarded-For: 10.0.0.9\r\nX-Real-IP: 10.0.0.9\r\n";
    let first = request_in(
        &namespace,
        put("/engine/v1/success", "{\"exitCode\":0}", spoofed),
    );
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let second = request_in(&namespace, put("/engine/v1/failed", "{\"exitCode\":1}", ""));
    assert!(second.starts_with("HTTP/1.1 409"), "{second}");
    assert_eq!(
        session.report().unwrap().exit_code,
        0,
        "the first report stands"
    );

    let huge = "x".repeat(100_000);
    let refused = request_in(&namespace, put("/engine/v1/success", &huge, ""));
    assert!(
        refused.starts_with("HTTP/1.1 413"),
        "{}",
        &refused[..40.min(refused.len())]
    );

    let garbage = request_in(&namespace, b"\x16\x03\x01 not http at all\r\n\r\n".to_vec());
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage}"
    );

    // A client that never finishes its headers is cut off.
    let started = std::time::Instant::now();
    let slow = request_in(
        &namespace,
        b"GET /engine/v1/ping HTTP/1.1\r\nHost: x\r\n".to_vec(),
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cut off: {slow:?}"
    );

    let ping = request_in(
        &namespace,
        b"GET /engine/v1/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
    );
    assert!(ping.contains("pong"), "{ping}");
    drop(network);
    assert!(!Path::new(&format!("/run/netns/{namespace}")).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_flood_is_capped_marked_and_keeps_memory_bounded() {
    let fixture = Fixture::new();
    let name = vm_name("flood");
    let mut config = SessionConfig::new(&name);
    config.log_cap = 8 << 20;
    let (_vm, session, log) = start(
        &fixture,
        &name,
        Ipv4Addr::new(169, 254, 0, 2),
        config,
        shell("head -c 50331648 /dev/zero | tr '\\0' x; echo; echo flood done >&2"),
    )
    .await;
    let before = resident_kib();
    // A slow consumer: the guest must wait for it, not the worker's memory grow.
    let consumer = tokio::spawn(async move {
        let mut log = log;
        let mut received = 0usize;
        let mut tail = Vec::new();
        while let Some(chunk) = log.recv().await {
            received += chunk.len();
            tail.extend_from_slice(&chunk);
            if tail.len() > 4096 {
                tail.drain(..tail.len() - 4096);
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        (received, String::from_utf8_lossy(&tail).into_owned())
    });
    let report = tokio::time::timeout(Duration::from_secs(300), session.wait_report())
        .await
        .expect("the flooding task ended");
    assert_eq!(report.exit_code, 0);
    let (written, truncated) = session.log_state().await;
    assert_eq!(written, 8 << 20);
    assert!(truncated);
    let peak = peak_kib();
    session.perform(ActionKind::Shutdown).await.ok();
    drop(_vm);
    drop(session);
    let (received, tail) = consumer.await.unwrap();
    assert!(
        tail.contains("[taskvm: log truncated at 8388608 bytes"),
        "{tail}"
    );
    assert!(received < (8 << 20) + 200);
    // 48 MiB arrive, 8 MiB are kept: had the other 40 MiB been buffered, the peak would be
    // that much higher (a run measured about 7 MiB of growth).
    println!("worker RSS before {before} KiB, peak {peak} KiB while 48 MiB of log arrived");
    assert!(
        peak < before + 24 * 1024,
        "memory grew by {} KiB",
        peak.saturating_sub(before)
    );
}

fn status_field(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    engine::host::procfs::field_number(&status, field).unwrap()
}

fn resident_kib() -> u64 {
    status_field("VmRSS:")
}

fn peak_kib() -> u64 {
    status_field("VmHWM:")
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_are_named_recorded_and_swept_after_a_crash() {
    let fixture = Fixture::new();
    let state = fixture.scratch.path().join("state");
    let name = vm_name("crashed");
    let lease = fixture.lease();
    let machine = resolved(&lease);
    let vm = VirtualMachine::start(
        lease,
        &machine,
        &fixture.settings(&name, Ipv4Addr::new(169, 254, 0, 2)),
    )
    .await
    .unwrap();
    let namespace = vm.network().unwrap().namespace().to_owned();
    assert!(namespace.starts_with("taskvm-"));
    // As if the worker died: nothing of the VM runs its destructor.
    std::mem::forget(vm);
    assert!(namespaces().contains(&namespace));
    let report = engine::sandbox::records::sweep(&state).unwrap();
    assert_eq!(report.removed_namespaces, std::slice::from_ref(&namespace));
    assert!(!namespaces().contains(&namespace));
}
