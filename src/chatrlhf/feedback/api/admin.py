"""The admin's area: the admin page (users, agreement, reliability), users, web import and the export zip."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from chatrlhf.errors import ChatRLHFError
from chatrlhf.feedback.api.deps import Admin, ItemId, checked_form, render, state, whole
from chatrlhf.feedback.errors import Invalid
from chatrlhf.feedback.export import export
from chatrlhf.feedback.imports import import_file
from chatrlhf.feedback.quality import agreement, reliability

router = APIRouter()


@router.get("/admin", response_class=HTMLResponse)
async def admin(request: Request, user: Admin):
    fb = state(request)

    def statistics():  # reads every answer: in a thread, on a snapshot that does not hold up submits
        everyone = fb.store.users()
        names = {u.id: u.name for u in everyone}
        return everyone, agreement(fb.store), {names[u]: r for u, r in reliability(fb.store).items()}

    everyone, agreed, reliable = await run_in_threadpool(statistics)
    return await render(request, "admin.html", user, users=everyone, agreement=agreed,
                        models=[w.name for w in fb.writers], reliability=reliable)


@router.post("/admin/users")
async def add_user(request: Request, user: Admin):
    data = await checked_form(request)
    await run_in_threadpool(state(request).store.add_user, str(data.get("name", "")),  # argon2: in a thread
                            str(data.get("password", "")), str(data.get("role", "annotator")))
    return RedirectResponse("/admin", 303)


@router.post("/admin/users/{user_id}")
async def change_user(request: Request, user_id: ItemId, user: Admin):
    fb = state(request)
    data = await checked_form(request)
    action = data.get("action")
    if action not in ("deactivate", "activate", "role"):
        raise Invalid("action must be deactivate, activate or role")
    fb.store.set_user(user_id, user.id, role=str(data.get("role")) if action == "role" else None,
                      active={"deactivate": False, "activate": True}.get(action))
    fb.users.pop(user_id, None)  # takes effect on the user's next request
    return RedirectResponse("/admin", 303)


@router.post("/admin/import")
async def import_items(request: Request, user: Admin):
    fb = state(request)
    data = await checked_form(request, files=("records",))
    text, source = data.get("records") or "", "web import (pasted)"
    if isinstance(text, UploadFile):
        source = f"web import: {(text.filename or 'upload')[:200]}"
        try:
            text = (await text.read()).decode("utf-8")
        except UnicodeDecodeError as e:
            raise Invalid(f"records: not UTF-8 text (byte {e.start})") from None
    kind, k = data.get("kind") or "auto", whole(data.get("k"), fb.k_default, "k", 1, 100)
    round_ = whole(data.get("round"), 0, "round", 0, 1_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "import.jsonl"
        path.write_text(text, encoding="utf-8")
        try:
            counts = import_file(fb.store, str(path), kind, k, round_, source=source)
        except ChatRLHFError as e:
            raise Invalid(str(e).replace(str(path), "records")) from None
    return RedirectResponse(f"/admin?imported={counts['items']}", 303)


@router.get("/admin/export.zip")
async def export_zip(request: Request, user: Admin, rule: Literal["all", "majority", "bt"] = "all",
                     eval_fraction: Annotated[float, Query(ge=0, lt=1, allow_inf_nan=False)] = 0.0):
    store = state(request).store

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
