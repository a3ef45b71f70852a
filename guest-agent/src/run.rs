//! Running the task's command and streaming its output as it is produced.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use protocol::{ExecResult, Execute, EXEC_OUTPUT_LIMIT};

/// Base environment of every command (and shell); the task's `env` is added on top.
pub const BASE_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("TERM", "xterm"),
    ("LANG", "C.UTF-8"),
];
/// How long output from background processes is still forwarded after the command exits.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

/// Runs `task`, writing its combined stdout and stderr to `log` as it comes. Records the
/// command's process group in `process_group` (for `kill-process`). Returns the exit code
/// (128 + signal when a signal ended it; 127 when it could not be started).
pub fn run(task: &Execute, log: &mut impl Write, process_group: &AtomicI32) -> i32 {
    let spawned = if task.tty {
        spawn_on_pty(task)
    } else {
        spawn_with_pipes(task)
    };
    let (mut child, output) = match spawned {
        Ok(spawned) => spawned,
        Err(error) => {
            let program = task.command.first().map_or("", String::as_str);
            let _ = writeln!(log, "taskvm-agent: cannot run {program:?}: {error}");
            return 127;
        }
    };
    process_group.store(child.id() as i32, Ordering::SeqCst);
    let code = forward_until_exit(&mut child, output, log);
    process_group.store(0, Ordering::SeqCst);
    code
}

fn command(task: &Execute) -> io::Result<Command> {
    let (program, args) = task
        .command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let mut command = Command::new(program);
    command.args(args).env_clear().current_dir("/");
    command.envs(BASE_ENV.iter().copied());
    command.envs(&task.env);
    Ok(command)
}

fn spawn_with_pipes(task: &Execute) -> io::Result<(Child, OwnedFd)> {
    let (reader, writer) = rustix::pipe::pipe()?;
    let mut command = command(task)?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer.try_clone()?))
        .stderr(Stdio::from(writer))
        .process_group(0);
    let child = command.spawn()?;
    Ok((child, reader))
}

fn spawn_on_pty(task: &Execute) -> io::Result<(Child, OwnedFd)> {
    spawn_on_terminal(command(task)?)
}

/// Starts `command` as the leader of a new session whose controlling terminal is a new
/// pseudo-terminal; returns the child and the terminal's controlling side.
#[allow(unsafe_code)]
pub fn spawn_on_terminal(mut command: Command) -> io::Result<(Child, OwnedFd)> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let controller = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY)?;
    grantpt(&controller)?;
    unlockpt(&controller)?;
    let name = ptsname(&controller, Vec::new())?;
    let terminal: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(name.to_string_lossy().as_ref())?
        .into();
    command
        .stdin(Stdio::from(terminal.try_clone()?))
        .stdout(Stdio::from(terminal.try_clone()?))
        .stderr(Stdio::from(terminal));
    // SAFETY: runs between fork and exec and only makes async-signal-safe system calls
    // (setsid, ioctl) without allocating.
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
            Ok(())
        });
    }
    let child = command.spawn()?;
    Ok((child, controller))
}

/// Forwards output until the command has exited and its output is drained (or, when
/// background processes keep the output open, until a short grace period has passed).
fn forward_until_exit(child: &mut Child, output: OwnedFd, log: &mut impl Write) -> i32 {
    let (sender, chunks) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut output = std::fs::File::from(output);
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match output.read(&mut buffer) {
                Ok(0) | Err(_) => break, // EOF, or EIO on a PTY whose last writer closed
                Ok(n) => {
                    if sender.send(buffer[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut exit = None;
    let mut drain_until = None;
    loop {
        match chunks.recv_timeout(Duration::from_millis(20)) {
            Ok(chunk) => {
                // The log may be gone (the service went away); the command still runs on.
                let _ = log.write_all(&chunk);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if exit.is_none() {
            if let Ok(Some(status)) = child.try_wait() {
                exit = Some(status);
                drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
            }
        }
        if drain_until.is_some_and(|deadline| Instant::now() > deadline) {
            break;
        }
    }
    let status = match exit {
        Some(status) => status,
        None => match child.wait() {
            Ok(status) => status,
            Err(_) => return 1,
        },
    };
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1)
}

/// Runs `sh -c script` with the base environment and returns how it ended with its output
/// (the first [`EXEC_OUTPUT_LIMIT`] bytes of it).
pub fn exec(script: &str) -> ExecResult {
    let task = Execute {
        command: vec!["sh".into(), "-c".into(), script.into()],
        ..Execute::default()
    };
    let mut output = LimitedBuffer::default();
    let exit_code = run(&task, &mut output, &AtomicI32::new(0));
    ExecResult {
        exit_code,
        output: String::from_utf8_lossy(&output.bytes).into_owned(),
        truncated: output.truncated,
    }
}

/// Output kept up to [`EXEC_OUTPUT_LIMIT`] bytes; the rest counted as left out.
#[derive(Default)]
struct LimitedBuffer {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Write for LimitedBuffer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = EXEC_OUTPUT_LIMIT.saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&data[..data.len().min(room)]);
        self.truncated |= data.len() > room;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
