//! A VM's isolated network, owned as one: its namespace, the tap QEMU uses, the metadata
//! service listening at 169.254.169.254:80 inside the namespace and the DHCP responder.
//!
//! Isolation is structural: the namespace holds only the tap and a loopback, has forwarding
//! and IPv6 off, and no route, veth or bridge leads out of it. Whatever the guest sends —
//! to the host's addresses, to other VMs, to any network — has nowhere to go; the only
//! sockets in the namespace are the metadata listener and the DHCP responder. With
//! `egress` (off unless asked for), [`crate::network::egress`] adds a NATed way out, and a DNS
//! forwarder ([`crate::network::dns`]) listens on the metadata address.
//!
//! # Layout
//! - [`netns`]: the VM's own network namespace and the tap device in it.
//! - [`metadata`]: the per-VM HTTP service, its listener inside the VM's namespace.
//! - [`session`]: the guest protocol (`/engine/v1/`) and cloud-init metadata as a handler.
//! - [`shell`]: interactive shells, connected over upgraded metadata-service connections.
//! - [`dhcp`]: a DHCP responder for stock cloud images.
//! - [`egress`]: opt-in NAT to other networks (never to the host itself), under the
//!   [`egress_policy`] (internal ranges and the host's own networks denied), with a
//!   [`dns`] forwarder that refuses answers naming denied addresses.

pub mod dhcp;
pub mod dns;
pub mod egress;
pub mod egress_policy;
pub mod metadata;
pub mod netns;
pub mod session;
pub mod shell;
pub mod warm_up;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use schemas::protocol::METADATA_ADDRESS;
use tokio::task::JoinHandle;

use crate::network::egress::Egress;
use crate::network::egress_policy::Ipv4Cidr;
use crate::network::metadata::{Handler, MetadataService, ServiceLimits};
use crate::network::netns::{check_privileges, open_tap, Namespace, NetworkError, TAP_NAME};

/// The guest address our agent uses when told nothing else.
pub const DEFAULT_GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 2);
/// The MAC of every VM's tap (the host side of its link).
pub const TAP_MAC: &str = "02:74:76:6d:00:01";
/// The link's prefix length (169.254.0.0/16).
pub const PREFIX_LEN: u8 = 16;

/// How a VM's network is set up.
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    /// The guest's address (on the kernel command line for our agent, by DHCP for others).
    pub guest_address: Ipv4Addr,
    /// Limits of the metadata service.
    pub limits: ServiceLimits,
    /// Whether to answer DHCP.
    pub dhcp: bool,
    /// Whether the guest may reach other networks through NAT (never the host itself).
    pub egress: bool,
    /// With egress: networks the guest may reach although the policy denies them.
    pub egress_allow: Vec<Ipv4Cidr>,
    /// With egress: the resolvers the guest's DNS queries go to (empty: the host's, from
    /// `/etc/resolv.conf`).
    pub dns_upstreams: Vec<SocketAddr>,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        NetworkSettings {
            guest_address: DEFAULT_GUEST_ADDRESS,
            limits: ServiceLimits::default(),
            dhcp: true,
            egress: false,
            egress_allow: Vec::new(),
            dns_upstreams: Vec::new(),
        }
    }
}

/// One VM's network. Dropping it stops the services and deletes the namespace.
pub struct VmNetwork {
    service: Option<MetadataService>,
    dhcp: Option<JoinHandle<()>>,
    dns: Option<JoinHandle<()>>,
    tap: OwnedFd,
    guest_address: Ipv4Addr,
    egress: Option<Egress>,
    namespace: Namespace,
}

