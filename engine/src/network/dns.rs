//! A DNS forwarder for one VM with egress, listening on the metadata address (port 53) inside
//! the VM's namespace. Queries go to the host's resolvers from the worker's own namespace;
//! an answer that points a name at an address the egress policy denies is replaced by
//! REFUSED, so that names cannot be used to aim the guest at internal addresses (DNS
//! rebinding). Only single-question standard queries are forwarded, at most
//! [`MAX_IN_FLIGHT`] at a time, each waiting at most [`UPSTREAM_TIMEOUT`] per resolver.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use crate::network::egress_policy::EgressPolicy;

/// Queries forwarded at once; more are dropped (the guest's resolver retries).
pub const MAX_IN_FLIGHT: usize = 32;
/// How long one resolver gets to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest message handled (EDNS answers above it are cut by the resolver, TC set).
const MAX_MESSAGE: usize = 4096;
const HEADER: usize = 12;
const TYPE_A: u16 = 1;
const RCODE_REFUSED: u8 = 5;

/// Binds port 53 at `address` on the calling thread's namespace.
pub fn bind(address: Ipv4Addr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(SocketAddrV4::new(address, 53))?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// The resolvers of the host: the `nameserver` lines of `resolv_conf` (IPv4 only), port 53.
pub fn host_resolvers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        .map(|address| SocketAddr::from((address, 53)))
        .collect()
}

/// Answers the guest's queries on `socket` until the task is dropped.
pub async fn serve(
    socket: std::net::UdpSocket,
    upstreams: Vec<SocketAddr>,
    policy: Arc<EgressPolicy>,
) {
    let Ok(socket) = UdpSocket::from_std(socket) else {
        return;
    };
    let socket = Arc::new(socket);
    let upstreams = Arc::new(upstreams);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buffer = vec![0u8; MAX_MESSAGE];
    loop {
        let Ok((length, guest)) = socket.recv_from(&mut buffer).await else {
            continue;
        };
        let query = buffer[..length].to_vec();
        if !is_plain_query(&query) {
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (socket, upstreams, policy) = (socket.clone(), upstreams.clone(), policy.clone());
        tokio::spawn(async move {
            if let Some(answer) = resolve(&query, &upstreams).await {
                let answer = screen(&query, answer, &policy);
                let _ = socket.send_to(&answer, guest).await;
            }
            drop(slot);
        });
    }
}

/// A standard query (QR=0, opcode 0) with exactly one question.
fn is_plain_query(message: &[u8]) -> bool {
    message.len() > HEADER
        && message[2] & 0x80 == 0
        && (message[2] >> 3) & 0x0f == 0
        && u16::from_be_bytes([message[4], message[5]]) == 1
}

/// Asks each resolver in turn; the first answer with the query's id wins.
async fn resolve(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await else {
            continue;
        };
        if socket.connect(upstream).await.is_err() || socket.send(query).await.is_err() {
            continue;
        }
        let mut buffer = vec![0u8; MAX_MESSAGE];
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        while let Ok(Ok(length)) = tokio::time::timeout_at(deadline, socket.recv(&mut buffer)).await
        {
            if length >= HEADER && buffer[..2] == query[..2] && buffer[2] & 0x80 != 0 {
                buffer.truncate(length);
                return Some(buffer);
            }
        }
    }
    None
}

/// The answer, or REFUSED when it names an address the policy denies (or cannot be read).
fn screen(query: &[u8], answer: Vec<u8>, policy: &EgressPolicy) -> Vec<u8> {
    match answer_addresses(&answer) {
        Some(addresses) if addresses.iter().all(|address| policy.permits(*address)) => answer,
        _ => refused(query),
    }
}

/// The query turned into a REFUSED answer with its question and no records.
fn refused(query: &[u8]) -> Vec<u8> {
    let mut reply = query.to_vec();
    reply[2] = 0x80 | (query[2] & 0x01); // QR, keep RD
    reply[3] = 0x80 | RCODE_REFUSED; // RA
    for count in reply[6..HEADER].iter_mut() {
        *count = 0;
    }
    // Drop anything after the question (EDNS records of the query).
    if let Some(end) = skip_name(&reply, HEADER).map(|at| at + 4) {
        reply.truncate(end.min(reply.len()));
    }
    reply
}

