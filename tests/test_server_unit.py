"""In-process checks of the HTTP layer that need no model: the app before its engine is loaded,
the API-key and body-limit middleware, error shapes, and the load generator's statistics."""

from __future__ import annotations

import argparse
import asyncio

import httpx
import pytest

from qwen_serve.bench.serving import RequestResult, _gaps, _lengths, _percentile, summarize
from qwen_serve.config import EngineConfig
from qwen_serve.engine.async_engine import AsyncEngine
from qwen_serve.server.app import build_app
from qwen_serve.server.errors import _param_of
from qwen_serve.server.serving import ServerSettings


def _call(app, method: str, path: str, **kw) -> httpx.Response:
    async def go() -> httpx.Response:
        # ASGITransport runs no lifespan, so the engine is never started: the "still loading" state.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


@pytest.fixture
def app():
    engine = AsyncEngine(EngineConfig(model="unused"))
    return build_app(engine, ServerSettings(served_model_names=["m"], api_key="k3y", max_body_bytes=4096))


def _is_openai_error(r: httpx.Response) -> bool:
    return set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_not_loaded_yet_is_503_with_retry_after(app):
    r = _call(app, "GET", "/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = _call(app, "POST", "/v1/chat/completions", headers={"Authorization": "Bearer k3y"},
              json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["Retry-After"] == "1" and _is_openai_error(r)
    assert _call(app, "GET", "/v1/models", headers={"Authorization": "Bearer k3y"}).json()["data"][0]["id"] == "m"


def test_api_key(app):
    assert _call(app, "GET", "/v1/models").status_code == 401
    assert _call(app, "GET", "/v1/models", headers={"Authorization": "Bearer k3"}).status_code == 401
    assert _call(app, "GET", "/v1/models", headers={"Authorization": "Bearer k3y-and-more"}).status_code == 401
    assert _call(app, "GET", "/v1/models", headers={"Authorization": "bearer k3y"}).status_code == 200
    r = _call(app, "POST", "/tokenize", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert _call(app, "GET", "/metrics").status_code == 200  # open, for scrapers



def test_browsers_reach_the_api_from_its_own_page_or_allowed_origins_only():
    def app_with(origins):
        engine = AsyncEngine(EngineConfig(model="unused"))
        return build_app(engine, ServerSettings(served_model_names=["m"], allowed_origins=origins))

    preflight = {"Origin": "http://x.example", "Access-Control-Request-Method": "POST"}
    models = {"Origin": "http://x.example"}
    default = app_with([])
    # Another site's page: no CORS grant, and a request it sends anyway (a form post, a text/plain
    # fetch) is refused before it reaches the model.
    assert _call(default, "OPTIONS", "/v1/models", headers=preflight).status_code == 400
    r = _call(default, "GET", "/v1/models", headers=models)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin" and _is_openai_error(r)
    assert "access-control-allow-origin" not in r.headers
    # The server's own page (Origin = its host), and clients that send no Origin, pass.
    assert _call(default, "GET", "/v1/models", headers={"Origin": "http://test"}).status_code == 200
    assert _call(default, "GET", "/v1/models").status_code == 200
    allowed = app_with(["http://x.example"])
    r = _call(allowed, "OPTIONS", "/v1/models", headers=preflight)  # CORS preflight needs no key
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://x.example"
    assert _call(allowed, "GET", "/v1/models", headers=models).status_code == 200
    assert _call(app_with(["*"]), "GET", "/v1/models", headers=models).status_code == 200


def test_body_limit_by_header_and_by_counting(app):
    auth = {"Authorization": "Bearer k3y", "Content-Type": "application/json"}
    big = b'{"model": "m", "prompt": "' + b"x" * 8000 + b'"}'
    r = _call(app, "POST", "/v1/completions", headers=auth, content=big)
    assert r.status_code == 413 and _is_openai_error(r)

    async def chunks():  # no Content-Length: the middleware must count the chunks
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    r = _call(app, "POST", "/v1/completions", headers=auth, content=chunks())
    assert r.status_code == 413 and _is_openai_error(r)


def test_validation_error_param_names():
    assert _param_of(("body", "messages", 0, "role")) == "messages.0.role"
    assert _param_of(("body", "prompt", "list[int]", 0)) == "prompt.0"
    assert _param_of(("body", "stop", "str")) == "stop"
    assert _param_of(("body",)) is None


def test_value_errors_name_request_fields():
    from qwen_serve.server.errors import APIError
    from qwen_serve.structured.spec import StructuredOutputError

    assert APIError.from_value_error(ValueError("top_p must be in (0, 1]")).param == "top_p"
    assert APIError.from_value_error(ValueError("structured_output must be a dict")).param == "response_format"
    assert APIError.from_value_error(ValueError("unsupported thing: x")).param is None
    assert APIError.from_value_error(StructuredOutputError("unsupported JSON schema: if")).param == "response_format"


def test_settings_validation():
    with pytest.raises(ValueError, match="served-model-name"):
        ServerSettings(served_model_names=[])
    with pytest.raises(ValueError, match="max-waiting"):
        AsyncEngine(EngineConfig(model="unused"), max_waiting=-1)


def test_bench_statistics():
    assert _percentile(list(range(1, 101)), 50) == pytest.approx(50.5)
    assert _percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    import random

    rng = random.Random(0)
    assert _lengths("10,20", 4, 0.0, rng) == [10, 20, 10, 20]
    assert all(5 <= n <= 15 for n in _lengths("10", 50, 0.5, rng))
    assert _gaps(3, 4.0, "fixed", rng) == [0.25] * 3
    gaps = _gaps(4000, 4.0, "poisson", rng)
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.1)
    ok = RequestResult(ok=True, prompt_len=10, output_tokens=5, ttft=0.1, e2e=0.5, itl=[0.1] * 4)
    bad = RequestResult(error="HTTP 503")
    args = argparse.Namespace(endpoint="completions", request_rate=float("inf"), arrival="poisson", max_concurrency=None)
    report = summarize([ok, ok, bad], 2.0, args, "m")
    assert report["completed"] == 2 and report["failed"] == 1 and report["errors"] == ["HTTP 503"]
    assert report["output_throughput"] == pytest.approx(5.0)
    assert report["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert report["itl_ms"]["p99"] == pytest.approx(100.0)


def test_internal_errors_are_counted_logged_once_and_openai_shaped(app, caplog):
    """A bug in a handler: a 500 in OpenAI's shape with no traceback in it, one log record, and the status
    counted in /metrics like every other response."""
    async def boom() -> None:
        raise RuntimeError("secret detail")

    app.add_api_route("/boom", boom)
    headers = {"Authorization": "Bearer k3y"}
    with caplog.at_level("ERROR"):
        r = _call(app, "GET", "/boom", headers=headers)
    assert r.status_code == 500 and _is_openai_error(r) and "secret" not in r.text
    assert r.json()["error"]["type"] == "server_error"
    assert sum("internal error on GET /boom" in rec.getMessage() for rec in caplog.records) == 1
    metrics = _call(app, "GET", "/metrics", headers=headers).text
    assert 'qwen_serve_http_responses_total{status="500"} 1.0' in metrics


def test_openapi_documents_the_error_responses(app):
    """A schema-driven client or fuzzer sees the statuses the server answers, each in OpenAI's error shape,
    and no 422 for invalid bodies (they are 400s, as OpenAI's)."""
    doc = _call(app, "GET", "/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "403", "404", "413", "500", "503"} <= set(chat) and "422" not in chat
    assert chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    error = doc["components"]["schemas"]["ErrorDetail"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert _call(app, "POST", "/v1/chat/completions", headers={"Authorization": "Bearer k3y"},
                 json={"model": "m"}).status_code == 400
