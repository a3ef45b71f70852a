//! A hostile guest's artifacts against the collector: a test peer speaks the agent's protocol to
//! a real metadata service on loopback (poll for the action, then POST a reply streamed in
//! chunks) and sends what a guest that escaped the agent could send.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::network::metadata::{MetadataService, ServiceLimits};
use engine::network::session::{GuestSession, SessionConfig};
use lifecycle::artifacts::{collect, ArtifactError, Budget, Exceeded};
use schemas::config::ArtifactConfig;
use schemas::{Artifact, ArtifactKind};

/// A metadata service on loopback with one session, and its address.
fn service() -> (MetadataService, Arc<GuestSession>, std::net::SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let service = MetadataService::start(listener, ServiceLimits::default()).unwrap();
    let (session, _log) = GuestSession::new(SessionConfig::new("hostile"));
    service.set_handler(session.handler());
    (service, session, address)
}

/// The guest's side: takes one action from `poll`, then streams `body` as its reply in
/// chunks of at most 1 MiB (write errors end it: the host hung up).
fn hostile_guest(
    address: std::net::SocketAddr,
    content_type: &'static str,
    body: impl FnOnce(&mut dyn FnMut(&[u8]) -> bool) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let id = loop {
            let mut poll = TcpStream::connect(address).unwrap();
            poll.write_all(b"GET /engine/v1/poll HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            poll.read_to_string(&mut answer).unwrap();
            if let Some(start) = answer.find("\"id\":\"") {
                let rest = &answer[start + 6..];
                break rest[..rest.find('"').unwrap()].to_owned();
            }
        };
        let mut reply = TcpStream::connect(address).unwrap();
        let head = format!(
            "POST /engine/v1/reply?id={id} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        );
        reply.write_all(head.as_bytes()).unwrap();
        let mut send = |bytes: &[u8]| -> bool {
            bytes.chunks(1 << 20).all(|chunk| {
                let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
                reply.write_all(&framed).is_ok()
            })
        };
        body(&mut send);
        let _ = reply.write_all(b"0\r\n\r\n");
        let _ = BufReader::new(reply).lines().next();
    })
}

fn header(flag: u8, name: &str, size: u64) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_entry_type(tar::EntryType::new(flag));
    header.set_size(size);
    header.set_mode(0o755);
    header.set_cksum();
    header.as_bytes().to_vec()
}

