//! Interactive shells: root's login shell on a new terminal, carried over one connection to
//! the metadata service that was upgraded to `protocol::shell::UPGRADE`. The terminal's
//! output goes out as it comes; the worker's frames are typed in or resize the terminal.
//! Either end closing ends the shell.

use std::fs;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use protocol::shell::{FRAME_HEADER, FRAME_INPUT, FRAME_RESIZE, MAX_FRAME};

use crate::client::Client;
use crate::run::{spawn_on_terminal, BASE_ENV};

/// Connects shell `id` to the worker and runs it on a thread of its own; the caller goes on
/// serving actions.
pub fn start(client: &Client, id: &str, rows: u16, cols: u16) -> io::Result<()> {
    let (input, output) = client.open_shell(id)?;
    std::thread::spawn(move || {
        if let Err(error) = run(input, output, rows, cols) {
            eprintln!("taskvm-agent: shell: {error}");
        }
    });
    Ok(())
}

fn run(input: BufReader<TcpStream>, mut output: TcpStream, rows: u16, cols: u16) -> io::Result<()> {
    let (child, controller) = match spawn_login_shell() {
        Ok(spawned) => spawned,
        Err(error) => {
            let _ = writeln!(output, "taskvm-agent: cannot start a shell: {error}\r");
            let _ = output.shutdown(Shutdown::Both);
            return Err(error);
        }
    };
    resize(&controller, rows, cols);
    let typed_into = fs::File::from(controller.try_clone()?);
    let session = child.id();
    let connection = output.try_clone()?;
    std::thread::spawn(move || {
        // The worker went away (or sent nonsense): hang the shell up.
        let _ = type_frames(input, typed_into);
        let _ = connection.shutdown(Shutdown::Both);
        if let Some(pid) = rustix::process::Pid::from_raw(session as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::HUP);
        }
    });
    forward_output(controller, &mut output, child)
}

/// Root's login shell (from `/etc/passwd`, else `/bin/sh`) on a new terminal.
fn spawn_login_shell() -> io::Result<(Child, OwnedFd)> {
    let shell = root_shell();
    let name = shell.rsplit('/').next().unwrap_or("sh");
    let mut command = Command::new(&shell);
    // A leading dash in argv[0] makes it a login shell, as login(1) starts it.
    command.arg0(format!("-{name}")).env_clear();
    command.envs(BASE_ENV.iter().copied());
    command.env("SHELL", &shell).env("USER", "root");
    command.current_dir(if fs::metadata("/root").is_ok_and(|m| m.is_dir()) {
        "/root"
    } else {
        "/"
    });
    spawn_on_terminal(command)
}

fn root_shell() -> String {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find(|line| line.starts_with("root:"))
        .and_then(|line| line.rsplit(':').next())
        .filter(|shell| shell.starts_with('/') && fs::metadata(shell).is_ok())
        .unwrap_or("/bin/sh")
        .to_owned()
}

/// Sends the terminal's output until the shell has exited, then closes the connection.
fn forward_output(controller: OwnedFd, output: &mut TcpStream, mut child: Child) -> io::Result<()> {
    let mut terminal = fs::File::from(controller);
    let mut buffer = vec![0u8; 16 * 1024];
    let sent = loop {
        match terminal.read(&mut buffer) {
            // EIO: the shell and everything on its terminal have gone.
            Ok(0) | Err(_) => break Ok(()),
            Ok(read) => {
                if let Err(error) = output.write_all(&buffer[..read]) {
                    break Err(error);
                }
            }
        }
    };
    let _ = output.shutdown(Shutdown::Both);
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::HUP);
    }
    let _ = child.wait();
    sent
}

/// Reads the worker's frames until the connection ends: input is typed into the terminal,
/// a resize resizes it.
fn type_frames(mut input: impl Read, mut terminal: fs::File) -> io::Result<()> {
    let mut header = [0u8; FRAME_HEADER];
    let mut payload = vec![0u8; MAX_FRAME];
    loop {
        input.read_exact(&mut header)?;
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if length > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a frame of {length} bytes (at most {MAX_FRAME})"),
            ));
        }
        let payload = &mut payload[..length];
        input.read_exact(payload)?;
        match header[0] {
            FRAME_INPUT => terminal.write_all(payload)?,
            FRAME_RESIZE if length == 4 => {
                let rows = u16::from_be_bytes([payload[0], payload[1]]);
                let cols = u16::from_be_bytes([payload[2], payload[3]]);
                resize(&terminal, rows, cols);
            }
            // Unknown kinds are skipped: a newer worker may send more.
            _ => {}
        }
    }
}

fn resize(terminal: &impl std::os::fd::AsFd, rows: u16, cols: u16) {
    let size = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let _ = rustix::termios::tcsetwinsize(terminal, size);
}
