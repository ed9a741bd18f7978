"""``--feedback-db``: every served completion into the feedback store, and ``POST /v1/feedback`` on it.

A served conversation is a Prompt (one row per distinct conversation, found by the digest of its messages in
``source``, so two completions of one conversation can be compared), each choice a Reply with its provenance: the
name and checkpoint hash of the model that served it (they change with a hot swap), decoding parameters as sent,
the rendered prompt (``template``), completion id and choice, finish reason, token counts, time. Feedback is an
Item answered at once by the API key's user (``api:<key id>``), as the web app's chat page does (assign, then
submit) — so ``chatrlhf feedback export`` writes it like any other answer. Store calls run in a worker thread
(asyncio.to_thread); a failed write is logged and counted (chatrlhf_feedback_store_errors_total), never the
client's problem.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from chatrlhf.feedback.errors import Conflict, FeedbackError, Invalid, NotFound
from chatrlhf.feedback.store import Store
from chatrlhf.feedback.tables import ANSWERS, Item, Prompt, Reply, User
from chatrlhf.serve.completions import authorized, server
from chatrlhf.serve.limits import ANONYMOUS
from chatrlhf.serve.protocol import APIError
from chatrlhf.serve.redact import redact, redact_messages

log = logging.getLogger("chatrlhf.serve")
router = APIRouter()
PREFERRED = {"this": "a", "other": "b", "tie": "tie", "both_bad": "both_bad"}


class FeedbackLog:
    """The store of a server started with --feedback-db."""

    def __init__(self, db: str, redacting: bool):
        self.store, self.redacting = Store(db), redacting
        self.pending: dict[str, asyncio.Task] = {}   # completion id → its write, awaited by a feedback on it
        self.users: dict[str, int] = {}

    def text(self, s: str) -> str:
        return redact(s) if self.redacting else s

    def submit(self, completion: dict, metrics) -> None:
        """Store a finished completion in the background (the reply has gone or goes out meanwhile)."""
        cid = completion["id"]

        async def write():
            try:
                await asyncio.to_thread(self.write, completion)
            except Exception as e:  # noqa: BLE001 - the reply is the client's either way: log and count
                metrics.store_errors.inc()
                log.error("chatrlhf serve: storing completion %s failed: %s: %s", cid, type(e).__name__, e)
            finally:
                self.pending.pop(cid, None)

        self.pending[cid] = asyncio.ensure_future(write())

    def write(self, c: dict) -> None:
        """One completion: its conversation (reused when seen before) and one reply per choice, in one transaction."""
        messages = redact_messages(c["messages"]) if self.redacting else c["messages"]
        source = "serve:" + hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:32]
        with self.store.transaction(), self.store.session() as s:
            prompt_id = s.scalar(select(Prompt.id).where(Prompt.source == source).limit(1))
            if prompt_id is None:
                prompt = Prompt(messages=messages, source=source)
                s.add(prompt)
                s.flush()
                prompt_id = prompt.id
            for i, choice in enumerate(c["choices"]):
                s.add(Reply(prompt_id=prompt_id, text=self.text(choice["text"]), model=c["model"],
                            checkpoint=c["checkpoint"], decoding=c["decoding"], template=self.text(c["template"]),
                            completion_id=c["id"], choice_index=i, finish_reason=choice["finish_reason"],
                            prompt_tokens=c["prompt_tokens"], completion_tokens=choice["tokens"]))

    def user(self, key: str) -> int:
        """The store user that stands for API key ``key`` (its id), made on first use; it never logs in."""
        if key not in self.users:
            name = "api:anonymous" if key == ANONYMOUS else f"api:{key}"
            for attempt in range(2):   # two first feedbacks of one key at once: the loser finds the winner's user
                with self.store.reading() as s:
                    uid = s.scalar(select(User.id).where(User.name == name))
                if uid is not None:
                    break
                try:
                    uid = self.store.add_user(name, secrets.token_urlsafe(24)).id
                    break
                except Conflict:
                    if attempt:
                        raise
            self.users[key] = uid
        return self.users[key]

    def reply(self, completion_id: str, index: int, param: str) -> Reply:
        with self.store.reading() as s:
            r = s.scalar(select(Reply).where(Reply.completion_id == completion_id, Reply.choice_index == index))
        if r is None:
            raise NotFound(f"{param}: no stored completion '{completion_id}' with choice {index} (only completions "
                           "served since --feedback-db was set are stored)")
        return r

    def answer(self, key: str, kind: str, a: Reply, b: Reply | None, **answer) -> int:
        """The item for this feedback, leased to the key's user and answered; 409 when the user already gave this
        kind of feedback on this reply (pair)."""
        user = self.user(key)
        table = ANSWERS[kind]
        with self.store.reading() as s:
            first = s.scalar(select(table.id).join(Item, Item.id == table.item_id).where(
                table.user_id == user, Item.kind == kind, Item.reply_a_id == a.id,
                Item.reply_b_id == b.id if b else Item.reply_b_id.is_(None)))
        if first is not None:
            raise Conflict(
                f"this API key already gave {kind} feedback on this completion choice (answer {first})")
        item = self.store.add_item(kind, a.id, b.id if b else None)
        self.store.assign(user, item)
        return self.store.submit(user, item, **answer)[0]


class Compare(BaseModel):
    model_config = ConfigDict(extra="forbid")
    other_completion_id: str = Field(min_length=1, max_length=64)
    other_choice_index: int = Field(0, ge=0)
    preferred: Literal["this", "other", "tie", "both_bad"]


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: one of thumbs, rating, correction, compare — on a completion's choice."""
    model_config = ConfigDict(extra="forbid")
    completion_id: str = Field(min_length=1, max_length=64)
    choice_index: int = Field(0, ge=0)
    thumbs: Literal["up", "down"] | None = None
    rating: int | None = Field(None, ge=1, le=5)
    correction: str | None = Field(None, min_length=1, max_length=20000)
    compare: Compare | None = None
    reason: str = Field("", max_length=4000)


