// Pure operations on one conversation's message tree (no DOM, no storage). `msgs` is a Map from
// id to message; every chat has a root message (role 'root') whose descendants are the turns.

/** The messages from the first turn down to `leafId` (the root left out). */
export function pathTo(msgs, leafId) {
  const path = [];
  for (let m = msgs.get(leafId); m && m.role !== 'root'; m = msgs.get(m.parent)) path.push(m);
  return path.reverse();
}

/** The newest leaf below `id`, following the last-added child at each level. */
export function newestLeaf(msgs, id) {
  let m = msgs.get(id);
  while (m && m.children.length) m = msgs.get(m.children[m.children.length - 1]);
  return m ? m.id : id;
}

/** {index, count} of a message among its siblings (1-based index), for the "< 1/2 >" switcher. */
export function siblingInfo(msgs, m) {
  const parent = msgs.get(m.parent);
  if (!parent) return { index: 1, count: 1 };
  return { index: parent.children.indexOf(m.id) + 1, count: parent.children.length };
}

/** The leaf to show after moving `delta` siblings from message `m`, or null at either end. */
export function siblingLeaf(msgs, m, delta) {
  const parent = msgs.get(m.parent);
  if (!parent) return null;
  const i = parent.children.indexOf(m.id) + delta;
  if (i < 0 || i >= parent.children.length) return null;
  return newestLeaf(msgs, parent.children[i]);
}

/** The text a user turn sends: its attached documents first, then what the user typed. */
export function userContent(m) {
  const docs = (m.docs ?? []).map((d) => `<document name="${d.name}">\n${d.text}\n</document>`);
  return [...docs, m.content].filter((s) => s).join('\n\n');
}

/** Chat-completions messages for a branch's turns (failed and empty replies left out). */
export function apiMessages(path) {
  const out = [];
  for (const m of path) {
    if (m.role === 'user') out.push({ role: 'user', content: userContent(m) });
    else if (m.role === 'assistant' && !m.error && m.content) out.push({ role: 'assistant', content: m.content });
  }
  return out;
}
