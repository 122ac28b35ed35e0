// Calls to the earshot API with the tab's API key, and a Server-Sent Events reader over fetch()
// (EventSource cannot send an Authorization header).

const KEY_ITEM = "earshot.apiKey";

export class AuthError extends Error {}

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let apiKey = sessionStorage.getItem(KEY_ITEM);

export const auth = {
  get key() { return apiKey; },
  set(key, remember) {
    apiKey = key;
    if (remember && key) sessionStorage.setItem(KEY_ITEM, key);
    else sessionStorage.removeItem(KEY_ITEM);
  },
  forget() { this.set(null, false); },
};

export function headers(extra = {}) {
  const out = { ...extra };
  if (apiKey) out.Authorization = `Bearer ${apiKey}`;
  return out;
}

async function errorOf(response) {
  let message = `HTTP ${response.status}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch { /* not JSON */ }
  if (response.status === 401) return new AuthError(message);
  return new ApiError(response.status, message, code);
}

// fetch() under the API key; throws AuthError on 401 and ApiError on any other error status.
export async function request(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJSON(path) {
  return (await request(path)).json();
}

export async function sendJSON(method, path, body) {
  const options = { method };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers = { "Content-Type": "application/json" };
  }
  return (await request(path, options)).json();
}

// Read a text/event-stream body; call onMessage({id, event, data, retry}) for each message.
// Resolves when the stream ends; rejects when reading fails (or the signal aborts it).
export async function readEvents(response, onMessage, onActivity = () => {}) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let message = { data: [], id: null, event: null, retry: null };
  const dispatch = () => {
    if (message.data.length || message.id !== null) {
      onMessage({ ...message, data: message.data.join("\n") });
    }
    message = { data: [], id: null, event: null, retry: null };
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    onActivity();
    buffer += value;
    let nl;
    while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
      if (line === "") { dispatch(); continue; }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? "" : line.slice(colon + 1);
      if (val.startsWith(" ")) val = val.slice(1);
      if (field === "data") message.data.push(val);
      else if (field === "id") message.id = val;
      else if (field === "event") message.event = val;
      else if (field === "retry" && /^\d+$/.test(val)) message.retry = Number(val);
    }
  }
  dispatch();
}
