// The shell's terminal: xterm.js in an element, on a shell websocket of the API (a running
// task's, or a fresh copy of a kept VM's). Keys go out as binary messages, the terminal's
// size as {"rows","cols"} text; the shell's output comes back as binary messages.

/**
 * Opens the shell at API path `path` in element `target`, saying how it goes in `status`;
 * calls `onClose` when the shell ends. Returns false when xterm.js is not served.
 */
export async function openTerminal({ target, status, path, onClose }) {
  let Terminal;
  try {
    ({ Terminal } = await import('/xterm/lib/xterm.mjs'));
  } catch (error) {
    status.textContent = 'No terminal: xterm.js is not served (make deps installs it).';
    return false;
  }
  target.hidden = false;
  target.replaceChildren();
  const terminal = new Terminal({ rows: 24, cols: 100, convertEol: false });
  terminal.open(target);
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const socket = new WebSocket(
    `${scheme}://${location.host}${path}?rows=${terminal.rows}&cols=${terminal.cols}`);
  socket.binaryType = 'arraybuffer';
  const encoder = new TextEncoder();
  status.textContent = 'connecting…';
  socket.addEventListener('open', () => {
    status.textContent = 'shell connected';
    target.dataset.connected = 'true';
    terminal.focus();
  });
  socket.addEventListener('message', (event) => terminal.write(new Uint8Array(event.data)));
  socket.addEventListener('close', (event) => {
    status.textContent = event.reason ? `shell closed: ${event.reason}` : 'shell closed';
    target.dataset.connected = 'false';
    onClose();
  });
  terminal.onData((data) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
  });
  terminal.onResize(({ rows, cols }) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ rows, cols }));
  });
  return true;
}