def feedback_log(request: Request) -> FeedbackLog:
    s = server(request)
    if s.feedback is None:
        raise APIError(400, "this server stores no feedback: start it with --feedback-db URL (SQLite file or "
                       "database URL) to store completions and take feedback on them", None, "feedback_disabled")
    return s.feedback


@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request, key: Annotated[str, Depends(authorized)]):
    store = feedback_log(request)
    given = [k for k in ("thumbs", "rating", "correction", "compare") if getattr(body, k) is not None]
    if len(given) != 1:
        got = ", ".join(given) or "none"
        raise APIError(400, f"give exactly one of thumbs, rating, correction, compare (got {got})",
                       given[1] if len(given) > 1 else None, "invalid_value")
    for cid in (body.completion_id, body.compare and body.compare.other_completion_id):
        if cid and (task := store.pending.get(cid)) is not None:
            await asyncio.shield(task)   # a feedback right after its completion waits for the completion's write
    try:
        answer_id, kind = await asyncio.to_thread(store_feedback, store, key, body)
    except FeedbackError as e:
        raise APIError(e.status, str(e), None, {404: "completion_not_found", 409: "duplicate_feedback"}.get(
            e.status, "invalid_value")) from None
    return {"object": "feedback", "id": answer_id, "kind": kind, "completion_id": body.completion_id,
            "choice_index": body.choice_index, "created": int(time.time())}


def store_feedback(store: FeedbackLog, key: str, body: FeedbackRequest) -> tuple[int, str]:
    """The body as a store answer (in a worker thread): (answer id, item kind)."""
    a = store.reply(body.completion_id, body.choice_index, "completion_id")
    if body.compare is not None:
        c = body.compare
        b = store.reply(c.other_completion_id, c.other_choice_index, "compare.other_completion_id")
        if b.prompt_id != a.prompt_id:
            raise Invalid("compare: the two completions answer different conversations; compare replies to the "
                          "same messages")
        if b.id == a.id:
            raise Invalid("compare: a completion choice compared with itself")
        return store.answer(key, "compare", a, b, choice=PREFERRED[c.preferred], reason=body.reason), "compare"
    if body.correction is not None:
        return store.answer(key, "correct", a, None, corrected=store.text(body.correction),
                            reason=body.reason), "correct"
    thumbs = None if body.thumbs is None else 1 if body.thumbs == "up" else -1
    return store.answer(key, "rate", a, None, score=body.rating, thumbs=thumbs, reason=body.reason), "rate"
