//! `taskvm shell TASK_ID`: a login shell in a running task's VM on a `taskvm serve`, on this
//! terminal (raw, resized with it). Without a terminal (a script's pipe) the input is sent as
//! it is, and its end types Ctrl-U Ctrl-D (clear the line, end of input), again each second
//! until the shell has ended: that ends the shell at its prompt (or a command's input), but
//! keys typed while the shell starts may be taken for something else, such as the answer to
//! its question where the cursor is, which no terminal answers here.

use std::io::Write;
use std::os::fd::AsFd;

use lifecycle::exit::Outcome;
use serve::shell_client::{connect, connect_url, ShellInput, ShellOutput};
use tokio::io::AsyncReadExt;

/// Arguments of `taskvm shell`.
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["task_id", "url"]))]
pub struct ShellArgs {
    /// The task on the `taskvm serve` (it must be running).
    task_id: Option<String>,
    /// A shell's websocket URL instead: an interactive Taskcluster task's, from its artifact
    /// private/taskvm/shell.json.
    #[arg(long, value_name = "WS_URL", conflicts_with = "task_id")]
    url: Option<String>,
    /// Which server.
    #[command(flatten)]
    server: crate::args::ServerArgs,
}

/// Ctrl-U Ctrl-D: clear the line typed so far, then end the input (at a shell's prompt, the
/// shell's end).
const END_OF_INPUT: &[u8] = b"\x15\x04";
/// How often the end of input is typed again.
const END_OF_INPUT_AGAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs `taskvm shell`: exits 0 when the shell ends, 3 when none could be opened.
pub fn run(args: ShellArgs) -> Outcome {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("taskvm shell: {error}");
            return Outcome::Internal;
        }
    };
    let (rows, cols) = terminal_size().unwrap_or((24, 80));
    let outcome = runtime.block_on(async {
        // clap requires one of the two.
        let connected = match (&args.url, args.task_id.as_deref()) {
            (Some(url), _) => connect_url(url, rows, cols).await,
            (None, task_id) => {
                let task_id = task_id.unwrap_or_default();
                let server = &args.server;
                connect(&server.server, server.token.as_deref(), task_id, rows, cols).await
            }
        };
        let (input, output) = match connected {
            Ok(halves) => halves,
            Err(error) => {
                eprintln!("taskvm shell: {error}");
                return Outcome::Internal;
            }
        };
        attach_websocket(input, output).await;
        Outcome::Success
    });
    // The thread reading stdin may be blocked in read(2): do not wait for it.
    runtime.shutdown_background();
    outcome
}

/// Attaches this terminal to a shell's websocket until the shell ends.
pub(crate) async fn attach_websocket(mut input: ShellInput, output: ShellOutput) {
    if let Some((rows, cols)) = terminal_size() {
        let _ = input.resize(rows, cols).await;
    }
    let raw = RawTerminal::enter();
    tokio::select! {
        () = print_output(output) => {}
        () = send_input(input) => {}
    }
    drop(raw);
}

/// Attaches this terminal to `shell`, a shell of a VM this process runs (`taskvm debug`),
/// until it ends.
pub(crate) async fn attach_terminal(shell: lifecycle::ShellStream) {
    let (mut output, input) = tokio::io::split(shell);
    let raw = RawTerminal::enter();
    let print = async {
        let mut buffer = vec![0u8; 16 * 1024];
        let mut stdout = std::io::stdout();
        loop {
            match output.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => {
                    if stdout
                        .write_all(&buffer[..read])
                        .and_then(|()| stdout.flush())
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = print => {}
        () = send_input(input) => {}
    }
    drop(raw);
}

/// Where the keys typed and the terminal's sizes go: a shell's websocket, or a shell of a VM
/// this process runs.
pub(crate) trait KeysTo {
    /// Types `keys`.
    async fn keys(&mut self, keys: &[u8]) -> Result<(), ()>;
    /// Says the terminal's new size.
    async fn resize(&mut self, rows: u16, cols: u16) -> Result<(), ()>;
}

impl KeysTo for ShellInput {
    async fn keys(&mut self, keys: &[u8]) -> Result<(), ()> {
        ShellInput::keys(self, keys).await.map_err(drop)
    }

    async fn resize(&mut self, rows: u16, cols: u16) -> Result<(), ()> {
        ShellInput::resize(self, rows, cols).await.map_err(drop)
    }
}

impl KeysTo for tokio::io::WriteHalf<lifecycle::ShellStream> {
    async fn keys(&mut self, keys: &[u8]) -> Result<(), ()> {
        use tokio::io::AsyncWriteExt;
        let framed = schemas::protocol::shell::input(keys);
        self.write_all(&framed).await.map_err(drop)
    }

    async fn resize(&mut self, rows: u16, cols: u16) -> Result<(), ()> {
        use tokio::io::AsyncWriteExt;
        let framed = schemas::protocol::shell::resize(rows, cols);
        self.write_all(&framed).await.map_err(drop)
    }
}

async fn print_output(mut output: ShellOutput) {
    let mut stdout = std::io::stdout();
    while let Some(bytes) = output.next().await {
        if stdout
            .write_all(&bytes)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return;
        }
    }
}

/// Sends the keys typed and the terminal's new sizes; returns only when the connection fails
/// (after the end of input it types Ctrl-D each second until the shell ends).
async fn send_input(mut input: impl KeysTo) {
    let mut stdin = tokio::io::stdin();
    let mut resized =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
    let mut buffer = vec![0u8; 4096];
    let mut reading = true;
    let mut again = tokio::time::interval(END_OF_INPUT_AGAIN);
    loop {
        tokio::select! {
            read = stdin.read(&mut buffer), if reading => {
                let sent = match read {
                    Ok(0) | Err(_) => {
                        reading = false;
                        again.reset();
                        input.keys(END_OF_INPUT).await
                    }
                    Ok(read) => input.keys(&buffer[..read]).await,
                };
                if sent.is_err() {
                    return;
                }
            }
            _ = again.tick(), if !reading => {
                if input.keys(END_OF_INPUT).await.is_err() {
                    return;
                }
            }
            Some(()) = async { resized.as_mut()?.recv().await } => {
                if let Some((rows, cols)) = terminal_size() {
                    if input.resize(rows, cols).await.is_err() {
                        return;
                    }
                }
            }
            else => std::future::pending::<()>().await,
        }
    }
}

/// This terminal's rows and columns, when stdin is one.
pub(crate) fn terminal_size() -> Option<(u16, u16)> {
    let size = rustix::termios::tcgetwinsize(std::io::stdin().as_fd()).ok()?;
    (size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

/// Stdin in raw mode (keys go to the remote shell as typed, Ctrl-C included) until dropped;
/// nothing when stdin is not a terminal.
struct RawTerminal(Option<rustix::termios::Termios>);

impl RawTerminal {
    fn enter() -> RawTerminal {
        let stdin = std::io::stdin();
        let Ok(saved) = rustix::termios::tcgetattr(stdin.as_fd()) else {
            return RawTerminal(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let set =
            rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &raw);
        RawTerminal(set.is_ok().then_some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin().as_fd(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}
