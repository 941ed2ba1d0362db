// The page's only way to the server: URLs relative to the page on the origin it came from
// (v1/models, v1/chat/completions, tokenize, v1/documents/extract; relative so that the page also
// works behind a proxy that serves it under a path prefix), with the API key, when the user gave
// one, sent as `Authorization: Bearer`.

const KEY_STORAGE = 'qwen-serve.apiKey';

export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function getApiKey() {
  return localStorage.getItem(KEY_STORAGE) || '';
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

function headers(extra = {}) {
  const h = { ...extra };
  const key = getApiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    const err = body.error ?? body;
    if (typeof err === 'string') message = err;
    else if (err && err.message) message = err.message;
    else if (body.detail) message = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
    code = err?.code ?? null;
  } catch {
    // The body was not JSON: keep the status line.
  }
  return new ApiError(message, response.status, code);
}

async function request(path, init = {}) {
  const response = await fetch(path, { ...init, headers: headers(init.headers) });
  if (!response.ok) throw await errorFrom(response);
  return response;
}

async function postJson(path, body, signal) {
  const response = await request(path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
    signal,
  });
  return response.json();
}

export async function listModels() {
  const body = await (await request('v1/models')).json();
  return body.data ?? [];
}

/** Token count of a prompt or of chat messages, counted by the server: {count, tokens, max_model_len}. */
export function tokenize(body, signal) {
  return postJson('tokenize', body, signal);
}

export async function extractDocument(file) {
  const form = new FormData();
  form.append('file', file, file.name);
  const response = await request('v1/documents/extract', { method: 'POST', body: form });
  return response.json();
}

/** Yields the `data:` payload of each server-sent event in a streamed response. */
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    // Line ends may be \r\n, \r or \n; a \r at the very end may be half of a \r\n, so it waits.
    const held = buffer.endsWith('\r') ? 1 : 0;
    buffer = buffer.slice(0, buffer.length - held).replace(/\r\n?/g, '\n') + buffer.slice(buffer.length - held);
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split('\n')
        .filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(5).replace(/^ /, ''))
        .join('\n');
      if (data) yield data;
    }
  }
}

/**
 * Streams one chat completion. Calls onDelta(text) per content piece and onReasoning(text) per piece of a
 * reasoning model's thinking (reasoning_content, with --reasoning-parser); returns {finishReason, usage}
 * (usage from the last chunk, asked for with stream_options.include_usage). Aborting `signal`
 * throws an AbortError, which the caller turns into a stopped reply.
 */
export async function streamChat(body, { signal, onDelta, onReasoning }) {
  const response = await request('v1/chat/completions', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  let finishReason = null;
  let usage = null;
  for await (const data of sseData(response)) {
    if (data === '[DONE]') break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(chunk.error.message ?? String(chunk.error), 500, chunk.error.code);
    if (chunk.usage) usage = chunk.usage;
    const choice = chunk.choices?.[0];
    if (!choice) continue;
    const thought = choice.delta?.reasoning_content;
    if (thought) onReasoning(thought);
    const text = choice.delta?.content;
    if (text) onDelta(text);
    if (choice.finish_reason) finishReason = choice.finish_reason;
  }
  return { finishReason, usage };
}
