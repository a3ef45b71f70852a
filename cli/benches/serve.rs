//! `make bench`: the embedded queue (`taskvm serve`) against `taskvm run` of the same payloads,
//! in one run, under TCG, on one state directory (so both restore the same snapshot):
//!
//! - throughput: `TASKVM_BENCH_SERVE_TASKS` trivial tasks (default 20) two at a time — two
//!   `taskvm run` processes side by side, then all submitted at once to `taskvm serve
//!   --concurrency 2`; tasks per minute each, and the ratio;
//! - latency: five tasks one at a time on an idle server, `taskvm submit --follow` against
//!   `taskvm run`, both from starting the command to its exit: the API's added time per task,
//!   and where the server spends it (submission to run start, run end to the client's exit);
//! - warm pool: a server with `warmPool: 1`, `TASKVM_BENCH_TASKS` tasks (default 10) one at a
//!   time, each once the pool is full again: from `POST /api/tasks` to the task's output on its
//!   followed log (`GET /api/tasks/{id}/log`), as a client sees it, against the same with
//!   snapshot starts (`warmPool: 0`) in the same run.
//!
//! Needs root (every VM gets a network namespace).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::guest::minimal_image;
use testkit::stats::median;

const TASKVM: &str = env!("CARGO_BIN_EXE_taskvm");

