"""POST /v1/chat/completions on the engine's continuous batching.

A request is checked (fields, model name, limits), admitted by the gate, and submitted as ``n`` engine requests
(one shared prompt, each choice with its own random generator when ``seed`` is given, so that a seeded request
samples the same replies whatever else is running). The engine's thread wakes the request's asyncio.Event after
each token (Request.on_token); the handler never blocks the event loop. Streaming sends OpenAI's chunks as tokens
come (held back only where a stop string may be starting, see text.py); a client that goes away cancels its
replies (Engine.cancel), streaming or not.

A request reads ``Server.served`` (the model, its engine and tokenizer, its name) once when it arrives and keeps it
to its end, so a hot swap (admin.py) never moves a request between models. With ``--rerank`` a request samples
``--candidates`` replies and returns the ``n`` the reranker scores highest (non-streaming only).
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from chatrlhf.serve.served import Served
from chatrlhf.serve.text import StreamText, token_logprobs

router = APIRouter()
PING_SECONDS = 15.0   # an SSE comment this often while a stream waits (SERVING.md §5)


@dataclass
class Server:
    """What every route needs: the served model (swapped whole by POST /admin/reload), the settings, the key
    digests, the gate, the metrics."""
    served: Served
    cfg: ServeConfig
    digests: list[str]
    feedback: object | None = None   # serve/feedback.py's FeedbackLog with --feedback-db, else None: nothing stored
    admin: str | None = None         # the digest of --admin-key; None: hot swap disabled
    reranker: object | None = None   # rerank.py's Reranker with --rerank, else None
    candidates: int = 1              # replies sampled per request with --rerank
    gate: Gate = field(init=False)
    metrics: Metrics = field(init=False)
    reloading: bool = False          # a POST /admin/reload is loading its model
    retiring: set = field(default_factory=set)   # swapped-out models whose last requests are still running
    rerank_lock: asyncio.Lock = field(default_factory=asyncio.Lock)   # one scoring pass at a time

    def __post_init__(self):
        self.gate = Gate(self.cfg.max_batch + self.cfg.max_queue, self.cfg.max_concurrent)
        self.metrics = Metrics(self.engines)

    def engines(self) -> list[Engine]:
        """Engines running: the served one, and swapped-out ones until their last request has finished."""
        return [self.served.engine] + [old.engine for old in list(self.retiring) if old.engine is not None]

    @property
    def names(self) -> list[str]:
        """What a request's ``model`` may say: the served model's name, and the name the server started with
        (--model-name, else --model), which stays valid across hot swaps."""
        first = self.cfg.model_name or self.cfg.model
        return [self.served.name] + ([first] if first != self.served.name else [])


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


def prompt_ids(s: Server, served: Served, req: ChatRequest, max_tokens: int) -> list[int]:
    ids = served.engine.encode([m.as_dict() for m in req.messages])
    if len(ids) > s.cfg.max_prompt_tokens:
        raise APIError(400, f"the prompt is {len(ids)} tokens, over this server's limit of {s.cfg.max_prompt_tokens}: "
                       "send a shorter conversation", "messages", "context_length_exceeded")
    if served.max_positions and len(ids) + max_tokens > served.max_positions:
        raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is over the model's "
                       f"context of {served.max_positions} tokens", "max_tokens", "context_length_exceeded")
    return ids


def choice_generator(seed: int | None, index: int, device) -> torch.Generator | None:
    """Choice ``index``'s own random stream for a seeded request (None without a seed: the engine's stream)."""
    if seed is None:
        return None
    return torch.Generator(device).manual_seed((seed * 1_000_003 + index) % (1 << 63))


class Job:
    """One HTTP request in flight on one served model: its engine requests, its wake-up event, its bookkeeping."""

    def __init__(self, s: Server, served: Served, key: str, ids: list[int], params: SamplingParams,
                 seed: int | None):
        self.s, self.served, self.key, self.ids, self.params = s, served, key, ids, params
        self.start, self.first_token, self.closed = time.perf_counter(), None, False
        self.event = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wake(_request):   # on the engine's thread
            try:
                loop.call_soon_threadsafe(self.event.set)
            except RuntimeError:  # the loop has closed (shutdown): nobody is waiting any more
                pass

        s.gate.enter(key, params.n)
        served.jobs += 1   # the model is not stopped while this is above 0 (served.retire)
        engine = served.engine
        self.requests = [engine.submit(ids, params, i, on_token=wake,
                                       generator=choice_generator(seed, i, engine.device)) for i in range(params.n)]
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
            self.served.engine.cancel(r)
        self.served.jobs -= 1
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
    served = s.served   # this request's model to its end, whatever a reload does meanwhile
    if body.model not in s.names:
        raise APIError(404, f"model '{body.model}' is not served here: this server serves '{served.name}' "
                       "(GET /v1/models)", "model", "model_not_found")
    params = sampling(body, s.cfg)
    if s.reranker is not None:
        params = best_of(s, body, params)
    ids = prompt_ids(s, served, body, params.max_tokens)
    job = Job(s, served, key, ids, params, body.seed)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return JobStream(job, stream(job, head, usage, body), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        await until_done_or_disconnect(job, request)
        if (error := job.failed()) is not None:
            raise error
        picked, scores = await ranked(job, body)
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                    "logprobs": {"content": token_logprobs(served.tok, r.token_ids, r.logprobs, r.text)}
                    if body.logprobs else None} for i, r in enumerate(job.requests[k] for k in picked)]
        log_completion(job, head, body, picked, scores)
        return {**head, "object": "chat.completion", "choices": choices, "usage": job.usage()}
    finally:
        job.close()


def best_of(s: Server, body: ChatRequest, params: SamplingParams) -> SamplingParams:
    """With --rerank: the request's settings with --candidates replies to sample; refuses what cannot be served."""
    if body.stream:
        raise APIError(400, "this server returns the best of --candidates replies (--rerank): a reply is picked "
                       "once every candidate has finished, so it cannot stream; ask with stream: false", "stream",
                       "unsupported_parameter")
    if body.n > s.candidates:
        raise APIError(400, f"n = {body.n} is over the {s.candidates} candidates this server samples per request "
                       "(--candidates); it returns the best n of them", "n", "invalid_value")
    return dataclasses.replace(params, n=s.candidates)


