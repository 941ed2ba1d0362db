// The chat page: conversation list, the branch on screen, the composer and the settings panel.
// State lives in IndexedDB (db.js); the server is reached only through api.js.

import * as api from './api.js';
import * as db from './db.js';
import { fitContext } from './context.js';
import { copyText, renderJson, renderMarkdown } from './markdown.js';
import { apiMessages, pathTo, siblingInfo, siblingLeaf } from './tree.js';

const $ = (id) => document.getElementById(id);

const DEFAULT_SETTINGS = {
  systemPrompt: '',
  presetId: '',
  temperature: 0.7,
  top_p: 0.8,
  max_tokens: 1024,
  contextLength: null, // null: the server's max_model_len
  jsonMode: false,
  model: '',
};
const FALLBACK_MAX_LEN = 32768;
const NARROW = window.matchMedia('(max-width: 800px)');

const state = {
  conversations: [], // rows from IndexedDB, newest first
  conv: null, // the conversation on screen
  unsaved: true, // the conversation on screen has no turns yet, so it is not stored
  msgs: new Map(), // its messages by id
  models: [],
  maxModelLen: null,
  presets: [],
  pendingDocs: [], // documents attached to the message being written: {name, text, chars, tokens}
  drafts: new Map(), // conversation id -> {text, docs}: what was being written in a chat left unsent
  generation: null, // {controller, id, done: Promise} while a reply streams
  needsKey: false, // the server answered 401: the API-key field keeps the focus
  contextSeq: 0,
};

// ---------- helpers ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const SVG_NS = 'http://www.w3.org/2000/svg';
const PENCIL = 'M4 20h4L19 9l-4-4L4 16zM14 6l4 4';
const TRASH = 'M4 7h16M9 7V4h6v3M6 7l1 13h10l1-13';

/** A line icon drawn from one SVG path (built with DOM calls, no markup strings). */
function icon(d) {
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  const path = document.createElementNS(SVG_NS, 'path');
  path.setAttribute('d', d);
  svg.append(path);
  return svg;
}

const fmt = (n) => Number(n).toLocaleString('en-US');

function showBanner(text, kind = 'error') {
  const banner = $('banner');
  banner.textContent = text;
  banner.dataset.kind = kind;
  banner.hidden = !text;
}

function dialog(text, { value = null } = {}) {
  const d = $('dialog');
  $('dialog-text').textContent = text;
  const input = $('dialog-input');
  input.hidden = value === null;
  input.value = value ?? '';
  d.returnValue = '';
  d.showModal();
  if (value !== null) input.select();
  return new Promise((resolve) => {
    d.addEventListener(
      'close',
      () => {
        if (d.returnValue !== 'ok') resolve(null);
        else resolve(value === null ? true : input.value.trim());
      },
      { once: true },
    );
  });
}

/** `fn` called `ms` after the last call; `.flush()` calls a pending one now. */
function debounce(fn, ms) {
  let t = null;
  let pending = null;
  const call = (...args) => {
    clearTimeout(t);
    pending = args;
    t = setTimeout(() => call.flush(), ms);
  };
  call.flush = () => {
    clearTimeout(t);
    if (pending === null) return;
    const args = pending;
    pending = null;
    fn(...args);
  };
  return call;
}

// ---------- conversations ----------

function blankConversation() {
  const now = Date.now();
  const convId = db.newId();
  const root = { id: db.newId(), convId, role: 'root', content: '', parent: null, children: [], createdAt: now };
  // A new chat starts from the settings of the one on screen (each chat then keeps its own copy).
  const settings = state.conv ? { ...state.conv.settings } : { ...DEFAULT_SETTINGS, model: state.models[0]?.id ?? '' };
  const conv = { id: convId, name: 'New chat', createdAt: now, lastModified: now, rootId: root.id, currNode: root.id, settings };
  return { conv, msgs: new Map([[root.id, root]]) };
}

/** Keeps the composer's text and attachments with the chat being left (or forgets them, both empty). */
function keepDraft() {
  const id = state.conv?.id;
  if (!id) return;
  const text = $('input').value;
  if (text || state.pendingDocs.length) state.drafts.set(id, { text, docs: state.pendingDocs });
  else state.drafts.delete(id);
}

/** Puts the chat's kept draft, if any, back in the composer. */
function restoreDraft(id) {
  const draft = state.drafts.get(id);
  $('input').value = draft?.text ?? '';
  state.pendingDocs = draft?.docs ?? [];
  autosize();
}

