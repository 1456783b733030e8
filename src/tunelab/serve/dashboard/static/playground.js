// A succeeded job's endpoint: its name, how to call it, and a chat playground streaming from
// POST /v1/chat/completions (OpenAI's server-sent chunks, `data: {...}` ... `data: [DONE]`). The returned element's
// chooseModel(name) points the playground at another model, e.g. one of the job's checkpoints.

import { request } from './api.js';
import { h } from './dom.js';

export function playground(job) {
  let model = job.tuned_model_endpoint_name || (job.tuned_model && job.tuned_model.endpoint);
  const messages = [];
  const chatModel = h('p', { class: 'muted small mono', 'data-testid': 'chat-model' }, model);
  const transcript = h('div', { class: 'transcript', role: 'log', 'aria-live': 'polite', 'aria-label': 'Conversation',
    'data-testid': 'chat-transcript' });
  const input = h('textarea', { id: 'chat-message', rows: 2, required: true, placeholder: 'Ask the tuned model…' });
  const temperature = h('input', { id: 'chat-temperature', type: 'number', min: 0, max: 2, step: 0.1, value: 0 });
  const maxTokens = h('input', { id: 'chat-max-tokens', type: 'number', min: 1, max: 4096, value: 64 });
  const send = h('button', { type: 'submit', class: 'primary' }, 'Send');
  const status = h('p', { class: 'field-error', role: 'alert' });

  async function submit(event) {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    messages.push({ role: 'user', content: text });
    transcript.append(bubble('user', text));
    const reply = bubble('assistant', '');
    reply.classList.add('pending');
    transcript.append(reply);
    input.value = '';
    send.disabled = true;
    status.textContent = '';
    try {
      const answer = await stream({ model, messages, stream: true, temperature: Number(temperature.value),
        max_tokens: Number(maxTokens.value) }, (piece) => {
        reply.querySelector('.bubble-text').textContent += piece;
        transcript.scrollTop = transcript.scrollHeight;
      });
      messages.push({ role: 'assistant', content: answer });
    } catch (error) {
      messages.pop();
      reply.remove();
      status.textContent = error.message;
    } finally {
      reply.classList.remove('pending');
      reply.setAttribute('data-testid', 'chat-reply');
      send.disabled = false;
      input.focus();
    }
  }

  const origin = window.location.origin;
  const example = `curl ${origin}/v1/chat/completions -H 'Content-Type: application/json' \\\n` +
    `  -d '{"model": "${model}", "messages": [{"role": "user", "content": "Hello"}]}'`;
  const element = h('div', { class: 'grid-2' },
    h('div', { class: 'card' },
      h('h2', {}, 'Endpoint'),
      h('p', { class: 'mono', 'data-testid': 'endpoint-name' }, model),
      h('p', { class: 'muted small' }, job.tuned_model.adapter ? 'LoRA adapter on ' : 'Full model from ',
        job.source_model || 'the base model'),
      h('p', { class: 'muted small' }, 'OpenAI-compatible: point any OpenAI client at ', h('code', {}, `${origin}/v1`),
        ' and use this model name.'),
      h('pre', { class: 'snippet' }, example)),
    h('div', { class: 'card playground', id: 'playground' },
      h('h2', {}, 'Chat playground'),
      chatModel,
      transcript,
      h('form', { onsubmit: submit, class: 'chat-form' },
        h('label', { for: 'chat-message' }, 'Message'), input,
        h('div', { class: 'row' },
          h('div', {}, h('label', { for: 'chat-temperature' }, 'Temperature'), temperature),
          h('div', {}, h('label', { for: 'chat-max-tokens' }, 'Max tokens'), maxTokens),
          h('div', { class: 'row-end' },
            h('button', { type: 'button', onclick: () => { messages.length = 0; transcript.replaceChildren(); } },
              'Clear'),
            send)),
        status)));
  element.chooseModel = (name) => {
    model = name;
    chatModel.textContent = name;
    messages.length = 0;
    transcript.replaceChildren();
    input.focus();
  };
  return element;
}

function bubble(role, text) {
  return h('div', { class: `bubble bubble-${role}` },
    h('div', { class: 'bubble-role' }, role === 'user' ? 'You' : 'Model'), h('div', { class: 'bubble-text' }, text));
}

// Reads the chunk stream, calling onPiece with each content delta; resolves to the whole reply.
async function stream(body, onPiece) {
  const response = await request('/v1/chat/completions', { method: 'POST', json: body });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let answer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return answer;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, '');
      const data = block.split(/\r?\n/).filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(5).trimStart()).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return answer;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || 'generation failed');
      const piece = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta || {}).content || '';
      answer += piece;
      if (piece) onPiece(piece);
    }
  }
}
