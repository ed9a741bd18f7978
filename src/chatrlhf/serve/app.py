"""The server's FastAPI app: ``create_app`` wires the middleware (body limit, status counting), the routes
(chat completions in completions.py, feedback in feedback.py, hot swap in admin.py; models, health and metrics
here) and the error handlers that turn every
failure into OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` — validation errors (FastAPI's
422) become 400 naming the field, unknown routes 404, anything unexpected a 500 without a traceback."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from chatrlhf.feedback import app as feedback_app
from chatrlhf.serve import admin, chat, completions, feedback
from chatrlhf.serve.completions import Server, authorized
from chatrlhf.serve.metrics import CountStatus
from chatrlhf.serve.protocol import APIError, validation_error


class BodyLimit(feedback_app.BodyLimit):
    """413 (OpenAI-shaped) for a body over ``limit`` bytes, by Content-Length or while it streams in."""

    def error(self) -> APIError:
        return APIError(413, f"the request body is over this server's limit of {self.limit} bytes", None,
                        "request_too_large")

    def response(self):
        return JSONResponse(self.error().body(), 413)


def create_app(s: Server) -> FastAPI:
    """The app of server ``s`` (its served model's engine started)."""
    app = FastAPI(title="chatrlhf serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = s
    app.add_middleware(BodyLimit, limit=s.cfg.max_body_bytes)
    app.add_middleware(CountStatus, metrics=s.metrics)
    app.router.routes.extend(completions.router.routes + feedback.router.routes + chat.router.routes +
                             admin.router.routes)
    created = int(time.time())

    @app.get("/v1/models")
    async def models(_key: Annotated[str, Depends(authorized)]):
        """The served model first; then the name the server started with, which a request may still use."""
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "chatrlhf"} for name in s.names]}

    @app.get("/health")
    async def health():
        if not s.served.engine.serving:
            raise APIError(503, "the generation engine is not running", None, "unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(s.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    for error in (APIError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(error, refused)
    return app


async def refused(request: Request, e: Exception) -> JSONResponse:
    """The one error handler: every error in OpenAI's shape, with Retry-After where the client should retry."""
    if isinstance(e, RequestValidationError):
        e = validation_error(e.errors())
    elif isinstance(e, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        e = APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None, code)
    elif not isinstance(e, APIError):
        e = APIError(500, f"internal error ({type(e).__name__}); the server log has the details", None,
                     "internal_error")
    return JSONResponse(e.body(), e.status, headers=e.headers())