function newConversation() {
  if (state.generation) return;
  saveSettings.flush(); // a setting changed just now belongs to the chat being left
  keepDraft();
  const { conv, msgs } = blankConversation();
  state.conv = conv;
  state.msgs = msgs;
  state.unsaved = true;
  restoreDraft(conv.id);
  showConversation();
  closeDrawers();
  if (!state.needsKey) $('input').focus();
}

async function openConversation(id) {
  if (state.generation || state.conv?.id === id) return closeDrawers();
  const conv = state.conversations.find((c) => c.id === id);
  if (!conv) return;
  saveSettings.flush();
  const messages = await db.getMessages(id);
  keepDraft();
  state.conv = { ...conv, settings: { ...DEFAULT_SETTINGS, ...conv.settings } };
  state.msgs = new Map(messages.map((m) => [m.id, m]));
  state.unsaved = false;
  restoreDraft(id);
  showConversation();
  closeDrawers();
}

/** Stores the conversation and the given messages (all of them the first time it is stored). */
async function persist(changed = []) {
  const conv = state.conv;
  conv.lastModified = Date.now();
  const messages = state.unsaved ? [...state.msgs.values()] : changed;
  state.unsaved = false;
  await db.save(conv, messages);
  await refreshConversationList();
}

async function refreshConversationList() {
  state.conversations = await db.listConversations();
  renderConversationList();
}

function renderConversationList() {
  const query = $('conv-search').value.trim().toLowerCase();
  const list = $('conv-list');
  list.replaceChildren();
  for (const c of state.conversations) {
    if (query && !c.name.toLowerCase().includes(query)) continue;
    const item = el(
      'li',
      { class: `conv-item${c.id === state.conv?.id ? ' active' : ''}`, 'data-id': c.id },
      el('button', { class: 'conv-open', type: 'button', title: c.name, text: c.name, onclick: () => openConversation(c.id) }),
      el('button', { class: 'conv-rename small-btn', type: 'button', title: 'Rename', 'aria-label': `Rename ${c.name}`, onclick: () => renameConversation(c.id) }, icon(PENCIL)),
      el('button', { class: 'conv-delete small-btn', type: 'button', title: 'Delete', 'aria-label': `Delete ${c.name}`, onclick: () => deleteConversation(c.id) }, icon(TRASH)),
    );
    list.append(item);
  }
  if (!list.children.length) {
    list.append(el('li', { class: 'conv-empty', text: query ? 'No conversation matches.' : 'No conversations yet.' }));
  }
}

async function renameConversation(id) {
  const conv = state.conversations.find((c) => c.id === id);
  const name = await dialog('Rename the conversation', { value: conv.name });
  if (!name) return;
  conv.name = name;
  if (state.conv?.id === id) {
    state.conv.name = name;
    showTitle();
  }
  await db.save({ ...conv, name }, []);
  await refreshConversationList();
}

async function deleteConversation(id) {
  const conv = state.conversations.find((c) => c.id === id);
  if (!(await dialog(`Delete "${conv.name}"? This cannot be undone.`))) return;
  if (state.generation && state.conv?.id === id) {
    // Let the stopped reply be stored first, so it cannot bring the deleted chat back.
    state.generation.controller.abort();
    await state.generation.done;
  }
  // Leave the chat before deleting it: leaving stores a settings change still pending for it (they are
  // stored 300 ms after the last change), so no save of it can come after the deletion and bring it back.
  if (state.conv?.id === id) newConversation();
  state.drafts.delete(id);
  await db.deleteConversation(id);
  await refreshConversationList();
}

// ---------- export / import ----------

