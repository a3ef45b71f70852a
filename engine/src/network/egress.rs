//! Opt-in NAT egress for one VM (`network.egress`): a veth pair from the VM's namespace to the
//! host (`tveXXXXXXXX` on the host, `up0` inside), an address pair from 100.72.0.0/16 (RFC 6598
//! shared space, unlikely to clash with a host's own networks), and two nftables tables:
//!
//! - inside the namespace (`taskvm`): the guest's traffic is forwarded out of `up0` and
//!   masqueraded, except to what the [`EgressPolicy`] denies (internal and special ranges,
//!   cloud metadata and host-agent addresses, the host's own networks, other VMs' links)
//!   unless the operator allowed it; nothing from `up0` reaches the guest or the metadata
//!   service unless it answers the guest;
//! - on the host (`taskvm_egress`, shared by all VMs): the links' addresses are masqueraded on
//!   the way out, and nothing arriving on a `tve*` link is delivered to the host itself — a
//!   guest with egress still cannot reach the host's own services.
//!
//! The host must forward IPv4 (`net.ipv4.ip_forward=1`): the first link turns it on, and the
//! last one turns it off again if it was off. Deleting the namespace deletes the veth pair
//! (so the crash sweep removes links too); the host table goes with the last link.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::network::egress_policy::{host_networks, EgressPolicy, Ipv4Cidr};
use crate::network::netns::{run_ip, run_with_input, Namespace, NetworkError};

/// Prefix of the host side of every egress link.
pub const HOST_LINK_PREFIX: &str = "tve";
/// The namespace side of the link.
pub const NAMESPACE_LINK: &str = "up0";
/// The shared host table.
const HOST_TABLE: &str = "taskvm_egress";
/// 100.72.0.0/16, carved into /30 links.
const POOL: [u8; 2] = [100, 72];
const POOL_CIDR: &str = "100.72.0.0/16";
const LINKS: u32 = 1 << 14;
/// The host's IPv4 forwarding switch.
const FORWARDING: &str = "/proc/sys/net/ipv4/ip_forward";
/// Present while egress links exist and forwarding was off before the first.
const FORWARDING_WAS_OFF: &str = "/run/taskvm-egress.forwarding-was-off";
/// Serialises link set-up and host-table changes across processes.
const HOST_LOCK: &str = "/run/taskvm-egress.lock";

/// One VM's egress link; dropping it removes the link (and the host table after the last).
#[derive(Debug)]
pub struct Egress {
    host_link: String,
}

impl Egress {
    /// Connects `namespace` (whose tap is `tap`) to the host with NAT, denying what the
    /// policy denies (`allowed` opens networks again); returns the policy too, for the DNS
    /// forwarder.
    pub fn create(
        namespace: &Namespace,
        tap: &str,
        allowed: &[Ipv4Cidr],
    ) -> Result<(Egress, EgressPolicy), NetworkError> {
        // Link creation and the host table's set-up and removal are serialised host-wide.
        let _lock = host_lock()?;
        let pool: Ipv4Cidr = POOL_CIDR.parse().map_err(|_| NetworkError::Command {
            args: POOL_CIDR.into(),
            stderr: "the address pool is not a CIDR".into(),
        })?;
        let host = host_networks(&host_addresses()?, HOST_LINK_PREFIX);
        let policy = EgressPolicy::new(&host, allowed, pool);
        let hash = fnv1a(namespace.name().as_bytes());
        let host_link = format!("{HOST_LINK_PREFIX}{hash:08x}");
        run_ip(&[
            "link",
            "add",
            &host_link,
            "type",
            "veth",
            "peer",
            "name",
            NAMESPACE_LINK,
            "netns",
            namespace.name(),
        ])?;
        let egress = Egress { host_link };
        let connected = egress.connect(namespace, tap, &policy, hash);
        // A failed link is dropped (and the host tidied, which takes the lock) only after the
        // lock is released: flock on a second descriptor would wait for this one forever.
        drop(_lock);
        connected.map(|()| (egress, policy))
    }

