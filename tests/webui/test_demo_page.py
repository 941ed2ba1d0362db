"""The chat page against the real demo model (Qwen2.5-Coder-0.5B-Instruct): JSON mode gives a reply
that parses, and a coding question comes back as highlighted markdown with a copy button
(saved as docs/screenshot-demo.png)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagekit import (
    Server,
    close_settings,
    open_page,
    open_settings,
    save_screenshot,
    send_and_wait,
    start_server,
    stop_server,
)

expect = pytest.importorskip("playwright.sync_api", reason="pip install playwright").expect

pytestmark = [pytest.mark.demo, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_server(demo_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("demo") / "server.log"
    server = start_server(demo_folder, log, "--max-model-len", "2048", "--served-model-name", "qwen2.5-coder-0.5b")
    yield server
    stop_server(server)


@pytest.fixture
def demo_page(browser, demo_server: Server):
    context, page, rec = open_page(browser, demo_server.url)
    yield page
    context.close()
    assert rec.foreign(demo_server.url) == []
    assert rec.errors == []


def settings(page, *, max_tokens: int, json_mode: bool = False, preset: str | None = None) -> None:
    open_settings(page)
    page.eval_on_selector("#temperature", "(e) => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
    page.fill("#max-tokens", str(max_tokens))
    if preset:
        page.select_option("#preset-select", label=preset)
    if json_mode:
        page.check("#json-mode")
    close_settings(page)


def test_json_mode_reply_parses(demo_page) -> None:
    page = demo_page
    settings(page, max_tokens=160, json_mode=True, preset="JSON-only data extractor")
    send_and_wait(page, "Extract name, age and city: Alice Smith is 31 years old and lives in Oslo.")
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".stats")).to_contain_text("finish: stop")
    content = reply.locator(".content")
    assert content.get_attribute("data-json-valid") == "true", content.inner_text()
    data = json.loads(content.locator("code").inner_text())
    assert isinstance(data, dict) and data
    assert "Alice" in json.dumps(data)


def test_code_reply_is_highlighted_markdown(demo_page) -> None:
    page = demo_page
    settings(page, max_tokens=200)
    send_and_wait(page, "Write a Python function add(a, b) that returns the sum. Only the code block.")
    reply = page.locator(".msg.assistant").last
    code = reply.locator(".content pre code.hljs")
    expect(code.first).to_contain_text("def add")
    assert reply.locator(".content pre code .hljs-keyword").count() > 0  # highlighted, not plain text
    assert reply.locator(".copy-code").count() >= 1
    assert reply.locator(".stats").inner_text().split(" tokens")[0].isdigit()
    page.locator("#input").blur()
    save_screenshot(page, "screenshot-demo.png")  # a real reply of the demo model, for the README
