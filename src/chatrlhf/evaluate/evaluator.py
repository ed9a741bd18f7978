"""The independent evaluator: a saved model folder scored the way its user will run it.

Nothing here shares code with the trainers' sampling or forward passes. Replies come from plain transformers
``model.generate`` (multinomial sampling at the given temperature, top-k 0, top-p 1 — nothing taken from the
folder's generation_config), seeded once per model so that a model and its baseline see the same random stream.
Prompts are rendered with the chat template saved in the folder (the plain-text one when it was trained with
--no-chat-template), and :func:`check_prompt_format` refuses a run that would format them otherwise than the
trainer did. Log-probabilities (for the KL and the human replies' likelihood) come from one plain forward pass
over prompt + reply. Every figure gets a 95% bootstrap interval over prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from chatrlhf.config import EvalConfig
from chatrlhf.data import load_prompts
from chatrlhf.data.records import prompt_key
from chatrlhf.data.template import prompt_format, render
from chatrlhf.errors import UsageError
from chatrlhf.evaluate.metrics import bootstrap_ci, prompt_win_rates
from chatrlhf.models import autocast
from chatrlhf.rewards import ModelReward, SimilarityReward, human_replies, load_callable


@dataclass
class Replies:
    """Sampled replies, row-aligned with the prompts they answer (n consecutive rows per prompt)."""
    texts: list[str]
    batches: list[tuple[torch.Tensor, ...]]  # (query ids, query mask, reply ids, reply mask) per generation batch
    ended: list[bool]
    lengths: list[int]


def check_prompt_format(model_dir: str, tok, flag: str = "--model") -> None:
    """Refuse to use ``tok`` on a model folder whose trainer formatted prompts otherwise (its chatrlhf.json)."""
    record = Path(model_dir) / "chatrlhf.json"
    if not record.is_file():
        return
    saved = json.loads(record.read_text(encoding="utf-8"))
    want = saved.get("prompt_format") or ({"template": "chat" if saved["chat_template"] else "plain"}
                                          if "chat_template" in saved else None)
    if want is None:
        return
    now = prompt_format(tok)
    if now["template"] != want["template"] or want.get("sha256", now["sha256"]) != now["sha256"]:
        hint = ("drop --no-chat-template" if want["template"] == "chat"
                else "the folder's tokenizer should carry the plain template: re-save it from the trainer's output")
        other = " with another chat template" if now["template"] == want["template"] else ""
        raise UsageError(f"{flag} {model_dir}: trained on {want['template']} prompts (its chatrlhf.json), but would be "
                         f"evaluated on {now['template']} prompts{other} — the figures would measure another task", hint)


def encode(tok, prompts: list[list[dict]], max_prompt_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask, rendered with the tokenizer's template (over-long prompts lose their start)."""
    return encode_texts(tok, [render(tok, p, add_generation_prompt=True) for p in prompts], max_prompt_length, device)


def encode_texts(tok, texts: list[str], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    tok.padding_side, tok.truncation_side = "left", "left"
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
              add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def sample_replies(model, tok, prompts, *, max_prompt_length: int, max_new_tokens: int, temperature: float, seed: int,
                   batch_rows: int = 32, dtype: str = "auto", on_batch=None) -> Replies:
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    model.eval()
    torch.manual_seed(seed)  # the evaluator's own process and stream; the same for model and baseline
    gen_cfg = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0,
                               max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)
    out = Replies([], [], [], [])
    for i in range(0, len(prompts), batch_rows):
        q, qm = encode(tok, prompts[i:i + batch_rows], max_prompt_length, device)
        with autocast(dtype, device):
            seq = model.generate(input_ids=q, attention_mask=qm, generation_config=gen_cfg)
        r = seq[:, q.shape[1]:]
        eos = (r == tok.eos_token_id).long()
        rm = ((eos.cumsum(1) - eos) == 0).long()  # through the first EOS
        out.batches.append((q, qm, r, rm))
        out.ended += eos.any(1).tolist()
        out.lengths += rm.sum(1).tolist()
        out.texts += [tok.decode(row[m.bool()], skip_special_tokens=True).strip() for row, m in zip(r, rm)]
        if on_batch:
            on_batch(len(q))
    return out


def reply_logprobs(model, q, qm, r, rm, temperature: float = 1.0, dtype: str = "auto") -> torch.Tensor:
    """(B, R) log π(reply token | prompt, reply so far) at ``temperature``, 0 off the reply: one plain forward pass."""
    ids, mask = torch.cat([q, r], 1), torch.cat([qm, rm], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with autocast(dtype, ids.device):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=r.shape[1] + 1).logits
    lp = torch.log_softmax(logits[:, :-1].float() / temperature, -1).gather(-1, r.unsqueeze(-1)).squeeze(-1)
    return lp * rm


