// The task list, the kept VMs and the submit form.
import { api, when, element, showHealth } from '/ui/common.js';

const rows = document.querySelector('#tasks tbody');
const filter = document.getElementById('state');

async function refresh() {
  const state = filter.value;
  try {
    const list = await api('/api/tasks' + (state ? `?state=${state}` : ''));
    rows.replaceChildren(...list.tasks.map((task) => {
      const row = document.createElement('tr');
      const link = element('a');
      link.href = `/tasks/${task.taskId}`;
      link.append(element('code', task.taskId));
      const first = document.createElement('td');
      first.append(link);
      const image = task.image && (typeof task.image === 'string' ? task.image : task.image.url);
      row.append(first, element('td', task.state, `state-${task.state}`),
        element('td', task.resolution || ''), element('td', image || ''),
        element('td', when(task.created)));
      return row;
    }));
    document.getElementById('empty').hidden = list.tasks.length > 0;
  } catch (error) {
    document.getElementById('empty').hidden = false;
    document.getElementById('empty').textContent = `Cannot list tasks: ${error.message}`;
  }
  await showKept();
  showHealth();
}

/** Lists the kept VMs, each linked to its task's page (where it can be resumed). */
async function showKept() {
  let list;
  try {
    list = await api('/api/kept');
  } catch (error) {
    return;
  }
  document.getElementById('kept-section').hidden = list.kept.length === 0;
  document.querySelector('#kept tbody').replaceChildren(...list.kept.map((vm) => {
    const row = document.createElement('tr');
    const task = document.createElement('td');
    if (vm.taskId) {
      const link = element('a');
      link.href = `/tasks/${encodeURIComponent(vm.taskId)}`;
      link.append(element('code', vm.taskId));
      task.append(link);
    }
    const size = `${(vm.size / (1 << 20)).toFixed(1)} MiB`;
    row.append(element('td', vm.name), task, element('td', size),
      element('td', when(vm.keptAt * 1000)), element('td', when(vm.expiresAt * 1000)),
      element('td', vm.command.join(' ')));
    return row;
  }));
}

document.getElementById('submit').addEventListener('submit', async (event) => {
  event.preventDefault();
  const errors = document.getElementById('errors');
  errors.hidden = true;
  try {
    const created = await api('/api/tasks', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: document.getElementById('payload').value,
    });
    location.href = `/tasks/${created.taskId}`;
  } catch (error) {
    const lines = [error.message];
    for (const violation of (error.body && error.body.violations) || []) {
      lines.push(`${violation.pointer || '/'}: ${violation.rule}`);
    }
    errors.textContent = lines.join('\n');
    errors.hidden = false;
  }
});

filter.addEventListener('change', refresh);
refresh();
setInterval(refresh, 2000);
