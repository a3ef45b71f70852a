//! The store against a real SQLite file.
use super::*;

fn ending(resolution: Resolution) -> FinishedRun {
    FinishedRun {
        ending: Ending {
            resolution,
            exit_code: Some(0),
            reason: None,
        },
        stages: vec![("boot".into(), 1.5)],
        artifacts: vec![ArtifactFile {
            name: "live.log".into(),
            size: 10,
        }],
    }
}

#[test]
fn tasks_are_claimed_in_submission_order_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.sqlite");
    let store = Store::open(&path, 3).unwrap();
    for id in ["a", "b", "c"] {
        store.submit(id, "{}").unwrap();
    }
    let first = store.claim_next().unwrap().unwrap();
    assert_eq!((first.task_id.as_str(), first.run_id), ("a", 0));
    store
        .finish("a", 0, &ending(Resolution::Completed))
        .unwrap();
    drop(store);
    let store = Store::open(&path, 3).unwrap();
    assert_eq!(store.recover().unwrap(), Recovered::default());
    let a = store.get("a").unwrap().unwrap();
    assert_eq!(a.state, TaskState::Completed);
    assert_eq!(a.runs[0].stages, vec![("boot".to_owned(), 1.5)]);
    assert_eq!(a.runs[0].artifacts[0].name, "live.log");
    assert_eq!(store.claim_next().unwrap().unwrap().task_id, "b");
    assert_eq!(store.claim_next().unwrap().unwrap().task_id, "c");
    assert!(store.claim_next().unwrap().is_none());
}

#[test]
fn a_run_a_crash_interrupted_is_requeued_until_attempts_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.sqlite");
    let store = Store::open(&path, 2).unwrap();
    store.submit("t", "{}").unwrap();
    store.claim_next().unwrap().unwrap();
    drop(store); // the process "dies" with the run open

    let store = Store::open(&path, 2).unwrap();
    assert_eq!(
        store.recover().unwrap(),
        Recovered {
            requeued: 1,
            given_up: 0
        }
    );
    let task = store.get("t").unwrap().unwrap();
    assert_eq!(task.state, TaskState::Queued);
    assert_eq!(
        task.runs[0].resolution.as_deref(),
        Some("exception/worker-shutdown")
    );
    let again = store.claim_next().unwrap().unwrap();
    assert_eq!(again.run_id, 1);
    drop(store);

    let store = Store::open(&path, 2).unwrap();
    assert_eq!(store.recover().unwrap().given_up, 1);
    assert_eq!(store.get("t").unwrap().unwrap().state, TaskState::Exception);
    assert!(store.claim_next().unwrap().is_none());
}

#[test]
fn only_queued_tasks_cancel_in_the_store_and_counts_follow() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("q.sqlite"), 3).unwrap();
    store.submit("running", "{}").unwrap();
    store.submit("queued", "{}").unwrap();
    store.claim_next().unwrap().unwrap();
    assert!(!store.cancel_queued("running").unwrap());
    assert!(store.cancel_queued("queued").unwrap());
    assert!(!store.cancel_queued("queued").unwrap());
    assert!(!store.cancel_queued("nonexistent").unwrap());
    let canceled = store.get("queued").unwrap().unwrap();
    assert_eq!(canceled.state, TaskState::Exception);
    assert_eq!(
        canceled.runs[0].resolution.as_deref(),
        Some("exception/canceled")
    );
    let counts = store.counts().unwrap();
    assert!(counts.contains(&(TaskState::Running, 1)));
    assert!(counts.contains(&(TaskState::Exception, 1)));
    assert!(counts.contains(&(TaskState::Queued, 0)));
    assert_eq!(
        store.list(Some(TaskState::Running), 10).unwrap()[0].task_id,
        "running"
    );
    assert_eq!(store.list(None, 10).unwrap().len(), 2);
    assert_eq!(
        store.resolutions().unwrap(),
        vec![("exception/canceled".to_owned(), 1)]
    );
}

#[test]
fn a_graceful_shutdown_requeues_like_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("q.sqlite"), 3).unwrap();
    store.submit("t", "{}").unwrap();
    store.claim_next().unwrap().unwrap();
    let shutdown = Resolution::Exception(ExceptionReason::WorkerShutdown);
    store.finish("t", 0, &ending(shutdown)).unwrap();
    assert_eq!(store.get("t").unwrap().unwrap().state, TaskState::Queued);
}
