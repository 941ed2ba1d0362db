"""The README's serving examples, run as written against the demo model: the curl commands and the
`openai` block (with the server's real address in place of port 8000), and the output the README shows."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
from pathlib import Path

import pytest
from server_process import ServerProcess

README = Path(__file__).parent.parent / "README.md"
KEY = "sk-my-secret"


def _block(after: str, language: str) -> str:
    """The first ```language block after the line containing `after`."""
    text = README.read_text()
    start = text.index(after)
    m = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert m, f"no {language} block after {after!r}"
    return m.group(1)


@pytest.fixture(scope="module")
def server(demo_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    proc = ServerProcess(demo_folder, tmp_path_factory.mktemp("readme") / "server.log", "--served-model-name", "demo",
                         "--max-model-len", "2048", "--dtype", "auto", api_key=KEY)
    yield proc
    assert proc.stop() == 0


@pytest.mark.demo
def test_curl_examples(server: ServerProcess):
    script = _block("With curl", "bash").replace("http://127.0.0.1:8000", server.base_url)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script.replace("curl ", "curl -sS --fail-with-body ")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.count('"object":"chat.completion"') == 1 and "data: [DONE]" in done.stdout
    assert '"object":"text_completion"' in done.stdout


@pytest.mark.demo
def test_openai_example_prints_what_the_readme_shows(server: ServerProcess):
    code = _block("With the official `openai` package", "python").replace("http://127.0.0.1:8000", server.base_url)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    shown = re.search(r"print\(repr\(fim\.choices\[0\]\.text\)\)\s+# (.+)", code).group(1)
    assert out.getvalue().splitlines()[-1] == shown
