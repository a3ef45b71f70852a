//! A DHCP responder for one VM, inside the VM's namespace: every DISCOVER gets an OFFER and
//! every REQUEST an ACK for the VM's one address, with no router and no DNS (the guest reaches
//! the metadata service on its own link and nothing else) unless the VM has egress: then the
//! metadata address is its router and its DNS server. Stock cloud images configure their
//! network this way; our agent reads `taskvm.ip=` instead and never asks.

use std::net::{Ipv4Addr, SocketAddrV4};

use tokio::net::UdpSocket;

/// The lease the responder hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The guest's address.
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The responder's (and metadata service's) address.
    pub server: Ipv4Addr,
    /// The default gateway to offer (only with egress).
    pub router: Option<Ipv4Addr>,
    /// Lease time in seconds.
    pub seconds: u32,
}

const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const FIXED_PART: usize = 236;

const OPTION_PAD: u8 = 0;
const OPTION_SUBNET_MASK: u8 = 1;
const OPTION_ROUTER: u8 = 3;
const OPTION_DNS: u8 = 6;
const OPTION_LEASE_TIME: u8 = 51;
const OPTION_MESSAGE_TYPE: u8 = 53;
const OPTION_SERVER_ID: u8 = 54;
const OPTION_END: u8 = 255;

const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;

/// Binds the DHCP server port on the calling thread's namespace, on `device` only.
pub fn bind(device: &str) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_broadcast(true)?;
    socket.set_reuse_address(true)?;
    socket.bind_device(Some(device.as_bytes()))?;
    socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 67).into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Answers requests on `socket` until the task is dropped.
pub async fn serve(socket: std::net::UdpSocket, lease: Lease) {
    let Ok(socket) = UdpSocket::from_std(socket) else {
        return;
    };
    let mut buffer = [0u8; 1500];
    loop {
        let Ok((length, _)) = socket.recv_from(&mut buffer).await else {
            continue;
        };
        if let Some(answer) = answer(&buffer[..length], &lease) {
            let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, 68);
            let _ = socket.send_to(&answer, to).await;
        }
    }
}

/// The reply to one packet, or None for anything that is not a DISCOVER or REQUEST.
pub fn answer(packet: &[u8], lease: &Lease) -> Option<Vec<u8>> {
    if packet.len() < FIXED_PART + MAGIC.len()
        || packet[0] != BOOTREQUEST
        || packet[FIXED_PART..FIXED_PART + 4] != MAGIC
    {
        return None;
    }
    let reply_type = match message_type(&packet[FIXED_PART + 4..])? {
        DISCOVER => OFFER,
        REQUEST => ACK,
        _ => return None,
    };
    let mut reply = vec![0u8; FIXED_PART];
    reply[0] = BOOTREPLY;
    reply[1..3].copy_from_slice(&packet[1..3]); // hardware type and address length
    reply[4..8].copy_from_slice(&packet[4..8]); // transaction id
    reply[10..12].copy_from_slice(&packet[10..12]); // flags
    reply[16..20].copy_from_slice(&lease.address.octets()); // yiaddr
    reply[20..24].copy_from_slice(&lease.server.octets()); // siaddr
    reply[28..44].copy_from_slice(&packet[28..44]); // chaddr
    reply.extend_from_slice(&MAGIC);
    let mask = u32::MAX
        .checked_shl(32 - u32::from(lease.prefix_len.min(32)))
        .unwrap_or(0);
    reply.extend_from_slice(&[OPTION_MESSAGE_TYPE, 1, reply_type]);
    reply.extend_from_slice(&[OPTION_SERVER_ID, 4]);
    reply.extend_from_slice(&lease.server.octets());
    reply.extend_from_slice(&[OPTION_LEASE_TIME, 4]);
    reply.extend_from_slice(&lease.seconds.to_be_bytes());
    reply.extend_from_slice(&[OPTION_SUBNET_MASK, 4]);
    reply.extend_from_slice(&mask.to_be_bytes());
    if let Some(router) = lease.router {
        // With egress the router also answers DNS (the forwarder on the metadata address).
        reply.extend_from_slice(&[OPTION_ROUTER, 4]);
        reply.extend_from_slice(&router.octets());
        reply.extend_from_slice(&[OPTION_DNS, 4]);
        reply.extend_from_slice(&router.octets());
    }
    reply.push(OPTION_END);
    // Some clients drop replies shorter than a minimal BOOTP packet.
    reply.resize(reply.len().max(300), OPTION_PAD);
    Some(reply)
}