async function exportConversations() {
  const conversations = [];
  for (const c of await db.listConversations()) conversations.push({ ...c, messages: await db.getMessages(c.id) });
  const data = { format: 'qwen-serve-conversations', version: 1, exportedAt: new Date().toISOString(), conversations };
  const blob = new Blob([JSON.stringify(data, null, 2)], { type: 'application/json' });
  const url = URL.createObjectURL(blob);
  const a = el('a', { href: url, download: `qwen-serve-chats-${new Date().toISOString().slice(0, 10)}.json` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/** Imports conversations with fresh ids, so importing the same file twice never overwrites. */
async function importConversations(file) {
  let data;
  try {
    data = JSON.parse(await file.text());
  } catch (e) {
    return showBanner(`${file.name} is not JSON: ${e.message}`);
  }
  const list = Array.isArray(data) ? data : data?.conversations;
  if (!Array.isArray(list)) return showBanner(`${file.name} holds no "conversations" list.`);
  let imported = 0;
  for (const c of list) {
    if (!c || !Array.isArray(c.messages) || !c.messages.some((m) => m.role === 'root')) continue;
    const ids = new Map(c.messages.map((m) => [m.id, db.newId()]));
    const convId = db.newId();
    const messages = c.messages.map((m) => ({
      ...m,
      id: ids.get(m.id),
      convId,
      parent: m.parent == null ? null : ids.get(m.parent) ?? null,
      children: (m.children ?? []).map((k) => ids.get(k)).filter(Boolean),
    }));
    const root = messages.find((m) => m.role === 'root');
    const { messages: _drop, ...rest } = c;
    const conv = {
      ...rest,
      id: convId,
      name: String(c.name ?? 'Imported chat'),
      rootId: root.id,
      currNode: ids.get(c.currNode) ?? root.id,
      lastModified: Number(c.lastModified) || Date.now(),
      settings: { ...DEFAULT_SETTINGS, ...(c.settings ?? {}) },
    };
    await db.save(conv, messages);
    imported += 1;
  }
  await refreshConversationList();
  showBanner(imported ? `Imported ${imported} conversation${imported > 1 ? 's' : ''}.` : `No conversations found in ${file.name}.`, imported ? 'info' : 'error');
}

// ---------- the thread ----------

function addChild(parentId, fields) {
  const parent = state.msgs.get(parentId);
  const m = { id: db.newId(), convId: state.conv.id, parent: parentId, children: [], createdAt: Date.now(), ...fields };
  state.msgs.set(m.id, m);
  parent.children.push(m.id);
  return [m, parent];
}

/** A chat saved under a model the server no longer serves switches to the first one it does. */
function ensureServedModel() {
  const ids = state.models.map((m) => m.id);
  if (ids.length && !ids.includes(state.conv.settings.model)) state.conv.settings.model = ids[0];
}

function showTitle() {
  $('conv-title').textContent = state.conv.name;
  document.title = `${state.conv.name} · qwen-serve`;
}

function showConversation() {
  ensureServedModel();
  showTitle();
  fillSettings();
  renderThread();
  renderAttachments();
  renderConversationList();
  refreshContext();
}

function statsText(stats) {
  if (!stats) return '';
  const parts = [];
  if (stats.tokens != null) parts.push(`${stats.estimated ? '~' : ''}${fmt(stats.tokens)} tokens`);
  if (stats.tokensPerSecond != null) parts.push(`${stats.tokensPerSecond.toFixed(1)} tok/s`);
  if (stats.ttftMs != null) parts.push(`TTFT ${fmt(Math.round(stats.ttftMs))} ms`);
  parts.push(`finish: ${stats.finishReason ?? 'unknown'}`);
  return parts.join(' · ');
}

/** A reasoning model's thinking, collapsed under a line with its length; kept open if the user opened it. */
function thinkingView(m, streaming, wasOpen) {
  const label = `${streaming && !m.content ? 'Thinking' : 'Thought'} · ${fmt(m.reasoning.length)} characters`;
  const details = el('details', { class: 'thinking' }, el('summary', { text: label }), el('div', { class: 'thinking-text', text: m.reasoning }));
  details.open = wasOpen;
  return details;
}

function renderContent(container, m) {
  const streaming = state.generation?.id === m.id;
  if (m.role !== 'assistant') {
    container.textContent = m.content;
    return;
  }
  const wasOpen = container.querySelector(':scope > details.thinking')?.open ?? false;
  const answer = el('div', { class: 'answer' });
  if (m.jsonMode && !streaming) {
    container.dataset.jsonValid = String(renderJson(answer, m.content));
  } else if (m.jsonMode) {
    answer.replaceChildren(el('pre', {}, el('code', { text: m.content })));
  } else {
    renderMarkdown(answer, m.content);
  }
  if (streaming) answer.append(el('span', { class: 'cursor', 'aria-hidden': 'true' }));
  container.replaceChildren(...(m.reasoning ? [thinkingView(m, streaming, wasOpen)] : []), answer);
}

function switcher(m) {
  const { index, count } = siblingInfo(state.msgs, m);
  if (count < 2) return null;
  const go = (delta) => () => {
    const leaf = siblingLeaf(state.msgs, m, delta);
    if (leaf === null || state.generation) return;
    state.conv.currNode = leaf;
    renderThread();
    persist([]);
    refreshContext();
  };
  return el(
    'span',
    { class: 'switcher' },
    el('button', { class: 'sib-prev small-btn', type: 'button', 'aria-label': 'Previous branch', text: '<', onclick: go(-1) }),
    el('span', { class: 'sib-pos', text: `${index}/${count}` }),
    el('button', { class: 'sib-next small-btn', type: 'button', 'aria-label': 'Next branch', text: '>', onclick: go(1) }),
  );
}

function docChips(docs) {
  if (!docs?.length) return null;
  return el('div', { class: 'doc-chips' }, ...docs.map((d) => el('span', { class: 'doc-chip', title: d.name }, `${d.name} · ${fmt(d.tokens ?? 0)} tokens`)));
}

function messageView(m) {
  const busy = Boolean(state.generation);
  const content = el('div', { class: 'content' });
  renderContent(content, m);
  const actions = el('span', { class: 'actions' });
  if (m.role === 'user') {
    actions.append(el('button', { class: 'edit-btn small-btn', type: 'button', text: 'Edit', onclick: () => startEdit(m.id) }));
  } else {
    actions.append(
      el('button', { class: 'copy-btn small-btn', type: 'button', text: 'Copy', onclick: (e) => copyText(m.content).then(() => { e.target.textContent = 'Copied'; }) }),
      el('button', { class: 'regen-btn small-btn', type: 'button', text: 'Regenerate', onclick: () => regenerate(m.id) }),
    );
  }
  for (const b of actions.querySelectorAll('button')) if (busy && !b.classList.contains('copy-btn')) b.disabled = true;
  return el(
    'article',
    { class: `msg ${m.role}`, 'data-id': m.id },
    el('div', { class: 'msg-head' }, el('span', { class: 'role', text: m.role === 'user' ? 'You' : m.model || 'Assistant' }), switcher(m)),
    docChips(m.docs),
    content,
    m.error ? el('div', { class: 'msg-error', text: m.error }) : null,
    el('div', { class: 'msg-foot' }, el('span', { class: 'stats', text: statsText(m.stats) }), actions),
  );
}

function renderThread() {
  const box = $('messages');
  const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  const path = pathTo(state.msgs, state.conv.currNode);
  if (!path.length) {
    box.replaceChildren(
      el('div', { class: 'empty' },
        el('h2', { text: 'Start a conversation' }),
        el('p', { text: 'Ask anything, or attach a TXT, MD, PDF or DOCX document and ask about it. Enter sends, Shift+Enter starts a new line.' })),
    );
    return;
  }
  box.replaceChildren(...path.map(messageView));
  if (nearBottom || state.generation) box.scrollTop = box.scrollHeight;
}

let renderQueued = false;
function scheduleStreamRender(m) {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    const node = document.querySelector(`.msg[data-id="${m.id}"] .content`);
    if (!node) return;
    const box = $('messages');
    const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 120;
    renderContent(node, m);
    if (nearBottom) box.scrollTop = box.scrollHeight;
  });
}

function startEdit(id) {
  if (state.generation) return;
  const m = state.msgs.get(id);
  const node = document.querySelector(`.msg[data-id="${id}"]`);
  const area = el('textarea', { class: 'edit-area', rows: '3' });
  area.value = m.content;
  const save = async () => {
    const text = area.value.trim();
    if (!text && !m.docs?.length) return;
    const [edited, parent] = addChild(m.parent, { role: 'user', content: text, docs: m.docs ?? [] });
    state.conv.currNode = edited.id;
    await persist([edited, parent]);
    await generateReply(edited.id);
  };
  area.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      save();
    } else if (e.key === 'Escape') {
      renderThread();
    }
  });
  node.querySelector('.content').replaceChildren(
    area,
    el('div', { class: 'row end' },
      el('button', { class: 'btn edit-cancel', type: 'button', text: 'Cancel', onclick: () => renderThread() }),
      el('button', { class: 'btn primary edit-send', type: 'button', text: 'Send', onclick: save })),
  );
  area.focus();
}

