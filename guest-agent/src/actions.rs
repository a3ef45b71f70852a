//! Carrying out the worker's actions: fetch artifacts, list folders, signal the command,
//! shut down.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use protocol::{content_type, Action, ActionKind, FolderEntry, FolderListing, ReplyError};

use crate::client::Client;

/// What the agent should do after an action.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Keep serving actions.
    Continue,
    /// Power off: the worker is done with this VM.
    Shutdown,
}

/// Carries out `action` and replies to it.
pub fn handle(client: &Client, action: &Action, process_group: &AtomicI32) -> io::Result<Next> {
    let id = action.id.as_str();
    match &action.kind {
        ActionKind::GetArtifact { path } => {
            send_artifact(client, id, Path::new(path))?;
            Ok(Next::Continue)
        }
        ActionKind::ListFolder { path } => {
            match list_folder(Path::new(path)) {
                Ok(listing) => reply_json(client, id, &listing)?,
                Err(error) => reply_error(client, id, path, &error)?,
            }
            Ok(Next::Continue)
        }
        ActionKind::KillProcess { signal } => {
            let group = process_group.load(Ordering::SeqCst);
            let outcome = kill_group(group, *signal);
            match outcome {
                Ok(()) => reply_json(client, id, &serde_json::json!({}))?,
                Err(error) => reply_error(client, id, "command", &error)?,
            }
            Ok(Next::Continue)
        }
        ActionKind::Exec { script } => {
            let result = crate::run::exec(script);
            reply_json(client, id, &result)?;
            Ok(Next::Continue)
        }
        ActionKind::Shell { rows, cols } => {
            // The shell runs on; a failure to connect is the worker's to notice (it waits
            // for the connection with a timeout).
            crate::shell::start(client, id, *rows, *cols)?;
            Ok(Next::Continue)
        }
        ActionKind::Shutdown => {
            reply_json(client, id, &serde_json::json!({}))?;
            Ok(Next::Shutdown)
        }
    }
}

fn kill_group(group: i32, signal: i32) -> io::Result<()> {
    let pid = rustix::process::Pid::from_raw(group)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no command is running"))?;
    let signal = rustix::process::Signal::from_named_raw(signal).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown signal {signal}"),
        )
    })?;
    rustix::process::kill_process_group(pid, signal).map_err(io::Error::from)
}

fn send_artifact(client: &Client, id: &str, path: &Path) -> io::Result<()> {
    let metadata = match fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) => return reply_error(client, id, &path.display().to_string(), &error),
    };
    if metadata.is_dir() {
        let stream = client.reply_stream(id, content_type::DIRECTORY)?;
        let mut builder = tar::Builder::new(stream);
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Deterministic);
        builder.append_dir_all(".", path)?;
        builder.into_inner()?.finish()?;
        Ok(())
    } else {
        match fs::File::open(path) {
            Ok(file) => client.reply(id, content_type::FILE, file).map(drop),
            Err(error) => reply_error(client, id, &path.display().to_string(), &error),
        }
    }
}

fn list_folder(path: &Path) -> io::Result<FolderListing> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        let metadata = entry.metadata()?;
        entries.push(FolderEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            directory: metadata.is_dir(),
            size: if metadata.is_dir() { 0 } else { metadata.len() },
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(FolderListing { entries })
}

fn reply_json(client: &Client, id: &str, value: &impl serde::Serialize) -> io::Result<()> {
    let body = serde_json::to_vec(value).map_err(io::Error::other)?;
    client
        .reply(id, content_type::JSON, body.as_slice())
        .map(drop)
}

fn reply_error(client: &Client, id: &str, subject: &str, error: &io::Error) -> io::Result<()> {
    reply_json(
        client,
        id,
        &ReplyError {
            error: format!("{subject}: {error}"),
        },
    )
}
