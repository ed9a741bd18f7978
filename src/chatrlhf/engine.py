"""THE generation engine: ``Engine.generate(prompts, SamplingParams) -> list[Completion]`` (the shape of vLLM's
``LLM.generate``), used by PPO rollouts, `chatrlhf chat`, `chatrlhf generate` and the feedback app's reply writer.

One code path: requests are submitted (:meth:`Engine.submit`) and every :meth:`Engine.step` first prefills the
requests that arrived since the last step (each distinct prompt once, its KV cache shared by the rows that repeat
it) and merges them into the running batch — the shorter KV cache is left-padded to the longer one with attention
mask 0, positions are counted per row — then samples one token for every running row and feeds it through the
model. A row stops at EOS, a stop string or ``max_tokens``; finished rows leave the batch and every layer of the
cache once at least ``compact_fraction`` of the rows have finished (copying the cache costs more than carrying a
few dead rows). :meth:`Engine.generate` is submit + step until done; :meth:`Engine.start` runs the step loop in a
background thread for a server.

Sampling: repetition penalty (over prompt and reply tokens, as ``transformers``), temperature, top-k, top-p, then
one uniform draw per row through the inverse CDF summed in float64 (:func:`draw`). With top-k 0, top-p 1 and no
penalty the distribution is ``log_softmax(logits / T)`` computed exactly as the PPO trainer recomputes it, so a
rollout draws the same tokens for the same generator as before the engine existed (RL_DETAILS items 1–5).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from chatrlhf.data.template import render
from chatrlhf.models import autocast, unwrap, use_bf16


@dataclass
class SamplingParams:
    """How to decode one request (vLLM's names). Off values: temperature 0 = greedy, top_k 0, top_p 1,
    repetition_penalty 1."""
    max_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)   # the reply ends before the first of these strings
    n: int = 1                                      # completions per prompt (its prefill is shared)
    seed: int | None = None                         # a generator of its own for generate() when none is given
    ignore_eos: bool = False                        # keep going after EOS (benchmarks: every reply max_tokens long)

    def __post_init__(self):
        for name, ok in (("max_tokens", self.max_tokens >= 1), ("temperature", self.temperature >= 0),
                         ("top_k", self.top_k >= 0), ("top_p", 0 < self.top_p <= 1),
                         ("repetition_penalty", self.repetition_penalty > 0), ("n", self.n >= 1)):
            if not ok:
                raise ValueError(f"SamplingParams.{name} = {getattr(self, name)!r} is out of range "
                                 "(max_tokens, n ≥ 1; temperature, top_k ≥ 0; 0 < top_p ≤ 1; repetition_penalty > 0)")

    @property
    def plain(self) -> bool:
        """Pure sampling from softmax(logits / T): no filter, no penalty."""
        return self.temperature > 0 and self.top_k == 0 and self.top_p >= 1 and self.repetition_penalty == 1


@dataclass
class Completion:
    """One finished request."""
    token_ids: list[int]     # the reply's tokens, EOS included when it ended with one
    text: str                # their text, special tokens dropped, cut before a stop string
    logprobs: list[float]    # log-prob of each token under the distribution it was drawn from (temperature T,
                             # after penalty and filters; for greedy rows at T = 1)
    finish_reason: str       # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_index: int        # which prompt of the generate() call (the submit() order otherwise)


class Request:
    """A handle on a submitted request: its tokens grow while it runs; ``wait()`` blocks until it finishes.

    For a server: ``on_token(request)`` is called from the engine's thread after each token the request gets, when
    it finishes (finish_reason set, ``text`` final) and when it fails or is cancelled — a streaming reply reads
    ``token_ids`` there. ``generator``: a random stream of its own (a request's ``seed``), so that its samples do not
    depend on which other requests share the batch."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, index: int, on_token=None,
                 generator: torch.Generator | None = None):
        self.prompt_ids, self.params, self.index = prompt_ids, params, index
        self.on_token, self.generator = on_token, generator
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.text = ""
        self.error: BaseException | None = None   # what stopped the background loop, if it failed
        self.cancelled = False                     # Engine.cancel(): the row leaves at the next step
        self._done = threading.Event()

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._done.set()
        if self.on_token is not None:
            self.on_token(self)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def wait(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.index} did not finish within {timeout} s")
        if self.error is not None:
            raise RuntimeError(f"request {self.index}: the engine's step loop failed: {self.error}") from self.error
        return self.completion()

    def completion(self) -> Completion:
        return Completion(list(self.token_ids), self.text, list(self.logprobs), self.finish_reason, self.index)


# --------------------------------------------------------------------------- pure sampling functions


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded prompt starts at position 0."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def sampling_cdf(logp: torch.Tensor) -> torch.Tensor:
    """(B, V) cumulative probabilities that :func:`draw` searches, summed in float64: in float32 a probability below
    half a unit in the last place of the running sum (3e-8 near 1) adds nothing or a whole unit, so on a peaked 49k
    distribution thousands of tokens get no width (never drawn) or a wrong one — and the recorded log-probs would
    not be those of the distribution sampled from. exp stays float32 (exact to 1e-7 relative); the float64 sum
    costs ~4 ms per step for 64 rows of 49k here."""
    return logp.exp().double().cumsum(-1)


def draw(logp: torch.Tensor, generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from log-probabilities (B, V), by the inverse CDF: one uniform draw per row and a
    binary search, where ``torch.multinomial`` draws V exponentials per row (74 ms of every decoding
    step on a 49k vocabulary for 64 rows, here on 2 cores). ``u`` (B, 1) float64 in [0, 1): the uniform draws,
    when rows draw from generators of their own (else they come from ``generator``)."""
    cdf = sampling_cdf(logp)
    if u is None:
        u = torch.rand(logp.shape[0], 1, device=logp.device, dtype=cdf.dtype, generator=generator)
    u = u * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=logp.shape[1] - 1)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019, as ``transformers``): the logit of every token already in the row (prompt
    or reply; ``seen`` (B, V) bool) is divided by ``penalty`` (B, 1) when positive and multiplied when negative."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def top_k_filter(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Logits below each row's k-th largest set to −inf (ties with it kept, as ``transformers``); k (B,) with
    0 = off. One ``topk`` of the largest k, not a sort of the vocabulary (a 64 × 49k sort per step costs more
    than the rest of the sampling)."""
    V = logits.shape[-1]
    k = torch.where(k <= 0, V, k.clamp(max=V))
    kth = logits.topk(int(k.max()), -1).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus (Holtzman et al. 2020, as ``transformers``): in ascending order, tokens whose cumulative probability
    is ≤ 1 − p are dropped (the most likely token always stays); p (B, 1) with 1 = off."""
    ascending, idx = logits.sort(-1)
    drop = ascending.softmax(-1).cumsum(-1) <= 1 - p
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))


def next_tokens(logits: torch.Tensor, rows: "RowParams", seen: torch.Tensor | None,
                generator: torch.Generator | None, u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B,), their log-probs (B,)) from the next-token logits (B, V) under each row's parameters; ``u``: the
    rows' uniform draws when some rows have generators of their own (see :func:`draw`)."""
    logits = logits.float()
    if rows.plain_temperature is not None:  # the rollout path: exactly log_softmax(logits / T) and one draw
        logp = torch.log_softmax(logits / rows.plain_temperature, -1)
        token = draw(logp, generator, u)
        return token, logp.gather(1, token[:, None]).squeeze(1)
    if seen is not None:
        logits = repetition_penalty(logits, seen, rows.penalty)
    greedy = rows.temperature == 0
    logits = logits / torch.where(greedy, 1.0, rows.temperature)
    if rows.top_k_on:
        logits = top_k_filter(logits, rows.top_k)
    if rows.top_p_on:
        logits = top_p_filter(logits, rows.top_p)
    logp = torch.log_softmax(logits, -1)
    token = logits.argmax(-1)
    if not bool(greedy.all()):
        token = torch.where(greedy[:, 0], token, draw(logp, generator, u))
    return token, logp.gather(1, token[:, None]).squeeze(1)


@dataclass
class RowParams:
    """The sampling parameters of the running rows as tensors, (B, 1) or (B,)."""
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    penalty: torch.Tensor
    plain_temperature: float | None = None  # every row plain at this one temperature
    top_k_on: bool = False                  # some row uses top-k
    top_p_on: bool = False                  # some row uses top-p

    @staticmethod
    def of(params: list[SamplingParams], device) -> "RowParams":
        col = lambda xs: torch.tensor(xs, dtype=torch.float32, device=device)[:, None]  # noqa: E731
        temps = {p.temperature for p in params}
        plain = all(p.plain for p in params) and len(temps) == 1
        return RowParams(col([p.temperature for p in params]),
                         torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
                         col([p.top_p for p in params]), col([p.repetition_penalty for p in params]),
                         next(iter(temps)) if plain else None,
                         any(p.top_k > 0 for p in params), any(p.top_p < 1 for p in params))


# --------------------------------------------------------------------------- prefill, bf16 weights, the batch


def shared_prompts(query_ids: torch.Tensor, query_mask: torch.Tensor):
    """(unique prompt ids, their mask, row → unique index) when some rows repeat a prompt (several replies
    per prompt), else None. The prompt then goes through the network once and its KV cache is shared."""
    rows, inverse = torch.unique(torch.cat([query_ids, query_mask], 1), dim=0, return_inverse=True)
    if len(rows) == len(query_ids):
        return None
    Q = query_ids.shape[1]
    return rows[:, :Q], rows[:, Q:], inverse


def prefill(model, query_ids: torch.Tensor, query_mask: torch.Tensor, shared, **kw):
    """One forward pass over the prompts with a KV cache, each distinct prompt computed once (``shared``:
    what shared_prompts() found, None if no prompt repeats); the output's tensors and cache are expanded
    back to one row per prompt."""
    ids, mask = (query_ids, query_mask) if shared is None else shared[:2]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, **kw)
    if shared is not None:
        out.cache.batch_select_indices(shared[2])
        for key in ("logits", "last_hidden_state"):
            if out.get(key) is not None:
                out[key] = out[key][shared[2]]
    return out


def low_precision_weights(model, dtype: str, device) -> dict | None:
    """bf16 copies of a model's floating-point parameters, for many forward passes without a backward
    (decoding): autocast would otherwise cast every weight again at every step (2 s of 12 s for 64 × 32
    tokens of SmolLM2-135M). Only the weights autocast would cast: norms stay fp32, and so does the input
    embedding (a bf16 one would put the residual stream in bf16: sampled log-probs then differ from the
    recomputed ones by 0.044 instead of 0.031 nats per token). None when bf16 is off."""
    if not use_bf16(dtype, torch.device(device)):
        return None
    embedding = unwrap(model).get_input_embeddings().weight
    weights = {n: p.detach().to(torch.bfloat16) if p.is_floating_point() and p.dim() >= 2 and p is not embedding else p
               for n, p in model.named_parameters()}
    head = unwrap(model).get_output_embeddings()
    if head is not None and head.weight is embedding:  # tied: the LM head still gets its bf16 copy
        name = next(n for n, m in model.named_modules() if m is head)
        weights[f"{name}.weight"] = embedding.detach().to(torch.bfloat16)
    return weights


class GrowingLayer(DynamicLayer):
    """A KV-cache layer whose keys and values live in a buffer with ``reserve`` free positions, so a decoding step
    writes one position instead of copying the whole cache (``torch.cat``: a tenth of a 64-row step). Attention sees
    the same values (a view of the filled part); anything that assigns ``keys``/``values`` (row selection, merging)
    replaces the buffer."""

    def __init__(self, reserve: int):
        self._reserve, self._buf, self._len = reserve, {"k": None, "v": None}, {"k": 0, "v": 0}
        super().__init__()

    def _get(self, name):
        t = self._buf[name]
        return t if t is None or t.dim() < 4 else t[:, :, :self._len[name]]

    def _set(self, name, t):
        self._buf[name], self._len[name] = t, (t.shape[2] if t is not None and t.dim() == 4 else 0)

    keys = property(lambda self: self._get("k"), lambda self, t: self._set("k", t))
    values = property(lambda self: self._get("v"), lambda self, t: self._set("v", t))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self._len["k"]
        end = start + key_states.shape[2]
        for name, new in (("k", key_states), ("v", value_states)):
            buf = self._buf[name]
            if buf.dim() < 4 or end > buf.shape[2] or buf.shape[0] != new.shape[0]:
                shape = list(new.shape)
                shape[2] = end + self._reserve
                grown = new.new_empty(shape)
                if start:
                    grown[:, :, :start] = self._get(name)
                self._buf[name] = buf = grown
            buf[:, :, start:end] = new
            self._len[name] = end
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len["k"]


def growing_cache(model, reserve: int):
    """A cache of :class:`GrowingLayer` for a model whose layers are all plain attention (else None: the model
    builds its own cache)."""
    cache = DynamicCache(config=unwrap(model).config)
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [GrowingLayer(reserve) for _ in cache.layers]
    return cache


def left_pad(t: torch.Tensor, width: int, dim: int, value=0) -> torch.Tensor:
    """``t`` widened to ``width`` along ``dim`` by ``value`` on the left."""
    n = width - t.shape[dim]
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_full(shape, value), t], dim)


