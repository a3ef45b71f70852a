//! The live log on Taskcluster: `public/logs/live.log` read through the queue while the task
//! runs, then pointing at the uploaded log.

use std::io::Read;
use std::time::{Duration, Instant};

use crate::deployment::*;

/// Reads `response` until `enough` holds for what was read (or the stream ends).
fn read_until(
    response: &mut reqwest::blocking::Response,
    read: &mut Vec<u8>,
    enough: impl Fn(&str) -> bool,
) {
    let mut buffer = [0u8; 4096];
    while !enough(&String::from_utf8_lossy(read)) {
        let got = response.read(&mut buffer).expect("the stream reads");
        if got == 0 {
            return;
        }
        read.extend_from_slice(&buffer[..got]);
    }
}

#[test]
fn the_live_log_streams_while_the_task_runs_then_points_at_the_uploaded_log() {
    let deployment = Deployment::get();
    let dir = scratch();
    let queue_id = own_queue("livelog");
    let task_id = create_task(
        &deployment,
        &queue_id,
        script("for i in $(seq 1 20); do echo line-$i; sleep 1; done", 120),
    );
    let mut worker = Worker::start(
        &deployment,
        &queue_id,
        &dir.path().join("w"),
        &["--livelog-listen", "127.0.0.1:0"],
    );
    let deadline = Instant::now() + Duration::from_secs(240);
    while !artifact_names(&deployment, &task_id, 0).contains(&"public/logs/live.log".to_owned()) {
        assert!(
            Instant::now() < deadline,
            "public/logs/live.log never appeared"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let queue_url = format!(
        "{}/api/queue/v1/task/{task_id}/runs/0/artifacts/public/logs/live.log",
        deployment.root_url
    );
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(240))
        .build()
        .unwrap();
    // Through the queue, which redirects to the worker's live log.
    let mut live = client.get(&queue_url).send().unwrap();
    assert_eq!(live.status(), 200);
    let live_url = live.url().clone();
    assert!(
        live_url.as_str().starts_with("http://127.0.0.1:") && live_url.path().starts_with("/log/"),
        "redirected to {live_url}"
    );
    let mut streamed = Vec::new();
    read_until(&mut live, &mut streamed, |text| text.contains("line-2\n"));
    let early = String::from_utf8_lossy(&streamed).into_owned();
    assert!(
        early.contains("line-1\n") && early.contains("line-2\n") && !early.contains("line-20"),
        "{early}"
    );
    assert_eq!(
        status(&deployment, &task_id)["state"],
        "running",
        "the first lines came while the task ran"
    );
    read_until(&mut live, &mut streamed, |_| false);
    let status = wait_resolved(&deployment, &task_id, Duration::from_secs(120));
    assert_eq!(status["state"], "completed", "{status:#}");
    let streamed = String::from_utf8_lossy(&streamed).into_owned();
    assert!(streamed.contains("line-20\n"), "{streamed}");

    // Now the same name leads to the uploaded log, and the worker no longer serves it.
    let (code, backing) = artifact(&deployment, &task_id, 0, "public/logs/live.log");
    assert_eq!(code, 200);
    assert_eq!(String::from_utf8_lossy(&backing), streamed);
    let (_, uploaded) = artifact(&deployment, &task_id, 0, "public/logs/live_backing.log");
    assert_eq!(uploaded, backing);
    let gone = client.get(live_url).send().unwrap();
    assert_eq!(gone.status(), 404);

    worker.signal(rustix::process::Signal::TERM);
    assert!(worker.wait_exit(Duration::from_secs(60)).success());
    assert!(worker.said("live logs are served at http://127.0.0.1:"));
}
