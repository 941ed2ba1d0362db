"""Helpers for the chat-page tests: starting a real `qwen-serve serve`, opening the page in
Debian's headless Chromium with a request recorder, page actions, and PDF / DOCX writers."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM = os.environ.get("QWEN_SERVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",  # containers often give /dev/shm only 64 MB
]
REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def start_server(model: Path, log: Path, *extra: str, timeout: float = 300.0) -> Server:
    """Starts `python -m qwen_serve.cli serve` on a free port and waits until /health answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "qwen_serve.cli", "serve", "--model", str(model), "--port", str(port),
           "--device", "cpu", "--kv-cache-gb", "0.25", "--disable-uvicorn-access-log", *extra]
    out = log.open("w")
    process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"the server did not become healthy in {timeout:.0f} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@dataclass
class PageRecorder:
    """Every request a page made and every uncaught error it raised."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)

    def foreign(self, origin: str) -> list[str]:
        """Requests that did not go to `origin` (blob: URLs the page made itself count as its own)."""
        out = []
        for url in self.requests:
            parts = urlsplit(url[5:] if url.startswith("blob:") else url)
            if f"{parts.scheme}://{parts.netloc}" != origin:
                out.append(url)
        return out


def open_page(browser, server_url: str, *, width: int = 1280, height: int = 860, color_scheme: str = "light"):
    """A fresh browser context (empty IndexedDB) on the chat page, with a request recorder."""
    context = browser.new_context(viewport={"width": width, "height": height}, color_scheme=color_scheme,
                                  accept_downloads=True)
    page = context.new_page()
    rec = PageRecorder()
    context.on("request", lambda r: rec.requests.append(r.url))
    page.on("pageerror", lambda e: rec.errors.append(str(e)))
    page.on("dialog", lambda d: (rec.dialogs.append(d.message), d.dismiss()))
    page.on("console", lambda m: rec.csp_violations.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(server_url + "/")
    page.wait_for_selector('body[data-ready="true"]')
    return context, page, rec


# ---------- page helpers ----------


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def replies_done(page) -> int:
    """How many replies the page has finished (streamed to the end, stopped or failed)."""
    return int(page.evaluate("document.body.dataset.replies ?? '0'"))


def wait_replies(page, n: int, timeout: float = 120_000) -> None:
    page.wait_for_function("(n) => Number(document.body.dataset.replies ?? 0) >= n", arg=n, timeout=timeout)


def send_and_wait(page, text: str) -> None:
    n = replies_done(page)
    send(page, text)
    wait_replies(page, n + 1)


def open_settings(page) -> None:
    if not page.is_visible("#settings"):
        page.click("#toggle-settings")
    page.wait_for_selector("#settings", state="visible")


def close_settings(page) -> None:
    if page.is_visible("#settings"):
        page.click("#close-settings")


def set_max_tokens(page, n: int) -> None:
    open_settings(page)
    page.fill("#max-tokens", str(n))
    close_settings(page)


# A message's content as the page stored it (IndexedDB "qwen-serve", store "messages", keyed by the message's id),
# not as rendered: markdown's rendering drops and adds characters.
_STORED_CONTENT = """async (id) => {
  const db = await new Promise((ok, fail) => {
    const r = indexedDB.open('qwen-serve'); r.onsuccess = () => ok(r.result); r.onerror = () => fail(r.error); });
  return await new Promise((ok, fail) => {
    const r = db.transaction('messages').objectStore('messages').get(id);
    r.onsuccess = () => ok(r.result ? r.result.content : null); r.onerror = () => fail(r.error); });
}"""


def stored_content(page, message) -> str:
    """The stored content of `message` (an `.msg` locator)."""
    content = page.evaluate(_STORED_CONTENT, message.get_attribute("data-id"))
    assert content is not None, "the message is not in the page's store"
    return content


def context_count(page) -> int:
    page.wait_for_selector("#context-info .ctx-count")
    return int(page.get_attribute("#context-info .ctx-count", "data-count"))


def wait_context_change(page, old: int, timeout: float = 20_000) -> int:
    page.wait_for_function(
        "(old) => { const e = document.querySelector('#context-info .ctx-count');"
        " return e && Number(e.dataset.count) !== old; }",
        arg=old,
        timeout=timeout,
    )
    return context_count(page)


def save_screenshot(page, name: str) -> Path:
    DOCS.mkdir(exist_ok=True)
    path = DOCS / name
    page.screenshot(path=str(path))
    return path


# ---------- documents ----------


def make_pdf(lines: list[str]) -> bytes:
    """A one-page PDF with `lines` as text in Helvetica, written by hand (objects + xref table)."""

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    ops = ["BT", "/F1 12 Tf", "14 TL", "72 740 Td"]
    for line in lines:
        ops += [f"({esc(line)}) Tj", "T*"]
    ops.append("ET")
    stream = "\n".join(ops).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % i + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def make_docx(paragraphs: list[str], table: list[list[str]] | None = None) -> bytes:
    import docx

    document = docx.Document()
    for p in paragraphs:
        document.add_paragraph(p)
    if table:
        t = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, value in enumerate(row):
                t.cell(r, c).text = value
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()

