"""The built-in chat page: serves the bundled page at `/`, its assets under `/static/`, and
`POST /v1/documents/extract`, which turns an uploaded TXT, MD, PDF or DOCX file into plain text.

The page itself (sources in `web/`, built with `npm run build` into `static/`, which is committed so
that `pip install` needs no npm) talks to the server only through the public API on the same origin.
The page is sent with a Content-Security-Policy that allows scripts, styles, images and requests from
this origin only: model output is sanitised before it reaches the DOM, and the policy is the second
wall should anything slip through.
"""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from qwen_serve.server.errors import error_responses

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# A 20 MB PDF can hold far more text than any context; cap what goes back to the browser.
MAX_EXTRACTED_CHARS = 2_000_000
# A DOCX is a zip: refuse one that would unpack to more than this (a zip bomb) before parsing it, and one
# whose XML parts (the text; images are stored beside them) would: 32 MB of XML is ~10,000 pages.
MAX_DOCX_UNPACKED_BYTES = 256 * 1024 * 1024
MAX_DOCX_XML_BYTES = 32 * 1024 * 1024

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'self'"
)


class DocumentError(ValueError):
    """An upload that cannot be turned into text; `status` and `code` go into the error response."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _error(message: str, status: int, code: str) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={
            "error": {"message": message, "type": "invalid_request_error", "param": "file", "code": code}
        },
    )


def _decode_text(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(
            f"the file is not UTF-8 text (invalid byte at offset {e.start})", 422, "unreadable_file"
        ) from e


def _extract_pdf(data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    if not data.startswith(b"%PDF-"):
        raise DocumentError("the file is not a PDF (no %PDF- header)", 422, "unreadable_file")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError("the PDF is encrypted with a password", 422, "unreadable_file")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as e:
        raise DocumentError(f"the PDF could not be read: {e}", 422, "unreadable_file") from e
    return "\n\n".join(p.strip() for p in pages if p.strip())


def _check_docx_package(data: bytes) -> None:
    """Refuses, before python-docx parses anything, a zip that is not an Office document, unpacks too far,
    or carries a DTD. Word never writes a DTD; one in an upload can only be there to define entities
    (billion laughs, external files), so it is refused rather than trusted to the XML parser's settings."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            names = {info.filename for info in infos}
            if "[Content_Types].xml" not in names or "word/document.xml" not in names:
                raise DocumentError("the DOCX could not be read: it is a zip without [Content_Types].xml and "
                                    "word/document.xml, not a Word document", 422, "unreadable_file")
            unpacked = sum(info.file_size for info in infos)
            xml_parts = [info for info in infos if info.filename.endswith((".xml", ".rels"))]
            xml_bytes = sum(info.file_size for info in xml_parts)
            if unpacked > MAX_DOCX_UNPACKED_BYTES or xml_bytes > MAX_DOCX_XML_BYTES:
                raise DocumentError(
                    f"the DOCX unpacks to {unpacked / 2**20:.0f} MB ({xml_bytes / 2**20:.0f} MB of it text), over the "
                    f"{MAX_DOCX_UNPACKED_BYTES / 2**20:.0f} MB limit ({MAX_DOCX_XML_BYTES / 2**20:.0f} MB of text)",
                    413, "file_too_large")
            for info in xml_parts:  # each read stops at its declared size: the sums above bound the work
                if b"<!DOCTYPE" in z.read(info).upper():
                    raise DocumentError(f"the DOCX could not be read: {info.filename} declares a DTD, which Word "
                                        "documents never do (entity definitions are refused)", 422, "unreadable_file")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as e:
        raise DocumentError(f"the DOCX could not be read: {e}", 422, "unreadable_file") from e


def _extract_docx(data: bytes) -> str:
    import docx

    _check_docx_package(data)
    try:
        document = docx.Document(io.BytesIO(data))
        parts = [p.text for p in document.paragraphs if p.text.strip()]
        for table in document.tables:
            for row in table.rows:
                parts.append(" | ".join(cell.text.strip() for cell in row.cells))
    except Exception as e:  # noqa: BLE001 - python-docx parsing an upload: any failure means an unreadable file
        raise DocumentError(f"the DOCX could not be read: {type(e).__name__}: {e}", 422, "unreadable_file") from e
    return "\n".join(parts)


EXTRACTORS: dict[str, Callable[[bytes], str]] = {
    ".txt": _decode_text,
    ".md": _decode_text,
    ".markdown": _decode_text,
    ".pdf": _extract_pdf,
    ".docx": _extract_docx,
}


def extract_text(filename: str, data: bytes) -> str:
    """Plain text of an uploaded document, chosen by its extension; raises DocumentError."""
    suffix = Path(filename).suffix.lower()
    extractor = EXTRACTORS.get(suffix)
    if extractor is None:
        raise DocumentError(
            f"unsupported file type {suffix or '(no extension)'!r}; use .txt, .md, .pdf or .docx",
            415,
            "unsupported_file_type",
        )
    text = extractor(data)
    if "\x00" in text:
        raise DocumentError("the file holds binary data, not text", 422, "unreadable_file")
    if not text.strip():
        raise DocumentError(
            "no text found in the file (a scanned PDF needs OCR first)", 422, "empty_document"
        )
    return text[:MAX_EXTRACTED_CHARS]


def mount_webui(app: FastAPI, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> None:
    """Adds the chat page (`/`), its assets (`/static/`) and `POST /v1/documents/extract` to `app`."""
    index = STATIC_DIR / "index.html"
    limit_mb = max_upload_bytes / (1024 * 1024)
    if index.is_file():

        @app.get("/", include_in_schema=False)
        async def chat_page() -> FileResponse:
            return FileResponse(
                index,
                media_type="text/html",
                headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"},
            )

        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    else:
        # The API still works without the page; say how to build it instead of failing startup.
        logger.warning("%s is missing, so / serves no chat page: run `npm ci && npm run build` in web/", index)

    @app.post("/v1/documents/extract", responses=error_responses(400, 401, 403, 413, 415, 422, 500))
    async def extract_document(request: Request) -> JSONResponse:
        # Refuse early on the declared size, before the multipart body is spooled to disk.
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes + 64 * 1024:
            return _error(f"the file is larger than the {limit_mb:g} MB limit", 413, "file_too_large")
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception as e:  # python-multipart raises several unrelated types for bad bodies
            return _error(f"expected a multipart/form-data upload: {e}", 400, "invalid_upload")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            return _error("no file in the upload (send it as the form field 'file')", 400, "missing_file")
        data = await upload.read(max_upload_bytes + 1)
        await form.close()
        if len(data) > max_upload_bytes:
            return _error(f"the file is larger than the {limit_mb:g} MB limit", 413, "file_too_large")
        filename = Path(upload.filename or "").name
        try:
            text = await run_in_threadpool(extract_text, filename, data)
        except DocumentError as e:
            return _error(f"{filename}: {e}", e.status, e.code)
        return JSONResponse({"text": text, "filename": filename, "chars": len(text)})