impl VmNetwork {
    /// Creates the namespace `taskvm-NAME` with its tap and services. Must run inside a
    /// tokio runtime.
    pub fn create(name: &str, settings: &NetworkSettings) -> Result<Self, NetworkError> {
        check_privileges()?;
        let metadata: Ipv4Addr = METADATA_ADDRESS
            .parse()
            .unwrap_or(Ipv4Addr::new(169, 254, 169, 254));
        let namespace = Namespace::create(name)?;
        let tap = namespace.run_inside(|| open_tap(TAP_NAME))?;
        // Every VM's tap has the same MAC: a guest restored from a snapshot still has the
        // address of the tap it was saved with in its ARP cache, and each VM has a segment of
        // its own, so nothing can clash. One `ip` for both changes: each start costs ~5 ms.
        namespace.ip_batch(&[
            format!("addr add {metadata}/{PREFIX_LEN} dev {TAP_NAME}"),
            format!("link set {TAP_NAME} address {TAP_MAC} up"),
        ])?;
        let (egress, policy) = if settings.egress {
            let (egress, policy) = Egress::create(&namespace, TAP_NAME, &settings.egress_allow)?;
            (Some(egress), Some(policy))
        } else {
            (None, None)
        };
        let want_dhcp = settings.dhcp;
        let want_dns = settings.egress;
        let (listener, dhcp_socket, dns_socket) = namespace.run_inside(move || {
            let listener = TcpListener::bind(SocketAddrV4::new(metadata, 80))?;
            let dhcp_socket = if want_dhcp {
                Some(dhcp::bind(TAP_NAME)?)
            } else {
                None
            };
            let dns_socket = if want_dns {
                Some(dns::bind(metadata)?)
            } else {
                None
            };
            Ok((listener, dhcp_socket, dns_socket))
        })?;
        let service = MetadataService::start(listener, settings.limits).map_err(|source| {
            NetworkError::Io {
                action: "starting the metadata service".into(),
                source,
            }
        })?;
        let dhcp = dhcp_socket.map(|socket| {
            tokio::spawn(dhcp::serve(
                socket,
                dhcp::Lease {
                    address: settings.guest_address,
                    prefix_len: PREFIX_LEN,
                    server: metadata,
                    router: settings.egress.then_some(metadata),
                    seconds: 86_400,
                },
            ))
        });
        let dns = dns_socket.zip(policy).map(|(socket, policy)| {
            let upstreams = if settings.dns_upstreams.is_empty() {
                let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
                dns::host_resolvers(&conf)
            } else {
                settings.dns_upstreams.clone()
            };
            tokio::spawn(dns::serve(socket, upstreams, Arc::new(policy)))
        });
        Ok(VmNetwork {
            service: Some(service),
            dhcp,
            dns,
            tap,
            guest_address: settings.guest_address,
            egress,
            namespace,
        })
    }

    /// The tap's descriptor, for QEMU's `-netdev tap,fd=N`.
    pub fn tap(&self) -> BorrowedFd<'_> {
        self.tap.as_fd()
    }

    /// The namespace's name.
    pub fn namespace(&self) -> &str {
        self.namespace.name()
    }

    /// Sets the handler of the VM's metadata requests.
    pub fn set_handler(&self, handler: Arc<dyn Handler>) {
        if let Some(service) = &self.service {
            service.set_handler(handler);
        }
    }

    /// Requests open at the metadata service now (0 once it is stopped).
    pub fn open_requests(&self) -> usize {
        self.service
            .as_ref()
            .map_or(0, MetadataService::open_connections)
    }

    /// Stops the metadata service for good: its connections close and new ones are refused,
    /// so the agent goes to its retry loop (no request open) — the state to snapshot a VM in.
    /// Returns how many open requests were cut off: the guest has left them only once it
    /// says so ([`schemas::protocol::marker::CUT_OFF`]).
    pub async fn stop_service(&mut self) -> usize {
        match self.service.take() {
            Some(service) => service.stop().await,
            None => 0,
        }
    }

    /// The kernel parameters that tell our agent its address (and, with egress, its
    /// gateway: the metadata address, which the namespace routes onward).
    pub fn kernel_parameter(&self) -> String {
        use schemas::protocol::kernel_parameter::{ADDRESS, GATEWAY};
        let address = format!("{ADDRESS}{}/{PREFIX_LEN}", self.guest_address);
        match &self.egress {
            Some(_) => format!("{address} {GATEWAY}{METADATA_ADDRESS}"),
            None => address,
        }
    }

    /// The host side of the egress link, when the VM has one.
    pub fn egress_link(&self) -> Option<&str> {
        self.egress.as_ref().map(Egress::host_link)
    }
}

impl Drop for VmNetwork {
    fn drop(&mut self) {
        for task in [&self.dhcp, &self.dns].into_iter().flatten() {
            task.abort();
        }
    }
}
