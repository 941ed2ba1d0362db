// Model output -> safe DOM. markdown-it parses (raw HTML off, images off so that a reply can never
// make the browser fetch from elsewhere), highlight.js colours code, DOMPurify sanitises the result
// before it is assigned to innerHTML. Nothing the model writes is ever run as HTML or script.

import MarkdownIt from 'markdown-it';
import DOMPurify from 'dompurify';
import hljs from 'highlight.js/lib/core';
import bash from 'highlight.js/lib/languages/bash';
import c from 'highlight.js/lib/languages/c';
import cpp from 'highlight.js/lib/languages/cpp';
import css from 'highlight.js/lib/languages/css';
import diff from 'highlight.js/lib/languages/diff';
import go from 'highlight.js/lib/languages/go';
import java from 'highlight.js/lib/languages/java';
import javascript from 'highlight.js/lib/languages/javascript';
import json from 'highlight.js/lib/languages/json';
import markdown from 'highlight.js/lib/languages/markdown';
import plaintext from 'highlight.js/lib/languages/plaintext';
import python from 'highlight.js/lib/languages/python';
import rust from 'highlight.js/lib/languages/rust';
import shell from 'highlight.js/lib/languages/shell';
import sql from 'highlight.js/lib/languages/sql';
import typescript from 'highlight.js/lib/languages/typescript';
import xml from 'highlight.js/lib/languages/xml';
import yaml from 'highlight.js/lib/languages/yaml';

const languages = {
  bash, c, cpp, css, diff, go, java, javascript, json, markdown, plaintext, python, rust, shell, sql,
  typescript, xml, yaml,
};
for (const [name, lang] of Object.entries(languages)) hljs.registerLanguage(name, lang);

function highlight(code, lang) {
  const known = lang && hljs.getLanguage(lang);
  const html = known ? hljs.highlight(code, { language: lang, ignoreIllegals: true }).value : md.utils.escapeHtml(code);
  const cls = known ? ` language-${md.utils.escapeHtml(lang)}` : '';
  return `<pre><code class="hljs${cls}">${html}</code></pre>`;
}

const md = new MarkdownIt({ html: false, linkify: true, typographer: false, highlight });
md.disable('image');

const PURIFY = {
  FORBID_TAGS: ['img', 'picture', 'source', 'video', 'audio', 'iframe', 'object', 'embed', 'style', 'form', 'input',
    'button', 'svg', 'math', 'link', 'meta', 'base'],
  FORBID_ATTR: ['style', 'srcset', 'src'],
};

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') {
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer');
  }
});

function addCopyButtons(container) {
  for (const pre of container.querySelectorAll('pre')) {
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'copy-code';
    button.textContent = 'Copy';
    button.addEventListener('click', () => {
      copyText(pre.querySelector('code')?.textContent ?? pre.textContent).then(() => {
        button.textContent = 'Copied';
        setTimeout(() => { button.textContent = 'Copy'; }, 1500);
      });
    });
    pre.classList.add('has-copy');
    pre.prepend(button);
  }
}

/** Clipboard API where the page is a secure context, else the older selection-based copy. */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return;
    } catch {
      // Permission refused (e.g. headless): fall through to the selection-based copy.
    }
  }
  const area = document.createElement('textarea');
  area.value = text;
  area.setAttribute('readonly', '');
  area.className = 'offscreen';
  document.body.append(area);
  area.select();
  document.execCommand('copy');
  area.remove();
}

/** Renders markdown into `container` (replacing its content), sanitised, with copy buttons on code. */
export function renderMarkdown(container, text) {
  container.innerHTML = DOMPurify.sanitize(md.render(text), PURIFY);
  addCopyButtons(container);
}

/**
 * JSON-mode replies: pretty-printed and highlighted when the text parses, else shown as it came.
 * Returns whether it parsed.
 */
export function renderJson(container, text) {
  let pretty = null;
  try {
    pretty = JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    pretty = null;
  }
  const html = pretty === null ? highlight(text, '') : highlight(pretty, 'json');
  container.innerHTML = DOMPurify.sanitize(html, PURIFY);
  addCopyButtons(container);
  return pretty !== null;
}