async function regenerate(id) {
  if (state.generation) return;
  await generateReply(state.msgs.get(id).parent);
}

// ---------- sending ----------

function setGenerating(on) {
  $('send').hidden = on;
  $('stop').hidden = !on;
}

function contextTotal(settings) {
  return Math.min(settings.contextLength ?? Infinity, state.maxModelLen ?? FALLBACK_MAX_LEN);
}

/** Prompt tokens allowed: the context length less the room kept for the reply (at most half). */
function budgetOf(settings) {
  const total = contextTotal(settings);
  return total - Math.min(Number(settings.max_tokens) || 0, Math.floor(total / 2));
}

async function sendMessage() {
  const input = $('input');
  const text = input.value.trim();
  if (state.generation || (!text && !state.pendingDocs.length)) return;
  const conv = state.conv;
  if (pathTo(state.msgs, conv.currNode).length === 0) {
    const title = text || state.pendingDocs[0].name;
    conv.name = title.length > 48 ? `${title.slice(0, 47)}…` : title;
    showTitle();
  }
  const [user, parent] = addChild(conv.currNode, { role: 'user', content: text, docs: state.pendingDocs });
  conv.currNode = user.id;
  state.pendingDocs = [];
  input.value = '';
  autosize();
  renderAttachments();
  await persist([user, parent]);
  await generateReply(user.id);
}

