"""``create_app``: the FastAPI application of ``chatforge serve``.

    app = create_app(["runs/tiny/sft", "runs/tiny/rm"], api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every error is OpenAI-shaped JSON (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status
for a bad request; the server keeps serving after each.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Optional, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatforge.serve.context import ServedModel, ServeContext, ServeError
from chatforge.serve.models import SchedulerSettings, load_all
from chatforge.serve.openai_routes import add_openai_routes, error_body, error_response

log = logging.getLogger("chatforge.serve")


def create_app(models: Union[list[str], dict[str, ServedModel], ServeContext], *, api_key: Optional[str] = None,
               labels_dir: Optional[str] = None, candidates: Optional[str] = None, prompts: Optional[str] = None,
               device: str = "cpu", settings: Optional[SchedulerSettings] = None,
               trust_remote_code: bool = False) -> FastAPI:
    """The server's app. ``models``: model directories (``DIR`` or ``NAME=DIR``; loaded here, the chat models'
    schedulers started), already loaded ``{name: ServedModel}``, or a whole :class:`ServeContext`.
    The schedulers stop when the app shuts down (``app.state.ctx.close()``)."""
    if isinstance(models, ServeContext):
        ctx = models
    else:
        loaded = models if isinstance(models, dict) else load_all(list(models), device, settings, trust_remote_code)
        ctx = ServeContext(loaded, api_key=api_key, labels_dir=labels_dir, candidates=candidates, prompts=prompts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        ctx.close()

    app = FastAPI(title="chatforge", description="OpenAI-compatible API over chatforge models", lifespan=lifespan)
    app.state.ctx = ctx

    @app.exception_handler(ServeError)
    async def _serve_error(request: HTTPRequest, e: ServeError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(msg, "invalid_request_error", code=str(e.status_code)),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        first = (e.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse(error_body(f"'{where}': {first.get('msg', 'invalid value')}", param=where or None,
                                       code="invalid_value"), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("error while serving %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal server error: {type(e).__name__}: {e}", "server_error"),
                            status_code=500)

    add_openai_routes(app, ctx)
    try:  # the web pages (chat at /, labelling at /label)
        from chatforge.serve.label_routes import add_label_routes
    except ModuleNotFoundError as e:
        if e.name != "chatforge.serve.label_routes":
            raise
    else:
        add_label_routes(app, ctx)
    return app
