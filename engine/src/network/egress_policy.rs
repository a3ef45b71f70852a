//! What a guest with egress may reach. Denied by default: the internal and special ranges
//! ([`DENIED`]), the known cloud metadata and host-agent addresses, and every network on the
//! host's own interfaces; an operator's allow list (`network.egressAllow`) opens specific
//! CIDRs again (a LAN cache). The same policy makes the namespace's nftables sets and checks
//! the addresses in the DNS answers given to the guest.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network: an address and a prefix length, the host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    network: u32,
    prefix: u8,
}

impl Ipv4Cidr {
    /// The network of `address` with `prefix` bits (at most 32).
    pub fn new(address: Ipv4Addr, prefix: u8) -> Ipv4Cidr {
        let prefix = prefix.min(32);
        Ipv4Cidr {
            network: u32::from(address) & mask(prefix),
            prefix,
        }
    }

    /// Whether `address` lies in this network.
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & mask(self.prefix) == self.network
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }
}

/// A CIDR that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an IPv4 CIDR (A.B.C.D/N): {0:?}")]
pub struct BadCidr(pub String);

impl FromStr for Ipv4Cidr {
    type Err = BadCidr;

    /// `A.B.C.D/N`, or `A.B.C.D` for one address.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadCidr(text.chars().take(64).collect());
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, prefix.parse::<u8>().map_err(|_| bad())?),
            None => (text, 32),
        };
        if prefix > 32 {
            return Err(bad());
        }
        let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
        Ok(Ipv4Cidr::new(address, prefix))
    }
}

/// Denied whatever the host: "this" network, RFC 1918, shared address space (where Alibaba's
/// metadata service lives), loopback, link-local (every cloud's 169.254.169.254), IETF
/// protocol assignments, benchmarking, multicast and reserved, and Azure's host agent.
pub const DENIED: [&str; 12] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "168.63.129.16/32",
];

/// The egress policy of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    denied: Vec<Ipv4Cidr>,
    allowed: Vec<Ipv4Cidr>,
}

impl EgressPolicy {
    /// [`DENIED`], the VM address pool and `host_networks`, with `allowed` opened again.
    pub fn new(host_networks: &[Ipv4Cidr], allowed: &[Ipv4Cidr], pool: Ipv4Cidr) -> Self {
        let mut denied: Vec<Ipv4Cidr> =
            DENIED.iter().filter_map(|text| text.parse().ok()).collect();
        denied.push(pool);
        denied.extend_from_slice(host_networks);
        EgressPolicy {
            denied: without_overlaps(denied),
            allowed: without_overlaps(allowed.to_vec()),
        }
    }

    /// Whether the guest may reach `address`.
    pub fn permits(&self, address: Ipv4Addr) -> bool {
        self.allowed.iter().any(|cidr| cidr.contains(address))
            || !self.denied.iter().any(|cidr| cidr.contains(address))
    }

    /// The denied networks, as nftables set elements.
    pub fn denied_elements(&self) -> String {
        join(&self.denied)
    }

    /// The allowed networks, as nftables set elements (empty when none).
    pub fn allowed_elements(&self) -> String {
        join(&self.allowed)
    }

    /// Whether any network is allowed explicitly.
    pub fn has_allowed(&self) -> bool {
        !self.allowed.is_empty()
    }
}

impl Ipv4Cidr {
    /// Whether `other` lies wholly inside this network.
    fn covers(&self, other: &Ipv4Cidr) -> bool {
        self.prefix <= other.prefix && self.contains(Ipv4Addr::from(other.network))
    }
}

/// The networks with every one inside another left out: nftables interval sets refuse
/// overlapping elements (a host network inside 10/8, 127/8 from the loopback interface).
fn without_overlaps(mut cidrs: Vec<Ipv4Cidr>) -> Vec<Ipv4Cidr> {
    cidrs.sort_by_key(|cidr| (cidr.prefix, cidr.network));
    let mut kept: Vec<Ipv4Cidr> = Vec::new();
    for cidr in cidrs {
        if !kept.iter().any(|wider| wider.covers(&cidr)) {
            kept.push(cidr);
        }
    }
    kept.sort();
    kept
}

fn join(cidrs: &[Ipv4Cidr]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The networks on the host's interfaces, from `ip -4 -o addr show` output, leaving out the
/// egress links' own (`skip_prefix`).
pub fn host_networks(ip_output: &str, skip_prefix: &str) -> Vec<Ipv4Cidr> {
    ip_output
        .lines()
        .filter(|line| {
            line.split_whitespace()
                .nth(1)
                .is_none_or(|name| !name.starts_with(skip_prefix))
        })
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|word| *word == "inet")?;
            words.next()?.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Ipv4Cidr {
        text.parse().unwrap()
    }

    #[test]
    fn the_internal_ranges_are_denied_and_allow_opens_them_again() {
        let policy = EgressPolicy::new(
            &[cidr("203.0.113.7/24")],
            &[cidr("10.99.0.0/24")],
            cidr("100.72.0.0/16"),
        );
        for denied in [
            "10.1.2.3",
            "172.16.5.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.100.100.200",
            "168.63.129.16",
            "169.254.169.254",
            "127.0.0.53",
            "0.1.2.3",
            "192.0.0.9",
            "198.19.0.1",
            "224.0.0.251",
            "255.255.255.255",
            "100.72.3.4",
            "203.0.113.99",
        ] {
            assert!(!policy.permits(denied.parse().unwrap()), "{denied}");
        }
        for permitted in ["10.99.0.1", "8.8.8.8", "172.32.0.1", "198.51.100.7"] {
            assert!(policy.permits(permitted.parse().unwrap()), "{permitted}");
        }
        assert!(policy.denied_elements().contains("10.0.0.0/8, "));
        assert_eq!(policy.allowed_elements(), "10.99.0.0/24");
        // Networks inside others are left out of the sets (nftables refuses overlaps).
        let nested = EgressPolicy::new(
            &[
                cidr("10.200.1.0/24"),
                cidr("127.0.0.0/8"),
                cidr("192.0.2.0/24"),
            ],
            &[cidr("10.99.0.0/16"), cidr("10.99.1.0/24")],
            cidr("100.72.0.0/16"),
        );
        let denied = nested.denied_elements();
        assert!(
            !denied.contains("10.200.1.0/24") && denied.contains("192.0.2.0/24"),
            "{denied}"
        );
        assert_eq!(denied.matches("127.0.0.0/8").count(), 1);
        assert_eq!(nested.allowed_elements(), "10.99.0.0/16");
    }

    #[test]
    fn cidrs_parse_strictly_and_host_networks_come_from_ip() {
        assert_eq!(cidr("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("1.2.3.4").to_string(), "1.2.3.4/32");
        assert!("10.0.0.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0/8".parse::<Ipv4Cidr>().is_err());
        assert!("".parse::<Ipv4Cidr>().is_err());
        let output = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                      2: eth0    inet 203.0.113.7/24 brd 203.0.113.255 scope global eth0\n\
                      9: tve0a1b2c3    inet 100.72.0.1/30 scope global tve0a1b2c3\n";
        assert_eq!(
            host_networks(output, "tve"),
            [cidr("127.0.0.0/8"), cidr("203.0.113.0/24")]
        );
    }
}
