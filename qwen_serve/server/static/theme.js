(()=>{const e=localStorage.getItem("qwen-serve.theme"),t=window.matchMedia("(prefers-color-scheme: dark)").matches;document.documentElement.dataset.theme=e||(t?"dark":"light")})();
