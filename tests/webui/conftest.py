"""Fixtures for the chat-page tests: a real `qwen-serve serve` process on the tiny model, Debian's
headless Chromium driven by Playwright's Python package, and a page that records every request.

Needs `apt-get install chromium` and `pip install playwright` (never `playwright install`: the
browser is the system one); the browser tests are skipped when either is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pagekit import CHROMIUM, CHROMIUM_ARGS, Server, open_page, start_server, stop_server


@pytest.fixture(scope="session")
def chat_server(tiny_chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server on the tiny random model (fast on CPU; its text is gibberish)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = start_server(tiny_chat_checkpoint, log, "--max-model-len", "4096", "--served-model-name", "tiny")
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def chat(browser, chat_server: Server):
    """(page, recorder) on the tiny-model server. Afterwards checks that the page sent no request
    anywhere but its own server, raised no uncaught error, opened no alert/confirm dialog and broke
    no rule of its Content-Security-Policy."""
    context, page, rec = open_page(browser, chat_server.url)
    yield page, rec
    context.close()
    assert rec.foreign(chat_server.url) == []
    assert rec.errors == []
    assert rec.dialogs == []
    assert rec.csp_violations == []
