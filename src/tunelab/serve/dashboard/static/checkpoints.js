// A job's saved checkpoints (GET /v1/fine_tuning/jobs/{id}/checkpoints, newest first) with their metrics; each
// one's Chat button points the playground at that checkpoint's model name.

import { api } from './api.js';
import { h, number } from './dom.js';

export async function checkpointsCard(job, chooseModel) {
  let list;
  try {
    list = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/checkpoints?limit=100`);
  } catch (_) {
    return null; // no checkpoints route or none readable: the page goes on without the card
  }
  if (!list.data.length) return null;
  const served = job.state === 'JOB_STATE_SUCCEEDED' && job.tuned_model && job.tuned_model.adapter;
  const callable = (name) => served && name.startsWith('ft:'); // OpenAI-style jobs' checkpoints are models
  const rows = list.data.map((c) => h('tr', { 'data-testid': 'checkpoint-row' },
    h('td', {}, String(c.step_number)),
    h('td', {}, number(c.metrics.train_loss)),
    h('td', {}, number(c.metrics.valid_loss)),
    h('td', { class: 'mono small' }, c.fine_tuned_model_checkpoint),
    h('td', {}, callable(c.fine_tuned_model_checkpoint)
      ? h('button', { type: 'button', onclick: () => chooseModel(c.fine_tuned_model_checkpoint) }, 'Chat') : '—')));
  return h('section', { class: 'card', 'aria-label': 'Checkpoints' },
    h('h2', {}, 'Checkpoints'),
    h('table', { class: 'table' },
      h('thead', {}, h('tr', {}, ...['Step', 'Train loss', 'Valid loss', 'Model', ''].map((t) => h('th', {}, t)))),
      h('tbody', {}, ...rows)));
}