/** Adds an assistant reply under `parentId` (a user turn) and streams it from the server. */
async function generateReply(parentId) {
  const conv = state.conv;
  const s = conv.settings;
  const [reply, parent] = addChild(parentId, { role: 'assistant', content: '', model: s.model, jsonMode: s.jsonMode });
  conv.currNode = reply.id;
  const controller = new AbortController();
  let finished;
  state.generation = { controller, id: reply.id, done: new Promise((resolve) => { finished = resolve; }) };
  setGenerating(true);
  renderThread();

  const system = s.systemPrompt.trim() ? { role: 'system', content: s.systemPrompt.trim() } : null;
  const turns = apiMessages(pathTo(state.msgs, parentId));
  let messages = system ? [system, ...turns] : turns;
  let pieces = 0;
  let promptTokens = null;
  let start = null;
  let firstAt = null;
  let savedAt = performance.now();
  // One streamed piece (answer or thinking): counted, shown, and stored now and then, so that a reload
  // mid-stream keeps what had arrived.
  const received = (add) => {
    firstAt ??= performance.now();
    add();
    pieces += 1;
    scheduleStreamRender(reply);
    if (performance.now() - savedAt > 2000) {
      savedAt = performance.now();
      db.save(conv, [reply]).catch(() => {}); // the save at the end reports errors
    }
  };
  let result = null;
  try {
    await persist([reply, parent]);
    try {
      const fit = await fitContext({ model: s.model, system, turns, budget: budgetOf(s), signal: controller.signal });
      messages = fit.messages;
      promptTokens = fit.count;
      showContext(fit);
    } catch (e) {
      if (e.name === 'AbortError' || e.status === 401) throw e;
      showContext(null, e);
    }
    const body = { messages, temperature: Number(s.temperature), top_p: Number(s.top_p) };
    if (s.model) body.model = s.model;
    // The server refuses prompt + max_tokens beyond its context: shorten the reply to fit.
    const room = promptTokens === null ? Infinity : contextTotal(s) - promptTokens;
    if (Number(s.max_tokens) > 0) body.max_tokens = Math.max(1, Math.min(Number(s.max_tokens), room));
    if (s.jsonMode) body.response_format = { type: 'json_object' };
    start = performance.now();
    result = await api.streamChat(body, {
      signal: controller.signal,
      onDelta: (text) => received(() => { reply.content += text; }),
      onReasoning: (text) => received(() => { reply.reasoning = (reply.reasoning ?? '') + text; }),
    });
  } catch (e) {
    if (e.name === 'AbortError') {
      result = { finishReason: 'stopped', usage: null };
    } else {
      reply.error = e.message;
      if (e.status === 401) askForApiKey();
    }
  }
  const end = performance.now();
  if (result) {
    const tokens = result.usage?.completion_tokens ?? pieces;
    reply.stats = {
      tokens,
      estimated: !result.usage,
      promptTokens: result.usage?.prompt_tokens ?? null,
      ttftMs: firstAt !== null && start !== null ? firstAt - start : null,
      // Decode speed after the first token; left out when the span is too short to mean anything.
      tokensPerSecond: firstAt !== null && tokens > 1 && end - firstAt >= 50 ? ((tokens - 1) * 1000) / (end - firstAt) : null,
      finishReason: result.finishReason,
    };
  }
  state.generation = null;
  setGenerating(false);
  renderThread();
  try {
    await persist([reply]);
  } catch (e) {
    showBanner(`Could not store the reply: ${e.message}`);
  }
  finished();
  // A counter of finished replies: lets scripts (and the tests) wait for "this reply is done".
  document.body.dataset.replies = String(Number(document.body.dataset.replies ?? 0) + 1);
  refreshContext();
}

// ---------- context and documents ----------

