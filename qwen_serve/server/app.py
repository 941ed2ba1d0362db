"""`build_app(engine, settings)`: the FastAPI application, its routes and its middleware.

Routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/responses, /tokenize, /detokenize, /health,
/metrics, /version, and the chat page from `qwen_serve.server.webui` when that module is present.
Middleware, outermost first: response counting by status, CORS and the origin check (only the server's
own page and `--allowed-origins` may call it from a browser), API key (Bearer, compared in
constant time; /health, /metrics and the page stay open), request-body limit (413).
The app starts the engine thread in its lifespan and stops it after uvicorn drained in-flight requests.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.util
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen_serve import __version__
from qwen_serve.engine.async_engine import AsyncEngine
from qwen_serve.server.errors import (APIError, InternalErrorMiddleware, drop_validation_responses, error_body,
                                     error_responses, install_error_handlers)
from qwen_serve.server.metrics import ServerMetrics, StatusCounterMiddleware
from qwen_serve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ResponsesRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from qwen_serve.server.serving import Serving, ServerSettings
from qwen_serve.server.serving_chat import ChatServing, message_dicts
from qwen_serve.server.serving_completion import CompletionServing
from qwen_serve.server.serving_responses import ResponsesServing, ResponseStore

def _needs_key(path: str) -> bool:
    # /health, /metrics, /version and the chat page stay open (load balancers, Prometheus, the browser).
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


class OriginMiddleware:
    """403 for a request a browser sent from another site's page, unless `--allowed-origins` lets that site
    in. CORS alone only stops the page from reading the answer: a form post or a text/plain fetch would
    still reach the model (and, without an API key, use it). A request without an Origin header (curl,
    SDKs) or from the server's own page passes."""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.any = "*" in allowed
        self.allowed = {o.rstrip("/").lower() for o in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/").lower()
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if not origin or origin in self.allowed or origin.split("://", 1)[-1] == host:
            return await self.app(scope, receive, send)
        body = error_body(f"requests from the web origin {origin!r} are not allowed; start the server with "
                          "--allowed-origins to let that site use the API", "permission_error", None, "forbidden_origin")
        await JSONResponse(body, status_code=403)(scope, receive, send)


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` matches; both sides are hashed first so the
    comparison takes the same time whatever the key's length or how much of it matches."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not _needs_key(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        ok = hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self._digest)
        if not ok or scheme.lower() != "bearer":
            response = APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}).response()
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a request body over the limit, by Content-Length up front or by counting a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, message = (413, self._message()) if length.isdigit() else (400, "invalid Content-Length header")
            await APIError(status, message, code="request_too_large" if status == 413 else None).response()(
                scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI turns an HTTPException raised while reading the body into this response.
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"request body larger than the limit of {self.max_bytes} bytes"


def webui_available() -> bool:
    return importlib.util.find_spec("qwen_serve.server.webui") is not None


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    metrics = ServerMetrics(engine.stats)
    chat = ChatServing(engine, settings, metrics)
    completion = CompletionServing(engine, settings, metrics)
    responses = ResponsesServing(engine, settings, metrics, store=ResponseStore(settings.max_stored_responses))
    base = Serving(engine, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.shutdown()

    app = FastAPI(title="qwen-serve", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)

    api_errors = error_responses(400, 401, 403, 404, 413, 500, 503)

    @app.get("/health", responses={503: {"description": "Loading, failed, stopped or shutting down: "
                                                        "{\"status\": \"loading\" | \"failed\" | \"stopping\"}"}})
    async def health() -> Response:
        if engine.is_ready:
            return JSONResponse({"status": "ok"})
        failed = engine.load_error or engine.fatal_error
        status = "loading" if engine.is_loading else ("failed" if failed else "stopping")
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=error_responses(401, 403, 500))
    async def models() -> ModelList:
        max_len = engine.max_model_len if engine.is_ready else None
        return ModelList(data=[ModelCard(id=name, root=settings.model_root, max_model_len=max_len)
                               for name in settings.served_model_names])

    @app.get("/v1/models/{model:path}", responses=error_responses(401, 403, 404, 500))
    async def model(model: str) -> ModelCard:
        name = base.check_model(model)
        return ModelCard(id=name, root=settings.model_root, max_model_len=engine.max_model_len if engine.is_ready else None)

    @app.post("/v1/chat/completions", responses=api_errors)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await chat.create(req, request)

    @app.post("/v1/responses", responses=api_errors)
    async def create_response(req: ResponsesRequest, request: Request) -> Response:
        return await responses.create(req, request)

    @app.get("/v1/responses/{response_id}", responses=error_responses(401, 403, 404, 500))
    async def retrieve_response(response_id: str) -> Response:
        found = responses.store.get(response_id)
        if found is None:
            raise APIError(404, f"response '{response_id}' is not stored (never made with store true, or evicted)",
                           param="response_id", code="response_not_found")
        return JSONResponse(found[0])

    @app.post("/v1/completions", responses=api_errors)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await completion.create(req, request)

    @app.post("/tokenize", responses=api_errors)
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        try:
            req.validate_fields()
        except ValueError as err:
            raise APIError.from_value_error(err) from None
        base.check_model(req.model)
        base.check_ready()
        tok = base.tokenizer
        if req.messages is not None:
            try:
                protect = not settings.content_special_tokens
                messages = message_dicts(req.messages)
                text = tok.apply_chat_template(tok.protect_special_tokens(messages) if protect else messages,
                                               add_generation_prompt=req.add_generation_prompt,
                                               continue_final_message=req.continue_final_message)
            except ValueError as err:
                raise APIError(400, str(err), param="messages") from None
        else:
            text = req.prompt or ""
        # Counting may go past the context (to tell how much to cut), up to 16 contexts, which caps the work.
        ids = await base.encode(text, "messages" if req.messages is not None else "prompt",
                                limit=16 * engine.max_model_len,
                                add_special_tokens=req.messages is None if req.add_special_tokens is None
                                else req.add_special_tokens,
                                literal_special_tokens=req.messages is not None and not settings.content_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids)

    @app.post("/detokenize", responses=api_errors)
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        base.check_model(req.model)
        base.check_ready()
        base.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=base.tokenizer.decode(req.tokens, skip_special_tokens=False))

    if webui_available():
        from qwen_serve.server.webui import mount_webui

        mount_webui(app)

    default_openapi = app.openapi
    app.openapi = lambda: drop_validation_responses(default_openapi())  # type: ignore[method-assign]

    # add_middleware puts each new one outside the previous: the body limit runs innermost.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(OriginMiddleware, allowed=settings.allowed_origins)
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(StatusCounterMiddleware, metrics=metrics)
    return app
