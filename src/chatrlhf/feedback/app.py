"""The feedback web app: FastAPI with server-rendered, autoescaped templates (no front-end build).

Pages: log in; the next item (rate a reply 1–5 / thumbs, compare two replies shown in random order with
A / B / Tie / Both bad, correct a reply) with keyboard shortcuts; progress; the admin page (users,
import, agreement and reliability, export). A JSON API (``/api/…``) does the same for scripts.

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

import io
import json
import secrets
import tempfile
import time
import zipfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware

from chatrlhf.feedback.security import DeviceCookies, LoginLimiter, SecurityHeaders, check_json_write
from chatrlhf.feedback.store import FeedbackError, Store

TEMPLATES = Path(__file__).resolve().parent / "templates"
MAX_BODY = 256 * 1024          # bytes per request (imports included)
MIN_SECRET = 32               # characters of CHATRLHF_SECRET in production (secrets.token_urlsafe(32) gives 43)
MAX_ID = 2**63 - 1             # ids are 64-bit: larger path ids are a 400, not an overflow
ItemId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
USER_TTL = 2.0                 # seconds a session's user record is reused before it is read again
GUIDELINES = """Prefer the reply that is helpful, honest and harmless. Judge what the user asked for, not length.
Tie: both equally good. Both bad: neither is acceptable. A correction should be the reply you would want."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AnswerBody(Strict):
    """An answer through the JSON API; the store checks it against the item's kind."""
    score: float | None = Field(None, ge=1, le=5)
    thumbs: Literal[-1, 1] | None = None
    choice: Literal["a", "b", "tie", "both_bad"] | None = None
    confidence: float | None = Field(None, ge=0, le=1)
    corrected: str | None = Field(None, max_length=100_000)
    reason: str | None = Field(None, max_length=4000)


class LoginBody(Strict):
    name: str = Field(max_length=64)
    password: str = Field(max_length=1024)


def parsed(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise FeedbackError("bad request: " + "; ".join(f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}"
                                                         for x in e.errors()), status=400) from None


