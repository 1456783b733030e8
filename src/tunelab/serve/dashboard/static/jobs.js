// The jobs list: state, progress, ETA and a loss sparkline per job, refreshed every few seconds.

import { api } from './api.js';
import { sparkline } from './charts.js';
import { TERMINAL, duration, emptyState, errorBox, h, jobId, progressBar, shortState, stateBadge, when } from './dom.js';

const REFRESH_MS = 3000;
const PAGE_SIZE = 200; // the newest jobs; older ones stay reachable through the API and their pages
const STATES = ['', 'PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLING', 'CANCELLED'];
const finishedLosses = new Map(); // a finished job's curve never changes: fetch it once

async function losses(job) {
  const id = jobId(job);
  if (finishedLosses.has(id)) return finishedLosses.get(id);
  const { metrics } = await api(`/v1/tuningJobs/${encodeURIComponent(id)}/metrics`);
  const values = metrics.filter((row) => typeof row.loss === 'number').map((row) => row.loss);
  if (TERMINAL.has(shortState(job.state))) finishedLosses.set(id, values);
  return values;
}

function row(job) {
  const id = jobId(job);
  const name = job.tuned_model_display_name || id;
  const spark = h('td', { 'data-label': 'Loss' });
  losses(job).then((values) => spark.append(sparkline(values, `Training loss of ${name}`)), () => {});
  const progress = job.progress || {};
  const eta = TERMINAL.has(shortState(job.state)) ? '—' : duration(progress.eta_seconds);
  return h('tr', { 'data-testid': 'job-row', 'data-job-id': id },
    h('td', { 'data-label': 'Job' }, h('a', { href: `/jobs/${encodeURIComponent(id)}`, class: 'job-link' }, name),
      h('div', { class: 'muted mono small' }, id)),
    h('td', { 'data-label': 'State' }, stateBadge(job.state)),
    h('td', { 'data-label': 'Progress' }, progressBar(progress)),
    h('td', { 'data-label': 'ETA' }, eta),
    spark,
    h('td', { 'data-label': 'Base model' },
      h('span', { class: 'truncate', title: job.source_model || '' }, job.source_model || '—')),
    h('td', { 'data-label': 'Created' }, when(job.create_time)));
}

export async function render(main) {
  const filter = h('select', { id: 'state-filter' }, STATES.map((s) => h('option', { value: s }, s || 'All states')));
  const body = h('div', {});
  main.replaceChildren(
    h('div', { class: 'page-head' },
      h('h1', {}, 'Tuning jobs'),
      h('div', { class: 'actions' },
        h('label', { for: 'state-filter', class: 'inline-label' }, 'State'), filter,
        h('a', { href: '/new', class: 'button primary' }, 'New job'))),
    body);

  let timer = null;
  async function refresh() {
    clearTimeout(timer);
    try {
      const state = filter.value ? `&state=${filter.value}` : '';
      const { tuning_jobs: jobs } = await api(`/v1/tuningJobs?page_size=${PAGE_SIZE}${state}`);
      body.replaceChildren(jobs.length ? table(jobs) : emptyState('No tuning jobs yet.',
        h('a', { href: '/new', class: 'button primary' }, 'Start your first tuning job')));
      if (jobs.some((job) => !TERMINAL.has(shortState(job.state)))) timer = setTimeout(refresh, REFRESH_MS);
    } catch (error) {
      body.replaceChildren(errorBox(error.message));
      timer = setTimeout(refresh, REFRESH_MS * 3);
    }
  }
  filter.addEventListener('change', refresh);
  await refresh();
}

function table(jobs) {
  return h('div', { class: 'card table-card' }, h('table', { class: 'table', 'aria-label': 'Tuning jobs' },
    h('thead', {}, h('tr', {}, ['Job', 'State', 'Progress', 'ETA', 'Loss', 'Base model', 'Created']
      .map((title) => h('th', { scope: 'col' }, title)))),
    h('tbody', {}, jobs.map(row))));
}
