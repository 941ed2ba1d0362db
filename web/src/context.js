// Fits a branch into the context-length setting: older turns are left out, oldest first, until the
// prompt (counted by the server's /tokenize with the chat template applied) fits the budget.

import { tokenize } from './api.js';

/**
 * @param {object} a
 * @param {string} a.model
 * @param {{role:string, content:string}|null} a.system  kept whatever the budget
 * @param {{role:string, content:string}[]} a.turns  oldest first; the last one is always kept
 * @param {number} a.budget  most prompt tokens allowed
 * @returns {Promise<{messages, count:number, dropped:number, maxModelLen:number|null}>}
 */
export async function fitContext({ model, system, turns, budget, signal }) {
  const build = (start) => (system ? [system, ...turns.slice(start)] : turns.slice(start));
  const count = async (start) => {
    const r = await tokenize({ model: model || undefined, messages: build(start) }, signal);
    return { count: r.count, maxModelLen: r.max_model_len ?? null };
  };
  // A kept branch starts at a user turn; the count only falls as the start moves later, so the
  // first start that fits is found by bisection (a handful of /tokenize calls for long chats).
  const starts = turns.map((t, i) => i).filter((i) => i === 0 || turns[i].role === 'user');
  const full = await count(0);
  if (full.count <= budget || starts.length <= 1) {
    return { messages: build(0), count: full.count, dropped: 0, maxModelLen: full.maxModelLen };
  }
  let lo = 1;
  let hi = starts.length - 1;
  let best = null;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const r = await count(starts[mid]);
    if (r.count <= budget) {
      best = { index: mid, ...r };
      hi = mid - 1;
    } else {
      lo = mid + 1;
    }
  }
  if (best === null) {
    // Even the last turn alone is too long: send it anyway and let the server say so.
    const last = starts[starts.length - 1];
    const r = await count(last);
    return { messages: build(last), count: r.count, dropped: last, maxModelLen: r.maxModelLen };
  }
  const start = starts[best.index];
  return { messages: build(start), count: best.count, dropped: start, maxModelLen: best.maxModelLen };
}
