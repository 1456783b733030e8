// DOM building without innerHTML (names and messages come from users), and the small formatters pages share.

export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else if (name === 'class') node.className = value;
    else node.setAttribute(name, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null && child !== false) node.append(child);
  }
  return node;
}

export const TERMINAL = new Set(['SUCCEEDED', 'FAILED', 'CANCELLED']);

export function shortState(state) {
  return (state || 'UNKNOWN').replace(/^JOB_STATE_/, '');
}

export function stateBadge(state) {
  const name = shortState(state);
  return h('span', { class: `badge badge-${name.toLowerCase()}`, 'data-testid': 'job-state' }, name);
}

export function jobId(job) {
  return job.id || (job.name || '').split('/').pop();
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return '—';
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

export function when(iso) {
  if (!iso) return '—';
  const date = new Date(iso);
  return h('time', { datetime: iso, title: date.toLocaleString() }, ago(date));
}

function ago(date) {
  const seconds = (Date.now() - date.getTime()) / 1000;
  if (seconds < 45) return 'just now';
  if (seconds < 3600 * 24) return `${duration(seconds).split(' ')[0]} ago`;
  return date.toLocaleDateString();
}

export function number(value, digits = 4) {
  return typeof value === 'number' ? +value.toPrecision(digits) + '' : String(value ?? '—');
}

export function progressBar(progress) {
  const { step = 0, total_steps: total } = progress || {};
  const fraction = total ? Math.min(1, step / total) : 0;
  return h('div', { class: 'progress', role: 'progressbar', 'aria-label': 'Progress', 'aria-valuemin': 0,
    'aria-valuemax': total || 0, 'aria-valuenow': step, 'data-testid': 'job-progress' },
  h('div', { class: 'progress-fill', style: `width:${(fraction * 100).toFixed(1)}%` }),
  h('span', { class: 'progress-text' }, total ? `${step} / ${total}` : `${step}`));
}

export function emptyState(text, ...actions) {
  return h('div', { class: 'empty' }, h('p', {}, text), ...actions);
}

export function errorBox(message) {
  return h('p', { class: 'error-box', role: 'alert' }, message);
}
