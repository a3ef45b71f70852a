//! `taskvm worker --worker-pool-id`: hosts that join a worker-manager pool of the `static`
//! provider with the secret an operator gave them, against tc-local's real worker-manager. Each
//! test makes a pool of its own (and the pool's role, which lets its workers read their state).

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::deployment::*;

/// A worker pool of this test's own whose credentials last `reregistration` seconds.
fn make_pool(deployment: &Deployment, name: &str, reregistration: u64) -> String {
    make_pool_with(deployment, name, reregistration, json!({}))
}

/// Like [`make_pool`], handing its workers `worker_config`.
fn make_pool_with(
    deployment: &Deployment,
    name: &str,
    reregistration: u64,
    worker_config: serde_json::Value,
) -> String {
    let pool = format!("proj-taskvm/{name}-{}", std::process::id());
    deployment.call(
        "auth",
        Method::PUT,
        &["roles", &format!("worker-pool:{pool}")],
        Some(&json!({
            "description": "taskvm test pool",
            "scopes": [format!("worker-manager:get-worker:{pool}/*")],
        })),
    );
    deployment.call(
        "worker-manager",
        Method::PUT,
        &["worker-pool", &pool],
        Some(&json!({
            "providerId": "static",
            "description": "taskvm test pool",
            "owner": "taskvm@example.com",
            "emailOnError": false,
            "config": {
                "lifecycle": { "reregistrationTimeout": reregistration },
                "workerConfig": worker_config,
            },
        })),
    );
    pool
}

/// `createWorker` of `local/ID` in `pool`, as an operator adds a host; returns its secret.
fn add_host(deployment: &Deployment, pool: &str, id: &str) -> String {
    let secret = format!("{}{}", slug(), slug());
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    deployment.call(
        "worker-manager",
        Method::PUT,
        &["workers", pool, "local", id],
        Some(&json!({
            "expires": expires,
            "capacity": 1,
            "providerInfo": { "staticSecret": secret },
        })),
    );
    secret
}

