//! The agent's life: take the task, run it while serving actions, report, and wait for the
//! worker to say it is done.

use std::io::{self, Write};
use std::sync::atomic::AtomicI32;
use std::sync::Arc;
use std::thread::sleep;
use std::time::Duration;

use protocol::exit_code::MOUNT_FAILED;
use protocol::Report;

use crate::actions::{handle, Next};
use crate::client::Client;
use crate::markers::marker;
use crate::run::run;

/// Runs one task through the metadata service at `url`; returns when the worker asks for a
/// shutdown.
pub fn serve(url: &str) -> io::Result<()> {
    let client = Arc::new(Client::new(url)?);
    crate::markers::banner();
    marker("ready");
    let task = loop {
        let task = client.wait_for_task();
        if !task.warm_up {
            break task;
        }
        warm_up(&client, &task);
    };
    if let Some(fresh) = &task.fresh {
        for problem in crate::fresh::apply(fresh) {
            eprintln!("taskvm-agent: {problem}");
        }
    }
    let mounted = match crate::mounts::mount_all(&task.mounts) {
        Ok(mounted) => mounted,
        Err(reason) => return refuse_to_run(&client, &reason),
    };
    marker("running");
    let process_group = Arc::new(AtomicI32::new(0));
    let (done_sender, done) = std::sync::mpsc::channel();
    {
        let (client, process_group) = (client.clone(), process_group.clone());
        std::thread::spawn(move || {
            serve_actions(&client, &process_group);
            let _ = done_sender.send(());
        });
    }

    let exit_code = match client.log() {
        Ok(mut log) => {
            let code = run(&task, &mut log, &process_group);
            if let Err(error) = log.finish() {
                eprintln!("taskvm-agent: log upload failed: {error}");
            }
            code
        }
        Err(error) => {
            eprintln!("taskvm-agent: cannot stream the log: {error}");
            run(&task, &mut io::sink(), &process_group)
        }
    };
    report_with_retries(
        &client,
        &Report {
            exit_code,
            not_run: None,
        },
    );
    marker(&format!("done exit={exit_code}"));
    let _ = done.recv();
    for problem in crate::mounts::unmount_all(&mounted) {
        eprintln!("taskvm-agent: {problem}");
    }
    Ok(())
}

/// Runs a warm-up the way a task runs — its freshness applied, its output streamed as a log —
/// so that a task's first steps run code that has run before; what it does and prints matters
/// to nobody. Then the task is asked for again.
fn warm_up(client: &Client, task: &protocol::Execute) {
    if let Some(fresh) = &task.fresh {
        let _ = crate::fresh::apply(fresh);
    }
    match client.log() {
        Ok(mut log) => {
            run(task, &mut log, &AtomicI32::new(0));
            let _ = log.finish();
        }
        Err(_) => {
            run(task, &mut io::sink(), &AtomicI32::new(0));
        }
    }
    // A marker, as a task's start writes one: the console's code (the serial line, the
    // screen's terminal) has then run too. Measured through `taskvm serve` with a warm pool
    // under TCG: it took a task's first output from 72 to 57 ms (medians of 24, one run).
    marker("warmed up");
}

/// A mount failed: says why in the task's log and on the console, reports
/// [`MOUNT_FAILED`] without running the command, and waits to be shut down.
fn refuse_to_run(client: &Arc<Client>, reason: &str) -> io::Result<()> {
    let line = format!("taskvm-agent: {reason}; the command did not run\n");
    eprint!("{line}");
    if let Ok(mut log) = client.log() {
        let _ = log.write_all(line.as_bytes());
        let _ = log.finish();
    }
    report_with_retries(
        client,
        &Report {
            exit_code: MOUNT_FAILED,
            not_run: Some(reason.to_owned()),
        },
    );
    marker(&format!("done exit={MOUNT_FAILED}"));
    serve_actions(client, &AtomicI32::new(0));
    Ok(())
}

fn report_with_retries(client: &Client, report: &Report) {
    for attempt in 0..50 {
        match client.report(report) {
            Ok(200..=299) | Ok(409) => return,
            Ok(status) => eprintln!("taskvm-agent: report answered {status}"),
            Err(error) if attempt == 0 => eprintln!("taskvm-agent: report failed: {error}"),
            Err(_) => {}
        }
        sleep(Duration::from_millis(100));
    }
}

/// Polls for actions until one says to shut down.
fn serve_actions(client: &Client, process_group: &AtomicI32) {
    loop {
        match client.next_action() {
            Ok(Some(action)) => match handle(client, &action, process_group) {
                Ok(Next::Shutdown) => return,
                Ok(Next::Continue) => {}
                Err(error) => eprintln!("taskvm-agent: action {} failed: {error}", action.id),
            },
            Ok(None) => {}
            Err(_) => sleep(Duration::from_millis(100)),
        }
    }
}
