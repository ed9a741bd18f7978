"""The feedback web app: FastAPI with server-rendered, autoescaped templates (no front-end build).

Pages: log in; the next item (rate a reply 1–5 / thumbs, compare two replies shown in random order with
A / B / Tie / Both bad, correct a reply) with keyboard shortcuts; progress; the admin page (users,
import, agreement and reliability, export). A JSON API (``/api/…``) does the same for scripts.

Layout (full-stack-fastapi-template): ``create_app`` only wires — settings checks, middleware, the app's state,
one router per area from ``api/`` (auth, annotate, replies, admin; shared dependencies in ``api/deps.py``) and
one error handler that maps the domain errors of ``errors.py`` (raised by the store and the routes) to HTTP.

Security: argon2 password hashes, checked in the same time for unknown names (store.py); a signed session cookie,
HttpOnly and SameSite=Strict (Secure in production), carrying the user's session version, so that logging out or
being switched off ends every session; a CSRF token on every form and API write, and JSON writes only as JSON
from this origin; roles checked on the server for every route; annotators reach only the items assigned to them
(others answer 404, like ids that do not exist); one log-in limiter on every log-in route (security.py); every
body validated (pydantic models for JSON, text-only form fields), request bodies capped; CSP with a per-request
script nonce and the other security headers on every response; the store uses parameterised SQL only. Errors
are 4xx pages or JSON, never tracebacks.
"""

from __future__ import annotations

import os
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware

from chatrlhf.feedback.api import admin, annotate, auth, replies
from chatrlhf.feedback.api.deps import Feedback, render
from chatrlhf.feedback.errors import FeedbackError, Invalid
from chatrlhf.feedback.security import DeviceCookies, LoginLimiter, SecurityHeaders
from chatrlhf.feedback.store import Store

TEMPLATES = Path(__file__).resolve().parent / "templates"
MAX_BODY = 256 * 1024          # bytes per request (imports included)
MIN_SECRET = 32               # characters of CHATRLHF_SECRET in production (secrets.token_urlsafe(32) gives 43)
GUIDELINES = """Prefer the reply that is helpful, honest and harmless. Judge what the user asked for, not length.
Tie: both equally good. Both bad: neither is acceptable. A correction should be the reply you would want."""


class BodyLimit:
    """413 for bodies over ``limit`` bytes, by Content-Length or while streaming. The server's API subclasses it
    for OpenAI-shaped bodies (serve/app.py): ``response()`` answers a declared length, ``error()`` is raised
    mid-stream for the app's handlers to shape."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def response(self):
        return JSONResponse({"error": f"request body over {self.limit} bytes"}, 413)

    def error(self) -> Exception:
        return HTTPException(413, f"request body over {self.limit} bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self.response()(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self.error()
            return message

        return await self.app(scope, limited, send)


def from_env() -> FastAPI:
    """The app for ``uvicorn --factory`` worker processes: settings from CHATRLHF_DB, CHATRLHF_SECRET and
    CHATRLHF_PRODUCTION (set by ``chatrlhf feedback serve --workers N``)."""
    models = [m for m in os.environ.get("CHATRLHF_MODELS", "").split(",") if m]
    return create_app(Store(os.environ["CHATRLHF_DB"], upgrade=False), os.environ.get("CHATRLHF_SECRET"),
                      os.environ.get("CHATRLHF_PRODUCTION") == "1", models=models,
                      max_new_tokens=int(os.environ.get("CHATRLHF_MAX_NEW_TOKENS", "128")))


def create_app(store: Store, secret: str | None = None, production: bool = False, k_default: int = 1,
               guidelines: str = GUIDELINES, models: list[str] | tuple = (), max_new_tokens: int = 128) -> FastAPI:
    """The app: settings checked, the security middleware, the routers of each area, one error handler."""
    if production and (not secret or len(secret) < MIN_SECRET):
        raise Invalid(f"production mode needs a session secret of at least {MIN_SECRET} random characters",
                      "set CHATRLHF_SECRET, e.g. to the output of "
                      "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if production and not any(u.role == "admin" for u in store.users()):
        raise Invalid("production mode needs an admin and has no default password",
                      "create one first: chatrlhf feedback add-user --role admin --name …")

    @asynccontextmanager
    async def lifespan(_app):  # SQLite: WAL checkpoints in a background thread while serving
        with store.checkpointing():
            yield

    app = FastAPI(title="chatrlhf feedback", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    secret = secret or secrets.token_urlsafe(32)
    app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie="chatrlhf_session", same_site="strict",
                       https_only=production, max_age=12 * 3600)
    app.add_middleware(BodyLimit, limit=MAX_BODY)  # (FastAPI's max_body_size answers a bare "Content Too Large")
    app.add_middleware(SecurityHeaders, production=production)
    app.state.feedback = Feedback(store, Jinja2Templates(directory=str(TEMPLATES)),  # .html templates autoescape
                                  LoginLimiter(), DeviceCookies(secret, production), guidelines, k_default,
                                  replies.load_writers(models, max_new_tokens))
    for area in (auth, annotate, replies, admin):  # flat, not include_router (which nests them in FastAPI ≥ 0.16x):
        app.router.routes.extend(area.router.routes)  # app.routes lists every route (the tests walk it)
    for error in (FeedbackError, RequestValidationError, HTTPException):
        app.add_exception_handler(error, refused)
    return app


async def refused(request: Request, e: Exception):
    """The one error handler: a domain error, a request that fails validation or an HTTP error becomes a 4xx —
    JSON under /api/, a page elsewhere, and a GET page that needs a log-in redirects to it. Never a traceback."""
    if isinstance(e, RequestValidationError):
        e = Invalid("bad request: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))
    status, message = (e.status, str(e)) if isinstance(e, FeedbackError) else (e.status_code, str(e.detail))
    api = request.url.path.startswith("/api/")
    if status == 401 and not api and request.method == "GET":
        return RedirectResponse("/login", 303)
    if api:
        return JSONResponse({"error": message}, status)
    return await render(request, "error.html", status=status, message=message)