fn directory(name: &str) -> Artifact {
    Artifact {
        kind: ArtifactKind::Directory,
        path: "/out".into(),
        name: name.into(),
    }
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn collect_from(
    body: impl FnOnce(&mut dyn FnMut(&[u8]) -> bool) + Send + 'static,
    artifact: Artifact,
    config: ArtifactConfig,
    dir: &Path,
) -> (
    Result<lifecycle::artifacts::Collected, ArtifactError>,
    Duration,
) {
    let (_service, session, address) = service();
    let content_type = match artifact.kind {
        ArtifactKind::Directory => "application/x-tar",
        ArtifactKind::File => "application/octet-stream",
    };
    let guest = hostile_guest(address, content_type, body);
    let mut budget = Budget::new(&config, 0, dir);
    let started = Instant::now();
    let result = collect(&session, &artifact, dir, &mut budget).await;
    let took = started.elapsed();
    // The guest thread is left to find out that nobody listens (a trickling one sleeps).
    drop(guest);
    (result, took)
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_bombs_in_a_directory_artifact_are_refused_at_their_header() {
    for (flag, kind) in [(b'L', "GNU long name (L)"), (b'x', "PAX extended (x)")] {
        let dir = tempfile::tempdir().unwrap();
        let body = move |send: &mut dyn FnMut(&[u8]) -> bool| {
            // The header declares 3 GiB; the guest then sends data until the host hangs up.
            if !send(&header(flag, "././@LongLink", 3 << 30)) {
                return;
            }
            let chunk = vec![b'a'; 1 << 20];
            for _ in 0..3072 {
                if !send(&chunk) {
                    return;
                }
            }
        };
        let (result, took) = collect_from(
            body,
            directory("out"),
            ArtifactConfig::default(),
            dir.path(),
        )
        .await;
        let error = result.expect_err("refused");
        let text = error.to_string();
        eprintln!("{kind}: {text} ({took:?}, peak RSS {} KiB)", peak_rss_kib());
        assert!(matches!(error, ArtifactError::Tar { .. }), "{text}");
        assert!(text.contains(kind) && text.contains("3221225472"), "{text}");
        assert!(text.len() < 1024);
        assert!(
            peak_rss_kib() < 100 * 1024,
            "peak RSS {} KiB",
            peak_rss_kib()
        );
        assert!(!dir.path().join("out").exists(), "nothing left behind");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_million_empty_entries_stop_at_the_entry_cap_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let body = |send: &mut dyn FnMut(&[u8]) -> bool| {
        let mut batch = Vec::with_capacity(512 * 1000);
        for index in 0..1_000_000u32 {
            batch.extend_from_slice(&header(b'5', &format!("d{index}/"), 0));
            if batch.len() >= 512 * 1000 {
                if !send(&batch) {
                    return;
                }
                batch.clear();
            }
        }
        send(&batch);
    };
    let (result, took) = collect_from(
        body,
        directory("many"),
        ArtifactConfig::default(),
        dir.path(),
    )
    .await;
    let error = result.expect_err("refused");
    eprintln!("{error} ({took:?})");
    assert!(
        matches!(
            error,
            ArtifactError::Exceeded {
                exceeded: Exceeded::Entries(20_000),
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("artifacts.maxEntries"));
    assert!(!dir.path().join("many").exists(), "nothing left behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_over_the_task_total_are_refused_for_files_and_directories() {
    let config = ArtifactConfig {
        max_bytes: 1 << 20,
        ..ArtifactConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let big_file = |send: &mut dyn FnMut(&[u8]) -> bool| {
        send(&vec![7u8; 3 << 20]);
    };
    let file = Artifact {
        kind: ArtifactKind::File,
        path: "/big".into(),
        name: "big.bin".into(),
    };
    let (result, _) = collect_from(big_file, file, config.clone(), dir.path()).await;
    let error = result.expect_err("refused");
    assert!(
        error
            .to_string()
            .contains("1048576 bytes in all (artifacts.maxBytes)"),
        "{error}"
    );
    assert!(!dir.path().join("big.bin").exists());

    let big_entry = |send: &mut dyn FnMut(&[u8]) -> bool| {
        send(&header(b'0', "inner.bin", 3 << 20));
        send(&vec![7u8; 3 << 20]);
    };
    let (result, _) = collect_from(big_entry, directory("tree"), config, dir.path()).await;
    let error = result.expect_err("refused");
    assert!(matches!(
        error,
        ArtifactError::Exceeded {
            exceeded: Exceeded::Bytes(_),
            ..
        }
    ));
    assert!(!dir.path().join("tree").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_trickling_a_byte_a_minute_is_cut_off_at_the_deadline() {
    let config = ArtifactConfig {
        timeout: 3,
        min_rate: 0,
        ..ArtifactConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let trickle = |send: &mut dyn FnMut(&[u8]) -> bool| {
        if !send(&header(b'0', "slow.bin", 100)) {
            return;
        }
        for _ in 0..100 {
            if !send(b"x") {
                return;
            }
            std::thread::sleep(Duration::from_secs(60));
        }
    };
    let (result, took) = collect_from(trickle, directory("slow"), config, dir.path()).await;
    let error = result.expect_err("cut off");
    eprintln!("{error} after {took:?}");
    assert!(
        matches!(
            error,
            ArtifactError::Exceeded {
                exceeded: Exceeded::Deadline(3),
                ..
            }
        ),
        "{error}"
    );
    assert!(took < Duration::from_secs(3 + 5), "{took:?}");
    assert!(!dir.path().join("slow").exists());
}
