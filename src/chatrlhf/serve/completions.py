"""POST /v1/chat/completions on the engine's continuous batching.

A request is checked (fields, model name, limits), admitted by the gate, and submitted as ``n`` engine requests
(one shared prompt, each choice with its own random generator when ``seed`` is given, so that a seeded request
samples the same replies whatever else is running). The engine's thread wakes the request's asyncio.Event after
each token (Request.on_token); the handler never blocks the event loop. Streaming sends OpenAI's chunks as tokens
come (held back only where a stop string may be starting, see text.py); a client that goes away cancels its
replies (Engine.cancel), streaming or not.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Annotated

import torch
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import StreamingResponse

from chatrlhf.config import ServeConfig
from chatrlhf.engine import Engine, SamplingParams
from chatrlhf.serve.limits import Gate, caller
from chatrlhf.serve.metrics import Metrics
from chatrlhf.serve.protocol import APIError, ChatRequest
from chatrlhf.serve.text import StreamText, token_logprobs

router = APIRouter()
PING_SECONDS = 15.0   # an SSE comment this often while a stream waits (SERVING.md §5)


@dataclass
class Server:
    """What every route needs: the engine, the settings, the served name, the gate, the metrics, the key digests."""
    engine: Engine
    cfg: ServeConfig
    name: str
    digests: list[str]
    feedback: object | None = None   # serve/feedback.py's FeedbackLog with --feedback-db, else None: nothing stored
    gate: Gate = field(init=False)
    metrics: Metrics = field(init=False)
    max_positions: int | None = field(init=False)

    def __post_init__(self):
        self.gate = Gate(self.cfg.max_batch + self.cfg.max_queue, self.cfg.max_concurrent)
        self.metrics = Metrics(self.engine)
        self.max_positions = getattr(self.engine.model.config, "max_position_embeddings", None)


def server(request: Request) -> Server:
    return request.app.state.server


def authorized(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The caller's key id, or a 401 (a dependency: it runs before the body is validated)."""
    return caller(authorization, server(request).digests)


def sampling(req: ChatRequest, cfg: ServeConfig) -> SamplingParams:
    """The request's sampling settings, the server's decoding flags where it sets none; limits checked."""
    if req.n > cfg.max_n:
        raise APIError(400, f"n = {req.n} is over this server's limit of {cfg.max_n}", "n", "invalid_value")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{param} = {max_tokens} is over this server's limit of {cfg.max_tokens_limit}", param,
                       "invalid_value")
    temperature = cfg.temperature if req.temperature is None else req.temperature
    greedy = temperature == 0
    return SamplingParams(max_tokens=max_tokens or min(cfg.max_new_tokens, cfg.max_tokens_limit),
                          temperature=temperature, top_k=0 if greedy else cfg.top_k if req.top_k is None else req.top_k,
                          top_p=1.0 if greedy else cfg.top_p if req.top_p is None else req.top_p,
                          repetition_penalty=cfg.repetition_penalty if req.repetition_penalty is None
                          else req.repetition_penalty, stop=list(req.stop or []), n=req.n,
                          ignore_eos=req.ignore_eos)


def prompt_ids(s: Server, req: ChatRequest, max_tokens: int) -> list[int]:
    ids = s.engine.encode([m.as_dict() for m in req.messages])
    if len(ids) > s.cfg.max_prompt_tokens:
        raise APIError(400, f"the prompt is {len(ids)} tokens, over this server's limit of {s.cfg.max_prompt_tokens}: "
                       "send a shorter conversation", "messages", "context_length_exceeded")
    if s.max_positions and len(ids) + max_tokens > s.max_positions:
        raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is over the model's "
                       f"context of {s.max_positions} tokens", "max_tokens", "context_length_exceeded")
    return ids


def choice_generator(seed: int | None, index: int, device) -> torch.Generator | None:
    """Choice ``index``'s own random stream for a seeded request (None without a seed: the engine's stream)."""
    if seed is None:
        return None
    return torch.Generator(device).manual_seed((seed * 1_000_003 + index) % (1 << 63))


class Job:
    """One HTTP request in flight: its engine requests, its wake-up event, its bookkeeping."""

    def __init__(self, s: Server, key: str, ids: list[int], params: SamplingParams, seed: int | None):
        self.s, self.key, self.ids, self.params = s, key, ids, params
        self.start, self.first_token, self.closed = time.perf_counter(), None, False
        self.event = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wake(_request):   # on the engine's thread
            try:
                loop.call_soon_threadsafe(self.event.set)
            except RuntimeError:  # the loop has closed (shutdown): nobody is waiting any more
                pass

        s.gate.enter(key, params.n)
        self.requests = [s.engine.submit(ids, params, i, on_token=wake,
                                         generator=choice_generator(seed, i, s.engine.device)) for i in range(params.n)]
        s.metrics.prompt_tokens.inc(len(ids))

    async def changed(self) -> None:
        """Wait for the next token or finish of any choice."""
        await self.event.wait()
        self.event.clear()
        if self.first_token is None and any(r.token_ids for r in self.requests):
            self.first_token = time.perf_counter()
            self.s.metrics.ttft.observe(self.first_token - self.start)

    def failed(self) -> APIError | None:
        r = next((r for r in self.requests if r.finish_reason == "error"), None)
        return None if r is None else APIError(500, f"generation failed: {r.error}", None, "engine_error")

    def close(self) -> None:
        """Cancel what has not finished (the client left), let the next request in, count. Once."""
        if self.closed:
            return
        self.closed = True
        for r in self.requests:
            self.s.engine.cancel(r)
        self.s.gate.leave(self.key, self.params.n)
        m = self.s.metrics
        for r in self.requests:
            m.finished.labels(r.finish_reason or "cancelled").inc()
            m.generation_tokens.inc(len(r.token_ids))
        m.latency.observe(time.perf_counter() - self.start)

    def usage(self) -> dict:
        completion = sum(len(r.token_ids) for r in self.requests)
        return {"prompt_tokens": len(self.ids), "completion_tokens": completion,
                "total_tokens": len(self.ids) + completion}


