"""End-to-end tests of the chat page in headless Chromium against a real `qwen-serve serve` on the
tiny random model. Its replies are gibberish, so tests check structure (streaming, stats, branches,
counts) and compare against the server's own answers; the two tests that need exact reply text
(untrusted markup, JSON rendering) fake that one response with `page.route`."""

from __future__ import annotations

import datetime
import json
import re
import urllib.request

import pytest

from pagekit import (
    context_count,
    make_docx,
    make_pdf,
    open_settings,
    close_settings,
    replies_done,
    send,
    send_and_wait,
    set_max_tokens,
    stored_content,
    wait_context_change,
    wait_replies,
)

expect = pytest.importorskip("playwright.sync_api", reason="pip install playwright").expect

STATS = re.compile(r"^(~?)(\d+) tokens(?: · [\d.]+ tok/s)? · TTFT \d+ ms · finish: (\w+)$")

# Records the length of the streaming reply each time the DOM changes while its cursor shows.
RECORD_STREAM = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const msgs = document.querySelectorAll('.msg.assistant');
    const last = msgs[msgs.length - 1];
    if (last && last.querySelector('.cursor')) window.__lengths.push(last.querySelector('.content').textContent.length);
  }).observe(document.querySelector('#messages'), { subtree: true, childList: true, characterData: true });
}"""


def last_reply(page):
    return page.locator(".msg.assistant").last


def server_tokens(url: str, body: dict) -> int:
    req = urllib.request.Request(f"{url}/tokenize", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)["count"]


def sse_body(pieces: list[str], finish: str = "stop", thinking: list[str] = ()) -> str:
    def chunk(delta: dict, finish_reason=None) -> str:
        return "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
                                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}) + "\n\n"

    out = chunk({"role": "assistant", "content": ""})
    out += "".join(chunk({"reasoning_content": p}) for p in thinking)  # as --reasoning-parser streams it
    out += "".join(chunk({"content": p}) for p in pieces)
    out += chunk({}, finish)
    usage = {"prompt_tokens": 20, "completion_tokens": len(pieces), "total_tokens": 20 + len(pieces)}
    out += "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage}) + "\n\n"
    return out + "data: [DONE]\n\n"


def fake_reply(page, pieces: list[str], seen: list[dict] | None = None, crlf: bool = False,
               thinking: list[str] = ()) -> None:
    """Answers the next chat completion with `pieces`, after `thinking` (only that one request is faked)."""

    def handle(route):
        if seen is not None:
            seen.append(route.request.post_data_json)
        body = sse_body(pieces, thinking=thinking)
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"},
                      body=body.replace("\n", "\r\n") if crlf else body)

    page.route("**/v1/chat/completions", handle, times=1)


def chats_of_one_turn(page, names: list[str]) -> None:
    """A new chat for each name, holding that message and a canned reply."""
    for name in names:
        page.click("#new-conv")
        fake_reply(page, ["Noted."])
        n = replies_done(page)
        send(page, name)
        wait_replies(page, n + 1)


def open_chat(page, name: str) -> None:
    page.locator(".conv-item", has_text=name).locator(".conv-open").click()
    expect(page.locator(".conv-item.active")).to_contain_text(name)

def test_send_streams_reply_with_stats(chat, chat_server) -> None:
    page, rec = chat
    set_max_tokens(page, 24)
    page.evaluate(RECORD_STREAM)
    send_and_wait(page, "Hello, who are you?")

    assert page.inner_text(".msg.user .content") == "Hello, who are you?"
    text = last_reply(page).locator(".content").inner_text()
    assert text.strip()
    lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
    assert len(set(lengths)) >= 2, f"the reply did not arrive in pieces: {lengths}"
    m = STATS.match(last_reply(page).locator(".stats").inner_text())
    assert m, last_reply(page).locator(".stats").inner_text()
    assert m.group(1) == ""  # counted by the server (usage), not estimated
    assert 1 <= int(m.group(2)) <= 24
    assert m.group(3) in ("length", "stop")
    # The conversation is titled after the first message and listed.
    assert page.inner_text("#conv-title") == "Hello, who are you?"
    assert page.locator(".conv-item").count() == 1
    # The context count is the server's count of the whole branch (system prompt added by the template).
    page.wait_for_timeout(400)
    reply = stored_content(page, last_reply(page))  # the text as generated (the page shows it as markdown)
    assert reply.strip()
    reply_msgs = [{"role": "user", "content": "Hello, who are you?"}, {"role": "assistant", "content": reply}]
    assert context_count(page) == server_tokens(chat_server.url, {"messages": reply_msgs})
    # Every call went through the public API.
    paths = {r.split("?")[0].removeprefix(chat_server.url) for r in rec.requests}
    assert {"/v1/models", "/tokenize", "/v1/chat/completions"} <= paths


def test_stop_mid_stream(chat) -> None:
    page, _ = chat
    set_max_tokens(page, 2000)
    n = replies_done(page)
    send(page, "Write a very long story.")
    page.wait_for_selector("#stop", state="visible")
    page.wait_for_function(
        "() => { const c = document.querySelectorAll('.msg.assistant .content'); "
        "return c.length && c[c.length - 1].textContent.length > 0; }"
    )
    page.click("#stop")
    wait_replies(page, n + 1, timeout=20_000)
    stats = last_reply(page).locator(".stats").inner_text()
    m = STATS.match(stats)
    assert m and m.group(3) == "stopped", stats
    assert int(m.group(2)) < 2000
    assert last_reply(page).locator(".content").inner_text().strip()
    assert page.is_visible("#send") and not page.is_visible("#stop")
    # Escape stops too.
    n = replies_done(page)
    send(page, "Another long story.")
    page.wait_for_selector("#stop", state="visible")
    page.keyboard.press("Escape")
    wait_replies(page, n + 1, timeout=20_000)
    assert last_reply(page).locator(".stats").inner_text().endswith("finish: stopped")
    # The server is free again: the next message gets a full reply.
    set_max_tokens(page, 6)
    send_and_wait(page, "Short one.")
    assert STATS.match(last_reply(page).locator(".stats").inner_text()).group(3) in ("length", "stop")
    assert page.locator(".msg").count() == 6


def test_regenerate_edit_and_switch_branches(chat) -> None:
    page, _ = chat
    set_max_tokens(page, 10)
    send_and_wait(page, "first question")
    first = last_reply(page).locator(".content").inner_text()

    n = replies_done(page)
    last_reply(page).locator(".regen-btn").click()
    wait_replies(page, n + 1)
    reply = last_reply(page)
    assert reply.locator(".sib-pos").inner_text() == "2/2"
    second = reply.locator(".content").inner_text()

    reply.locator(".sib-prev").click()
    assert last_reply(page).locator(".sib-pos").inner_text() == "1/2"
    assert last_reply(page).locator(".content").inner_text() == first
    last_reply(page).locator(".sib-next").click()
    assert last_reply(page).locator(".sib-pos").inner_text() == "2/2"
    assert last_reply(page).locator(".content").inner_text() == second

    # Edit and resend: a second user branch with its own reply.
    n = replies_done(page)
    page.click(".msg.user .edit-btn")
    page.fill(".msg.user .edit-area", "second question")
    page.click(".msg.user .edit-send")
    wait_replies(page, n + 1)
    assert page.inner_text(".msg.user .content") == "second question"
    assert page.inner_text(".msg.user .sib-pos") == "2/2"
    assert last_reply(page).locator(".switcher").count() == 0
    third = last_reply(page).locator(".content").inner_text()

    # Back to the first branch: its newest reply (the regenerated one) comes back with it.
    page.click(".msg.user .sib-prev")
    assert page.inner_text(".msg.user .content") == "first question"
    assert last_reply(page).locator(".sib-pos").inner_text() == "2/2"
    assert last_reply(page).locator(".content").inner_text() == second

    # The branch on screen survives a reload; the other one is still reachable.
    page.wait_for_timeout(300)
    page.reload()
    page.wait_for_selector('body[data-ready="true"]')
    assert page.inner_text(".msg.user .content") == "first question"
    assert last_reply(page).locator(".content").inner_text() == second
    page.click(".msg.user .sib-next")
    assert page.inner_text(".msg.user .content") == "second question"
    assert last_reply(page).locator(".content").inner_text() == third


def test_documents_are_extracted_and_counted(chat, chat_server, tmp_path) -> None:
    page, _ = chat
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(make_pdf(["Quarterly report", "Revenue grew by twelve percent in the third quarter.",
                              "Costs stayed flat; hiring resumes in spring."]))
    docx = tmp_path / "notes.docx"
    docx.write_bytes(make_docx(["Meeting notes", "The launch moves to May."], table=[["owner", "task"],
                                                                                      ["ana", "write tests"]]))
    before = context_count(page)

    counts = {}
    for path, words in ((pdf, "Revenue grew by twelve percent"), (docx, "ana | write tests")):
        page.set_input_files("#file-input", str(path))
        chip = page.locator(f'.attachments .doc-chip[data-name="{path.name}"]')
        chip.locator(".doc-meta", has_text=re.compile(r"\d tokens")).wait_for()
        meta = re.search(r"([\d,]+) chars · ([\d,]+) tokens", chip.inner_text())
        chars, tokens = (int(g.replace(",", "")) for g in meta.groups())
        # The page's numbers are the server's: extract the text again and count it there.
        req = urllib.request.Request(f"{chat_server.url}/v1/documents/extract", method="POST",
                                     data=_multipart(path.name, path.read_bytes()),
                                     headers={"Content-Type": "multipart/form-data; boundary=xyz"})
        with urllib.request.urlopen(req) as r:
            text = json.load(r)["text"]
        assert words in text
        assert chars == len(text)
        assert tokens == server_tokens(chat_server.url, {"prompt": text})
        after = wait_context_change(page, before)
        assert after >= before + tokens
        counts[path.name] = tokens
        before = after

    set_max_tokens(page, 6)
    send_and_wait(page, "Summarize both documents.")
    chips = page.locator(".msg.user .doc-chip").all_inner_texts()
    assert chips == [f"report.pdf · {counts['report.pdf']} tokens", f"notes.docx · {counts['notes.docx']} tokens"]
    assert page.locator(".attachments .doc-chip").count() == 0
    page.wait_for_timeout(400)
    assert context_count(page) > sum(counts.values())


def test_unreadable_upload_shows_the_servers_error(chat, tmp_path) -> None:
    page, _ = chat
    bad = tmp_path / "slides.pptx"
    bad.write_bytes(b"PK\x03\x04")
    page.set_input_files("#file-input", str(bad))
    page.wait_for_selector("#banner:not([hidden])")
    assert "unsupported file type '.pptx'" in page.inner_text("#banner")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 garbage")
    page.set_input_files("#file-input", str(broken))
    page.wait_for_selector("#banner:has-text('broken.pdf: the PDF could not be read')")
    assert page.locator(".attachments .doc-chip").count() == 0


def test_conversations_survive_reload_rename_search_delete_export_import(chat, tmp_path) -> None:
    page, _ = chat
    set_max_tokens(page, 4)
    send_and_wait(page, "alpha question")
    page.click("#new-conv")
    assert page.locator(".msg").count() == 0
    send_and_wait(page, "beta question")

    page.reload()
    page.wait_for_selector('body[data-ready="true"]')
    assert page.locator(".conv-item .conv-open").all_inner_texts() == ["beta question", "alpha question"]
    assert page.inner_text(".msg.user .content") == "beta question"  # the newest opens

    page.fill("#conv-search", "ALP")
    assert page.locator(".conv-item .conv-open").all_inner_texts() == ["alpha question"]
    page.click(".conv-item .conv-open")
    expect(page.locator(".msg.user .content")).to_have_text("alpha question")
    page.fill("#conv-search", "")

    page.locator(".conv-item.active .conv-rename").click()
    page.fill("#dialog-input", "Renamed chat")
    page.press("#dialog-input", "Enter")
    page.wait_for_selector(".conv-item.active .conv-open:has-text('Renamed chat')")
    assert page.inner_text("#conv-title") == "Renamed chat"

    with page.expect_download() as download:
        page.click("#export-btn")
    exported = tmp_path / "chats.json"
    download.value.save_as(exported)
    data = json.loads(exported.read_text())
    assert sorted(c["name"] for c in data["conversations"]) == ["Renamed chat", "beta question"]

    page.reload()
    page.wait_for_selector('body[data-ready="true"]')
    assert "Renamed chat" in page.locator(".conv-item .conv-open").all_inner_texts()
    page.locator(".conv-item", has_text="beta question").locator(".conv-delete").click()
    page.click("#dialog-ok")
    page.wait_for_function("() => document.querySelectorAll('.conv-item').length === 1")

    page.set_input_files("#import-input", str(exported))
    page.wait_for_selector("#banner:has-text('Imported 2 conversations')")
    names = page.locator(".conv-item .conv-open").all_inner_texts()
    assert sorted(names) == ["Renamed chat", "Renamed chat", "beta question"]
    page.locator(".conv-item", has_text="beta question").locator(".conv-open").click()
    expect(page.locator(".msg.user .content")).to_have_text("beta question")
    assert last_reply(page).locator(".stats").inner_text()


def test_model_output_is_never_run_as_html(chat) -> None:
    page, rec = chat
    page.evaluate("window.__pwned = 0")
    fake_reply(page, [
        "Here: <script>window.__pwned = 1</script> and ",
        '<img src="x" onerror="window.__pwned = 2"> and ',
        '<svg onload="window.__pwned = 3"></svg>\n\n',
        "![tracker](http://evil.example/pixel.png) [click](javascript:window.__pwned=4) ",
        "<iframe src=\"http://evil.example/\"></iframe>\n\n",
        "```html\n<script>alert(1)</script>\n```\n",
    ])
    send_and_wait(page, "say something nasty")
    reply = last_reply(page).locator(".content")
    text = reply.inner_text()
    assert "<script>window.__pwned = 1</script>" in text
    assert '<img src="x" onerror="window.__pwned = 2">' in text
    assert reply.locator("script, img, svg, iframe, [onerror], [onload]").count() == 0
    assert reply.locator('a[href^="javascript:"]').count() == 0
    page.locator(".copy-code").first.wait_for()  # the code block still renders
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") == 0
    assert not any("evil.example" in r for r in rec.requests)


def test_json_mode_sends_response_format_and_formats_the_reply(chat) -> None:
    page, _ = chat
    open_settings(page)
    page.check("#json-mode")
    close_settings(page)
    seen: list[dict] = []
    # Server-sent events may end lines with \r\n: the page's parser takes both.
    fake_reply(page, ['{"name": "Ada",', ' "langs": ["py", "c"],', ' "age": 36}'], seen, crlf=True)
    send_and_wait(page, "Who is Ada?")
    assert seen[0]["response_format"] == {"type": "json_object"}
    assert seen[0]["stream_options"] == {"include_usage": True}
    content = last_reply(page).locator(".content")
    assert content.get_attribute("data-json-valid") == "true"
    shown = content.locator("code").inner_text()
    assert json.loads(shown) == {"name": "Ada", "langs": ["py", "c"], "age": 36}
    assert shown.startswith('{\n  "name": "Ada"')


def test_settings_reach_the_request_and_context_slider_drops_old_turns(chat, chat_server) -> None:
    page, _ = chat
    open_settings(page)
    page.select_option("#preset-select", label="Senior Python engineer")
    assert "senior Python engineer" in page.input_value("#system-prompt")
    page.fill("#max-tokens", "8")
    close_settings(page)
    for q in ("one " * 60, "two " * 60, "three " * 60):
        send_and_wait(page, q.strip())
    full = context_count(page)

    # Shrink the context to 256 tokens: the request keeps the system prompt and the newest turns.
    seen: list[dict] = []
    page.route("**/v1/chat/completions", lambda route: (seen.append(route.request.post_data_json),
                                                        route.continue_()))
    open_settings(page)
    page.eval_on_selector("#context-length", "(e) => { e.value = '256'; e.dispatchEvent(new Event('input')); }")
    assert "256" in page.inner_text("#context-length-out")
    close_settings(page)
    after = wait_context_change(page, full)
    assert after <= 256 - 8 < full
    assert "left out" in page.inner_text("#context-info")
    send_and_wait(page, "four")
    body = seen[0]
    assert body["messages"][0]["role"] == "system"
    assert "senior Python engineer" in body["messages"][0]["content"]
    assert body["messages"][-1] == {"role": "user", "content": "four"}
    assert [m["role"] for m in body["messages"][1:]][0] == "user"
    assert len(body["messages"]) < 8
    assert body["max_tokens"] == 8
    assert server_tokens(chat_server.url, {"messages": body["messages"]}) <= 256 - 8

    # A draft that cannot fit even alone is flagged before it is sent.
    page.fill("#input", "word " * 400)
    expect(page.locator("#context-info")).to_have_class(re.compile(r"\bover\b"))
    expect(page.locator("#context-info .ctx-over")).to_contain_text("too long")


def _multipart(name: str, data: bytes) -> bytes:
    return (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="' + name.encode()
            + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + data + b"\r\n--xyz--\r\n")


def test_presets_keyboard_and_copy(chat, chat_server) -> None:
    page, _ = chat
    open_settings(page)
    shipped = page.locator("#preset-select option").all_inner_texts()
    assert shipped == ["(custom)", "Careful translator", "JSON-only data extractor", "Senior Python engineer"]
    page.fill("#system-prompt", "You answer in haiku.")
    page.click("#preset-save-new")
    page.fill("#dialog-input", "Haiku")
    page.click("#dialog-ok")
    expect(page.locator("#preset-select option:checked")).to_have_text("Haiku")
    page.fill("#system-prompt", "You answer in limericks.")
    page.click("#preset-update")
    expect(page.locator("#dialog-input")).to_have_value("Haiku")
    page.fill("#dialog-input", "Limerick")
    page.click("#dialog-ok")
    expect(page.locator("#preset-select option:checked")).to_have_text("Limerick")
    page.select_option("#preset-select", label="Careful translator")
    page.click("#preset-delete")
    page.click("#dialog-ok")
    expect(page.locator("#preset-select option")).to_have_text(
        ["(custom)", "JSON-only data extractor", "Limerick", "Senior Python engineer"])

    # Presets live in IndexedDB: the edit and the deletion survive a reload (shipped ones are not re-added).
    page.reload()
    page.wait_for_selector('body[data-ready="true"]')
    open_settings(page)
    expect(page.locator("#preset-select option")).to_have_text(
        ["(custom)", "JSON-only data extractor", "Limerick", "Senior Python engineer"])
    page.select_option("#preset-select", label="Limerick")
    assert page.input_value("#system-prompt") == "You answer in limericks."
    page.fill("#max-tokens", "4")
    close_settings(page)

    # Shift+Enter is a new line, Enter sends.
    page.click("#input")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#input") == "line one\nline two"
    assert page.locator(".msg").count() == 0
    seen: list[dict] = []
    fake_reply(page, ["Sure:\n\n```python\nprint('copied')\n```\n"], seen)
    n = replies_done(page)
    page.keyboard.press("Enter")
    wait_replies(page, n + 1)
    assert page.inner_text(".msg.user .content") == "line one\nline two"
    assert seen[0]["messages"][0] == {"role": "system", "content": "You answer in limericks."}
    assert seen[0]["model"] == "tiny"

    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=chat_server.url)
    page.click(".msg.assistant .copy-code")
    expect(page.locator(".msg.assistant .copy-code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "print('copied')\n"


def test_deleting_the_chat_that_is_streaming_stops_it_for_good(chat) -> None:
    page, _ = chat
    set_max_tokens(page, 2000)
    n = replies_done(page)
    send(page, "Tell me everything.")
    page.wait_for_function(
        "() => { const c = document.querySelectorAll('.msg.assistant .content'); "
        "return c.length && c[c.length - 1].textContent.length > 0; }"
    )
    page.click(".conv-item.active .conv-delete")
    page.click("#dialog-ok")
    wait_replies(page, n + 1, timeout=20_000)
    expect(page.locator(".conv-item")).to_have_count(0)
    expect(page.locator(".msg")).to_have_count(0)
    assert page.is_visible("#send")
    page.reload()
    page.wait_for_selector('body[data-ready="true"]')
    expect(page.locator(".conv-item")).to_have_count(0)


def test_a_settings_save_pending_at_deletion_does_not_bring_the_chat_back(chat) -> None:
    """Settings are stored 300 ms after the last change. Page timers run on Playwright's paused clock
    here, and that save is let go while the deletion runs: it must not write the deleted chat back.
    Three rounds, as where the timer lands in the deletion varies (the old order lost about half)."""
    page, _ = chat
    page.clock.pause_at(datetime.datetime(2030, 1, 1))
    for rounds in range(3):
        fake_reply(page, ["Noted."])
        n = replies_done(page)
        send(page, f"Remember {rounds}.")
        wait_replies(page, n + 1)
        set_max_tokens(page, 7 + rounds)
        page.click(".conv-item.active .conv-delete")
        page.click("#dialog-ok")
        page.clock.run_for(1000)
        expect(page.locator(".conv-empty")).to_have_count(1)
        page.wait_for_timeout(200)
        expect(page.locator(".conv-item")).to_have_count(0)
    page.reload()
    page.wait_for_selector('body[data-ready="true"]')
    expect(page.locator(".conv-item")).to_have_count(0)


def test_a_setting_changed_just_before_switching_chats_is_kept(chat) -> None:
    """A setting is stored 300 ms after the last change; switching chats within that time (here: on Playwright's
    paused clock, so the timer has not fired) must store it with the chat it was changed in, not lose it."""
    page, _ = chat
    chats_of_one_turn(page, ["first chat", "second chat"])
    page.clock.pause_at(datetime.datetime(2030, 1, 1))
    page.locator(".conv-item", has_text="first chat").locator(".conv-open").click()
    set_max_tokens(page, 321)
    page.locator(".conv-item", has_text="second chat").locator(".conv-open").click()
    expect(page.locator(".conv-item.active")).to_contain_text("second chat")
    page.clock.run_for(1000)
    page.reload()
    page.wait_for_selector('body[data-ready="true"]')
    page.locator(".conv-item", has_text="first chat").locator(".conv-open").click()
    expect(page.locator(".conv-item.active")).to_contain_text("first chat")
    open_settings(page)
    assert page.input_value("#max-tokens") == "321"


def test_a_draft_and_its_attachment_stay_with_their_chat(chat, tmp_path) -> None:
    """Text written and a document attached in one chat, left unsent: another chat opens with an empty composer,
    and going back brings both back; a new chat starts empty too."""
    page, _ = chat
    chats_of_one_turn(page, ["first chat", "second chat"])
    open_chat(page, "first chat")
    page.fill("#input", "half a question")
    doc = tmp_path / "notes.docx"
    doc.write_bytes(make_docx(["Meeting notes", "The launch moves to May."]))
    page.set_input_files("#file-input", str(doc))
    page.locator('.attachments .doc-chip[data-name="notes.docx"]').wait_for()

    open_chat(page, "second chat")
    assert page.input_value("#input") == ""
    expect(page.locator(".attachments .doc-chip")).to_have_count(0)
    page.click("#new-conv")
    assert page.input_value("#input") == ""
    expect(page.locator(".attachments .doc-chip")).to_have_count(0)

    open_chat(page, "first chat")
    assert page.input_value("#input") == "half a question"
    expect(page.locator('.attachments .doc-chip[data-name="notes.docx"]')).to_have_count(1)


def test_a_document_read_after_its_chat_was_left_waits_in_that_chat(chat, tmp_path) -> None:
    """A document still being read (the server's answer held back) when the user opens another chat: it joins
    the draft of the chat it was attached in, not the chat on screen."""
    page, _ = chat
    chats_of_one_turn(page, ["first chat", "second chat"])
    open_chat(page, "first chat")
    held = []
    page.route("**/v1/documents/extract", lambda route: held.append(route), times=1)
    doc = tmp_path / "late.docx"
    doc.write_bytes(make_docx(["Late notes", "Read after the chat was left."]))
    page.set_input_files("#file-input", str(doc))
    for _ in range(100):
        if held:
            break
        page.wait_for_timeout(50)
    open_chat(page, "second chat")
    with page.expect_response("**/v1/documents/extract"):
        held[0].continue_()
    page.wait_for_timeout(300)  # the page has the text by now
    expect(page.locator(".attachments .doc-chip")).to_have_count(0)
    open_chat(page, "first chat")
    expect(page.locator('.attachments .doc-chip[data-name="late.docx"]')).to_have_count(1)


def test_reload_mid_stream_keeps_the_partial_reply(chat) -> None:
    page, _ = chat
    set_max_tokens(page, 2000)
    send(page, "A long answer, please.")
    page.wait_for_selector("#stop", state="visible")
    page.wait_for_timeout(3500)  # partial replies are stored every 2 s
    streamed = last_reply(page).locator(".content").inner_text()
    page.reload()
    page.wait_for_selector('body[data-ready="true"]')
    expect(page.locator(".msg.user .content")).to_have_text("A long answer, please.")
    kept = last_reply(page).locator(".content").inner_text()
    assert kept and streamed.startswith(kept[:20])
    assert page.is_visible("#send")


def test_thinking_is_shown_collapsed_with_its_length_and_never_sent_back(chat) -> None:
    """A reasoning model's stream (reasoning_content deltas, then content): the answer is the reply, the
    thinking sits above it in a closed <details> that says how long it is, and the next request's history
    carries the answer only."""
    page, _ = chat
    thinking = ["The user greets me.", " I should greet back."]
    fake_reply(page, ["Hello", " there!"], thinking=thinking)
    send_and_wait(page, "Hi")
    reply = last_reply(page)
    details = reply.locator("details.thinking")
    assert details.count() == 1 and details.get_attribute("open") is None
    assert details.locator("summary").inner_text() == f"Thought · {len(''.join(thinking))} characters"
    assert reply.locator(".answer").inner_text() == "Hello there!"
    expect(reply.locator(".thinking-text")).to_be_hidden()
    details.locator("summary").click()
    expect(reply.locator(".thinking-text")).to_have_text("".join(thinking))
    seen: list[dict] = []
    fake_reply(page, ["Fine."], seen)
    send_and_wait(page, "How are you?")
    assert [m["content"] for m in seen[0]["messages"] if m["role"] == "assistant"] == ["Hello there!"]