async def ranked(job: Job, body: ChatRequest) -> tuple[list[int], list[float] | None]:
    """(the replies to return, every reply's score): all in order; with --rerank the ``n`` candidates the reranker
    scores highest, best first (a tie goes to the earlier candidate), scored off the event loop."""
    s = job.s
    if s.reranker is None:
        return list(range(len(job.requests))), None
    texts = [r.text for r in job.requests]
    async with s.rerank_lock:   # one scoring pass at a time: they would only share the same cores
        scores = await asyncio.to_thread(s.reranker.scores, [[m.as_dict() for m in body.messages]] * len(texts),
                                         texts)
    return sorted(range(len(texts)), key=lambda i: -scores[i])[:body.n], scores


def log_completion(job: Job, head: dict, body: ChatRequest, picked: list[int] | None = None,
                   scores: list[float] | None = None) -> None:
    """With --feedback-db: the finished completion to the store, in the background (serve/feedback.py), with the
    model that served it (name, checkpoint hash, and its folder in ``decoding.model_path``); with --rerank the
    candidates' scores and which were returned go into ``decoding``."""
    s, served = job.s, job.served
    if s.feedback is None or not all(r.finished for r in job.requests):  # a client that left: nothing to judge
        return
    picked = list(range(len(job.requests))) if picked is None else picked
    sent = body.model_dump(exclude_unset=True, exclude={"messages", "model", "stream", "stream_options", "logprobs"})
    decoding = {**asdict(job.params), "seed": body.seed, "sent": sent, "model_path": served.path}
    if scores is not None:
        decoding["rerank"] = {"by": s.cfg.rerank, "scores": scores, "picked": picked}
    s.feedback.submit({"id": head["id"], "messages": [m.as_dict() for m in body.messages],
                       "model": served.name, "checkpoint": served.checkpoint,
                       "template": served.tok.decode(job.ids), "prompt_tokens": len(job.ids), "decoding": decoding,
                       "choices": [{"text": r.text, "finish_reason": r.finish_reason, "tokens": len(r.token_ids)}
                                   for r in (job.requests[k] for k in picked)]}, s.metrics)


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
    tok = job.served.tok
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