class JobStream(StreamingResponse):
    """A streamed reply that closes its job however the response ends: Starlette cancels a stream whose client
    disconnected without closing the generator, which then would only be closed when garbage-collected."""

    def __init__(self, job: Job, content, **kw):
        super().__init__(content, **kw)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, key: Annotated[str, Depends(authorized)]):
    s = server(request)
    body.check()
    if body.model != s.name:
        raise APIError(404, f"model '{body.model}' is not served here: this server serves '{s.name}' "
                       "(GET /v1/models)", "model", "model_not_found")
    params = sampling(body, s.cfg)
    ids = prompt_ids(s, body, params.max_tokens)
    job = Job(s, key, ids, params, body.seed)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": s.name}
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return JobStream(job, stream(job, head, usage, body), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        await until_done_or_disconnect(job, request)
        if (error := job.failed()) is not None:
            raise error
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                    "logprobs": {"content": token_logprobs(s.engine.tok, r.token_ids, r.logprobs, r.text)}
                    if body.logprobs else None} for i, r in enumerate(job.requests)]
        log_completion(job, head, body)
        return {**head, "object": "chat.completion", "choices": choices, "usage": job.usage()}
    finally:
        job.close()


def log_completion(job: Job, head: dict, body: ChatRequest) -> None:
    """With --feedback-db: the finished completion to the store, in the background (serve/feedback.py)."""
    s = job.s
    if s.feedback is None or not all(r.finished for r in job.requests):  # a client that left: nothing to judge
        return
    sent = body.model_dump(exclude_unset=True, exclude={"messages", "model", "stream", "stream_options", "logprobs"})
    s.feedback.submit({"id": head["id"], "messages": [m.as_dict() for m in body.messages],
                       "template": s.engine.tok.decode(job.ids), "prompt_tokens": len(job.ids),
                       "decoding": {**asdict(job.params), "seed": body.seed, "sent": sent},
                       "choices": [{"text": r.text, "finish_reason": r.finish_reason, "tokens": len(r.token_ids)}
                                   for r in job.requests]}, s.metrics)


async def until_done_or_disconnect(job: Job, request: Request) -> None:
    """Wait for every choice to finish, or return early when the client disconnects (vLLM's race against the
    ASGI http.disconnect message; job.close() then cancels the rest)."""
    async def done():
        while not all(r.finished for r in job.requests):
            await job.changed()

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    tasks = [asyncio.ensure_future(done()), asyncio.ensure_future(disconnected())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream(job: Job, head: dict, include_usage: bool, body: ChatRequest):
    """The SSE events of a streamed completion: per choice a role chunk, content deltas as tokens come, a finish
    chunk; a usage chunk (choices []) iff ``include_usage``; then ``data: [DONE]``. A failure is an error event
    (JSON, OpenAI's shape); a ``: ping`` comment every PING_SECONDS while nothing comes (a long queue) keeps
    proxies from closing the stream. Closing the stream early (a client disconnect) cancels the unfinished
    choices (job.close)."""
    chunk = {**head, "object": "chat.completion.chunk"}
    try:
        for i in range(len(job.requests)):
            yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        async for event in choice_events(job, chunk):
            yield event
        log_completion(job, head, body)
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": job.usage()})
    except APIError as e:
        yield sse(e.body())
    except Exception as e:  # noqa: BLE001 - the headers are sent: the client gets an error event, not a cut stream
        yield sse(APIError(500, f"internal error ({type(e).__name__}: {e})", None, "internal_error").body())
    finally:
        job.close()
    yield "data: [DONE]\n\n"


async def choice_events(job: Job, chunk: dict):
    """Content and finish chunks of every choice until all have finished; raises the engine's failure."""
    tok = job.s.engine.tok
    texts = [StreamText(r.params.stop) for r in job.requests]
    open_ = set(range(len(job.requests)))
    while open_:
        try:
            await asyncio.wait_for(job.changed(), PING_SECONDS)
        except asyncio.TimeoutError:
            yield ": ping\n\n"
            continue
        if (error := job.failed()) is not None:
            raise error
        for i in sorted(open_):
            r = job.requests[i]
            done = r.finished
            delta = texts[i].finish(r.text) if done else \
                texts[i].feed(tok.decode(list(r.token_ids), skip_special_tokens=True))
            if delta:
                yield sse({**chunk, "choices": [{"index": i, "delta": {"content": delta}, "logprobs": None,
                                                 "finish_reason": None}]})
            if done:
                open_.discard(i)
                yield sse({**chunk, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                 "finish_reason": r.finish_reason}]})
