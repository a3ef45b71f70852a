//! The task log: the guest's output as it arrives and taskvm's own `[taskvm]` lines, in one
//! file (`live.log`, the text every provider publishes). `taskvm run` also echoes it: guest
//! output to stdout, taskvm's lines to stderr.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Where the log is echoed besides its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// Only the file.
    Quiet,
    /// Guest output to stdout, taskvm's lines to stderr.
    Terminal,
}

/// A task's log; clone it to write from several places (it is one file behind a lock).
#[derive(Clone)]
pub struct TaskLog {
    inner: Arc<Mutex<Inner>>,
    echo: Echo,
}

struct Inner {
    file: File,
    /// Whether the last byte written ended a line (taskvm's lines start on a line of their own).
    at_line_start: bool,
    first_output: Option<Instant>,
    failed: Option<String>,
}

impl TaskLog {
    /// Creates (truncates) the log file at `path`.
    pub fn create(path: &Path, echo: Echo) -> io::Result<TaskLog> {
        let file = File::create(path)?;
        Ok(TaskLog {
            inner: Arc::new(Mutex::new(Inner {
                file,
                at_line_start: true,
                first_output: None,
                failed: None,
            })),
            echo,
        })
    }

    /// Appends the guest's output.
    pub fn output(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.echo == Echo::Terminal {
            let mut stdout = io::stdout().lock();
            let _ = stdout.write_all(bytes).and_then(|()| stdout.flush());
        }
        self.with(|inner| {
            inner.first_output.get_or_insert_with(Instant::now);
            inner.at_line_start = bytes.ends_with(b"\n");
            inner.file.write_all(bytes)
        });
    }

    /// Appends one line of taskvm's own, `[taskvm] LINE`, on a line of its own.
    pub fn note(&self, line: &str) {
        if self.echo == Echo::Terminal {
            // Never panic on a closed stderr (a terminal gone, a reader that died): the log
            // file still gets the line.
            let _ = writeln!(io::stderr().lock(), "taskvm: {line}");
        }
        self.with(|inner| {
            let separator = if inner.at_line_start { "" } else { "\n" };
            inner.at_line_start = true;
            inner
                .file
                .write_all(format!("{separator}[taskvm] {line}\n").as_bytes())
        });
    }

    /// When the guest's first output arrived.
    pub fn first_output(&self) -> Option<Instant> {
        self.inner.lock().ok().and_then(|inner| inner.first_output)
    }

    /// The first write error, if writing the file ever failed (the log is then incomplete).
    pub fn write_error(&self) -> Option<String> {
        self.inner
            .lock()
            .ok()
            .and_then(|inner| inner.failed.clone())
    }

    /// Flushes the file to disk.
    pub fn sync(&self) {
        self.with(|inner| inner.file.sync_data());
    }

    fn with(&self, work: impl FnOnce(&mut Inner) -> io::Result<()>) {
        if let Ok(mut inner) = self.inner.lock() {
            if let Err(error) = work(&mut inner) {
                inner.failed.get_or_insert_with(|| error.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_start_on_their_own_line_and_output_is_kept_verbatim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("live.log");
        let log = TaskLog::create(&path, Echo::Quiet).unwrap();
        log.note("starting");
        log.output(b"partial");
        log.note("maxRunTime exceeded");
        log.output(b"a\nb\n");
        log.note("done");
        assert!(log.first_output().is_some());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "[taskvm] starting\npartial\n[taskvm] maxRunTime exceeded\na\nb\n[taskvm] done\n"
        );
        assert_eq!(log.write_error(), None);
    }
}