/// The workers of `pool` with their states.
fn workers(deployment: &Deployment, pool: &str) -> Vec<(String, String)> {
    let listed = deployment.call("worker-manager", Method::GET, &["workers", pool], None);
    listed["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|worker| {
            (
                worker["workerId"].as_str().unwrap().to_owned(),
                worker["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The worker that ran `task_id`'s first run.
fn ran_on(deployment: &Deployment, task_id: &str) -> String {
    let status = status(deployment, task_id);
    status["runs"][0]["workerId"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn two_registered_hosts_share_a_pools_tasks_and_renew_their_credentials_during_a_long_task() {
    let deployment = Deployment::get();
    let dir = scratch();
    // Credentials last 20 s from registration: renewed every 10 s.
    let pool = make_pool(&deployment, "static-share", 20);
    let (secret_a, secret_b) = (
        add_host(&deployment, &pool, "host-a"),
        add_host(&deployment, &pool, "host-b"),
    );
    let mut host_a = Worker::start_in_pool(
        &deployment,
        &pool,
        &dir.path().join("host-a"),
        &secret_a,
        &[],
    );
    let mut host_b = Worker::start_in_pool(
        &deployment,
        &pool,
        &dir.path().join("host-b"),
        &secret_b,
        &[],
    );
    for host in [&host_a, &host_b] {
        host.wait_said("claiming from", Duration::from_secs(60));
    }
    assert!(host_a.said(&format!(
        "registered with worker-manager as {pool}/local/host-a"
    )));
    let mut states = workers(&deployment, &pool);
    states.sort();
    assert_eq!(
        states,
        [
            ("host-a".to_owned(), "running".to_owned()),
            ("host-b".to_owned(), "running".to_owned())
        ]
    );

    let long = create_task(&deployment, &pool, script("sleep 28; echo long done", 120));
    let short: Vec<String> = (0..5)
        .map(|index| {
            create_task(
                &deployment,
                &pool,
                script(&format!("echo short {index}"), 60),
            )
        })
        .collect();
    for task_id in std::iter::once(&long).chain(&short) {
        let status = wait_resolved(&deployment, task_id, Duration::from_secs(300));
        assert_eq!(status["runs"][0]["state"], "completed", "{status:#}");
    }
    let ran: Vec<String> = std::iter::once(&long)
        .chain(&short)
        .map(|task_id| ran_on(&deployment, task_id))
        .collect();
    for host in ["host-a", "host-b"] {
        assert!(
            ran.iter().any(|worker| worker == host),
            "{host} ran none of {ran:?}"
        );
    }
    // The host that ran the long task renewed at least twice while it ran, and went on.
    let long_host = if ran[0] == "host-a" { &host_a } else { &host_b };
    let lines = long_host.process.lines();
    let claimed = lines
        .iter()
        .position(|line| line.contains(&format!("claimed task {long}")))
        .expect("claimed");
    let resolved = lines
        .iter()
        .position(|line| line.contains(&format!("task {long} run 0 resolved")))
        .expect("resolved");
    let renewals = lines[claimed..resolved]
        .iter()
        .filter(|line| line.contains("renewed the worker's credentials"))
        .count();
    assert!(
        renewals >= 2,
        "{renewals} renewals during the long task: {lines:#?}"
    );
    for host in [&mut host_a, &mut host_b] {
        assert!(host.process.is_running(), "{:#?}", host.process.lines());
        host.signal(rustix::process::Signal::TERM);
        assert!(host.wait_exit(Duration::from_secs(30)).success());
    }
}

#[test]
fn a_removed_host_finishes_its_task_claims_nothing_more_and_exits_0() {
    let deployment = Deployment::get();
    let dir = scratch();
    let pool = make_pool(&deployment, "static-remove", 3600);
    let secret = add_host(&deployment, &pool, "host-r");
    let first = create_task(&deployment, &pool, script("sleep 15; echo first done", 120));
    let mut host = Worker::start_in_pool(
        &deployment,
        &pool,
        &dir.path().join("host-r"),
        &secret,
        &["--shutdown-grace", "60"],
    );
    host.wait_said(&format!("claimed task {first}"), Duration::from_secs(60));
    deployment.call(
        "worker-manager",
        Method::DELETE,
        &["workers", &pool, "local", "host-r"],
        None,
    );
    let removed = Instant::now();
    let second = create_task(&deployment, &pool, script("echo second", 60));
    let exit = host.wait_exit(Duration::from_secs(60 + 30));
    assert!(exit.success(), "{exit:?}: {:#?}", host.process.lines());
    assert!(
        removed.elapsed() < Duration::from_secs(60 + 10),
        "exited {:?} after the removal",
        removed.elapsed()
    );
    assert!(
        host.said("(removed from its pool): draining"),
        "{:#?}",
        host.process.lines()
    );
    let first_status = status(&deployment, &first);
    assert_eq!(
        first_status["runs"][0]["state"], "completed",
        "{first_status:#}"
    );
    let second_status = status(&deployment, &second);
    assert_eq!(second_status["state"], "pending", "{second_status:#}");
    assert!(!host.said(&format!("claimed task {second}")));
    // Cancel it, so that no other test's worker meets it.
    let _ = runtime().block_on(deployment.admin().call(
        Method::POST,
        &["task", &second, "cancel"],
        None,
    ));
}

#[test]
fn a_wrong_secret_an_unknown_worker_an_absent_worker_manager_or_an_unknown_worker_config_key_end_the_worker_at_once(
) {
    let deployment = Deployment::get();
    let dir = scratch();
    let pool = make_pool(&deployment, "static-refuse", 3600);
    add_host(&deployment, &pool, "host-w");
    let wrong = format!("{}{}", slug(), slug());
    let cases: [(&str, &str, Option<&str>, &str); 3] = [
        ("host-w", &wrong, None, "refused the static secret"),
        (
            "host-unknown",
            &wrong,
            None,
            "does not know the worker local/host-unknown",
        ),
        (
            "host-w",
            &wrong,
            Some("http://127.0.0.1:9"),
            "cannot be reached",
        ),
    ];
    // A pool whose workerConfig holds a key the configuration does not have.
    let odd_pool = make_pool_with(
        &deployment,
        "static-odd-config",
        3600,
        json!({ "warmPool": 1, "noSuchSetting": true }),
    );
    let odd_secret = add_host(&deployment, &odd_pool, "host-o");
    let mut odd = Worker::start_in_pool(
        &deployment,
        &odd_pool,
        &dir.path().join("host-o"),
        &odd_secret,
        &[],
    );
    let exit = odd.wait_exit(Duration::from_secs(30));
    let lines = odd.process.lines();
    assert_eq!(exit.code(), Some(2), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|line| line.contains("worker pool's workerConfig"))
            && lines.iter().any(|line| line.contains("noSuchSetting")),
        "{lines:#?}"
    );
    // The pool, identity and secret file from the configuration's queue section alone.
    let secret_file = dir.path().join("wrong-secret");
    std::fs::write(&secret_file, format!("{wrong}\n")).unwrap();
    let config = dir.path().join("pool-config.json");
    std::fs::write(
        &config,
        json!({
            "queue": {
                "provider": "taskcluster", "rootUrl": deployment.root_url, "taskQueueId": pool,
                "workerGroup": "local", "workerId": "host-w", "workerPoolId": pool,
                "staticSecretFile": secret_file,
            }
        })
        .to_string(),
    )
    .unwrap();
    let output = crate::common::taskvm_command(&[])
        .arg("worker")
        .arg("--config")
        .arg(&config)
        .arg("--state")
        .arg(dir.path().join("from-config"))
        .args(["--accel", "tcg"])
        .env_remove("TASKCLUSTER_ROOT_URL")
        .env_remove("TASKCLUSTER_CLIENT_ID")
        .env_remove("TASKCLUSTER_ACCESS_TOKEN")
        .env_remove("TASKVM_STATIC_SECRET")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{said}");
    assert!(said.contains("refused the static secret of"), "{said}");
    assert!(
        !said.contains(&wrong),
        "the secret is never printed: {said}"
    );
    for (case, (id, secret, root_url, expected)) in cases.into_iter().enumerate() {
        let case_dir = dir.path().join(format!("case-{case}"));
        std::fs::create_dir(&case_dir).unwrap();
        let state = case_dir.join(id);
        let started = Instant::now();
        let mut host = match root_url {
            Some(root_url) => {
                let elsewhere = Deployment {
                    root_url: root_url.to_owned(),
                    vars: deployment.vars.clone(),
                };
                Worker::start_in_pool(&elsewhere, &pool, &state, secret, &[])
            }
            None => Worker::start_in_pool(&deployment, &pool, &state, secret, &[]),
        };
        let status = host.wait_exit(Duration::from_secs(30));
        let lines = host.process.lines();
        assert!(!status.success(), "{lines:#?}");
        assert!(
            lines.iter().any(|line| line.contains(expected)),
            "{expected}: {lines:#?}"
        );
        assert!(
            !lines.iter().any(|line| line.contains("claiming from")),
            "{lines:#?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{expected}: {:?}",
            started.elapsed()
        );
    }
}
