// IndexedDB storage, laid out like the llama.cpp web UI: a `conversations` table (one row per chat,
// with `currNode`, the leaf of the branch on screen) and a `messages` table holding each chat's
// message tree (`parent` id, `children` ids, a `root` message per chat). A `presets` table keeps
// the system-prompt presets, filled with the shipped ones when the database is created (so a
// shipped preset the user deleted stays deleted).

import { DEFAULT_PRESETS } from './presets.js';

const DB_NAME = 'qwen-serve';
const DB_VERSION = 1;

let dbPromise = null;

function open() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve, reject) => {
      const req = indexedDB.open(DB_NAME, DB_VERSION);
      req.onupgradeneeded = () => {
        const db = req.result;
        db.createObjectStore('conversations', { keyPath: 'id' });
        const messages = db.createObjectStore('messages', { keyPath: 'id' });
        messages.createIndex('convId', 'convId');
        const presets = db.createObjectStore('presets', { keyPath: 'id' });
        for (const p of DEFAULT_PRESETS) presets.put(p);
      };
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
  }
  return dbPromise;
}

function done(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function txDone(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error);
  });
}

/** Ids that need no secure context (crypto.randomUUID does, and the page may be served over http). */
export function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return Date.now().toString(36) + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

export async function listConversations() {
  const db = await open();
  const all = await done(db.transaction('conversations').objectStore('conversations').getAll());
  return all.sort((a, b) => b.lastModified - a.lastModified);
}

export async function getMessages(convId) {
  const db = await open();
  const index = db.transaction('messages').objectStore('messages').index('convId');
  return done(index.getAll(convId));
}

/** Writes a conversation and any number of its messages in one transaction. */
export async function save(conversation, messages = []) {
  const db = await open();
  const tx = db.transaction(['conversations', 'messages'], 'readwrite');
  tx.objectStore('conversations').put(conversation);
  const store = tx.objectStore('messages');
  for (const m of messages) store.put(m);
  return txDone(tx);
}

export async function deleteConversation(convId) {
  const db = await open();
  const tx = db.transaction(['conversations', 'messages'], 'readwrite');
  tx.objectStore('conversations').delete(convId);
  const store = tx.objectStore('messages');
  // Delete inside the request's callback: the transaction must still be active.
  store.index('convId').getAllKeys(convId).onsuccess = (e) => {
    for (const k of e.target.result) store.delete(k);
  };
  return txDone(tx);
}

export async function listPresets() {
  const db = await open();
  return done(db.transaction('presets').objectStore('presets').getAll());
}

export async function putPreset(preset) {
  const db = await open();
  const tx = db.transaction('presets', 'readwrite');
  tx.objectStore('presets').put(preset);
  return txDone(tx);
}

export async function deletePreset(id) {
  const db = await open();
  const tx = db.transaction('presets', 'readwrite');
  tx.objectStore('presets').delete(id);
  return txDone(tx);
}