@dataclass
class Batch:
    """The running rows: one per request, the KV cache of all of them, and the logits each samples from next."""
    requests: list[Request]
    cache: object                  # transformers cache, B rows, T positions
    mask: torch.Tensor             # (B, T) attention mask, left padding 0
    pos: torch.Tensor              # (B,) position of each row's last token
    logits: torch.Tensor           # (B, V) next-token logits
    done: torch.Tensor             # (B,) finished rows still carried (dropped when it pays)
    seen: torch.Tensor | None      # (B, V) tokens in prompt or reply, when some row has a repetition penalty
    rows: RowParams
    merged: bool = False           # rows joined while others ran (then the cache is also trimmed on the left)

    def select(self, idx: torch.Tensor) -> "Batch":
        """The rows ``idx``. In a batch that requests joined while it ran, the columns that are padding in every
        remaining row go too: else the cache of a batch that never empties would only grow. (A batch admitted at
        once keeps its width, so that a rollout's attention sees exactly what it saw before the engine.)"""
        self.cache.batch_select_indices(idx)
        mask = self.mask[idx]
        start = int(mask.any(0).long().argmax()) if self.merged else 0
        if start:
            mask = mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        requests = [self.requests[i] for i in idx.tolist()]
        return Batch(requests, self.cache, mask, self.pos[idx], self.logits[idx], self.done[idx],
                     None if self.seen is None else self.seen[idx],
                     RowParams.of([r.params for r in requests], self.mask.device), self.merged)

    def merge(self, new: "Batch") -> "Batch":
        """The two batches as one: the shorter cache and mask left-padded to the longer (mask 0 there)."""
        width = max(self.mask.shape[1], new.mask.shape[1])
        for a, b in zip(self.cache.layers, new.cache.layers):
            if not hasattr(a, "keys") or getattr(a, "is_sliding", False) or hasattr(a, "cumulative_length"):
                raise NotImplementedError(f"continuous batching merges plain KV caches only, not {type(a).__name__}"
                                          " (a sliding-window model): submit requests together, or one batch at a time")
            a.keys = torch.cat([left_pad(a.keys, width, -2), left_pad(b.keys, width, -2)])
            a.values = torch.cat([left_pad(a.values, width, -2), left_pad(b.values, width, -2)])
        requests = self.requests + new.requests
        seen = None
        if self.seen is not None or new.seen is not None:
            seen = seen_tokens(requests, self.logits.shape[1], self.mask.device)
        rows = RowParams.of([r.params for r in requests], self.mask.device)
        return Batch(requests, self.cache, torch.cat([left_pad(self.mask, width, 1), left_pad(new.mask, width, 1)]),
                     torch.cat([self.pos, new.pos]), torch.cat([self.logits, new.logits]),
                     torch.cat([self.done, new.done]), seen, rows, merged=True)