    /// Addresses, routes, forwarding and both tables of a new link (the host lock held).
    fn connect(
        &self,
        namespace: &Namespace,
        tap: &str,
        policy: &EgressPolicy,
        hash: u32,
    ) -> Result<(), NetworkError> {
        let egress = self;
        let (host, inside) = egress.claim_addresses(hash)?;
        run_ip(&["link", "set", &egress.host_link, "up"])?;
        namespace.ip(&[
            "addr",
            "add",
            &format!("{inside}/30"),
            "dev",
            NAMESPACE_LINK,
        ])?;
        namespace.ip(&["link", "set", NAMESPACE_LINK, "up"])?;
        namespace.ip(&["route", "add", "default", "via", &host.to_string()])?;
        namespace.run_inside(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?;
        nft_inside(namespace, &namespace_rules(tap, policy))?;
        nft(&host_rules())?;
        let forwarding = std::fs::read_to_string(FORWARDING).unwrap_or_default();
        if forwarding.trim() != "1" {
            // Remember that it was off, so that the last link turns it off again.
            let _ = std::fs::write(FORWARDING_WAS_OFF, "");
            std::fs::write(FORWARDING, "1").map_err(|source| NetworkError::Io {
                action: "turning on the host's IPv4 forwarding".into(),
                source,
            })?;
        }
        Ok(())
    }

    /// The host side's name.
    pub fn host_link(&self) -> &str {
        &self.host_link
    }

    /// Gives the host side the first free /30 of the pool, starting at `hash`; returns the
    /// host's and the namespace's addresses. The caller holds the host-wide lock, so
    /// concurrent workers never take the same link.
    fn claim_addresses(&self, hash: u32) -> Result<(Ipv4Addr, Ipv4Addr), NetworkError> {
        let taken = host_addresses()?;
        for step in 0..LINKS {
            let link = hash.wrapping_add(step) % LINKS;
            let base = u32::from_be_bytes([POOL[0], POOL[1], 0, 0]) + link * 4;
            let (host, inside) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
            if taken.contains(&format!("inet {host}/")) {
                continue;
            }
            run_ip(&["addr", "add", &format!("{host}/30"), "dev", &self.host_link])?;
            return Ok((host, inside));
        }
        Err(NetworkError::Command {
            args: format!("addr add <{POOL_CIDR}> dev {}", self.host_link),
            stderr: "no free egress link address left".into(),
        })
    }
}

impl Drop for Egress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .output();
        tidy_host();
    }
}

/// The host's IPv4 addresses, as `ip -4 -o addr show` lists them.
fn host_addresses() -> Result<String, NetworkError> {
    let output = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .map_err(|source| NetworkError::Io {
            action: "running ip".into(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Once no egress link is left (after a VM, or after the crash sweep deleted namespaces):
/// removes the host table and turns forwarding back off if egress turned it on.
pub fn tidy_host() {
    let Ok(_lock) = host_lock() else {
        return;
    };
    let links = std::fs::read_dir("/sys/class/net")
        .map(|entries| {
            entries.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(HOST_LINK_PREFIX)
            })
        })
        .unwrap_or(true);
    if links {
        return;
    }
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    if tables.contains(HOST_TABLE) {
        let _ = nft(&format!("delete table ip {HOST_TABLE}\n"));
    }
    if std::fs::remove_file(FORWARDING_WAS_OFF).is_ok() {
        let _ = std::fs::write(FORWARDING, "0");
    }
}

/// The host-wide egress lock (released when the file closes).
fn host_lock() -> Result<std::fs::File, NetworkError> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(HOST_LOCK)
        .map_err(|source| NetworkError::Io {
            action: format!("opening {HOST_LOCK}"),
            source,
        })?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map_err(|error| {
        NetworkError::Io {
            action: format!("locking {HOST_LOCK}"),
            source: error.into(),
        }
    })?;
    Ok(lock)
}

/// The namespace's table: the guest's traffic out of `up0`, allowed networks first, then
/// nothing the policy denies.
fn namespace_rules(tap: &str, policy: &EgressPolicy) -> String {
    let denied = policy.denied_elements();
    let (allowed_set, allowed_rule) = if policy.has_allowed() {
        (
            format!(
                "  set allowed {{ type ipv4_addr; flags interval; elements = {{ {} }} }}\n",
                policy.allowed_elements()
            ),
            format!(
                "    iifname \"{tap}\" oifname \"{NAMESPACE_LINK}\" ip daddr @allowed accept\n"
            ),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        "table ip taskvm {{
  set blocked {{ type ipv4_addr; flags interval; elements = {{ {denied} }} }}
{allowed_set}  chain forward {{
    type filter hook forward priority filter; policy drop;
{allowed_rule}    iifname \"{tap}\" oifname \"{NAMESPACE_LINK}\" ip daddr @blocked drop
    iifname \"{tap}\" oifname \"{NAMESPACE_LINK}\" accept
    iifname \"{NAMESPACE_LINK}\" oifname \"{tap}\" ct state established,related accept
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{NAMESPACE_LINK}\" ct state established,related accept
    iifname \"{NAMESPACE_LINK}\" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{NAMESPACE_LINK}\" masquerade
  }}
}}
"
    )
}