class BodyLimit:
    """413 for bodies over ``limit`` bytes, by Content-Length or while streaming."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await JSONResponse({"error": f"request body over {self.limit} bytes"}, 413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


def from_env() -> FastAPI:
    """The app for ``uvicorn --factory`` worker processes: settings from CHATRLHF_DB, CHATRLHF_SECRET and
    CHATRLHF_PRODUCTION (set by ``chatrlhf feedback serve --workers N``)."""
    import os

    models = [m for m in os.environ.get("CHATRLHF_MODELS", "").split(",") if m]
    return create_app(Store(os.environ["CHATRLHF_DB"], upgrade=False), os.environ.get("CHATRLHF_SECRET"),
                      os.environ.get("CHATRLHF_PRODUCTION") == "1", models=models,
                      max_new_tokens=int(os.environ.get("CHATRLHF_MAX_NEW_TOKENS", "128")))


def create_app(store: Store, secret: str | None = None, production: bool = False, k_default: int = 1,
               guidelines: str = GUIDELINES, models: list[str] | tuple = (), max_new_tokens: int = 128) -> FastAPI:
    if production and (not secret or len(secret) < MIN_SECRET):
        raise FeedbackError(f"production mode needs a session secret of at least {MIN_SECRET} random characters",
                            "set CHATRLHF_SECRET, e.g. to the output of "
                            "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if production and not any(u.role == "admin" for u in store.users()):
        raise FeedbackError("production mode needs an admin and has no default password",
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
    limiter, devices = LoginLimiter(), DeviceCookies(secret, production)
    pages = Jinja2Templates(directory=str(TEMPLATES))  # .html templates autoescape
    if len(models) > 2:
        raise FeedbackError("at most two --model (two models make compare items)")
    writers = []
    if models:
        from chatrlhf.feedback.writers import ReplyWriter

        writers = [ReplyWriter(m, max_new_tokens) for m in models]

    # ------------------------------------------------------------------ helpers

    async def blocking(fn, *args, **kwargs):
        """A store call on an annotator's path. PostgreSQL: in a worker thread, so requests overlap while they
        wait on the server (round trips, commit flushes). SQLite: inline — its calls are short CPU work under one
        write lock, and the thread hop would only add to it. (Password checks, the admin page's statistics and
        exports always run in a thread: seconds of work that must not stall everyone's requests.)"""
        if store.sqlite:
            return fn(*args, **kwargs)
        return await run_in_threadpool(fn, *args, **kwargs)

    def api(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    def csrf_token(request: Request) -> str:
        if "csrf" not in request.session:
            request.session["csrf"] = secrets.token_urlsafe(32)
        return request.session["csrf"]

    def check_csrf(request: Request, sent: str | None) -> None:
        if not sent or not secrets.compare_digest(str(sent), request.session.get("csrf", "")):
            raise FeedbackError("missing or wrong CSRF token — reload the page and try again", status=403)

    users: dict[int, tuple] = {}  # id → (user, read at): a role change or deactivation applies within USER_TTL

    async def user_of(request: Request, *roles: str):
        uid = request.session.get("uid")
        user = None
        if isinstance(uid, int):
            user, at = users.get(uid, (None, 0.0))
            if time.monotonic() - at > USER_TTL:
                user = await blocking(store.user, uid)
                users[uid] = (user, time.monotonic())
        if user is None or not user.active or request.session.get("sv") != user.session_version:
            raise FeedbackError("log in first", status=401)  # (logged out, switched off, or a session from before)
        if roles and user.role not in roles:
            raise FeedbackError(f"this needs the {' or '.join(roles)} role", status=403)
        return user

    async def form(request: Request, files: tuple = ()) -> dict:
        """The form's fields, each text (a file only in a field named in ``files``)."""
        try:
            data = await request.form()
        except Exception:  # noqa: BLE001 - malformed multipart or urlencoded body
            raise FeedbackError("malformed form", status=400) from None
        for k, v in data.multi_items():
            if isinstance(v, UploadFile) and k not in files:
                raise FeedbackError(f"form field {k!r} must be text, not a file", status=400)
        return {k: v for k, v in data.items()}

    async def body_json(request: Request) -> dict:
        """A JSON object body, sent as JSON from this origin (see security.check_json_write)."""
        check_json_write(request)
        try:
            data = json.loads(await request.body() or b"{}")
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise FeedbackError("malformed JSON body", status=400) from None
        if not isinstance(data, dict):
            raise FeedbackError("the JSON body must be an object", status=400)
        return data

    async def log_in(request: Request, name: str, password: str):
        """The one log-in path of every route: the limiter, one argon2 check (in a thread), a fresh session."""
        trusted = devices.trusted(request, name)
        limiter.check(name, trusted)
        user = await run_in_threadpool(store.authenticate, name, password)  # ~0.1 s of argon2
        if user is None:
            limiter.failed(name, trusted)
            return None
        request.session.clear()
        request.session.update(uid=user.id, sv=user.session_version, csrf=secrets.token_urlsafe(32))
        return user

    async def log_out(request: Request) -> None:
        uid = request.session.get("uid")
        if isinstance(uid, int):
            await blocking(store.end_sessions, uid)
            users.pop(uid, None)
        request.session.clear()

    async def render(request: Request, name: str, user=None, status: int = 200, **ctx):
        progress = await blocking(store.progress, user.id) if user is not None else None
        overall = await blocking(store.progress)
        return pages.TemplateResponse(request, name, {"user": user, "csrf": csrf_token(request), "progress": progress,
                                                      "overall": overall, "guidelines": guidelines,
                                                      "csp_nonce": request.state.csp_nonce, **ctx}, status_code=status)

    # ------------------------------------------------------------------ errors: 4xx, never a traceback

    @app.exception_handler(FeedbackError)
    async def refused(request: Request, e: FeedbackError):
        if e.status == 401 and not api(request) and request.method == "GET":
            return RedirectResponse("/login", 303)
        if api(request):
            return JSONResponse({"error": str(e)}, e.status)
        return await render(request, "error.html", status=e.status, message=str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return await refused(request, FeedbackError("bad request: " + "; ".join(
            f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()), status=400))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return await refused(request, FeedbackError(str(e.detail), status=e.status_code))

    # ------------------------------------------------------------------ log-in

    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request):
        return await render(request, "login.html")

    @app.post("/login")
    async def login(request: Request):
        data = await form(request)
        check_csrf(request, data.get("csrf"))
        user = await log_in(request, data.get("name", "")[:64], data.get("password", "")[:1024])
        if user is None:
            return await render(request, "login.html", status=401, message="wrong name or password")
        response = RedirectResponse("/admin" if user.role == "admin" else "/next", 303)
        devices.set(response, user.name)
        return response

    @app.post("/logout")
    async def logout(request: Request):
        check_csrf(request, (await form(request)).get("csrf"))
        await log_out(request)
        return RedirectResponse("/login", 303)

    # ------------------------------------------------------------------ annotation

    @app.get("/")
    async def home(request: Request):
        user = await user_of(request)
        return RedirectResponse("/admin" if user.role == "admin" else "/next" if user.role == "annotator"
                                else "/progress", 303)

    @app.get("/next")
    async def next_item(request: Request, kind: Literal["rate", "compare", "correct"] | None = None):
        user = await user_of(request, "annotator", "admin")
        item = await blocking(store.lease, user.id, kind)
        if item is None:
            return await render(request, "done.html", user)
        return RedirectResponse(f"/item/{item}", 303)

    @app.get("/item/{item_id}", response_class=HTMLResponse)
    async def item_page(request: Request, item_id: ItemId):
        user = await user_of(request, "annotator", "admin")
        view = await blocking(store.item_view, item_id, user.id, user.role)
        order = request.session.setdefault("order", {})
        if str(item_id) not in order:  # the random screen order of a comparison, fixed per item
            order[str(item_id)] = secrets.randbelow(2) == 0
            request.session["order"] = dict(list(order.items())[-50:])
        a_first = request.session["order"].get(str(item_id), True)
        sides = [view["a"], view["b"]] if a_first else [view["b"], view["a"]]
        return await render(request, "item.html", user, item=view, sides=sides,
                            then="chat" if request.query_params.get("then") == "chat" else "")

    def answer_from(kind: str, data: dict, a_first: bool) -> dict:
        """Form or JSON fields → the store's answer fields (validated again by the store)."""
        out = {"reason": data.get("reason") or ""}
        try:
            if kind == "rate":
                if data.get("score") not in (None, ""):
                    out["score"] = float(data["score"])
                if data.get("thumbs") not in (None, ""):
                    out["thumbs"] = int(data["thumbs"])
            elif kind == "compare":
                side = data.get("choice")
                out["choice"] = {"left": "a" if a_first else "b", "right": "b" if a_first else "a"}.get(side, side)
                out["a_shown_first"] = a_first
                if data.get("confidence") not in (None, ""):
                    out["confidence"] = float(data["confidence"])
            else:
                out["corrected"] = data.get("corrected") or ""
        except (TypeError, ValueError):
            raise FeedbackError("a rating, thumbs or confidence is not a number", status=400) from None
        return out

    @app.post("/item/{item_id}")
    async def submit_form(request: Request, item_id: ItemId):
        user = await user_of(request, "annotator", "admin")
        data = await form(request)
        check_csrf(request, data.get("csrf"))
        kind = (await blocking(store.item_view, item_id, user.id, user.role))["kind"]
        if data.get("skip"):
            await blocking(store.skip, user.id, item_id)
        else:
            a_first = request.session.get("order", {}).get(str(item_id), True)
            await blocking(store.submit, user.id, item_id, **answer_from(kind, data, a_first))
        return RedirectResponse("/chat" if data.get("then") == "chat" else "/next", 303)

    # ------------------------------------------------------------------ chat with a model, rate each reply

    def writer(i: int = 0):
        if len(writers) <= i:
            raise FeedbackError("no model loaded: start the server with --model", status=404)
        return writers[i]

    @app.get("/chat", response_class=HTMLResponse)
    async def chat_page(request: Request):
        user = await user_of(request, "annotator", "admin")
        return await render(request, "chat.html", user, chat=request.session.get("chat", []), model=writer().name)

    @app.post("/chat")
    async def chat(request: Request):
        user = await user_of(request, "annotator", "admin")
        data = await form(request)
        check_csrf(request, data.get("csrf"))
        if data.get("reset"):
            request.session["chat"] = []
            return RedirectResponse("/chat", 303)
        text = str(data.get("message") or "").strip()
        if not text:
            raise FeedbackError("the message is empty", status=400)
        conversation = request.session.get("chat", [])[-18:] + [{"role": "user", "content": text[:4000]}]
        (reply,) = await run_in_threadpool(writer().write, [conversation])
        pid = store.add_prompt(conversation, source="chat")
        item = store.add_item("rate", store.add_reply(pid, **reply))  # the writer's fields are add_reply's
        store.assign(user.id, item)
        request.session["chat"] = conversation + [{"role": "assistant", "content": reply["text"]}]
        return RedirectResponse(f"/item/{item}?then=chat", 303)

    @app.post("/admin/generate")
    async def admin_generate(request: Request):
        """Replies to every prompt that has none, from the loaded model(s): one model → rate items, two →
        compare items (k from the form)."""
        await user_of(request, "admin")
        data = await form(request)
        check_csrf(request, data.get("csrf"))
        writer()
        k = whole(data.get("k"), k_default, "k", 1, 100)
        todo = store.prompts_without_replies(whole(data.get("limit"), 50, "limit", 1, 10_000))
        outs = [await run_in_threadpool(w.write, [m for _, m in todo]) for w in writers] if todo else []
        for n, (pid, _) in enumerate(todo):
            ids = [store.add_reply(pid, **o[n]) for o in outs]
            store.add_item("compare" if len(ids) == 2 else "rate", ids[0], ids[1] if len(ids) == 2 else None, k=k)
        return RedirectResponse(f"/admin?generated={len(todo)}", 303)

    @app.get("/progress", response_class=HTMLResponse)
    async def progress(request: Request):
        user = await user_of(request)
        return await render(request, "done.html", user)

    # ------------------------------------------------------------------ JSON API

    @app.get("/api/session")
    async def api_session(request: Request):
        user = await user_of(request)
        return {"user": user.name, "role": user.role, "csrf": csrf_token(request)}

    @app.get("/api/next")
    async def api_next(request: Request, kind: Literal["rate", "compare", "correct"] | None = None,
                       count: Annotated[int, Query(ge=1, le=100)] = 1):
        """Lease up to ``count`` (≤ 100) items: {"items": [{id, kind, messages, a, b}, …]}."""
        user = await user_of(request, "annotator", "admin")
        items = await blocking(store.lease_many, user.id, count, kind)
        return JSONResponse({"items": await blocking(store.item_views, items, user.id, user.role) if items else []})

    @app.post("/api/items/{item_id}")
    async def api_submit(request: Request, item_id: ItemId):
        """Answer an item: {"score": 1–5, "thumbs": ±1} | {"choice": "a"|"b"|"tie"|"both_bad", "confidence": 0–1}
        | {"corrected": "…"}, plus an optional "reason". 201 when stored, 200 for a repeat (the first stands)."""
        user = await user_of(request, "annotator", "admin")
        check_csrf(request, request.headers.get("x-csrf-token"))
        answer = parsed(AnswerBody, await body_json(request))
        answer_id, created = await blocking(store.submit, user.id, item_id, **answer.model_dump(exclude_unset=True))
        return JSONResponse({"answer": answer_id, "created": created}, 201 if created else 200)

    @app.post("/api/login")
    async def api_login(request: Request):
        body = parsed(LoginBody, await body_json(request))
        user = await log_in(request, body.name, body.password)
        if user is None:
            raise FeedbackError("wrong name or password", status=401)
        response = JSONResponse({"user": user.name, "role": user.role, "csrf": request.session["csrf"]})
        devices.set(response, user.name)
        return response

    @app.post("/api/logout")
    async def api_logout(request: Request):
        """End every session of this user (the cookie and its CSRF token stop working everywhere)."""
        await user_of(request)
        check_csrf(request, request.headers.get("x-csrf-token"))
        check_json_write(request)
        await log_out(request)
        return {"logged_out": True}

    # ------------------------------------------------------------------ admin

    @app.get("/admin", response_class=HTMLResponse)
    async def admin(request: Request):
        user = await user_of(request, "admin")
        from chatrlhf.feedback.quality import agreement, reliability

        def statistics():  # reads every answer: in a thread, on a snapshot that does not hold up submits
            everyone = store.users()
            names = {u.id: u.name for u in everyone}
            return everyone, agreement(store), {names[u]: r for u, r in reliability(store).items()}

        everyone, agreed, reliable = await run_in_threadpool(statistics)
        return await render(request, "admin.html", user, users=everyone, agreement=agreed,
                            models=[w.name for w in writers], reliability=reliable)

    @app.post("/admin/users")
    async def add_user(request: Request):
        await user_of(request, "admin")
        data = await form(request)
        check_csrf(request, data.get("csrf"))
        await run_in_threadpool(store.add_user, str(data.get("name", "")), str(data.get("password", "")),  # argon2
                                str(data.get("role", "annotator")))
        return RedirectResponse("/admin", 303)

    @app.post("/admin/users/{user_id}")
    async def change_user(request: Request, user_id: ItemId):
        admin_user = await user_of(request, "admin")
        data = await form(request)
        check_csrf(request, data.get("csrf"))
        action = data.get("action")
        if action not in ("deactivate", "activate", "role"):
            raise FeedbackError("action must be deactivate, activate or role", status=400)
        store.set_user(user_id, admin_user.id, role=str(data.get("role")) if action == "role" else None,
                       active={"deactivate": False, "activate": True}.get(action))
        users.pop(user_id, None)  # takes effect on the user's next request
        return RedirectResponse("/admin", 303)

    @app.post("/admin/import")
    async def import_items(request: Request):
        await user_of(request, "admin")
        data = await form(request, files=("records",))
        check_csrf(request, data.get("csrf"))
        from chatrlhf.errors import ChatRLHFError
        from chatrlhf.feedback.imports import import_file

        text, source = data.get("records") or "", "web import (pasted)"
        if isinstance(text, UploadFile):
            source = f"web import: {(text.filename or 'upload')[:200]}"
            try:
                text = (await text.read()).decode("utf-8")
            except UnicodeDecodeError as e:
                raise FeedbackError(f"records: not UTF-8 text (byte {e.start})", status=400) from None
        kind, k = data.get("kind") or "auto", whole(data.get("k"), k_default, "k", 1, 100)
        round_ = whole(data.get("round"), 0, "round", 0, 1_000_000)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "import.jsonl"
            path.write_text(text, encoding="utf-8")
            try:
                counts = import_file(store, str(path), kind, k, round_, source=source)
            except ChatRLHFError as e:
                raise FeedbackError(str(e).replace(str(path), "records"), status=400) from None
        return RedirectResponse(f"/admin?imported={counts['items']}", 303)

    @app.get("/admin/export.zip")
    async def export_zip(request: Request, rule: Literal["all", "majority", "bt"] = "all",
                         eval_fraction: Annotated[float, Query(ge=0, lt=1, allow_inf_nan=False)] = 0.0):
        await user_of(request, "admin")
        from chatrlhf.feedback.export import export

        def zipped() -> bytes:  # in a thread, on a snapshot: submits carry on meanwhile
            with tempfile.TemporaryDirectory() as tmp:
                export(store, Path(tmp) / "export", rule=rule, eval_fraction=eval_fraction)
                buf = io.BytesIO()
                with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                    for f in sorted((Path(tmp) / "export").rglob("*")):
                        if f.is_file():
                            z.write(f, f.relative_to(Path(tmp) / "export"))
                return buf.getvalue()

        return Response(await run_in_threadpool(zipped), media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="chatrlhf-feedback.zip"'})

    return app


def whole(value, default: int, name: str, low: int, high: int) -> int:
    """A whole-number form field within [low, high] (400 naming the field otherwise)."""
    text = str(value if value not in (None, "") else default).strip()
    if not text.lstrip("-").isdigit() or len(text) > 12 or not low <= int(text) <= high:
        raise FeedbackError(f"{name} must be a whole number from {low} to {high:,}", status=400)
    return int(text)