def seen_tokens(requests: list[Request], vocab: int, device) -> torch.Tensor:
    """(B, V) True at every token of each request's prompt and reply so far (for the repetition penalty)."""
    seen = torch.zeros((len(requests), vocab), dtype=torch.bool, device=device)
    for i, r in enumerate(requests):
        seen[i, torch.tensor(r.prompt_ids + r.token_ids, dtype=torch.long, device=device)] = True
    return seen


def pack(requests: list, max_tokens: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Finished requests (or completions) as (response_ids, response_mask, logprobs), (B, R): right-padded with
    ``pad_id``, mask 1 on reply tokens (EOS included), log-probs 0 after the reply."""
    B = len(requests)
    ids = torch.full((B, max_tokens), pad_id, dtype=torch.long)
    mask = torch.zeros((B, max_tokens), dtype=torch.long)
    lp = torch.zeros((B, max_tokens))
    for i, r in enumerate(requests):
        n = len(r.token_ids)
        ids[i, :n] = torch.tensor(r.token_ids, dtype=torch.long)
        lp[i, :n] = torch.tensor(r.logprobs, dtype=torch.float32)
        mask[i, :n] = 1
    return ids.to(device), mask.to(device), lp.to(device)


# --------------------------------------------------------------------------- the engine


class Engine:
    """Generation with a KV cache and continuous batching for one model and its tokenizer.

    ``dtype``: "auto" decodes with bf16 copies of the weights where bf16 is fast (see models.use_bf16), "float32"
    never. ``max_batch``: at most this many rows run at once (later requests wait for a free row); None = no limit.
    ``compact_fraction``: finished rows leave the batch once they are at least this fraction of it."""

    def __init__(self, model, tok, dtype: str = "auto", max_batch: int | None = None, compact_fraction: float = 0.25):
        self.model, self.tok, self.dtype = model, tok, dtype
        self.device = next(model.parameters()).device
        self.eos_id, self.pad_id = tok.eos_token_id, tok.pad_token_id
        self.max_batch, self.compact_fraction = max_batch, compact_fraction
        self.generator: torch.Generator | None = None   # the random stream draws come from (None: torch's global)
        self._batch: Batch | None = None
        self._waiting: list[Request] = []
        self._weights = None
        self._submitted = 0
        self._cv = threading.Condition()   # guards _waiting; wakes the background loop
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ----------------------------------------------------------------- requests in, completions out

    def encode(self, prompt) -> list[int]:
        """Token ids of a prompt: a message list (rendered with the tokenizer's template and its generation
        prompt) or token ids as they are."""
        if prompt and isinstance(prompt[0], int):
            return list(prompt)
        if not prompt or not isinstance(prompt[0], dict):
            raise TypeError(f"a prompt is a list of messages ({{'role', 'content'}} dicts) or of token ids, "
                            f"not {type(prompt).__name__} {str(prompt)[:60]!r}")
        return self.tok(render(self.tok, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]

    def submit(self, prompt, params: SamplingParams, index: int | None = None, on_token=None,
               generator: torch.Generator | None = None) -> Request:
        """Queue one completion of ``prompt``; it joins the running batch at the next step. Thread-safe.
        ``on_token`` and ``generator``: see :class:`Request`."""
        ids = self.encode(prompt)
        with self._cv:
            r = Request(ids, params, self._submitted if index is None else index, on_token, generator)
            self._submitted += 1
            self._waiting.append(r)
            self._cv.notify()
        return r

    def generate(self, prompts: list, params: SamplingParams | None = None, generator: torch.Generator | None = None,
                 on_finish=None) -> list[Completion]:
        """``params.n`` completions of each prompt, in prompt order. ``on_finish(n)`` is called after each step in
        which n of them finished (a progress bar)."""
        params = params or SamplingParams()
        if generator is None and params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        requests = [self.submit(p, params, i) for i, p in enumerate(prompts) for _ in range(params.n)]
        self._finish(requests, generator, on_finish)
        return [r.completion() for r in requests]

    @torch.no_grad()
    def sample_tensors(self, query_ids: torch.Tensor, query_mask: torch.Tensor, params: SamplingParams,
                       generator: torch.Generator | None = None, row_generators: list[torch.Generator] | None = None):
        """The training rollout: one reply per row of the left-padded prompts (B, Q), as tensors
        (response_ids, response_mask, logprobs), (B, R = params.max_tokens), right-padded after the first EOS.
        ``row_generators``: a random stream per row (instead of ``generator``), so that a row samples the same reply
        whatever else is in the batch — one process of a batch of 2B or two of B draw the same replies."""
        rows = row_generators or [None] * len(query_ids)
        requests = [Request(row[m.bool()].tolist(), params, i, generator=g)
                    for i, (row, m, g) in enumerate(zip(query_ids, query_mask, rows))]
        with self._cv:
            if self._batch is not None or self._waiting or self._thread is not None:
                raise RuntimeError("Engine.sample_tensors needs the engine to itself: requests are still running")
            self._admit(requests, query_ids, query_mask)
        self._finish(requests, generator)
        return pack(requests, params.max_tokens, self.pad_id, self.device)

    def _finish(self, requests: list[Request], generator, on_finish=None) -> None:
        """Step until every request in ``requests`` has finished (or wait, when the background loop steps)."""
        if self._thread is not None:
            if generator is not None:
                raise RuntimeError("the background loop draws from the engine's generator: set Engine.generator")
            for r in requests:
                r.wait()
                if on_finish:
                    on_finish(1)
            return
        self.generator, previous = generator, self.generator
        mine = {id(r) for r in requests}
        try:
            while not all(r.finished for r in requests):
                n = sum(id(r) in mine for r in self.step())
                if n and on_finish:
                    on_finish(n)
        finally:
            self.generator = previous

    # ----------------------------------------------------------------- one decoding step

    @torch.no_grad()
    def step(self) -> list[Request]:
        """Admit waiting requests, sample one token for every running row, drop finished rows where it pays,
        feed the new tokens through the model. Returns the requests that finished."""
        with self._cv:
            room = len(self._waiting) if self.max_batch is None else self.max_batch - self.running
            new, self._waiting = self._waiting[:max(room, 0)], self._waiting[max(room, 0):]
        if new:
            try:
                self._admit(new)
            except Exception:
                with self._cv:   # back in the queue, so that whoever handles the error finds them
                    self._waiting = new + self._waiting
                raise
        b = self._batch
        if b is None:
            return []
        token, lp = next_tokens(b.logits, b.rows, b.seen, self.generator, self._uniforms(b))
        token = torch.where(b.done, torch.full_like(token, self.pad_id), token)
        finished = self._record(b, token, lp)
        if bool(b.done.all()):
            self._batch = None
            return finished
        if int(b.done.sum()) >= max(1, self.compact_fraction * len(b.requests)):  # drop finished rows where it pays
            keep = (~b.done).nonzero().squeeze(1)
            b, token = b.select(keep), token[keep]
        b.mask = torch.cat([b.mask, torch.ones_like(b.mask[:, :1])], 1)
        b.pos = b.pos + 1
        out = self._forward(input_ids=token[:, None], attention_mask=b.mask, position_ids=b.pos[:, None],
                            cache=b.cache, use_cache=True)
        b.logits = out.logits[:, -1]
        if b.seen is not None:
            b.seen.scatter_(1, token[:, None], True)
        self._batch = b
        return finished

    @property
    def running(self) -> int:
        """Rows in the batch (finished ones not yet dropped included)."""
        return 0 if self._batch is None else len(self._batch.requests)

    @property
    def serving(self) -> bool:
        """The background loop (start()) is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet admitted to the batch."""
        return len(self._waiting)

    def cancel(self, r: Request) -> None:
        """End request ``r`` with finish_reason "cancelled" (a client went away): taken off the queue now, or, when
        running, out of the batch at the next step (it gets no more tokens). Thread-safe; a finished one is left."""
        with self._cv:
            if r.finished:
                return
            if r in self._waiting:
                self._waiting.remove(r)
                r._finish("cancelled")
                return
            r.cancelled = True

    def _uniforms(self, b: Batch) -> torch.Tensor | None:
        """(B, 1) float64 uniform draws, each row's from its request's own generator where it has one (a seeded
        request samples the same reply whatever else is in the batch); None when no row has one (training)."""
        if all(r.generator is None for r in b.requests):
            return None
        return torch.cat([torch.rand(1, dtype=torch.float64, device=self.device,
                                     generator=self.generator if r.generator is None else r.generator)
                          for r in b.requests])[:, None]

    def _record(self, b: Batch, token: torch.Tensor, lp: torch.Tensor) -> list[Request]:
        """Append each live row's token; mark the rows that finish (EOS, stop string, max_tokens)."""
        finished = []
        done = b.done.tolist()
        for i, (r, t, p) in enumerate(zip(b.requests, token.tolist(), lp.tolist())):
            if done[i]:
                continue
            if r.cancelled:
                r.text = self.tok.decode(r.token_ids, skip_special_tokens=True)
                done[i] = True
                finished.append(r)
                continue
            r.token_ids.append(t)
            r.logprobs.append(p)
            eos = t == self.eos_id and not r.params.ignore_eos
            reason = "stop" if eos else "length" if len(r.token_ids) >= r.params.max_tokens else None
            text = self.tok.decode(r.token_ids, skip_special_tokens=True) if r.params.stop or reason else ""
            cut = min((j for j in (text.find(s) for s in r.params.stop) if j >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            if reason:
                r.text, r.finish_reason = text, reason
                done[i] = True
                finished.append(r)
            elif r.on_token is not None:
                r.on_token(r)
        if finished:
            b.done = torch.tensor(done, device=b.done.device)
            for r in finished:
                r._finish("cancelled" if r.cancelled else r.finish_reason)
        return finished

    def _admit(self, new: list[Request], ids: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> None:
        """Prefill new requests (each distinct prompt once) and merge them into the running batch."""
        if ids is None:
            width = max(len(r.prompt_ids) for r in new)
            ids = torch.tensor([[self.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in new],
                               dtype=torch.long, device=self.device)
            mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in new],
                                dtype=torch.long, device=self.device)
        if self._batch is None:  # a fresh batch: the weights may have changed since the last one (training)
            self._weights = low_precision_weights(self.model, self.dtype, self.device)
        params = [r.params for r in new]
        cache = growing_cache(self.model, max(p.max_tokens for p in params))
        out = prefill(self._forward, ids, mask, shared_prompts(ids, mask), logits_to_keep=1,
                      **({} if cache is None else {"cache": cache}))
        seen = seen_tokens(new, out.logits.shape[-1], self.device) if any(p.repetition_penalty != 1 for p in params) \
            else None
        batch = Batch(new, out.cache, mask, position_ids(mask)[:, -1], out.logits[:, -1],
                      torch.zeros(len(new), dtype=torch.bool, device=self.device), seen,
                      RowParams.of(params, self.device))
        self._batch = batch if self._batch is None else self._batch.merge(batch)

    def _forward(self, **kw):
        """The model, with the bf16 weight copies where bf16 is on."""
        if self._weights is None:
            return self.model(**kw)
        with autocast(self.dtype, self.device):
            return torch.func.functional_call(self.model, self._weights, args=(), kwargs=kw, tie_weights=False)

    # ----------------------------------------------------------------- background loop (for a server)

    def start(self) -> "Engine":
        """Run the step loop in a background thread: submit() from any thread, Request.wait() for the result."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="chatrlhf-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and self._batch is None:
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - every waiting caller gets the error instead of hanging
                self._fail(e)

    def _fail(self, error: Exception) -> None:
        """End every running and waiting request with ``error`` and empty the batch."""
        with self._cv:
            requests = self._waiting + ([] if self._batch is None else self._batch.requests)
            self._waiting, self._batch = [], None
        for r in requests:
            if not r.finished:
                r.error = error
                r._finish("error")
