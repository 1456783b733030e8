// The new-job form: base model (a served base or a path), a dataset (uploaded here, checked by the server, or one
// uploaded before), method, the main hyperparameters, what the job needs (compute), a display name. The server's
// one-line errors show inline.

import { api } from './api.js';
import { errorBox, h } from './dom.js';

const FORMATS = ['', 'alpaca', 'chat', 'sharegpt', 'completion', 'gemini', 'preference', 'text', 'prompt'];
const METHODS = [['sft', 'Supervised fine-tuning (SFT)'], ['dpo', 'Preference tuning (DPO)']];

// The managed-service request body (README, "Tuning service"); empty fields keep the server's defaults.
export function jobRequest(fields) {
  const request = { source_model: fields.source_model, train_dataset: fields.train_dataset, method: fields.method,
    hyperparameters: {} };
  if (fields.validation_dataset) request.validation_dataset = fields.validation_dataset;
  if (fields.tuned_model_display_name) request.tuned_model_display_name = fields.tuned_model_display_name;
  for (const key of ['epoch_count', 'learning_rate_multiplier', 'adapter_size', 'batch_size']) {
    if (fields[key] !== '') request.hyperparameters[key] = Number(fields[key]);
  }
  const compute = {};
  for (const key of ['gpus', 'nodes', 'cpus', 'memory_gb', 'priority']) {
    if (fields[key] !== undefined && fields[key] !== '') compute[key] = Number(fields[key]);
  }
  if (fields.time_limit) compute.time_limit = fields.time_limit.trim();
  if (Object.keys(compute).length) request.compute = compute;
  return request;
}

function field(id, label, control, hint) {
  const error = h('p', { class: 'field-error', id: `${id}-error`, role: 'alert' });
  control.setAttribute('aria-describedby', `${id}-hint ${id}-error`);
  return { error, node: h('div', { class: 'field' }, h('label', { for: id }, label), control,
    h('p', { class: 'hint', id: `${id}-hint` }, hint || ''), error) };
}

function fileLabel(file) {
  return `${file.filename} · ${file.rows ?? '?'} rows · ${file.format || 'auto'} (${file.id})`;
}

