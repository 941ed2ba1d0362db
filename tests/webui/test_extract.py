"""`POST /v1/documents/extract` and the page routes of `mount_webui`, on a bare FastAPI app."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pagekit import make_docx, make_pdf
from qwen_serve.server import webui
from qwen_serve.server.webui import CSP, mount_webui

LIMIT = 64 * 1024


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    mount_webui(app, max_upload_bytes=LIMIT)
    return TestClient(app)


def upload(client: TestClient, name: str, data: bytes):
    return client.post("/v1/documents/extract", files={"file": (name, data, "application/octet-stream")})


def assert_error(response, status: int, code: str, words: str) -> None:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code
    assert err["type"] == "invalid_request_error"
    assert words in err["message"]


def test_page_and_assets_are_served_with_a_same_origin_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == CSP
    assert "connect-src 'self'" in CSP and "script-src 'self'" in CSP
    html = page.text
    for asset in ("static/app.js", "static/app.css", "static/theme.js", "static/favicon.svg"):
        assert f'"{asset}' in html
        assert client.get(f"/{asset}").status_code == 200
    # Everything the page loads is local: no absolute http(s) URL in the HTML.
    assert "http://" not in html and "https://" not in html


def test_text_and_markdown(client: TestClient) -> None:
    text = "# Title\n\nSome *text* – ünïcode.\n"
    r = upload(client, "notes.md", text.encode())
    assert r.status_code == 200
    assert r.json() == {"text": text, "filename": "notes.md", "chars": 32}
    r = upload(client, "bom.txt", "\ufeffhello".encode("utf-8"))
    assert r.json()["text"] == "hello"
    r = upload(client, "wide.txt", "hi there".encode("utf-16"))
    assert r.json()["text"] == "hi there"


def test_pdf(client: TestClient) -> None:
    r = upload(client, "report.pdf", make_pdf(["Quarterly report (draft)", "Revenue grew 12 percent."]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Quarterly report (draft)" in body["text"]
    assert "Revenue grew 12 percent." in body["text"]
    assert body["chars"] == len(body["text"])
    assert body["filename"] == "report.pdf"


def test_docx_with_table(client: TestClient) -> None:
    data = make_docx(["Meeting notes", "Ship the chat page."], table=[["owner", "task"], ["ana", "tests"]])
    r = upload(client, "notes.DOCX", data)
    assert r.status_code == 200, r.text
    text = r.json()["text"]
    assert text.splitlines() == ["Meeting notes", "Ship the chat page.", "owner | task", "ana | tests"]


def test_path_in_filename_is_dropped(client: TestClient) -> None:
    r = upload(client, "../../etc/notes.txt", b"x")
    assert r.json()["filename"] == "notes.txt"


def test_unsupported_type(client: TestClient) -> None:
    assert_error(upload(client, "tool.exe", b"MZ\x90\x00"), 415, "unsupported_file_type", "'.exe'")
    assert_error(upload(client, "README", b"text"), 415, "unsupported_file_type", "no extension")


def test_oversized(client: TestClient) -> None:
    assert_error(upload(client, "big.txt", b"a" * (LIMIT + 1)), 413, "file_too_large", "0.0625 MB")
    assert upload(client, "fits.txt", b"a" * LIMIT).status_code == 200


def test_docx_that_unpacks_too_large(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webui, "MAX_DOCX_UNPACKED_BYTES", 1000)
    assert_error(upload(client, "bomb.docx", make_docx(["tiny"])), 413, "file_too_large", "unpacks to")


def _rezip(data: bytes, replace: dict[str, bytes | None]) -> bytes:
    """The DOCX `data` with parts replaced (None: removed)."""
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename in replace:
                continue
            dst.writestr(info, src.read(info))
        for name, body in replace.items():
            if body is not None:
                dst.writestr(name, body)
    return out.getvalue()


LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;'
          b'&lol;&lol;&lol;&lol;&lol;"><!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
          b'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body><w:p><w:r>'
          b'<w:t>&lol3;</w:t></w:r></w:p></w:body></w:document>')
EXTERNAL = (b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            b'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body><w:p><w:r>'
            b'<w:t>&x;</w:t></w:r></w:p></w:body></w:document>')


@pytest.mark.parametrize(("replace", "status", "code", "words"), [
    ({"[Content_Types].xml": None}, 422, "unreadable_file", "not a Word document"),
    ({"word/document.xml": LAUGHS}, 422, "unreadable_file", "declares a DTD"),
    ({"word/document.xml": EXTERNAL}, 422, "unreadable_file", "declares a DTD"),
    ({"word/document.xml": b"<w:document><unclosed>"}, 422, "unreadable_file", "could not be read"),
    ({"word/document.xml": b"<?xml version='1.0'?><w:document xmlns:w='x'/>"}, 422, "unreadable_file",
     "could not be read"),
])
def test_hostile_docx_is_a_4xx_naming_the_problem(client: TestClient, replace, status, code, words) -> None:
    assert_error(upload(client, "evil.docx", _rezip(make_docx(["hello"]), replace)), status, code, words)


def test_docx_whose_text_unpacks_too_far(client: TestClient) -> None:
    """200 MB of text compresses to a few hundred KB: refused by the declared sizes, before any parsing."""
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(make_docx(["x"]))) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename != "word/document.xml":
                dst.writestr(info, src.read(info))
        with dst.open("word/document.xml", "w") as f:
            block = b"<w:p><w:r><w:t>" + b"a" * 1_000_000 + b"</w:t></w:r></w:p>"
            for _ in range(200):
                f.write(block)
    data = out.getvalue()
    assert len(data) < LIMIT * 16
    client_big = TestClient(_app(len(data) + 1))
    assert_error(upload(client_big, "bomb.docx", data), 413, "file_too_large", "of text")


def _app(limit: int) -> FastAPI:
    app = FastAPI()
    mount_webui(app, max_upload_bytes=limit)
    return app


def test_oversized_by_declared_length(client: TestClient) -> None:
    r = client.post(
        "/v1/documents/extract",
        content=b"x" * 10,
        headers={"content-type": "multipart/form-data; boundary=b", "content-length": str(LIMIT * 4)},
    )
    assert_error(r, 413, "file_too_large", "limit")


@pytest.mark.parametrize(
    ("name", "data", "code", "words"),
    [
        ("broken.pdf", b"%PDF-1.4\n this is not a pdf", "unreadable_file", "PDF could not be read"),
        ("fake.pdf", b"plain text", "unreadable_file", "not a PDF"),
        ("broken.docx", b"PK\x03\x04 not a zip", "unreadable_file", "DOCX could not be read"),
        ("latin1.txt", "café".encode("latin-1"), "unreadable_file", "not UTF-8"),
        ("binary.txt", b"\x00\x01\x02abc", "unreadable_file", "binary"),
        ("empty.md", b"  \n", "empty_document", "no text"),
        ("blank.pdf", make_pdf([]), "empty_document", "no text"),
    ],
)
def test_unreadable(client: TestClient, name: str, data: bytes, code: str, words: str) -> None:
    assert_error(upload(client, name, data), 422, code, words)
    assert name in upload(client, name, data).json()["error"]["message"]


def test_missing_file_field(client: TestClient) -> None:
    r = client.post("/v1/documents/extract", files={"other": ("a.txt", b"x", "text/plain")})
    assert_error(r, 400, "missing_file", "'file'")
    r = client.post("/v1/documents/extract", json={"file": "a.txt"})
    assert_error(r, 400, "missing_file", "'file'")
