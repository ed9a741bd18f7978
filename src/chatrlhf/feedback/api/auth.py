"""Log in and out: the page and form, and the JSON API (``/api/login``, ``/api/logout``, ``/api/session``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from chatrlhf.feedback.api.bodies import LoginBody
from chatrlhf.feedback.api.deps import CurrentUser, body_json, check_csrf, checked_form, csrf_token, log_in, log_out, \
    parsed, render, state
from chatrlhf.feedback.errors import NotLoggedIn
from chatrlhf.feedback.security import check_json_write

router = APIRouter()


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request):
    return await render(request, "login.html")


@router.post("/login")
async def login(request: Request):
    data = await checked_form(request)
    user = await log_in(request, data.get("name", "")[:64], data.get("password", "")[:1024])
    if user is None:
        return await render(request, "login.html", status=401, message="wrong name or password")
    response = RedirectResponse("/admin" if user.role == "admin" else "/next", 303)
    state(request).devices.set(response, user.name)
    return response


@router.post("/logout")
async def logout(request: Request):
    await checked_form(request)
    await log_out(request)
    return RedirectResponse("/login", 303)


@router.get("/api/session")
async def api_session(request: Request, user: CurrentUser):
    return {"user": user.name, "role": user.role, "csrf": csrf_token(request)}


@router.post("/api/login")
async def api_login(request: Request):
    body = parsed(LoginBody, await body_json(request))
    user = await log_in(request, body.name, body.password)
    if user is None:
        raise NotLoggedIn("wrong name or password")
    response = JSONResponse({"user": user.name, "role": user.role, "csrf": request.session["csrf"]})
    state(request).devices.set(response, user.name)
    return response


@router.post("/api/logout")
async def api_logout(request: Request, user: CurrentUser):
    """End every session of this user (the cookie and its CSRF token stop working everywhere)."""
    check_csrf(request, request.headers.get("x-csrf-token"))
    check_json_write(request)
    await log_out(request)
    return {"logged_out": True}