@torch.no_grad()
def kl_per_reply(model, base, replies: Replies, temperature: float, dtype: str = "auto") -> list[float]:
    """Σ_t log π(y_t) − log π_base(y_t) over each of ``model``'s replies: unbiased for KL(π ‖ π_base)."""
    out = []
    for q, qm, r, rm in replies.batches:
        out += (reply_logprobs(model, q, qm, r, rm, temperature, dtype)
                - reply_logprobs(base, q, qm, r, rm, temperature, dtype)).sum(1).tolist()
    return out


@torch.no_grad()
def reference_nll(model, tok, pairs: list[tuple[list[dict], str]], max_length: int, dtype: str = "auto",
                  batch_rows: int = 16) -> float:
    """Mean negative log-likelihood per token of the human replies (and the template's end of turn), each given
    its prompt: what SFT's held-out loss measures, computed here from the saved folder alone."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_rows):
        q_texts, r_ids = [], []
        for prompt, reply in pairs[i:i + batch_rows]:
            head = render(tok, prompt, add_generation_prompt=True)
            full = render(tok, prompt + [{"role": "assistant", "content": reply}])
            q_texts.append(head)
            r_ids.append(tok(full[len(head):], add_special_tokens=False)["input_ids"])
        q, qm = encode_texts(tok, q_texts, max_length, device)
        width = max(len(x) for x in r_ids)
        r = torch.full((len(r_ids), width), tok.pad_token_id, dtype=torch.long, device=device)
        rm = torch.zeros_like(r)
        for j, x in enumerate(r_ids):
            r[j, :len(x)], rm[j, :len(x)] = torch.tensor(x, device=device), 1
        total -= float(reply_logprobs(model, q, qm, r, rm, 1.0, dtype).sum())
        count += int(rm.sum())
    return total / max(count, 1)


# --------------------------------------------------------------------------- prompts and judges


def held_out(paths: list[str]) -> list[tuple[list[dict], list[str]]]:
    """[(prompt, its human replies — possibly none)] in first-seen order, without repeats."""
    refs = human_replies(paths)
    found: dict[str, list[dict]] = {}
    for path in paths:
        for p in load_prompts(path):
            found.setdefault(prompt_key(p), p)
    if not found:
        raise UsageError(f"--data {','.join(paths)}: no prompts", "one prompt per line in a .txt, or any data format")
    return [(p, refs.get(k, [])) for k, p in found.items()]


def reward_sources(cfg: EvalConfig, refs: dict) -> dict:
    """{name: f(prompts, replies, ended) -> scores}: the judges this evaluation reports, each separately."""
    sources = {}
    if cfg.reward_model:
        sources["rm"] = ModelReward(cfg.reward_model, force=True, max_length=cfg.max_prompt_length + cfg.max_new_tokens,
                                    device=cfg.device, dtype=cfg.dtype, log=lambda m: None)
    if cfg.reward_fn:
        fn = load_callable(cfg.reward_fn)
        sources["fn"] = lambda p, r, ended: fn(p, r)
    if refs:
        rouge = SimilarityReward(refs, "rouge")
        sources["similarity"] = lambda p, r, ended: rouge(p, r)
    return sources


# --------------------------------------------------------------------------- statistics over prompts


def per_prompt_means(values: list, n: int) -> list[float | None]:
    """The mean of each prompt's n values (None where the source had no opinion on any of them)."""
    out = []
    for i in range(0, len(values), n):
        seen = [float(x) for x in values[i:i + n] if x is not None]
        out.append(sum(seen) / len(seen) if seen else None)
    return out


def interval(values, seed: int) -> dict:
    mean, lo, hi = bootstrap_ci([v for v in values if v is not None], seed=seed)
    return {"mean": mean, "ci95": [lo, hi]}


def compare(model: list, base: list, n: int, seed: int) -> dict:
    """Per reward source: each side's mean, the gain (paired by prompt) and the win rate, each with a 95% CI."""
    a, b = per_prompt_means(model, n), per_prompt_means(base, n)
    gains = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    full = [i for i in range(len(a)) if all(v is not None for v in model[i * n:(i + 1) * n] + base[i * n:(i + 1) * n])]
    wins = prompt_win_rates([model[i * n + k] for i in full for k in range(n)],
                            [base[i * n + k] for i in full for k in range(n)], n) if full else []
    return {"model": interval(a, seed), "baseline": interval(b, seed), "gain": interval(gains, seed),
            "win_rate": interval(wins, seed), "prompts_compared": len(full)}