fn message_type(mut options: &[u8]) -> Option<u8> {
    while let Some((&code, rest)) = options.split_first() {
        match code {
            OPTION_PAD => options = rest,
            OPTION_END => return None,
            _ => {
                let (&length, rest) = rest.split_first()?;
                let value = rest.get(..usize::from(length))?;
                if code == OPTION_MESSAGE_TYPE {
                    return value.first().copied();
                }
                options = &rest[usize::from(length)..];
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(kind: u8) -> Vec<u8> {
        let mut packet = vec![0u8; FIXED_PART];
        packet[0] = BOOTREQUEST;
        packet[1] = 1;
        packet[2] = 6;
        packet[4..8].copy_from_slice(&[1, 2, 3, 4]);
        packet[28..34].copy_from_slice(&[0x52, 0x54, 0, 1, 2, 3]);
        packet.extend_from_slice(&MAGIC);
        packet.extend_from_slice(&[OPTION_PAD, OPTION_MESSAGE_TYPE, 1, kind, OPTION_END]);
        packet
    }

    fn lease() -> Lease {
        Lease {
            address: Ipv4Addr::new(169, 254, 0, 2),
            prefix_len: 16,
            server: Ipv4Addr::new(169, 254, 169, 254),
            router: None,
            seconds: 86400,
        }
    }

    #[test]
    fn discover_gets_an_offer_and_request_an_ack_for_the_one_address() {
        for (kind, expected) in [(DISCOVER, OFFER), (REQUEST, ACK)] {
            let reply = answer(&request(kind), &lease()).unwrap();
            assert_eq!(reply[0], BOOTREPLY);
            assert_eq!(&reply[4..8], &[1, 2, 3, 4], "same transaction");
            assert_eq!(&reply[16..20], &[169, 254, 0, 2]);
            assert_eq!(&reply[28..34], &[0x52, 0x54, 0, 1, 2, 3]);
            assert_eq!(message_type(&reply[FIXED_PART + 4..]), Some(expected));
            let options = &reply[FIXED_PART + 4..];
            let mask_at = options
                .windows(2)
                .position(|w| w == [OPTION_SUBNET_MASK, 4])
                .unwrap();
            assert_eq!(&options[mask_at + 2..mask_at + 6], &[255, 255, 0, 0]);
            assert!(reply.len() >= 300);
            assert!(
                !options.windows(2).any(|w| w == [OPTION_ROUTER, 4]),
                "no way out"
            );
        }
        let with_router = Lease {
            router: Some(Ipv4Addr::new(169, 254, 169, 254)),
            ..lease()
        };
        let reply = answer(&request(DISCOVER), &with_router).unwrap();
        let options = &reply[FIXED_PART + 4..];
        let at = options
            .windows(2)
            .position(|w| w == [OPTION_ROUTER, 4])
            .unwrap();
        assert_eq!(&options[at + 2..at + 6], &[169, 254, 169, 254]);
    }

    #[test]
    fn anything_else_is_ignored_without_panicking() {
        assert_eq!(answer(&[], &lease()), None);
        assert_eq!(answer(&request(7), &lease()), None, "RELEASE");
        let mut reply_packet = request(DISCOVER);
        reply_packet[0] = BOOTREPLY;
        assert_eq!(answer(&reply_packet, &lease()), None);
        let mut truncated = request(DISCOVER);
        truncated.truncate(FIXED_PART + 6);
        truncated.push(200); // an option whose length runs past the end
        assert_eq!(answer(&truncated, &lease()), None);
        for length in 0..300 {
            let garbage: Vec<u8> = (0..length).map(|i| (i * 7 + 3) as u8).collect();
            let _ = answer(&garbage, &lease());
        }
    }
}
