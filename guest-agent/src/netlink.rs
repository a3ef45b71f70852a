//! Configuring the guest's network with rtnetlink directly: bring links up, add an IPv4
//! address and a default route, without starting `ip` (each program start costs tens of milliseconds under TCG).

use std::io;
use std::net::Ipv4Addr;

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{
    recv, sendto, socket_with, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType,
};

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const IFF_UP: u32 = 0x1;
const AF_INET: u8 = 2;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

/// An IPv4 address with its prefix length, parsed from `A.B.C.D/N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// The address.
    pub address: Ipv4Addr,
    /// The prefix length (0–32).
    pub prefix: u8,
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = io::Error;

    fn from_str(text: &str) -> io::Result<Self> {
        let invalid = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not an IPv4 address/prefix: {text:?}"),
            )
        };
        let (address, prefix) = text.split_once('/').ok_or_else(invalid)?;
        let address = address.parse().map_err(|_| invalid())?;
        let prefix = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(invalid)?;
        Ok(Ipv4Cidr { address, prefix })
    }
}

/// A route netlink socket.
pub struct Netlink {
    socket: rustix::fd::OwnedFd,
    sequence: u32,
}

impl Netlink {
    /// Opens a `NETLINK_ROUTE` socket.
    pub fn open() -> io::Result<Self> {
        // Protocol 0 is NETLINK_ROUTE.
        let socket = socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            None,
        )?;
        Ok(Netlink {
            socket,
            sequence: 0,
        })
    }

    /// Sets the link with index `index` up.
    pub fn link_up(&mut self, index: u32) -> io::Result<()> {
        let mut body = Vec::with_capacity(16);
        body.extend_from_slice(&[0, 0]); // family AF_UNSPEC, padding
        body.extend_from_slice(&0u16.to_ne_bytes()); // device type
        body.extend_from_slice(&(index as i32).to_ne_bytes());
        body.extend_from_slice(&IFF_UP.to_ne_bytes()); // flags
        body.extend_from_slice(&IFF_UP.to_ne_bytes()); // change mask
        self.request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, &body)
    }

    /// Adds `cidr` to the link with index `index`.
    pub fn add_address(&mut self, index: u32, cidr: Ipv4Cidr) -> io::Result<()> {
        let mut body = vec![AF_INET, cidr.prefix, 0, 0]; // family, prefix, flags, scope
        body.extend_from_slice(&index.to_ne_bytes());
        for kind in [IFA_LOCAL, IFA_ADDRESS] {
            body.extend_from_slice(&8u16.to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(&cidr.address.octets());
        }
        self.request(
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            &body,
        )
    }

    /// Adds a default route via `gateway` on the link with index `index`.
    pub fn add_default_route(&mut self, index: u32, gateway: Ipv4Addr) -> io::Result<()> {
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        let mut body = vec![
            AF_INET,
            0,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            RT_SCOPE_UNIVERSE,
            RTN_UNICAST,
        ];
        body.extend_from_slice(&0u32.to_ne_bytes());
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&RTA_GATEWAY.to_ne_bytes());
        body.extend_from_slice(&gateway.octets());
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&RTA_OIF.to_ne_bytes());
        body.extend_from_slice(&index.to_ne_bytes());
        self.request(
            RTM_NEWROUTE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            &body,
        )
    }

    fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        self.sequence += 1;
        let length = 16 + body.len() as u32;
        let mut message = Vec::with_capacity(length as usize);
        message.extend_from_slice(&length.to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&flags.to_ne_bytes());
        message.extend_from_slice(&self.sequence.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        message.extend_from_slice(body);
        sendto(
            &self.socket,
            &message,
            SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )?;

        let mut answer = [0u8; 1024];
        let (received, _) = recv(&self.socket, &mut answer, RecvFlags::empty())?;
        let answer = &answer[..received];
        let field16 = |at: usize| {
            answer
                .get(at..at + 2)
                .map(|b| u16::from_ne_bytes([b[0], b[1]]))
        };
        let error = answer
            .get(16..20)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        match (field16(4), error) {
            (Some(NLMSG_ERROR), Some(0)) => Ok(()),
            (Some(NLMSG_ERROR), Some(code)) => Err(io::Error::from_raw_os_error(-code)),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected netlink answer",
            )),
        }
    }
}

/// The index of interface `name`.
pub fn interface_index(name: &str) -> io::Result<u32> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))?;
    text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad ifindex for {name}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::Ipv4Cidr;

    #[test]
    fn parses_address_and_prefix() {
        let cidr: Ipv4Cidr = "169.254.0.2/16".parse().unwrap();
        assert_eq!((cidr.address.octets(), cidr.prefix), ([169, 254, 0, 2], 16));
        for bad in ["169.254.0.2", "169.254.0.2/33", "x/8", "1.2.3/8"] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }
}
