// Loaded before the page paints: picks the saved theme, else the system's, so there is no flash.
(() => {
  const saved = localStorage.getItem('qwen-serve.theme');
  const dark = window.matchMedia('(prefers-color-scheme: dark)').matches;
  document.documentElement.dataset.theme = saved || (dark ? 'dark' : 'light');
})();