export async function render(main) {
  const [models, endpoints, files] = await Promise.all([
    api('/v1/models').catch(() => ({ data: [] })),
    api('/v1/endpoints').catch(() => ({ endpoints: [] })),
    api('/v1/files')]);
  const tuned = new Set(endpoints.endpoints.flatMap((e) => [e.model, e.name]));
  const bases = models.data.map((m) => m.id).filter((id) => !tuned.has(id) && !tuned.has(`endpoints/${id}`));

  const baseModel = h('input', { id: 'base-model', name: 'source_model', list: 'base-models', required: true,
    autocomplete: 'off', placeholder: bases[0] || '/path/to/model', value: bases.length === 1 ? bases[0] : '' });
  const dataset = h('select', { id: 'training-dataset', name: 'train_dataset', required: true });
  const validation = h('select', { id: 'validation-dataset', name: 'validation_dataset' });
  function fillDatasets(list, selected) {
    dataset.replaceChildren(h('option', { value: '' }, list.length ? 'Choose a dataset…' : 'Upload a file first'),
      ...list.map((f) => h('option', { value: f.id, selected: f.id === selected }, fileLabel(f))));
    validation.replaceChildren(h('option', { value: '' }, 'None'),
      ...list.map((f) => h('option', { value: f.id }, fileLabel(f))));
  }
  fillDatasets(files.data);
  const upload = h('input', { id: 'dataset-upload', type: 'file', accept: '.jsonl,.json,.csv,.parquet,.txt' });
  const format = h('select', { id: 'dataset-format' },
    FORMATS.map((f) => h('option', { value: f }, f || 'Detect from the rows')));
  const uploaded = h('p', { class: 'ok', 'data-testid': 'upload-status', role: 'status' });

  const fields = {
    base: field('base-model', 'Base model', baseModel, 'Pick a served base model or type a model path on the server.'),
    upload: field('dataset-upload', 'Upload a dataset', upload, 'JSON Lines, JSON, CSV or Parquet; checked on upload.'),
    format: field('dataset-format', 'Dataset format', format),
    dataset: field('training-dataset', 'Training dataset', dataset),
    validation: field('validation-dataset', 'Validation dataset (optional)', validation),
  };
  upload.addEventListener('change', async () => {
    const file = upload.files[0];
    fields.upload.error.textContent = '';
    uploaded.textContent = '';
    upload.removeAttribute('aria-invalid');
    if (!file) return;
    const form = new FormData();
    form.append('file', file);
    if (format.value) form.append('format', format.value);
    uploaded.textContent = `Uploading ${file.name}…`;
    try {
      const stored = await api('/v1/files', { method: 'POST', form });
      fillDatasets((await api('/v1/files')).data, stored.id);
      uploaded.textContent = `✓ ${fileLabel(stored)}`;
    } catch (error) {
      uploaded.textContent = '';
      fields.upload.error.textContent = error.message;
      upload.setAttribute('aria-invalid', 'true');
    }
  });

  const number = (id, name, value, attrs) => h('input', { id, name, type: 'number', value, ...attrs });
  const method = h('select', { id: 'method', name: 'method' }, METHODS.map(([v, l]) => h('option', { value: v }, l)));
  // Empty means the server's default, shown as the placeholder.
  const params = [
    field('epoch-count', 'Epochs', number('epoch-count', 'epoch_count', '', { min: 0, step: 'any', placeholder: '3' })),
    field('learning-rate-multiplier', 'Learning rate multiplier',
      number('learning-rate-multiplier', 'learning_rate_multiplier', '', { min: 0, step: 'any', placeholder: '1' })),
    field('adapter-size', 'Adapter size (LoRA rank)',
      number('adapter-size', 'adapter_size', '', { min: 1, step: 1, placeholder: '16' })),
    field('batch-size', 'Batch size', number('batch-size', 'batch_size', '', { min: 1, step: 1, placeholder: '16' })),
  ];
  const resources = [
    field('gpus', 'GPUs per node', number('gpus', 'gpus', '', { min: 0, step: 1, placeholder: 'server default' })),
    field('nodes', 'Nodes', number('nodes', 'nodes', '', { min: 1, step: 1, placeholder: '1' })),
    field('cpus', 'CPUs per process', number('cpus', 'cpus', '', { min: 1, step: 1, placeholder: 'any' })),
    field('memory-gb', 'Memory (GB per node)',
      number('memory-gb', 'memory_gb', '', { min: 0, step: 'any', placeholder: 'any' })),
    field('time-limit', 'Time limit', h('input', { id: 'time-limit', name: 'time_limit', placeholder: '2h, 30m, 1:30:00' })),
    field('priority', 'Priority', number('priority', 'priority', '', { step: 1, placeholder: '0' }),
      'Higher runs first among queued jobs.'),
  ];
  const displayName = h('input', { id: 'display-name', name: 'tuned_model_display_name', maxlength: 128,
    placeholder: 'my-tuned-model' });
  const submitError = h('div', { 'data-testid': 'submit-error' });
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Start tuning');

  const form = h('form', { class: 'card form', novalidate: true, 'aria-label': 'New tuning job' },
    h('datalist', { id: 'base-models' }, bases.map((b) => h('option', { value: b }))),
    h('fieldset', {}, h('legend', {}, 'Model'), fields.base.node,
      field('display-name', 'Display name', displayName, 'Names the tuned model and its endpoint.').node),
    h('fieldset', {}, h('legend', {}, 'Data'),
      h('div', { class: 'grid-2' }, fields.upload.node, fields.format.node), uploaded,
      h('div', { class: 'grid-2' }, fields.dataset.node, fields.validation.node)),
    h('fieldset', {}, h('legend', {}, 'Training'), field('method', 'Method', method).node,
      h('div', { class: 'grid-4' }, params.map((p) => p.node))),
    h('fieldset', {}, h('legend', {}, 'Compute'), h('div', { class: 'grid-4' }, resources.map((r) => r.node))),
    submitError,
    h('div', { class: 'actions' }, h('a', { href: '/', class: 'button' }, 'Cancel'), submit));

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    submitError.replaceChildren();
    fields.base.error.textContent = baseModel.value.trim() ? '' : 'Choose or type a base model.';
    fields.dataset.error.textContent = dataset.value ? '' : 'Upload or choose a training dataset.';
    if (!baseModel.value.trim() || !dataset.value) return;
    const values = Object.fromEntries(new FormData(form).entries());
    values.source_model = values.source_model.trim();
    submit.disabled = true;
    try {
      const job = await api('/v1/tuningJobs', { method: 'POST', json: jobRequest(values) });
      window.location.href = `/jobs/${encodeURIComponent(job.id)}`;
    } catch (error) {
      submitError.replaceChildren(errorBox(error.message));
      submit.disabled = false;
    }
  });
  main.replaceChildren(h('div', { class: 'page-head' }, h('h1', {}, 'New tuning job')), form);
}
