"""The page against a server started with --api-key: it asks for the key on the 401 and then works."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pagekit import Server, open_page, send_and_wait, set_max_tokens, start_server, stop_server

expect = pytest.importorskip("playwright.sync_api", reason="pip install playwright").expect


@pytest.fixture(scope="module")
def keyed_server(tiny_chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    server = start_server(tiny_chat_checkpoint, log, "--max-model-len", "1024", "--served-model-name", "tiny",
                          "--api-key", "s3cret-key")
    yield server
    stop_server(server)


def test_asks_for_the_key_and_uses_it(browser, keyed_server: Server) -> None:
    context, page, rec = open_page(browser, keyed_server.url)
    try:
        expect(page.locator("#banner")).to_contain_text("asks for an API key")
        expect(page.locator("#settings")).to_be_visible()
        expect(page.locator("#api-key")).to_be_focused()
        assert page.locator("#model-select option").count() == 0

        page.fill("#api-key", "wrong")
        page.press("#api-key", "Enter")
        expect(page.locator("#banner")).to_contain_text("asks for an API key")

        page.fill("#api-key", "s3cret-key")
        page.press("#api-key", "Enter")
        expect(page.locator("#model-select option")).to_have_text(["tiny"])
        expect(page.locator("#banner")).to_be_hidden()
        set_max_tokens(page, 4)
        send_and_wait(page, "hello with a key")
        expect(page.locator(".msg.assistant .stats")).to_contain_text("finish:")
        assert page.locator(".msg-error").count() == 0

        # The key is kept in this browser for the next visit.
        page.reload()
        page.wait_for_selector('body[data-ready="true"]')
        expect(page.locator("#model-select option")).to_have_text(["tiny"])
    finally:
        context.close()
    assert rec.foreign(keyed_server.url) == []
    assert rec.errors == []
