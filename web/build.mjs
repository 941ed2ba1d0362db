// Builds the chat page into qwen_serve/server/static/ (committed, so `pip install` needs no npm):
// app.js (the bundled page), app.css (page styles plus highlight.js's GitHub light/dark themes,
// each scoped to its data-theme), theme.js, favicon.svg and index.html with cache-busting hashes.
import { createHash } from 'node:crypto';
import { mkdir, readFile, rm, writeFile, copyFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const here = (p) => fileURLToPath(new URL(p, import.meta.url));
const outDir = here('../qwen_serve/server/static/');
const target = ['chrome111', 'firefox113', 'safari16.2'];

await rm(outDir, { recursive: true, force: true });
await mkdir(outDir, { recursive: true });

const js = await esbuild.build({
  entryPoints: [here('src/main.js')],
  bundle: true,
  minify: true,
  format: 'esm',
  target,
  legalComments: 'eof',
  write: false,
  outfile: `${outDir}app.js`,
});

const hljsTheme = async (name) => readFile(here(`node_modules/highlight.js/styles/${name}.css`), 'utf8');
const cssSource = [
  await readFile(here('src/style.css'), 'utf8'),
  `:root[data-theme='light'] {\n${await hljsTheme('github')}\n}`,
  `:root[data-theme='dark'] {\n${await hljsTheme('github-dark')}\n}`,
].join('\n');
// CSS nesting is lowered by esbuild for the targets above.
const css = await esbuild.transform(cssSource, { loader: 'css', minify: true, target, legalComments: 'eof' });
const theme = await esbuild.transform(await readFile(here('src/theme.js'), 'utf8'), { minify: true, target });

const appJs = js.outputFiles[0].contents;
const hash = createHash('sha256').update(appJs).update(css.code).update(theme.code).digest('hex').slice(0, 12);
await writeFile(`${outDir}app.js`, appJs);
await writeFile(`${outDir}app.css`, css.code);
await writeFile(`${outDir}theme.js`, theme.code);
await copyFile(here('src/favicon.svg'), `${outDir}favicon.svg`);
const html = (await readFile(here('src/index.html'), 'utf8')).replaceAll('__HASH__', hash);
await writeFile(`${outDir}index.html`, html);

for (const [name, bytes] of [['app.js', appJs.length], ['app.css', css.code.length]]) {
  console.log(`${name.padEnd(8)} ${(bytes / 1024).toFixed(1)} KiB`);
}