/// The IPv4 addresses of every A record in an answer's answer, authority and additional
/// sections; None when the message cannot be read.
fn answer_addresses(message: &[u8]) -> Option<Vec<Ipv4Addr>> {
    let count = |at: usize| u16::from_be_bytes([message[at], message[at + 1]]);
    if message.len() < HEADER {
        return None;
    }
    let questions = count(4);
    let records = u32::from(count(6)) + u32::from(count(8)) + u32::from(count(10));
    let mut at = HEADER;
    for _ in 0..questions {
        at = skip_name(message, at)? + 4;
    }
    let mut addresses = Vec::new();
    for _ in 0..records {
        at = skip_name(message, at)?;
        let fixed = message.get(at..at + 10)?;
        let kind = u16::from_be_bytes([fixed[0], fixed[1]]);
        let length = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let data = message.get(at + 10..at + 10 + length)?;
        if kind == TYPE_A && length == 4 {
            addresses.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + length;
    }
    Some(addresses)
}

/// The offset after the (possibly compressed) name at `at`.
fn skip_name(message: &[u8], mut at: usize) -> Option<usize> {
    // A name has at most 128 labels; a longer run is malformed.
    for _ in 0..128 {
        let length = *message.get(at)?;
        match length {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => {
                message.get(at + 1)?;
                return Some(at + 2);
            }
            l if l & 0xc0 == 0 => at += 1 + usize::from(l),
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::egress_policy::Ipv4Cidr;

    /// A query for `name` (type A) with id 0x1234.
    pub(crate) fn query(name: &str) -> Vec<u8> {
        let mut message = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            message.push(label.len() as u8);
            message.extend_from_slice(label.as_bytes());
        }
        message.extend_from_slice(&[0, 0, 1, 0, 1]);
        message
    }

    /// The answer to `query` with one A record per address (the name compressed).
    pub(crate) fn answer(query: &[u8], addresses: &[Ipv4Addr]) -> Vec<u8> {
        let mut message = query.to_vec();
        message[2] = 0x81;
        message[3] = 0x80;
        message[7] = addresses.len() as u8;
        for address in addresses {
            message.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            message.extend_from_slice(&address.octets());
        }
        message
    }

    #[test]
    fn answers_naming_denied_addresses_are_refused() {
        let policy = EgressPolicy::new(&[], &[], "100.72.0.0/16".parse::<Ipv4Cidr>().unwrap());
        let asked = query("cache.example");
        let public = answer(&asked, &[Ipv4Addr::new(198, 51, 100, 7)]);
        assert_eq!(screen(&asked, public.clone(), &policy), public);
        let rebinding = answer(
            &asked,
            &[Ipv4Addr::new(198, 51, 100, 7), Ipv4Addr::new(10, 0, 0, 1)],
        );
        let refused = screen(&asked, rebinding, &policy);
        assert_eq!(refused[3] & 0x0f, RCODE_REFUSED);
        assert_eq!(&refused[..2], &asked[..2]);
        assert_eq!(&refused[6..12], &[0; 6]);
        assert_eq!(refused.len(), asked.len());
        // Garbage from upstream is refused too, never passed on.
        let mut broken = answer(&asked, &[Ipv4Addr::new(198, 51, 100, 7)]);
        broken.truncate(broken.len() - 3);
        assert_eq!(screen(&asked, broken, &policy)[3] & 0x0f, RCODE_REFUSED);
        assert!(is_plain_query(&asked));
        assert!(!is_plain_query(&answer(&asked, &[])));
    }

    #[test]
    fn resolvers_come_from_resolv_conf() {
        let conf =
            "# comment\nnameserver 127.0.0.53\nnameserver ::1\nsearch x\nnameserver 10.0.0.2\n";
        assert_eq!(
            host_resolvers(conf),
            [
                SocketAddr::from(([127, 0, 0, 53], 53)),
                SocketAddr::from(([10, 0, 0, 2], 53))
            ]
        );
    }
}
