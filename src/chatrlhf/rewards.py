"""Reward sources. So far: the learned reward model (scores read at the last non-pad token, then
normalised with the gain and bias fitted after training)."""

from __future__ import annotations

import torch

from chatrlhf.data.template import render
from chatrlhf.models import reward_norm


def encode_reply(tok, prompt: list[dict], response: str, max_length: int) -> list[int]:
    """Prompt + reply through the reward model's own chat template (it may differ from the policy's:
    text is re-tokenised). Over-long inputs lose the start of the prompt; the reply is kept."""
    text = render(tok, prompt + [{"role": "assistant", "content": response}])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[-max_length:]


def pad_right(seqs: list[list[int]], pad_id: int, device) -> dict:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def raw_scores(model, batch: dict) -> torch.Tensor:
    """(B,) scores at the last non-pad token (right padding)."""
    hidden = model.base_model(**batch, use_cache=False).last_hidden_state
    last = batch["attention_mask"].sum(1) - 1
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return model.score(h).squeeze(-1).float()


@torch.no_grad()
def reward_scores(model, tok, prompts: list[list[dict]], responses: list[str], batch_size: int = 16,
                  max_length: int = 512, normalise: bool = True) -> list[float]:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seqs = [encode_reply(tok, p, r, max_length) for p, r in zip(prompts, responses)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding
    out = [0.0] * len(seqs)
    gain, bias = reward_norm(model) if normalise else (1.0, 0.0)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        s = raw_scores(model, pad_right([seqs[i] for i in idx], tok.pad_token_id, device))
        for i, v in zip(idx, s.tolist()):
            out[i] = gain * v + bias
    model.train(was_training)
    return out
