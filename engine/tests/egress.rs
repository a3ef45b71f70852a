//! Egress with real VMs under TCG (root only): what a guest with `network.egress` can reach.
//! Every target is a host of the test's own — a namespace joined to the host by a veth pair,
//! with addresses of the ranges under test routed to it — or a listener on the host itself.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::Path;

use engine::network::session::{GuestSession, SessionConfig};
use engine::VirtualMachine;

mod common;

use common::nets::{host_address, run_to_report, serve_forever, shell, vm_name, RestOfNetwork};
use common::{resolved, Fixture};

/// Addresses of the ranges denied by default, each a listener on the test's own network.
const DENIED_FAR: [Ipv4Addr; 6] = [
    Ipv4Addr::new(10, 98, 0, 1),
    Ipv4Addr::new(172, 16, 5, 1),
    Ipv4Addr::new(192, 168, 77, 1),
    Ipv4Addr::new(100, 64, 5, 1),
    Ipv4Addr::new(100, 100, 100, 200),
    Ipv4Addr::new(168, 63, 129, 16),
];
/// In 10/8, but opened by the allow list.
const ALLOWED: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// An address of no special range (TEST-NET-2 stands for the internet here).
const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

/// A DNS server of the test's own on loopback: `public.test` is [`PUBLIC`], `internal.test`
/// an internal address (rebinding), anything else NXDOMAIN.
fn fake_resolver() -> std::net::SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 512];
        while let Ok((length, from)) = socket.recv_from(&mut buffer) {
            let query = &buffer[..length];
            let mut name = Vec::new();
            let mut at = 12;
            while at < query.len() && query[at] != 0 {
                let label = usize::from(query[at]);
                name.push(String::from_utf8_lossy(&query[at + 1..at + 1 + label]).into_owned());
                at += 1 + label;
            }
            let question_end = at + 5;
            let answer = match name.join(".").as_str() {
                "public.test" => Some(PUBLIC),
                "internal.test" => Some(Ipv4Addr::new(192, 168, 77, 1)),
                _ => None,
            };
            let mut reply = query[..question_end].to_vec();
            reply[2] = 0x81;
            reply[3] = if answer.is_some() { 0x80 } else { 0x83 };
            reply[6..12].copy_from_slice(&[0, u8::from(answer.is_some()), 0, 0, 0, 0]);
            if let Some(address) = answer {
                reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                reply.extend_from_slice(&address.octets());
            }
            let _ = socket.send_to(&reply, from);
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread")]
async fn with_egress_internal_networks_and_the_host_are_denied_and_dns_is_screened() {
    let fixture = Fixture::new();
    let loopback = TcpListener::bind("127.0.0.1:0").unwrap();
    let loopback_address = loopback.local_addr().unwrap().to_string();
    serve_forever(loopback);
    let rest = RestOfNetwork::create(1);
    for address in DENIED_FAR.iter().chain([&ALLOWED, &PUBLIC]) {
        rest.add_far_address(*address);
    }
    // The host's own end of the test network is a host address too.
    let host_side = TcpListener::bind("10.200.1.2:0").unwrap();
    let host_side_address = host_side.local_addr().unwrap().to_string();
    serve_forever(host_side);
    let mut blocked: Vec<String> =
        vec![loopback_address, host_side_address, "10.200.1.1:80".into()];
    blocked.extend(DENIED_FAR.iter().map(|address| format!("{address}:80")));
    blocked.extend(host_address().map(|address| {
        let listener = TcpListener::bind((address, 0)).unwrap();
        let bound = listener.local_addr().unwrap().to_string();
        serve_forever(listener);
        bound
    }));
    let reached = [format!("{ALLOWED}:80"), format!("{PUBLIC}:80")];
    // A blocked connection waits out its whole timeout (the packets are dropped): the probes
    // run side by side, each line written whole.
    let probe = |target: &String| {
        format!(
            "(if timeout 8 wget -q -O /dev/null http://{target}/; \
             then echo REACHED {target}; else echo BLOCKED {target}; fi) & "
        )
    };
    let script: String = reached
        .iter()
        .chain(blocked.iter())
        .map(probe)
        .collect::<String>()
        + "wait; echo \"public: $(timeout 10 nslookup public.test 2>&1 | tr '\\n' ' ')\"; \
           echo \"internal: $(timeout 10 nslookup internal.test 2>&1 | tr '\\n' ' ')\"; \
           echo resolv: $(cat /etc/resolv.conf); \
           echo metadata says $(timeout 3 wget -q -O - http://169.254.169.254/latest/meta-data/instance-id)";

    let name = vm_name("egress");
    let lease = fixture.lease();
    let machine = resolved(&lease);
    let mut settings = fixture.settings(&name, Ipv4Addr::new(169, 254, 0, 2));
    if let Some(network) = settings.network.as_mut() {
        network.egress = true;
        network.egress_allow = vec!["10.99.0.0/24".parse().unwrap()];
        network.dns_upstreams = vec![fake_resolver()];
    }
    let vm = VirtualMachine::start(lease, &machine, &settings)
        .await
        .unwrap();
    let link = vm.network().unwrap().egress_link().unwrap().to_owned();
    assert!(Path::new("/sys/class/net").join(&link).exists());
    let (session, log) = GuestSession::new(SessionConfig::new(&name));
    session.set_task(shell(&script));
    vm.set_http_handler(session.handler());
    let text = run_to_report(&session, log).await;
    println!("{text}");
    for target in &reached {
        assert!(
            text.contains(&format!("REACHED {target}")),
            "{target}:\n{text}"
        );
    }
    for target in &blocked {
        assert!(
            text.contains(&format!("BLOCKED {target}")),
            "{target} must stay unreachable:\n{text}"
        );
    }
    let line = |prefix: &str| {
        text.lines()
            .find(|line| line.starts_with(prefix))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        line("resolv:").contains("nameserver 169.254.169.254"),
        "{text}"
    );
    assert!(line("public:").contains(&PUBLIC.to_string()), "{text}");
    assert!(!line("internal:").contains("192.168.77.1"), "{text}");
    assert!(text.contains(&format!("metadata says {name}")), "{text}");
    drop(vm);
    drop(rest);
    assert!(
        !Path::new("/sys/class/net").join(&link).exists(),
        "the egress link goes with the VM"
    );
}
