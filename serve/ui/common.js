// Helpers shared by the pages.

/** Fetches JSON from the API; throws an Error carrying the server's message. */
export async function api(path, options = {}) {
  const response = await fetch(path, options);
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!response.ok) {
    const error = new Error((body && body.error) || `${response.status} ${response.statusText}`);
    error.body = body;
    error.status = response.status;
    throw error;
  }
  return body;
}

/** `2026-12-01 10:02:03` in local time. */
export function when(milliseconds) {
  if (!milliseconds) return '';
  const date = new Date(milliseconds);
  const pad = (n) => String(n).padStart(2, '0');
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

/** An element with a class and text. */
export function element(tag, text = '', className = '') {
  const node = document.createElement(tag);
  node.textContent = text;
  if (className) node.className = className;
  return node;
}

/** Shows the server's health in the header. */
export async function showHealth() {
  try {
    const health = await api('/api/health');
    const capacity = health.capacity;
    document.getElementById('health').textContent =
      `${health.running} running, ${health.queued} queued · ` +
      `${capacity.used.memoryMib}/${capacity.total.memoryMib} MiB, ` +
      `${capacity.used.cpus}/${capacity.total.cpus} vCPUs` + (health.paused ? ' · paused' : '');
  } catch (error) {
    document.getElementById('health').textContent = `server unreachable: ${error.message}`;
  }
}
