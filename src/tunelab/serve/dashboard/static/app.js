// Picks the page for the URL and renders it into <main>. Navigation is plain links: every page is a full load.

import { errorBox, h } from './dom.js';
import { render as renderJobs } from './jobs.js';
import { render as renderJob } from './job.js';
import { render as renderNewJob } from './newjob.js';
import { renderDatasets, renderEndpoints } from './lists.js';

const PAGES = [
  [/^\/$/, 'jobs', renderJobs, 'Jobs'],
  [/^\/new$/, 'new', renderNewJob, 'New job'],
  [/^\/endpoints$/, 'endpoints', renderEndpoints, 'Endpoints'],
  [/^\/datasets$/, 'datasets', renderDatasets, 'Datasets'],
  [/^\/jobs\/([^/]+)$/, 'jobs', renderJob, 'Job'],
];

async function main() {
  const root = document.getElementById('main');
  const path = window.location.pathname.replace(/\/+$/, '') || '/';
  const page = PAGES.find(([pattern]) => pattern.test(path));
  if (!page) {
    root.replaceChildren(h('h1', {}, 'Page not found'), h('p', {}, h('a', { href: '/' }, 'Back to the jobs')));
    return;
  }
  const [pattern, nav, render, title] = page;
  const param = path.match(pattern)[1];
  document.title = `${param ? decodeURIComponent(param) : title} · tunelab`;
  for (const link of document.querySelectorAll('nav a')) {
    if (link.dataset.page === nav) link.setAttribute('aria-current', 'page');
  }
  try {
    await render(root, param && decodeURIComponent(param));
    root.setAttribute('data-ready', 'true');
  } catch (error) {
    root.append(errorBox(error.message));
  }
}

main();
