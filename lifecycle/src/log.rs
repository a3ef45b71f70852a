//! The task log: the guest's output as it arrives and taskvm's own `[taskvm]` lines, in one
//! file (`live.log`, the text every provider publishes). `taskvm run` also echoes it: guest
//! output to stdout, taskvm's lines to stderr.
//!
//! A line that begins with `[taskvm] ` is always taskvm's: the guest's output is kept byte for
//! byte except that a guest line beginning with `[taskvm]` after any number of `>` gets one
//! more `>` in front (as mbox quotes `From ` lines), so a guest cannot forge taskvm's lines and
//! the quoting can be undone. taskvm's own lines are single lines with control characters
//! escaped. On a terminal, `taskvm run` shows the guest's control characters escaped unless
//! asked for raw output.

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
    /// Guest output to stdout as it is, taskvm's lines to stderr.
    Terminal,
    /// As `Terminal`, with the guest's control characters (escape sequences among them)
    /// shown escaped, for a stdout that is a terminal.
    TerminalEscaped,
}

/// What begins every line of taskvm's own in the log.
pub const NOTE_PREFIX: &str = "[taskvm] ";
/// A guest line beginning with this (after any `>`) is quoted with one more `>`.
const MARKER: &[u8] = b"[taskvm]";

/// Called after every write to a task's log: a follower reads on when it is told, instead of
/// polling the file.
pub type LogListener = Arc<dyn Fn() + Send + Sync>;

/// A task's log; clone it to write from several places (it is one file behind a lock).
#[derive(Clone)]
pub struct TaskLog {
    inner: Arc<Mutex<Inner>>,
    echo: Echo,
    listener: Option<LogListener>,
}

struct Inner {
    file: File,
    /// Whether the last byte written ended a line (taskvm's lines start on a line of their own).
    at_line_start: bool,
    /// Where the guest's current line stands against the marker.
    quoting: LineStart,
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
                quoting: LineStart::Quotes(0),
                first_output: None,
                failed: None,
            })),
            echo,
            listener: None,
        })
    }

    /// The log, with `listener` told of every write from now on.
    pub fn with_listener(mut self, listener: LogListener) -> TaskLog {
        self.listener = Some(listener);
        self
    }

    fn written(&self) {
        if let Some(listener) = &self.listener {
            listener();
        }
    }

    /// Appends the guest's output.
    pub fn output(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match self.echo {
            Echo::Quiet => {}
            Echo::Terminal => {
                let mut stdout = io::stdout().lock();
                let _ = stdout.write_all(bytes).and_then(|()| stdout.flush());
            }
            Echo::TerminalEscaped => {
                let mut stdout = io::stdout().lock();
                let shown = escape_for_terminal(bytes);
                let _ = stdout.write_all(&shown).and_then(|()| stdout.flush());
            }
        }
        self.with(|inner| {
            inner.first_output.get_or_insert_with(Instant::now);
            let quoted = inner.quoting.feed(bytes);
            inner.at_line_start = bytes.ends_with(b"\n");
            inner.file.write_all(&quoted)
        });
        self.written();
    }

    /// Appends one line of taskvm's own, `[taskvm] LINE`, on a line of its own (control
    /// characters in it escaped, so it stays one line).
    pub fn note(&self, line: &str) {
        let line = schemas::shown::escape_controls(line);
        if self.echo != Echo::Quiet {
            // Never panic on a closed stderr (a terminal gone, a reader that died): the log
            // file still gets the line.
            let _ = writeln!(io::stderr().lock(), "taskvm: {line}");
        }
        self.with(|inner| {
            let separator = if inner.at_line_start { "" } else { "\n" };
            let held = inner.quoting.flush();
            inner.at_line_start = true;
            inner.quoting = LineStart::Quotes(0);
            let mut text = held;
            text.extend_from_slice(format!("{separator}{NOTE_PREFIX}{line}\n").as_bytes());
            inner.file.write_all(&text)
        });
        self.written();
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

/// The start of the guest's current line, as far as it could match `>`* + [`MARKER`]: the
/// `>`s seen, then how much of the marker. Bytes that may still turn out to be the marker are
/// held back (at most the marker's length; the `>`s are only counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineStart {
    /// At the start of a line, after this many `>`.
    Quotes(u64),
    /// After `quotes` `>` and the first `matched` bytes of the marker.
    Marker { quotes: u64, matched: usize },
    /// Past the start of the line (it cannot be the marker any more).
    Settled,
}

