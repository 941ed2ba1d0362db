"""Screenshots of the main states for the README (docs/screenshot-*.png): light, dark with the
settings panel, and a phone-width view. The assistant's reply is faked with `page.route` so the
pictures show readable markdown rather than the tiny model's gibberish; everything else (models,
token counts, storage) is the real server and page."""

from __future__ import annotations

import json

import pytest

from pagekit import DOCS, make_pdf, open_page, save_screenshot, send_and_wait, set_max_tokens

expect = pytest.importorskip("playwright.sync_api", reason="pip install playwright").expect

REPLY = """Use the standard library's `csv` module; `DictReader` maps each row to the header:

```python
import csv
from pathlib import Path


def load_prices(path: Path) -> dict[str, float]:
    \"\"\"Reads `name,price` rows into a dict.\"\"\"
    with path.open(newline="", encoding="utf-8") as f:
        return {row["name"]: float(row["price"]) for row in csv.DictReader(f)}
```

| Approach | Memory | Handles quoting |
|---|---|---|
| `csv.DictReader` | one row at a time | yes |
| `str.split(",")` | one row at a time | **no** |

Notes:
1. Open the file with `newline=""` so quoted newlines survive.
2. Convert types yourself: the reader returns strings.
"""


def fake_stream(page, text: str) -> None:
    pieces = [text[i:i + 12] for i in range(0, len(text), 12)]
    chunks = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({"choices": [], "usage": {"prompt_tokens": 61, "completion_tokens": 142, "total_tokens": 203}})
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body),
               times=1)


def build_conversations(page, tmp_path) -> None:
    set_max_tokens(page, 4)
    for title in ("Translate the release notes to German", "Extract invoice fields as JSON"):
        send_and_wait(page, title)
        page.click("#new-conv" if page.is_visible("#new-conv") else "#new-conv-top")
    page.click("#toggle-settings")
    page.select_option("#preset-select", label="Senior Python engineer")
    page.fill("#max-tokens", "512")
    page.click("#close-settings")
    pdf = tmp_path / "prices.pdf"
    pdf.write_bytes(make_pdf(["name,price", "apple,0.5", "pear,0.75", "plum,1.25"]))
    page.set_input_files("#file-input", str(pdf))
    page.locator(".attachments .doc-meta", has_text="tokens").wait_for()
    expect(page.locator(".attachments .doc-meta")).not_to_contain_text("…")
    fake_stream(page, REPLY)
    send_and_wait(page, "How do I read a CSV of prices like the attached one into a dict?")
    page.wait_for_timeout(500)  # the context count settles


def test_screenshots(browser, chat_server, tmp_path) -> None:
    context, page, rec = open_page(browser, chat_server.url, width=1280, height=860)
    try:
        build_conversations(page, tmp_path)
        page.locator("#input").blur()
        light = save_screenshot(page, "screenshot-light.png")

        page.click("#toggle-theme")
        assert page.evaluate("document.documentElement.dataset.theme") == "dark"
        page.click("#toggle-settings")
        expect(page.locator("#settings")).to_be_visible()
        dark = save_screenshot(page, "screenshot-dark.png")
        page.click("#close-settings")
        page.click("#toggle-theme")
    finally:
        context.close()
    assert rec.foreign(chat_server.url) == [] and rec.errors == []

    # Phone width: same browser storage is not shared across contexts, so build it again.
    context, page, rec = open_page(browser, chat_server.url, width=390, height=844)
    try:
        expect(page.locator("#sidebar")).to_be_hidden()
        build_conversations(page, tmp_path)
        page.locator("#input").blur()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        narrow = save_screenshot(page, "screenshot-narrow.png")
        page.click("#toggle-sidebar")
        expect(page.locator("#sidebar")).to_be_visible()
        expect(page.locator("#backdrop")).to_be_visible()
        save_screenshot(page, "screenshot-narrow-sidebar.png")
        page.click("#backdrop", position={"x": 370, "y": 400})
        expect(page.locator("#sidebar")).to_be_hidden()
    finally:
        context.close()
    assert rec.foreign(chat_server.url) == [] and rec.errors == []
    for path in (light, dark, narrow):
        assert path.parent == DOCS and path.stat().st_size > 10_000
