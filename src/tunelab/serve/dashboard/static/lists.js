// The endpoints page (tuned models being served) and the datasets page (uploaded files).

import { api } from './api.js';
import { emptyState, errorBox, h, when } from './dom.js';

function table(label, columns, rows) {
  return h('div', { class: 'card table-card' }, h('table', { class: 'table', 'aria-label': label },
    h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col' }, c)))),
    h('tbody', {}, rows.map((cells) => h('tr', {}, cells.map((cell, i) => h('td', { 'data-label': columns[i] }, cell)))))));
}

export async function renderEndpoints(main) {
  const head = h('div', { class: 'page-head' }, h('h1', {}, 'Endpoints'));
  const { endpoints } = await api('/v1/endpoints');
  const rows = endpoints.map((e) => [
    h('div', {}, h('strong', {}, e.display_name || e.model), h('div', { class: 'muted mono small' }, e.name)),
    h('code', {}, e.model),
    h('span', { class: 'truncate', title: e.source_model || '' }, e.source_model || '—'),
    e.adapter ? h('span', { class: 'badge badge-neutral' }, 'LoRA adapter') : 'Full model',
    when(e.create_time),
    e.job_id ? h('a', { href: `/jobs/${encodeURIComponent(e.job_id)}#playground` }, 'Open playground') : '—',
  ]);
  main.replaceChildren(head, endpoints.length
    ? table('Endpoints', ['Endpoint', 'Model name', 'Base model', 'Kind', 'Created', ''], rows)
    : emptyState('No endpoints yet: a tuning job that succeeds gets one.',
      h('a', { href: '/new', class: 'button primary' }, 'New job')));
}

export async function renderDatasets(main) {
  const upload = h('input', { id: 'dataset-file', type: 'file', accept: '.jsonl,.json,.csv,.parquet,.txt' });
  const error = h('p', { class: 'field-error', id: 'dataset-file-error', role: 'alert' });
  const body = h('div', {});
  async function refresh() {
    const { data } = await api('/v1/files');
    body.replaceChildren(data.length
      ? table('Datasets', ['File', 'ID', 'Rows', 'Format', 'Size', 'Uploaded'], data.map((f) => [
        h('strong', {}, f.filename), h('code', {}, f.id), String(f.rows ?? '—'), f.format || '—', size(f.bytes),
        when(typeof f.created_at === 'number' ? new Date(f.created_at * 1000).toISOString() : f.created_at)]))
      : emptyState('No datasets uploaded yet.'));
  }
  upload.setAttribute('aria-describedby', 'dataset-file-error');
  upload.addEventListener('change', async () => {
    error.textContent = '';
    if (!upload.files[0]) return;
    const form = new FormData();
    form.append('file', upload.files[0]);
    try {
      await api('/v1/files', { method: 'POST', form });
      upload.value = '';
      await refresh();
    } catch (e) {
      error.textContent = e.message;
    }
  });
  main.replaceChildren(
    h('div', { class: 'page-head' }, h('h1', {}, 'Datasets'),
      h('div', { class: 'upload-inline' }, h('label', { for: 'dataset-file' }, 'Upload a dataset'), upload, error)),
    body);
  await refresh().catch((e) => body.replaceChildren(errorBox(e.message)));
}

function size(bytes) {
  if (typeof bytes !== 'number') return '—';
  const units = ['B', 'KB', 'MB', 'GB'];
  let i = 0;
  let v = bytes;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${i ? v.toFixed(1) : v} ${units[i]}`;
}
