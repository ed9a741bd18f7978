"""GET /chat: a customer-service chat page on the server's own API (chat.html: one file, inline CSS and script, no
external assets, so it works offline).

The page streams replies from POST /v1/chat/completions and sends thumbs, corrections and comparisons to
POST /v1/feedback, with the API key the user typed (kept in the tab's sessionStorage). It is served without a key
because it holds no data: what it needs to know — whether the server wants a key, whether it stores feedback — is
rendered into it as JSON; the model's name it reads from GET /v1/models, which also checks the key. Its script runs
under a Content-Security-Policy with a per-response nonce and puts every text in the page as text, never as HTML.
"""

from __future__ import annotations

import json
import secrets
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from chatrlhf.feedback.security import csp
from chatrlhf.serve.completions import server

router = APIRouter()
PAGE = files("chatrlhf.serve").joinpath("chat.html").read_text(encoding="utf-8")


def page_config(digests: list[str], feedback: object | None) -> dict:
    """What the page needs to know: ask for a key? show the feedback controls?"""
    return {"keys": bool(digests), "feedback": feedback is not None}


@router.get("/chat", response_class=HTMLResponse)
async def chat_page(request: Request) -> HTMLResponse:
    s = server(request)
    nonce = secrets.token_urlsafe(16)
    # json.dumps of booleans only: nothing here can close the <script> element it sits in
    html = PAGE.replace("{{config}}", json.dumps(page_config(s.digests, s.feedback))).replace("{{nonce}}", nonce)
    return HTMLResponse(html, headers={"Content-Security-Policy": csp(nonce), "X-Frame-Options": "DENY",
                                       "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                                       "Cache-Control": "no-store"})