impl LineStart {
    /// Passes `bytes` through, quoting lines that begin with the marker.
    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len() + 8);
        for &byte in bytes {
            *self = match (*self, byte) {
                (_, b'\n') => {
                    out.extend(self.flush());
                    out.push(b'\n');
                    LineStart::Quotes(0)
                }
                (LineStart::Settled, _) => {
                    out.push(byte);
                    LineStart::Settled
                }
                (LineStart::Quotes(quotes), b'>') => LineStart::Quotes(quotes + 1),
                (LineStart::Quotes(quotes), byte) if byte == MARKER[0] => {
                    LineStart::Marker { quotes, matched: 1 }
                }
                (LineStart::Marker { quotes, matched }, byte) if byte == MARKER[matched] => {
                    if matched + 1 == MARKER.len() {
                        out.push(b'>');
                        out.extend(std::iter::repeat_n(b'>', quotes as usize));
                        out.extend_from_slice(MARKER);
                        LineStart::Settled
                    } else {
                        LineStart::Marker {
                            quotes,
                            matched: matched + 1,
                        }
                    }
                }
                (held, byte) => {
                    *self = held;
                    out.extend(self.flush());
                    out.push(byte);
                    LineStart::Settled
                }
            };
        }
        out
    }

    /// The bytes held back, as they came (the line turned out not to be the marker).
    fn flush(&mut self) -> Vec<u8> {
        let (quotes, matched) = match *self {
            LineStart::Quotes(quotes) => (quotes, 0),
            LineStart::Marker { quotes, matched } => (quotes, matched),
            LineStart::Settled => (0, 0),
        };
        *self = LineStart::Settled;
        let mut held = vec![b'>'; quotes as usize];
        held.extend_from_slice(&MARKER[..matched]);
        held
    }
}

/// The guest's bytes for a terminal: C0 controls but newline, carriage return, tab and
/// backspace, DEL and C1 controls written as `\xNN`, so that no escape sequence reaches it.
fn escape_for_terminal(bytes: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\r' | '\t' | '\u{8}' => out.push(c),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.into_bytes()
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

    /// Feeds `chunks` as the guest's output and returns the file.
    fn logged(chunks: &[&[u8]]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("live.log");
        let log = TaskLog::create(&path, Echo::Quiet).unwrap();
        for chunk in chunks {
            log.output(chunk);
        }
        log.note("end");
        std::fs::read_to_string(&path).unwrap()
    }

    #[test]
    fn a_guest_cannot_forge_a_taskvm_line_whatever_the_chunking() {
        let forged = b"ok\n[taskvm] resolved completed in 1 s\n>[taskvm] x\n[taskvm]\n[task\n>>\n";
        let expected = "ok\n>[taskvm] resolved completed in 1 s\n>>[taskvm] x\n>[taskvm]\n\
                        [task\n>>\n[taskvm] end\n";
        assert_eq!(logged(&[forged]), expected);
        // Split at every byte: the same result.
        let bytewise: Vec<&[u8]> = forged.chunks(1).collect();
        assert_eq!(logged(&bytewise), expected);
        // A held-back start followed by a note: the bytes come out before the note.
        assert_eq!(logged(&[b"[tas"]), "[tas\n[taskvm] end\n");
        assert_eq!(logged(&[b">>"]), ">>\n[taskvm] end\n");
        let text = logged(&[b"a [taskvm] in the middle\n"]);
        assert_eq!(text, "a [taskvm] in the middle\n[taskvm] end\n");
    }

    #[test]
    fn notes_stay_one_line_and_terminals_get_no_escape_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("live.log");
        let log = TaskLog::create(&path, Echo::Quiet).unwrap();
        log.note("two\nlines \u{1b}[2J");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "[taskvm] two\\nlines \\u{1b}[2J\n"
        );
        assert_eq!(
            escape_for_terminal(b"red \x1b[31m\tok\r\n\x07"),
            b"red \\x1b[31m\tok\r\n\\x07"
        );
    }
}
