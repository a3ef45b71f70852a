// A task's page: state, live log, screenshot, artifacts, cancel, console (noVNC), shell
// (xterm.js over the shell's websocket), and resuming the kept VM of a failed run.
import { api, element, showHealth, when } from '/ui/common.js';
import { openTerminal } from '/ui/terminal.js';

const taskId = location.pathname.split('/').pop();
document.getElementById('task-id').textContent = taskId;
document.title = `taskvm task ${taskId}`;

const logView = document.getElementById('log');
const screenshot = document.getElementById('screenshot');
const cancelButton = document.getElementById('cancel');
const consoleButton = document.getElementById('open-console');
const shellButton = document.getElementById('open-shell');
const keptButton = document.getElementById('resume-kept');
let current = null;
let rfb = null;
let shell = null;
/** The kept VM of this task's failed run, if the server keeps one. */
let kept = null;

/** Appends the log as it arrives, run after run, until the task is over. */
async function followLog() {
  const response = await fetch(`/api/tasks/${taskId}/log`);
  if (!response.ok || !response.body) {
    logView.textContent = `No log: ${response.status}`;
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    const atBottom = logView.scrollTop + logView.clientHeight >= logView.scrollHeight - 4;
    logView.append(document.createTextNode(decoder.decode(value, { stream: true })));
    if (atBottom) logView.scrollTop = logView.scrollHeight;
  }
  logView.dataset.ended = 'true';
}

function showScreenshot() {
  const running = current && current.state === 'running';
  const taken = current && current.runs.some((run) => run.artifacts.some((file) => file.name === 'screenshot.png'));
  if (!running && !taken) return;
  const next = new Image();
  next.onload = () => {
    screenshot.src = next.src;
    screenshot.hidden = false;
    document.getElementById('no-screen').hidden = true;
  };
  next.src = `/api/tasks/${taskId}/screenshot?at=${Date.now()}`;
}

/** Shows this task's kept VM (a failed run with debug.keepOnFailure), and its button. */
async function showKept() {
  const note = document.getElementById('kept-note');
  if (current.resolution !== 'failed') {
    kept = null;
  } else {
    try {
      const list = await api('/api/kept');
      kept = list.kept.find((vm) => vm.taskId === taskId) || null;
    } catch (error) {
      kept = null;
    }
  }
  note.textContent = kept
    ? `The failed VM is kept as ${kept.name} until ${when(kept.expiresAt * 1000)}. ` +
      'Each resume is a fresh copy of it as it failed, discarded when its shell ends.'
    : '';
  keptButton.hidden = !kept || shell !== null;
}

async function refresh() {
  try {
    current = await api(`/api/tasks/${taskId}`);
  } catch (error) {
    document.getElementById('state').textContent = error.message;
    return;
  }
  const state = document.getElementById('state');
  state.textContent = current.state;
  state.className = `state-${current.state}`;
  document.getElementById('resolution').textContent = current.resolution || '';
  const run = current.runs[current.runs.length - 1];
  document.getElementById('reason').textContent = run && run.reason ? run.reason : '';
  document.getElementById('stages').textContent = run && run.stages.length
    ? run.stages.map(([stage, seconds]) => `${stage} ${seconds.toFixed(2)} s`).join(' · ') : '';
  cancelButton.hidden = current.state !== 'queued' && current.state !== 'running';
  consoleButton.hidden = !current.console || rfb !== null;
  shellButton.hidden = !current.shell || shell !== null;
  await showKept();
  const list = document.getElementById('artifacts');
  list.replaceChildren(...(run ? run.artifacts : []).map((file) => {
    const item = document.createElement('li');
    const link = element('a', file.name);
    link.href = `/api/tasks/${taskId}/artifacts/${file.name.split('/').map(encodeURIComponent).join('/')}?run=${run.runId}`;
    item.append(link, ` (${file.size} bytes)`);
    return item;
  }));
  showHealth();
}

cancelButton.addEventListener('click', async () => {
  try {
    await api(`/api/tasks/${taskId}/cancel`, { method: 'POST' });
  } catch (error) {
    document.getElementById('reason').textContent = `Cancel: ${error.message}`;
  }
  refresh();
});

consoleButton.addEventListener('click', async () => {
  const status = document.getElementById('console-status');
  const { default: RFB } = await import('/novnc/core/rfb.js');
  const target = document.getElementById('console');
  target.hidden = false;
  consoleButton.hidden = true;
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  rfb = new RFB(target, `${scheme}://${location.host}/api/tasks/${taskId}/console`, { wsProtocols: ['binary'] });
  rfb.scaleViewport = true;
  rfb.addEventListener('connect', () => { status.textContent = 'console connected'; target.dataset.connected = 'true'; });
  rfb.addEventListener('disconnect', () => { status.textContent = 'console disconnected'; rfb = null; refresh(); });
});

/** Opens a shell at API path `path` in the page's terminal (one at a time). */
async function openShell(path) {
  shell = path;
  shellButton.hidden = true;
  keptButton.hidden = true;
  const opened = await openTerminal({
    target: document.getElementById('terminal'),
    status: document.getElementById('shell-status'),
    path,
    onClose: () => { shell = null; refresh(); },
  });
  if (!opened) shell = null;
}

shellButton.addEventListener('click', () => openShell(`/api/tasks/${taskId}/shell`));
keptButton.addEventListener('click', () => {
  if (kept) openShell(`/api/kept/${encodeURIComponent(kept.name)}/shell`);
});

refresh().then(showScreenshot);
followLog();
setInterval(async () => {
  const wasLive = current && !['completed', 'failed', 'exception'].includes(current.state);
  if (wasLive) {
    await refresh();
    showScreenshot();
  }
}, 2000);
