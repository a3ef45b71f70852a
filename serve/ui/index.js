// The task list and the submit form.
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
  showHealth();
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
