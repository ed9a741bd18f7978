"""What the routers share (full-stack-fastapi-template's ``api/deps.py``): the app's state, the current user and
role as dependencies (``CurrentUser``, ``Annotator``, ``Admin``), the CSRF token, text-only forms, JSON bodies
sent as JSON from this origin, the one log-in path, and page rendering."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi import Path as PathParam
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from chatrlhf.feedback.errors import Invalid, NotLoggedIn, PermissionDenied
from chatrlhf.feedback.security import DeviceCookies, LoginLimiter, check_json_write
from chatrlhf.feedback.store import Store
from chatrlhf.feedback.tables import User

MAX_ID = 2**63 - 1             # ids are 64-bit: larger path ids are a 400, not an overflow
ItemId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
USER_TTL = 2.0                 # seconds a session's user record is reused before it is read again


@dataclass
class Feedback:
    """The app's state, on ``app.state.feedback``."""
    store: Store
    pages: Jinja2Templates
    limiter: LoginLimiter
    devices: DeviceCookies
    guidelines: str
    k_default: int = 1
    writers: list = field(default_factory=list)        # reply writers of --model (replies.py)
    users: dict = field(default_factory=dict)          # id → (user, read at): changes apply within USER_TTL

    async def blocking(self, fn, *args, **kwargs):
        """A store call on an annotator's path. PostgreSQL: in a worker thread, so requests overlap while they
        wait on the server (round trips, commit flushes). SQLite: inline — its calls are short CPU work under one
        write lock, and the thread hop would only add to it. (Password checks, the admin page's statistics and
        exports always run in a thread: seconds of work that must not stall everyone's requests.)"""
        if self.store.sqlite:
            return fn(*args, **kwargs)
        return await run_in_threadpool(fn, *args, **kwargs)


def state(request: Request) -> Feedback:
    return request.app.state.feedback


async def current_user(request: Request) -> User:
    """The logged-in, active user whose session is current (401 otherwise)."""
    fb, uid, user = state(request), request.session.get("uid"), None
    if isinstance(uid, int):
        user, at = fb.users.get(uid, (None, 0.0))
        if time.monotonic() - at > USER_TTL:
            user = await fb.blocking(fb.store.user, uid)
            fb.users[uid] = (user, time.monotonic())
    if user is None or not user.active or request.session.get("sv") != user.session_version:
        raise NotLoggedIn("log in first")  # (logged out, switched off, or a session from before)
    return user


CurrentUser = Annotated[User, Depends(current_user)]


def needs(*roles: str):
    async def check(user: CurrentUser) -> User:  # async: no thread hop per request
        if user.role not in roles:
            raise PermissionDenied(f"this needs the {' or '.join(roles)} role")
        return user

    return check


Annotator = Annotated[User, Depends(needs("annotator", "admin"))]
Admin = Annotated[User, Depends(needs("admin"))]


def csrf_token(request: Request) -> str:
    if "csrf" not in request.session:
        request.session["csrf"] = secrets.token_urlsafe(32)
    return request.session["csrf"]


def check_csrf(request: Request, sent: str | None) -> None:
    if not sent or not secrets.compare_digest(str(sent), request.session.get("csrf", "")):
        raise PermissionDenied("missing or wrong CSRF token — reload the page and try again")


async def form(request: Request, files: tuple = ()) -> dict:
    """The form's fields, each text (a file only in a field named in ``files``)."""
    try:
        data = await request.form()
    except Exception:  # noqa: BLE001 - malformed multipart or urlencoded body
        raise Invalid("malformed form") from None
    for k, v in data.multi_items():
        if isinstance(v, UploadFile) and k not in files:
            raise Invalid(f"form field {k!r} must be text, not a file")
    return {k: v for k, v in data.items()}


async def checked_form(request: Request, files: tuple = ()) -> dict:
    """A form whose CSRF token is right."""
    data = await form(request, files)
    check_csrf(request, data.get("csrf"))
    return data


async def body_json(request: Request) -> dict:
    """A JSON object body, sent as JSON from this origin (see security.check_json_write)."""
    check_json_write(request)
    try:
        data = json.loads(await request.body() or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Invalid("malformed JSON body") from None
    if not isinstance(data, dict):
        raise Invalid("the JSON body must be an object")
    return data


def parsed(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise Invalid("bad request: " + "; ".join(f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}"
                                                  for x in e.errors())) from None


async def log_in(request: Request, name: str, password: str) -> User | None:
    """The one log-in path of every route: the limiter, one argon2 check (in a thread), a fresh session."""
    fb = state(request)
    trusted = fb.devices.trusted(request, name)
    fb.limiter.check(name, trusted)
    user = await run_in_threadpool(fb.store.authenticate, name, password)  # ~0.1 s of argon2
    if user is None:
        fb.limiter.failed(name, trusted)
        return None
    request.session.clear()
    request.session.update(uid=user.id, sv=user.session_version, csrf=secrets.token_urlsafe(32))
    return user


async def log_out(request: Request) -> None:
    fb, uid = state(request), request.session.get("uid")
    if isinstance(uid, int):
        await fb.blocking(fb.store.end_sessions, uid)
        fb.users.pop(uid, None)
    request.session.clear()


async def render(request: Request, name: str, user=None, status: int = 200, **ctx):
    fb = state(request)
    progress = await fb.blocking(fb.store.progress, user.id) if user is not None else None
    overall = await fb.blocking(fb.store.progress)
    return fb.pages.TemplateResponse(request, name, {"user": user, "csrf": csrf_token(request), "progress": progress,
                                                     "overall": overall, "guidelines": fb.guidelines,
                                                     "csp_nonce": request.state.csp_nonce, **ctx}, status_code=status)


def whole(value, default: int, name: str, low: int, high: int) -> int:
    """A whole-number form field within [low, high] (400 naming the field otherwise)."""
    text = str(value if value not in (None, "") else default).strip()
    if not text.lstrip("-").isdigit() or len(text) > 12 or not low <= int(text) <= high:
        raise Invalid(f"{name} must be a whole number from {low} to {high:,}")
    return int(text)
