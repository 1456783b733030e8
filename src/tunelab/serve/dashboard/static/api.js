// Calls to the JSON API. A 401 asks for the API key once (all waiting calls share the prompt), hands it to the
// server, which keeps it as an HttpOnly cookie its middleware accepts (a wrong key is not kept), and retries; any
// other error becomes an ApiError carrying the server's one-line message.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let keyPrompt = null;

// The JSON (or text) body of a successful call.
export async function api(path, options = {}) {
  const response = await request(path, options);
  return (response.headers.get('content-type') || '').includes('json') ? response.json() : response.text();
}

// The successful response itself, for callers that read a stream.
export async function request(path, { method = 'GET', json, form } = {}) {
  for (let attempt = 0; ; attempt++) {
    const init = { method, credentials: 'same-origin', headers: {} };
    if (json !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(json);
    } else if (form !== undefined) {
      init.body = form;
    }
    const response = await fetch(path, init);
    if (response.status === 401 && attempt < 5) {
      await askForKey(attempt > 0 ? 'The server refused this key.' : '');
      continue;
    }
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    return response;
  }
}

export async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return body.error.message;
    if (body && body.detail) return typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
  } catch (_) { /* not JSON: the text itself */ }
  return text.split('\n')[0] || `HTTP ${response.status}`;
}

function askForKey(problem) {
  if (keyPrompt) return keyPrompt;
  const dialog = document.getElementById('key-dialog');
  const input = document.getElementById('key-input');
  document.getElementById('key-error').textContent = problem;
  keyPrompt = new Promise((resolve) => {
    dialog.addEventListener('close', async function saved() {
      const key = input.value.trim();
      // Cookie values cannot carry ; , " \ or spaces; API keys are tokens, so refuse rather than mangle one.
      if (!/^[!#-+\--:<-\[\]-~]+$/.test(key)) {
        document.getElementById('key-error').textContent = key ? 'An API key has no spaces, ; , " or \\.' : '';
        dialog.showModal();
        return;
      }
      dialog.removeEventListener('close', saved);
      input.value = '';
      // A refused key leaves no cookie: the retry then asks again, saying the server refused it.
      await fetch('/dashboard/key', {
        method: 'POST', credentials: 'same-origin', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ key }),
      }).catch(() => {}); // unreachable server: the retry reports it
      keyPrompt = null;
      resolve();
    });
  });
  dialog.showModal();
  input.focus();
  return keyPrompt;
}
