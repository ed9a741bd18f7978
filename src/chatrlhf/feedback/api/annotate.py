"""Annotation: the next item, an item's page and its answer (form), progress, and the JSON API for scripts
(``/api/next``, ``/api/items/{id}``)."""

from __future__ import annotations

import secrets
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from chatrlhf.feedback.api.bodies import AnswerBody
from chatrlhf.feedback.api.deps import Annotator, CurrentUser, ItemId, body_json, check_csrf, checked_form, parsed, \
    render, state
from chatrlhf.feedback.errors import Invalid

router = APIRouter()
Kind = Literal["rate", "compare", "correct"]


@router.get("/")
async def home(user: CurrentUser):
    return RedirectResponse("/admin" if user.role == "admin" else "/next" if user.role == "annotator"
                            else "/progress", 303)


@router.get("/next")
async def next_item(request: Request, user: Annotator, kind: Kind | None = None):
    fb = state(request)
    item = await fb.blocking(fb.store.lease, user.id, kind)
    if item is None:
        return await render(request, "done.html", user)
    return RedirectResponse(f"/item/{item}", 303)


@router.get("/item/{item_id}", response_class=HTMLResponse)
async def item_page(request: Request, item_id: ItemId, user: Annotator):
    fb = state(request)
    view = await fb.blocking(fb.store.item_view, item_id, user.id, user.role)
    order = request.session.setdefault("order", {})
    if str(item_id) not in order:  # the random screen order of a comparison, fixed per item
        order[str(item_id)] = secrets.randbelow(2) == 0
        request.session["order"] = dict(list(order.items())[-50:])
    a_first = request.session["order"].get(str(item_id), True)
    sides = [view["a"], view["b"]] if a_first else [view["b"], view["a"]]
    return await render(request, "item.html", user, item=view, sides=sides,
                        then="chat" if request.query_params.get("then") == "chat" else "")


def answer_from(kind: str, data: dict, a_first: bool) -> dict:
    """Form fields → the store's answer fields (validated again by the store)."""
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
        raise Invalid("a rating, thumbs or confidence is not a number") from None
    return out


@router.post("/item/{item_id}")
async def submit_form(request: Request, item_id: ItemId, user: Annotator):
    fb = state(request)
    data = await checked_form(request)
    kind = (await fb.blocking(fb.store.item_view, item_id, user.id, user.role))["kind"]
    if data.get("skip"):
        await fb.blocking(fb.store.skip, user.id, item_id)
    else:
        a_first = request.session.get("order", {}).get(str(item_id), True)
        await fb.blocking(fb.store.submit, user.id, item_id, **answer_from(kind, data, a_first))
    return RedirectResponse("/chat" if data.get("then") == "chat" else "/next", 303)


@router.get("/progress", response_class=HTMLResponse)
async def progress(request: Request, user: CurrentUser):
    return await render(request, "done.html", user)


@router.get("/api/next")
async def api_next(request: Request, user: Annotator, kind: Kind | None = None,
                   count: Annotated[int, Query(ge=1, le=100)] = 1):
    """Lease up to ``count`` (≤ 100) items: {"items": [{id, kind, messages, a, b}, …]}."""
    fb = state(request)
    items = await fb.blocking(fb.store.lease_many, user.id, count, kind)
    return JSONResponse({"items": await fb.blocking(fb.store.item_views, items, user.id, user.role) if items else []})


@router.post("/api/items/{item_id}")
async def api_submit(request: Request, item_id: ItemId, user: Annotator):
    """Answer an item: {"score": 1–5, "thumbs": ±1} | {"choice": "a"|"b"|"tie"|"both_bad", "confidence": 0–1}
    | {"corrected": "…"}, plus an optional "reason". 201 when stored, 200 for a repeat (the first stands)."""
    fb = state(request)
    check_csrf(request, request.headers.get("x-csrf-token"))
    answer = parsed(AnswerBody, await body_json(request))
    answer_id, created = await fb.blocking(fb.store.submit, user.id, item_id, **answer.model_dump(exclude_unset=True))
    return JSONResponse({"answer": answer_id, "created": created}, 201 if created else 200)
