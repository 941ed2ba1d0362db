"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the right status.

Bad input is always a 4xx: pydantic's validation errors and malformed JSON become 400 with `param`
naming the field; `ValueError`s raised while turning a request into engine work become 400 too.
Only a bug reaches the catch-all (`InternalErrorMiddleware`), which logs the traceback once and hides it
from the client behind a 500 in the same shape.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("qwen_serve.server")

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


class APIError(Exception):
    """An error the client gets back as JSON; raise it anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = None) -> "APIError":
        return cls(400, message, param=param, code=code)

    @classmethod
    def from_value_error(cls, err: ValueError) -> "APIError":
        """A ValueError whose message starts with a request field's name ("top_p must be ...") -> 400
        naming it; constraint errors (unsupported schemas) name response_format."""
        message = str(err) or "invalid request"
        head = message.split(":", 1)[0].split(" ", 1)[0]
        param = _PARAM_ALIASES.get(head, head if head in _request_fields() else None)
        if param is None and type(err).__name__ == "StructuredOutputError":
            param = "response_format"
        return cls(400, message, param=param, code=getattr(err, "code", None))

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# SamplingParams names that differ from the request field a client sent.
_PARAM_ALIASES = {"structured_output": "response_format"}


@functools.cache
def _request_fields() -> frozenset[str]:
    from qwen_serve.server.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest

    return frozenset(f for m in (ChatCompletionRequest, CompletionRequest, TokenizeRequest) for f in m.model_fields)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """Every error this server answers, in OpenAI's shape (the OpenAPI document's error schema)."""

    error: ErrorDetail


_DESCRIPTIONS = {
    400: "Invalid request: a malformed body, a bad field (named in `param`), a prompt too long for the context",
    401: "Missing or wrong API key (with --api-key)",
    403: "Sent from a web page whose origin --allowed-origins does not list",
    404: "No such model",
    413: "Request body (or upload) over its limit",
    415: "Unsupported file type",
    422: "A file that cannot be read as text",
    500: "A bug in the server",
    503: "Loading, shutting down, stopped, or overloaded (see Retry-After)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route: the errors it can answer, each with the error schema."""
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]} for status in statuses}


def drop_validation_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents a 422 for every route with a body; invalid bodies get a 400 here (OpenAI's
    status), which the routes document instead."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            responses = operation.get("responses", {})
            if responses.get("422", {}).get("description") == "Validation Error":  # FastAPI's, not a route's own
                del responses["422"]
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Names pydantic puts into an error's location for the member of a union it tried; not field names.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "TextPart"})


def _param_of(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages.0.role', without pydantic's union-member tags."""
    parts = [str(p) for p in loc
             if p != "body" and not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS or p.startswith("function-")))]
    return ".".join(parts) or None


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}").response()
    param = _param_of(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and param:
        message = f"{param}: field required"
    else:
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=param).response()


class ClientDisconnected(Exception):
    """The client went away before the response was ready; its engine requests were aborted. Answered 499
    (nginx's "client closed request"; nobody reads it, the status counter does)."""


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> JSONResponse:
        return JSONResponse({}, status_code=499)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = "no such route"
        elif exc.status_code == 405:
            message = "method not allowed on this route"
        return APIError(exc.status_code, message, headers=exc.headers).response()


class InternalErrorMiddleware:
    """The catch-all for bugs: logs the traceback once and answers a 500 in OpenAI's shape. A plain ASGI
    middleware inside the status counter, so every 500 is counted: Starlette runs an
    `exception_handler(Exception)` in its outermost middleware, past all others, and re-raises after
    answering, so those 500s went uncounted and uvicorn logged each one a second time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:  # a stream already under way: the server must close the connection
                raise
            logger.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            body = error_body("internal server error", "server_error", None, None)
            await JSONResponse(body, status_code=500)(scope, receive, send)