function showContext(fit, error = null) {
  const info = $('context-info');
  if (error) {
    info.textContent = `Context: token count unavailable (${error.message})`;
    return;
  }
  if (fit.maxModelLen && fit.maxModelLen !== state.maxModelLen) {
    state.maxModelLen = fit.maxModelLen;
    fillContextSlider();
  }
  const s = state.conv.settings;
  const total = contextTotal(s);
  const tooLong = fit.count > budgetOf(s);
  info.classList.toggle('over', tooLong);
  info.replaceChildren(el('span', {},
    el('span', { class: 'ctx-count', 'data-count': String(fit.count), text: `Context: ${fmt(fit.count)} / ${fmt(total)} tokens` }),
    fit.dropped ? el('span', { class: 'ctx-dropped', text: ` · ${fit.dropped} older message${fit.dropped > 1 ? 's' : ''} left out` }) : null,
    el('span', { class: 'ctx-reserve', text: ` · up to ${fmt(Math.max(0, Math.min(Number(s.max_tokens) || total, total - fit.count)))} for the reply` }),
    tooLong ? el('span', { class: 'ctx-over', text: ' · the last message alone is too long: shorten it or its documents, or raise the context length' }) : null,
  ));
}

/** Counts the branch on screen plus the message being written (text and documents). */
const refreshContext = debounce(async () => {
  if (!state.conv || state.generation) return;
  const seq = ++state.contextSeq;
  const s = state.conv.settings;
  const system = s.systemPrompt.trim() ? { role: 'system', content: s.systemPrompt.trim() } : null;
  const path = pathTo(state.msgs, state.conv.currNode);
  const draft = $('input').value.trim();
  if (draft || state.pendingDocs.length) path.push({ role: 'user', content: draft, docs: state.pendingDocs });
  const turns = apiMessages(path);
  if (!turns.length && !system) {
    $('context-info').replaceChildren(el('span', { class: 'ctx-count', 'data-count': '0', text: 'Context: empty' }));
    return;
  }
  try {
    const fit = await fitContext({ model: s.model, system, turns, budget: budgetOf(s) });
    if (seq === state.contextSeq) showContext(fit);
  } catch (e) {
    if (seq !== state.contextSeq) return;
    if (e.status === 401) askForApiKey();
    showContext(null, e);
  }
}, 250);

function renderAttachments() {
  const box = $('attachments');
  box.replaceChildren(
    ...state.pendingDocs.map((d, i) =>
      el(
        'span',
        { class: 'doc-chip pending', 'data-name': d.name },
        el('span', { class: 'doc-name', text: d.name }),
        el('span', { class: 'doc-meta', text: ` · ${fmt(d.chars)} chars · ${d.tokens == null ? '…' : fmt(d.tokens)} tokens` }),
        el('button', {
          class: 'doc-remove small-btn', type: 'button', 'aria-label': `Remove ${d.name}`, text: '×',
          onclick: () => { state.pendingDocs.splice(i, 1); renderAttachments(); refreshContext(); },
        }),
      ),
    ),
  );
}

async function attachFiles(files) {
  const convId = state.conv.id; // a file read after the user opened another chat goes to this one's draft
  for (const file of files) {
    let doc;
    try {
      const r = await api.extractDocument(file);
      doc = { name: r.filename || file.name, text: r.text, chars: r.chars, tokens: null };
    } catch (e) {
      if (e.status === 401) askForApiKey();
      showBanner(`Could not attach ${file.name}: ${e.message}`);
      continue;
    }
    if (state.conv.id === convId) {
      state.pendingDocs.push(doc);
    } else {
      const draft = state.drafts.get(convId) ?? { text: '', docs: [] };
      draft.docs.push(doc);
      state.drafts.set(convId, draft);
    }
    renderAttachments();
    try {
      doc.tokens = (await api.tokenize({ model: state.conv.settings.model || undefined, prompt: doc.text })).count;
    } catch (e) {
      showBanner(`Could not count the tokens of ${doc.name}: ${e.message}`);
    }
    renderAttachments();
    refreshContext();
  }
}

// ---------- settings ----------

function fillContextSlider() {
  const slider = $('context-length');
  const max = state.maxModelLen ?? FALLBACK_MAX_LEN;
  slider.max = String(max);
  slider.min = String(Math.min(64, max));
  const s = state.conv?.settings;
  const value = s?.contextLength ?? max;
  slider.value = String(value);
  $('context-length-out').textContent = `${fmt(value)} tokens`;
}

function fillPresets() {
  const select = $('preset-select');
  select.replaceChildren(
    el('option', { value: '', text: '(custom)' }),
    ...state.presets.map((p) => el('option', { value: p.id, text: p.name })),
  );
  select.value = state.presets.some((p) => p.id === state.conv?.settings.presetId) ? state.conv.settings.presetId : '';
}