/// The shared host table, rewritten in one transaction (idempotent).
fn host_rules() -> String {
    format!(
        "add table ip {HOST_TABLE}
add chain ip {HOST_TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
add chain ip {HOST_TABLE} input {{ type filter hook input priority filter; policy accept; }}
flush chain ip {HOST_TABLE} postrouting
flush chain ip {HOST_TABLE} input
add rule ip {HOST_TABLE} postrouting ip saddr {POOL_CIDR} oifname != \"{HOST_LINK_PREFIX}*\" masquerade
add rule ip {HOST_TABLE} input iifname \"{HOST_LINK_PREFIX}*\" drop
"
    )
}

fn nft(rules: &str) -> Result<(), NetworkError> {
    nft_with(&mut Command::new("nft"), rules)
}

fn nft_inside(namespace: &Namespace, rules: &str) -> Result<(), NetworkError> {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", namespace.name(), "nft"]);
    nft_with(&mut command, rules)
}

fn nft_with(command: &mut Command, rules: &str) -> Result<(), NetworkError> {
    command.args(["-f", "-"]);
    run_with_input(command, rules, "nft (package nftables)").map_err(|stderr| {
        NetworkError::Command {
            args: "nft -f -".into(),
            stderr,
        }
    })
}

/// FNV-1a, for stable per-VM names and starting points.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_the_vm_links_and_block_the_host_and_other_vms() {
        let pool: Ipv4Cidr = POOL_CIDR.parse().unwrap();
        let plain = EgressPolicy::new(&["203.0.113.0/24".parse().unwrap()], &[], pool);
        let inside = namespace_rules("tap0", &plain);
        for denied in [
            "10.0.0.0/8",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "100.64.0.0/10", // holds the VMs' own links (100.72.0.0/16)
            "203.0.113.0/24",
        ] {
            assert!(inside.contains(denied), "{denied}: {inside}");
        }
        assert!(inside.contains("iifname \"tap0\" oifname \"up0\" accept"));
        assert!(inside.contains("policy drop"));
        assert!(!inside.contains("@allowed"));
        let opened = EgressPolicy::new(&[], &["10.99.0.0/24".parse().unwrap()], pool);
        let inside = namespace_rules("tap0", &opened);
        let allow = inside.find("ip daddr @allowed accept").unwrap();
        let block = inside.find("ip daddr @blocked drop").unwrap();
        assert!(allow < block, "{inside}");
        let host = host_rules();
        assert!(host.contains("input iifname \"tve*\" drop"));
        assert!(host.contains("ip saddr 100.72.0.0/16 oifname != \"tve*\" masquerade"));
        assert_ne!(fnv1a(b"taskvm-a"), fnv1a(b"taskvm-b"));
    }
}
