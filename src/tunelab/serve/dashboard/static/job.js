// One job: its state and progress, live loss curves (SSE `events` stream on top of `/metrics`), the log tail, a
// cancel button, its config, and once it succeeded the endpoint with a chat playground and the job's checkpoints
// (each can be chatted with).

import { api } from './api.js';
import { lineChart } from './charts.js';
import { TERMINAL, duration, errorBox, h, number, progressBar, shortState, stateBadge, when } from './dom.js';
import { checkpointsCard } from './checkpoints.js';
import { playground } from './playground.js';

const LOG_LINES = 400;
const COLOURS = { loss: '#4f46e5', eval_loss: '#db2777' };

export async function render(main, id) {
  const base = `/v1/tuningJobs/${encodeURIComponent(id)}`;
  let job;
  try {
    job = await api(base);
  } catch (error) {
    main.replaceChildren(h('h1', {}, 'Job not found'), errorBox(error.message));
    return;
  }
  const head = h('div', { class: 'page-head' });
  const stats = h('div', { class: 'stats' });
  const problem = h('div', {});
  const trainChart = h('figure', { class: 'card chart-card', 'data-testid': 'chart-train' });
  const evalChart = h('figure', { class: 'card chart-card', 'data-testid': 'chart-eval' });
  const endpoint = h('section', { class: 'endpoint', 'aria-label': 'Endpoint' });
  const checkpoints = h('div', {});
  const log = h('pre', { class: 'log', 'data-testid': 'job-log', tabindex: 0, 'aria-label': 'Log tail' });
  const config = h('pre', { class: 'config mono' });
  main.replaceChildren(head, problem, stats,
    h('div', { class: 'charts' }, trainChart, evalChart),
    endpoint,
    checkpoints,
    h('section', { class: 'card' }, h('h2', {}, 'Log'), log),
    h('section', { class: 'card' }, h('details', {}, h('summary', {}, 'Resolved config'), config)));

  const rows = new Map(); // metrics rows by their text: the stream may repeat rows we already fetched
  function addMetrics(row) {
    rows.set(JSON.stringify(row), row);
  }
  function drawCharts() {
    const series = (key) => [...rows.values()].filter((r) => typeof r[key] === 'number').map((r) => [r.step, r[key]])
      .sort((a, b) => a[0] - b[0]);
    trainChart.replaceChildren(h('figcaption', {}, 'Training loss'),
      lineChart([{ name: 'loss', points: series('loss'), colour: COLOURS.loss }], { title: 'Training loss' }));
    evalChart.replaceChildren(h('figcaption', {}, 'Evaluation loss'),
      lineChart([{ name: 'eval_loss', points: series('eval_loss'), colour: COLOURS.eval_loss, markers: true }],
        { title: 'Evaluation loss' }));
  }
  function appendLog(lines) {
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = (log.textContent + lines).split('\n').slice(-LOG_LINES).join('\n');
    if (atBottom) log.scrollTop = log.scrollHeight;
  }
  function show(next) {
    job = next;
    drawHead(head, job, base, show);
    drawStats(stats, job);
    problem.replaceChildren(...(job.error && job.error.message ? [errorBox(job.error.message)] : []));
    config.textContent = JSON.stringify(job.config || {}, null, 2);
    if (job.tuned_model && !endpoint.hasChildNodes()) {
      const chat = playground(job);
      endpoint.append(chat);
      checkpointsCard(job, (name) => { chat.chooseModel(name); chat.scrollIntoView(); })
        .then((card) => checkpoints.replaceChildren(...(card ? [card] : [])));
    }
  }

  show(job);
  if (TERMINAL.has(shortState(job.state))) {
    const [{ metrics }, logText] = await Promise.all([api(`${base}/metrics`), api(`${base}/logs?tail=${LOG_LINES}`)]);
    metrics.forEach(addMetrics);
    drawCharts();
    appendLog(logText);
    return;
  }
  // A live job: the stream replays the job's events from the first, then follows it until it ends.
  drawCharts();
  const events = new EventSource(`${base}/events`);
  let metricsPending = false;
  events.addEventListener('state', (event) => show(JSON.parse(event.data)));
  events.addEventListener('metrics', (event) => {
    addMetrics(JSON.parse(event.data));
    if (!metricsPending) { // one redraw per frame, not one per replayed row
      metricsPending = true;
      requestAnimationFrame(() => { metricsPending = false; drawCharts(); });
    }
  });
  events.addEventListener('log', (event) => appendLog(`${JSON.parse(event.data)}\n`));
  // The server ends the stream after the job's last event; without this the browser would reconnect forever.
  events.addEventListener('error', () => { if (TERMINAL.has(shortState(job.state))) events.close(); });
  window.addEventListener('pagehide', () => events.close());
}

function drawHead(head, job, base, show) {
  const id = job.id;
  const cancellable = !TERMINAL.has(shortState(job.state)) && shortState(job.state) !== 'CANCELLING';
  const cancel = h('button', { type: 'button', class: 'danger', disabled: !cancellable,
    onclick: async () => {
      if (!confirm(`Cancel job ${id}?`)) return;
      cancel.disabled = true;
      try { show(await api(`${base}:cancel`, { method: 'POST' })); } catch (error) { alert(error.message); }
    } }, 'Cancel job');
  head.replaceChildren(
    h('div', {}, h('h1', {}, job.tuned_model_display_name || id, ' ', stateBadge(job.state)),
      h('div', { class: 'muted mono small' }, job.name || id)),
    h('div', { class: 'actions' }, cancel));
}

function drawStats(stats, job) {
  const progress = job.progress || {};
  const latest = job.latest_metrics || {};
  const best = job.best_metrics || {};
  const terminal = TERMINAL.has(shortState(job.state));
  const elapsed = job.start_time
    ? ((job.end_time ? new Date(job.end_time) : new Date()) - new Date(job.start_time)) / 1000 : null;
  const stat = (label, value, testid) => h('div', { class: 'stat', 'data-testid': testid },
    h('div', { class: 'stat-label' }, label), h('div', { class: 'stat-value' }, value));
  stats.replaceChildren(
    stat('Progress', progressBar(progress)),
    stat('Epoch', progress.epoch !== undefined ? number(progress.epoch, 3) : '—'),
    stat('ETA', terminal ? '—' : duration(progress.eta_seconds), 'job-eta'),
    stat('Elapsed', duration(elapsed)),
    stat('Loss', number(latest.loss), 'job-loss'),
    stat('Best eval loss', number(best.eval_loss)),
    stat('Method', job.method || '—'),
    stat('Base model', h('span', { class: 'truncate', title: job.source_model || '' }, job.source_model || '—')),
    stat('Training data', h('span', { class: 'mono small' }, job.train_dataset || '—')),
    stat('Validation data', h('span', { class: 'mono small' }, job.validation_dataset || '—')),
    stat('Created', when(job.create_time)),
    stat('Attempt', job.attempt ?? '—'),
    stat('Runs on', where(job.backend), 'job-backend'));
}

// "slurm job 1234 · node01 · GPUs 0,1": the backend, its own id for the job, the nodes and GPU ids.
function where(backend) {
  if (!backend) return '—';
  const parts = [`${backend.name}${backend.job_id ? ` job ${backend.job_id}` : ''}`];
  if (backend.nodes.length) parts.push(backend.nodes.join(', '));
  if (backend.gpus.length) parts.push(`GPU${backend.gpus.length > 1 ? 's' : ''} ${backend.gpus.join(',')}`);
  return h('span', { class: 'mono small' }, parts.join(' · '));
}
