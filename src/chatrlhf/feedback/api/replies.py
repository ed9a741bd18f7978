"""Replies from a loaded model (``--model``): chat with it and rate each reply, and the admin's "write replies to
every prompt that has none". The one place the app reaches a model: the reply writer is imported only when a
model is given, so the store and the app start and run without torch (ARCHITECTURE)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from chatrlhf.feedback.api.deps import Admin, Annotator, checked_form, render, state, whole
from chatrlhf.feedback.errors import Invalid, NotFound

router = APIRouter()


def load_writers(models: list[str] | tuple, max_new_tokens: int) -> list:
    """A reply writer per model (at most two: two models make compare items); none without models."""
    if len(models) > 2:
        raise Invalid("at most two --model (two models make compare items)")
    if not models:
        return []
    from chatrlhf.feedback.writers import ReplyWriter

    return [ReplyWriter(m, max_new_tokens) for m in models]


def writer(request: Request, i: int = 0):
    writers = state(request).writers
    if len(writers) <= i:
        raise NotFound("no model loaded: start the server with --model")
    return writers[i]


@router.get("/chat", response_class=HTMLResponse)
async def chat_page(request: Request, user: Annotator):
    return await render(request, "chat.html", user, chat=request.session.get("chat", []), model=writer(request).name)


@router.post("/chat")
async def chat(request: Request, user: Annotator):
    store = state(request).store
    data = await checked_form(request)
    if data.get("reset"):
        request.session["chat"] = []
        return RedirectResponse("/chat", 303)
    text = str(data.get("message") or "").strip()
    if not text:
        raise Invalid("the message is empty")
    conversation = request.session.get("chat", [])[-18:] + [{"role": "user", "content": text[:4000]}]
    (reply,) = await run_in_threadpool(writer(request).write, [conversation])
    pid = store.add_prompt(conversation, source="chat")
    item = store.add_item("rate", store.add_reply(pid, **reply))  # the writer's fields are add_reply's
    store.assign(user.id, item)
    request.session["chat"] = conversation + [{"role": "assistant", "content": reply["text"]}]
    return RedirectResponse(f"/item/{item}?then=chat", 303)


@router.post("/admin/generate")
async def admin_generate(request: Request, user: Admin):
    """Replies to every prompt that has none, from the loaded model(s): one model → rate items, two →
    compare items (k from the form)."""
    fb = state(request)
    data = await checked_form(request)
    writer(request)
    k = whole(data.get("k"), fb.k_default, "k", 1, 100)
    todo = fb.store.prompts_without_replies(whole(data.get("limit"), 50, "limit", 1, 10_000))
    outs = [await run_in_threadpool(w.write, [m for _, m in todo]) for w in fb.writers] if todo else []
    for n, (pid, _) in enumerate(todo):
        ids = [fb.store.add_reply(pid, **o[n]) for o in outs]
        fb.store.add_item("compare" if len(ids) == 2 else "rate", ids[0], ids[1] if len(ids) == 2 else None, k=k)
    return RedirectResponse(f"/admin?generated={len(todo)}", 303)