fn main() {
    if !rustix::process::geteuid().is_root() {
        println!("serve benchmark skipped: taskvm needs root");
        return;
    }
    let tasks: usize = std::env::var("TASKVM_BENCH_SERVE_TASKS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(20);
    let scratch = testkit::process::root_scratch("VMs need root");
    let bench = Bench {
        state: scratch.path().join("state"),
        cache: scratch.path().join("cache"),
        payload: scratch.path().join("task.json"),
    };
    let image = minimal_image().canonicalize().expect("image");
    std::fs::write(
        &bench.payload,
        format!(
            r#"{{"image": "file://{}", "command": ["echo", "first output"], "maxRunTime": 60}}"#,
            image.display()
        ),
    )
    .expect("payload");
    println!(
        "serve benchmark: {tasks} tasks, concurrency 2, TCG, minimal image, `echo first output`"
    );
    bench.run_once(); // fills the cache, makes the snapshot

    // Throughput, two at a time.
    let started = Instant::now();
    let halves: Vec<_> = (0..2)
        .map(|half| {
            let bench = bench.clone();
            let count = tasks / 2 + (half < tasks % 2) as usize;
            std::thread::spawn(move || (0..count).for_each(|_| bench.run_once()))
        })
        .collect();
    halves
        .into_iter()
        .for_each(|half| half.join().expect("run series"));
    let run_wall = started.elapsed();

    let server = bench.serve();
    let client = reqwest::blocking::Client::new();
    let started = Instant::now();
    let ids: Vec<String> = (0..tasks)
        .map(|_| server.submit(&client, &bench.payload))
        .collect();
    for id in &ids {
        server.wait_completed(&client, id);
    }
    let serve_wall = started.elapsed();
    let per_minute = |wall: Duration| tasks as f64 * 60.0 / wall.as_secs_f64();
    println!(
        "throughput: taskvm run x2 {:.1} tasks/min ({:.2} s), taskvm serve --concurrency 2 {:.1} \
         tasks/min ({:.2} s) -> {:.2}x",
        per_minute(run_wall),
        run_wall.as_secs_f64(),
        per_minute(serve_wall),
        serve_wall.as_secs_f64(),
        run_wall.as_secs_f64() / serve_wall.as_secs_f64()
    );

    // Latency, one at a time, on the idle server.
    let mut run_times = Vec::new();
    let mut submit_times = Vec::new();
    let mut pickups = Vec::new();
    let mut tails = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        bench.run_once();
        run_times.push(started.elapsed());

        let started = Instant::now();
        let status = Command::new(TASKVM)
            .arg("submit")
            .arg(&bench.payload)
            .args(["--follow", "--server", &server.base])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("taskvm submit");
        let exited = std::time::SystemTime::now();
        assert!(status.success(), "the task completed");
        submit_times.push(started.elapsed());
        let latest = server.latest(&client);
        let run = &latest["runs"][0];
        let millis = |value: &Value| value.as_i64().expect("a time");
        pickups.push(Duration::from_millis(
            (millis(&run["started"]) - millis(&latest["created"])).max(0) as u64,
        ));
        let exited_ms = exited
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64;
        tails.push(Duration::from_millis(
            (exited_ms - millis(&run["resolved"])).max(0) as u64,
        ));
    }
    let (run_median, submit_median) = (median(&run_times), median(&submit_times));
    println!(
        "latency (one task at a time, command start -> exit): taskvm run median {:.3} s, taskvm \
         submit --follow median {:.3} s -> added {:+.0} ms per task ({:.2}x); in the server: \
         submission -> run start {:.0} ms, run resolved -> client exit {:.0} ms (medians)",
        run_median.as_secs_f64(),
        submit_median.as_secs_f64(),
        (submit_median.as_secs_f64() - run_median.as_secs_f64()) * 1000.0,
        submit_median.as_secs_f64() / run_median.as_secs_f64(),
        median(&pickups).as_secs_f64() * 1000.0,
        median(&tails).as_secs_f64() * 1000.0,
    );
    drop(server);

    // POST -> first output byte, snapshot starts against a warm pool.
    let rounds = testkit::stats::bench_rounds();
    let restored = bench.first_outputs("", rounds);
    let pooled = bench.first_outputs(r#""warmPool": 1"#, rounds);
    let (restored_median, pooled_median) = (median(&restored), median(&pooled));
    println!(
        "POST /api/tasks -> the task's first output on the followed log, {rounds} tasks one at a time: \
         snapshot start median {:.3} s, p95 {:.3} s; warm pool median {:.3} s, p95 {:.3} s (goal \
         <= 50 ms) -> {:.1}x faster",
        restored_median.as_secs_f64(),
        testkit::stats::percentile(&restored, 95).as_secs_f64(),
        pooled_median.as_secs_f64(),
        testkit::stats::percentile(&pooled, 95).as_secs_f64(),
        restored_median.as_secs_f64() / pooled_median.as_secs_f64()
    );
}

impl Bench {
    /// `rounds` tasks on a server configured with `extra`, one at a time (each once the warm
    /// pool, if any, is full again): POST -> first byte of the followed log.
    fn first_outputs(&self, extra: &str, rounds: usize) -> Vec<Duration> {
        use std::io::Read;
        let server = self.serve_configured(extra);
        let client = reqwest::blocking::Client::new();
        let pooled = !extra.is_empty();
        let first = server.submit(&client, &self.payload); // the snapshot, the pool's key
        server.wait_completed(&client, &first);
        let mut times = Vec::new();
        for _ in 0..rounds {
            let deadline = Instant::now() + Duration::from_secs(120);
            while pooled && server.health(&client)["warmPoolReady"] == 0 {
                assert!(Instant::now() < deadline, "the pool did not fill");
                std::thread::sleep(Duration::from_millis(50));
            }
            let started = Instant::now();
            let id = server.submit(&client, &self.payload);
            let mut log = client
                .get(format!("{}/api/tasks/{id}/log", server.base))
                .send()
                .expect("the log");
            // The log's own lines come first: the task's output is what is waited for.
            let mut text = String::new();
            let mut chunk = [0u8; 4096];
            while !text.contains("\nfirst output\n") {
                let read = log.read(&mut chunk).expect("the log");
                assert!(read > 0, "no output: {text}");
                text.push_str(&String::from_utf8_lossy(&chunk[..read]));
            }
            times.push(started.elapsed());
            log.read_to_string(&mut text).expect("the whole log");
            let start = if pooled {
                "(start pool, "
            } else {
                "(start snapshot, "
            };
            assert!(text.contains(start), "{text}");
            server.wait_completed(&client, &id);
        }
        times
    }
}

#[derive(Clone)]
struct Bench {
    state: PathBuf,
    cache: PathBuf,
    payload: PathBuf,
}

impl Bench {
    fn common(&self, command: &mut Command) {
        command
            .arg("--state")
            .arg(&self.state)
            .arg("--cache")
            .arg(&self.cache)
            .args(["--accel", "tcg"]);
    }

    fn run_once(&self) {
        let mut command = Command::new(TASKVM);
        command.arg("run").arg(&self.payload);
        self.common(&mut command);
        let status = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("taskvm run");
        assert!(status.success(), "the task completed");
    }

    fn serve(&self) -> Server {
        self.serve_configured("")
    }

    /// A server whose configuration has `extra` (JSON members) beside the test images'.
    fn serve_configured(&self, extra: &str) -> Server {
        let mut command = Command::new(TASKVM);
        command.args(["serve", "--listen", "127.0.0.1:0", "--concurrency", "2"]);
        self.common(&mut command);
        let config = self.state.with_extension("json");
        std::fs::write(&config, testkit::guest::config_allowing_test_images(extra))
            .expect("write config");
        command.arg("--config").arg(config);
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("taskvm serve");
        let stderr = child.stderr.take().expect("stderr");
        let (address, found) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = address.send(rest.trim_end_matches('/').to_owned());
                }
            }
        });
        let base = found
            .recv_timeout(Duration::from_secs(60))
            .expect("the server listens");
        Server { child, base }
    }
}

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn submit(&self, client: &reqwest::blocking::Client, payload: &Path) -> String {
        let body = std::fs::read(payload).expect("payload");
        let created: Value = client
            .post(format!("{}/api/tasks", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .and_then(|response| response.error_for_status())
            .and_then(|response| response.json())
            .expect("submitted");
        created["taskId"].as_str().expect("task id").to_owned()
    }

    fn task(&self, client: &reqwest::blocking::Client, id: &str) -> Value {
        client
            .get(format!("{}/api/tasks/{id}", self.base))
            .send()
            .and_then(|response| response.json())
            .expect("task")
    }

    fn health(&self, client: &reqwest::blocking::Client) -> Value {
        client
            .get(format!("{}/api/health", self.base))
            .send()
            .and_then(|response| response.json())
            .expect("health")
    }

    fn latest(&self, client: &reqwest::blocking::Client) -> Value {
        let list: Value = client
            .get(format!("{}/api/tasks?limit=1", self.base))
            .send()
            .and_then(|response| response.json())
            .expect("list");
        let id = list["tasks"][0]["taskId"]
            .as_str()
            .expect("a task")
            .to_owned();
        self.task(client, &id)
    }

    fn wait_completed(&self, client: &reqwest::blocking::Client, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let task = self.task(client, id);
            match task["state"].as_str() {
                Some("completed") => return,
                Some("queued" | "running") => {}
                _ => panic!("task {id} did not complete: {task}"),
            }
            assert!(Instant::now() < deadline, "task {id} took too long");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let _ = self.child.wait();
    }
}
