//! Progress markers on the console, so the engine and people can follow a guest without the
//! network: `taskvm-agent: ready`, `taskvm-agent: running`, `taskvm-agent: done exit=N`, and
//! `taskvm-agent: warmed up` after a warm-up (a warm pool's VM, a snapshot's).

use std::io::Write;

/// Writes `taskvm-agent: TEXT` to standard output (the serial console when the agent is init)
/// and, when there is one, to the VGA text console.
pub fn marker(text: &str) {
    let line = format!("{}{text}\n", protocol::marker::PREFIX);
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(line.as_bytes());
    let _ = stdout.flush();
    if let Ok(mut screen) = std::fs::OpenOptions::new().write(true).open("/dev/tty0") {
        let _ = screen.write_all(line.as_bytes());
    }
}

/// Paints a recognisable banner on the VGA text console, when there is one: three full-width
/// bars (red, green, blue) on the top rows; the markers follow below. Screenshot tests check
/// these colours at known positions.
pub fn banner() {
    let Ok(mut screen) = std::fs::OpenOptions::new().write(true).open("/dev/tty0") else {
        return;
    };
    let bar = " ".repeat(80);
    // Clear, home, then a bar per background colour (41 red, 42 green, 44 blue).
    let text = format!("\x1b[2J\x1b[H\x1b[41m{bar}\x1b[42m{bar}\x1b[44m{bar}\x1b[0m\n");
    let _ = screen.write_all(text.as_bytes());
}