function fillModels() {
  const select = $('model-select');
  const current = state.conv?.settings.model;
  const ids = state.models.map((m) => m.id);
  if (current && !ids.includes(current)) ids.push(current);
  select.replaceChildren(...ids.map((id) => el('option', { value: id, text: id })));
  if (current) select.value = current;
}

function fillSettings() {
  const s = state.conv.settings;
  $('system-prompt').value = s.systemPrompt;
  $('temperature').value = String(s.temperature);
  $('temperature-out').textContent = Number(s.temperature).toFixed(2);
  $('top-p').value = String(s.top_p);
  $('top-p-out').textContent = Number(s.top_p).toFixed(2);
  $('max-tokens').value = String(s.max_tokens ?? '');
  $('json-mode').checked = Boolean(s.jsonMode);
  fillContextSlider();
  fillPresets();
  fillModels();
}

const saveSettings = debounce(() => {
  if (!state.unsaved) persist([]);
}, 300);

function updateSetting(key, value) {
  state.conv.settings[key] = value;
  saveSettings();
  refreshContext();
}

function bindSettings() {
  $('system-prompt').addEventListener('input', (e) => updateSetting('systemPrompt', e.target.value));
  $('temperature').addEventListener('input', (e) => {
    $('temperature-out').textContent = Number(e.target.value).toFixed(2);
    updateSetting('temperature', Number(e.target.value));
  });
  $('top-p').addEventListener('input', (e) => {
    $('top-p-out').textContent = Number(e.target.value).toFixed(2);
    updateSetting('top_p', Number(e.target.value));
  });
  $('max-tokens').addEventListener('input', (e) => updateSetting('max_tokens', e.target.value ? Math.max(1, Math.floor(Number(e.target.value))) : null));
  $('context-length').addEventListener('input', (e) => {
    // The slider moves in single tokens so that any max_model_len is reachable; values snap to 64.
    const max = state.maxModelLen ?? FALLBACK_MAX_LEN;
    const v = Number(e.target.value) >= max ? max : Math.max(64, Math.round(Number(e.target.value) / 64) * 64);
    $('context-length-out').textContent = `${fmt(v)} tokens`;
    updateSetting('contextLength', v >= (state.maxModelLen ?? FALLBACK_MAX_LEN) ? null : v);
  });
  $('json-mode').addEventListener('change', (e) => updateSetting('jsonMode', e.target.checked));
  $('model-select').addEventListener('change', (e) => updateSetting('model', e.target.value));
  $('preset-select').addEventListener('change', (e) => {
    const preset = state.presets.find((p) => p.id === e.target.value);
    state.conv.settings.presetId = preset?.id ?? '';
    if (preset) {
      $('system-prompt').value = preset.prompt;
      updateSetting('systemPrompt', preset.prompt);
    } else {
      saveSettings();
    }
  });
  $('preset-save-new').addEventListener('click', async () => {
    const prompt = $('system-prompt').value.trim();
    if (!prompt) return showBanner('Write a system prompt first, then save it as a preset.');
    const name = await dialog('Name of the new preset', { value: '' });
    if (!name) return;
    const preset = { id: db.newId(), name, prompt };
    await db.putPreset(preset);
    await loadPresets();
    state.conv.settings.presetId = preset.id;
    fillPresets();
    saveSettings();
  });
  $('preset-update').addEventListener('click', async () => {
    const preset = state.presets.find((p) => p.id === $('preset-select').value);
    if (!preset) return showBanner('Choose a preset to update first.');
    const name = await dialog('Save the system prompt into this preset; its name:', { value: preset.name });
    if (!name) return;
    await db.putPreset({ ...preset, name, prompt: $('system-prompt').value });
    await loadPresets();
    fillPresets();
  });
  $('preset-delete').addEventListener('click', async () => {
    const preset = state.presets.find((p) => p.id === $('preset-select').value);
    if (!preset || !(await dialog(`Delete the preset "${preset.name}"?`))) return;
    await db.deletePreset(preset.id);
    await loadPresets();
    state.conv.settings.presetId = '';
    fillPresets();
    saveSettings();
  });
  $('api-key').value = api.getApiKey();
  $('api-key').addEventListener('change', (e) => {
    api.setApiKey(e.target.value.trim());
    loadModels();
    refreshContext();
  });
}

function askForApiKey() {
  state.needsKey = true;
  showBanner('The server asks for an API key: enter it under Settings → API key.');
  openSettings();
  $('api-key').classList.add('attention');
  $('api-key').focus();
}

async function loadPresets() {
  state.presets = (await db.listPresets()).sort((a, b) => a.name.localeCompare(b.name));
}

async function loadModels() {
  try {
    state.models = await api.listModels();
  } catch (e) {
    if (e.status === 401) askForApiKey();
    else showBanner(`Could not list the models: ${e.message}`);
    return;
  }
  const withLen = state.models.find((m) => m.max_model_len);
  if (withLen && !state.maxModelLen) state.maxModelLen = withLen.max_model_len;
  if (state.conv) ensureServedModel();
  state.needsKey = false;
  $('api-key').classList.remove('attention');
  showBanner('');
  if (state.conv) {
    fillModels();
    fillContextSlider();
  }
}

// ---------- layout, theme, keyboard ----------

function openSettings() {
  document.body.classList.add('settings-open');
  if (NARROW.matches) document.body.classList.remove('sidebar-open');
  syncBackdrop();
}

function closeDrawers() {
  if (NARROW.matches) document.body.classList.remove('sidebar-open', 'settings-open');
  syncBackdrop();
}

function syncBackdrop() {
  const b = document.body.classList;
  $('backdrop').hidden = !(NARROW.matches && (b.contains('sidebar-open') || b.contains('settings-open')));
}

function autosize() {
  const input = $('input');
  input.style.height = 'auto';
  input.style.height = `${Math.min(input.scrollHeight, 220)}px`;
}

function bindLayout() {
  if (!NARROW.matches) document.body.classList.add('sidebar-open');
  $('toggle-sidebar').addEventListener('click', () => {
    document.body.classList.toggle('sidebar-open');
    if (NARROW.matches) document.body.classList.remove('settings-open');
    syncBackdrop();
  });
  $('toggle-settings').addEventListener('click', () => {
    if (document.body.classList.contains('settings-open')) document.body.classList.remove('settings-open');
    else openSettings();
    syncBackdrop();
  });
  $('close-settings').addEventListener('click', () => {
    document.body.classList.remove('settings-open');
    syncBackdrop();
  });
  $('backdrop').addEventListener('click', closeDrawers);
  NARROW.addEventListener('change', () => {
    document.body.classList.toggle('sidebar-open', !NARROW.matches);
    document.body.classList.remove('settings-open');
    syncBackdrop();
  });
  $('toggle-theme').addEventListener('click', () => {
    const next = document.documentElement.dataset.theme === 'dark' ? 'light' : 'dark';
    document.documentElement.dataset.theme = next;
    localStorage.setItem('qwen-serve.theme', next);
  });
  $('new-conv').addEventListener('click', newConversation);
  $('new-conv-top').addEventListener('click', newConversation);
  $('conv-search').addEventListener('input', renderConversationList);
  $('export-btn').addEventListener('click', exportConversations);
  $('import-btn').addEventListener('click', () => $('import-input').click());
  $('import-input').addEventListener('change', async (e) => {
    const [file] = e.target.files;
    e.target.value = '';
    if (file) await importConversations(file);
  });
  $('attach-btn').addEventListener('click', () => $('file-input').click());
  const composer = document.querySelector('.composer');
  composer.addEventListener('dragover', (e) => {
    e.preventDefault();
    composer.classList.add('dropping');
  });
  composer.addEventListener('dragleave', () => composer.classList.remove('dropping'));
  composer.addEventListener('drop', (e) => {
    e.preventDefault();
    composer.classList.remove('dropping');
    attachFiles([...e.dataTransfer.files]);
  });
  $('file-input').addEventListener('change', async (e) => {
    const files = [...e.target.files];
    e.target.value = '';
    await attachFiles(files);
  });
  const input = $('input');
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendMessage();
    }
  });
  input.addEventListener('input', () => {
    autosize();
    refreshContext();
  });
  $('send').addEventListener('click', sendMessage);
  $('stop').addEventListener('click', () => state.generation?.controller.abort());
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && state.generation && !$('dialog').open) state.generation.controller.abort();
  });
  $('banner').addEventListener('click', () => showBanner(''));
  // Enter in the dialog's field means OK (the form's implicit submit would pick Cancel, the first button).
  $('dialog-input').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.isComposing) {
      e.preventDefault();
      $('dialog').close('ok');
    }
  });
}

async function main() {
  bindLayout();
  bindSettings();
  await Promise.all([loadPresets(), loadModels(), refreshConversationList()]);
  const last = state.conversations[0];
  if (last) await openConversation(last.id);
  else newConversation();
  document.body.dataset.ready = 'true';
}

main();
