"""What the preference trainers (DPO, KTO) share: replies tokenised with the policy's own chat template, sequence
log-probs from one forward pass over a batch (the LM head only where a reply token is predicted), and the reference
log-probs computed once before training and cached in the run folder.

The reference is the policy as loaded from --model, before any step. The trainers compute its log-probs with the
freshly loaded policy itself, before the run restores a checkpoint — so no second model is ever in memory; with
LoRA the adapters are switched off for that pass (the base is the reference, as TRL's adapters-off reference).
The cache (OUTPUT_DIR/ref_logps.safetensors) is keyed by the model, the dtype and every token id: a resumed run reads
it; a missing or stale cache is computed again — correct either way, because it is computed before the restore. A
fresh run always computes it.
"""

from __future__ import annotations

import os
import contextlib
import hashlib
from pathlib import Path

import torch

from chatrlhf.data.template import IGNORE, Tokenized, tokenize_conversation
from chatrlhf.errors import UsageError
from chatrlhf.models import autocast, in_forward, unwrap

REF_CACHE = "ref_logps.safetensors"


# --------------------------------------------------------------------------- tokenise


def encode_reply(tok, prompt: list[dict], reply: str, max_length: int) -> tuple[Tokenized | None, str]:
    """Prompt + reply through the policy's chat template; labels only on the reply (and its end-of-turn tokens).
    Over --max-length the end is cut (the reply keeps its first tokens); (None, why) when no reply token is left."""
    try:
        return tokenize_conversation(tok, prompt + [{"role": "assistant", "content": reply}], max_length,
                                     last_only=True)
    except ValueError as e:
        raise UsageError(f"the chat template: {e}", "pass --no-chat-template for plain text") from None


def collate(items: list[Tokenized], pad_id: int, device) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE off the replies) of a list of sequences."""
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for i, x in enumerate(items):
        ids[i, :len(x.input_ids)] = torch.tensor(x.input_ids)
        labels[i, :len(x.labels)] = torch.tensor(x.labels)
    mask = (torch.arange(width)[None, :] < torch.tensor([len(x.input_ids) for x in items])[:, None]).long()
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


# --------------------------------------------------------------------------- log-probs


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(reply | prompt) summed over each row's reply tokens (B,), reply token counts (B,)) in one forward pass
    of the whole batch (chosen and rejected replies together: TRL's concatenated_forward). The LM head runs only at
    the positions that predict a reply token: on a 49k vocabulary most of the logits would be thrown away.
    With ``batch["trunk"]`` (B, T, d) — the residual stream entering block ``batch["depth"]``, from
    :func:`trunk_states` — only the blocks from there up run."""
    return in_forward(model, _trunk_then_head, model, batch)


def _trunk_then_head(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    base = unwrap(model)
    if "trunk" in batch:
        with top_blocks(base.base_model, batch["depth"]):
            hidden = base.base_model(inputs_embeds=batch["trunk"], attention_mask=batch["attention_mask"],
                                     use_cache=False).last_hidden_state
    else:
        hidden = base.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    select = targets != IGNORE
    token_logps = reply_token_logps(base.get_output_embeddings(), hidden[:, :-1][select], targets[select])
    rows = select.nonzero()[:, 0]
    logps = torch.zeros(len(targets), dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    return logps, select.sum(1).to(logps.dtype)


def _token_logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")


def reply_token_logps(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(N,) log-probs of ``targets`` under ``head(hidden)`` (N, d), ``chunk`` positions at a time. With gradients each
    chunk is checkpointed: its (chunk, V) logits are made again in the backward instead of kept, so a batch's logits
    never sit in memory whole (16 replies of 45 tokens on a 49k vocabulary: 140 MB per copy, and cross-entropy keeps
    three) for one more pass through the head (~1/8 of the model's forward FLOPs)."""
    out = []
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        if torch.is_grad_enabled() and h.requires_grad:
            out.append(torch.utils.checkpoint.checkpoint(_token_logps, head, h, t, use_reentrant=False))
        else:
            out.append(_token_logps(head, h, t))
    return torch.cat(out) if out else hidden.new_zeros(0)


@torch.no_grad()
def all_logps(model, items: list[Tokenized], batch_size: int, pad_id: int, device, dtype: str,
              states: list | None = None, depth: int = 0) -> torch.Tensor:
    """(N,) sequence log-probs of ``items`` with ``model`` in eval mode, in batches of similar length, on the CPU.
    With ``states`` (a list of N), each item's residual stream entering block ``depth`` (T_i, d) is kept there."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(items))
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))  # little padding
    sink: list[torch.Tensor] = []
    with capturing(model, depth, sink) if states is not None else contextlib.nullcontext():
        for b in (order[k:k + batch_size] for k in range(0, len(order), batch_size)):
            with autocast(dtype, device):
                out[b] = sequence_logps(model, collate([items[i] for i in b], pad_id, device))[0].float().cpu()
            if states is not None:
                h = sink.pop()
                for row, i in enumerate(b):
                    states[i] = h[row, :len(items[i].input_ids)].clone()
    model.train(was_training)
    return out


# --------------------------------------------------------------------------- the frozen trunk, run once
# With only the top N blocks trained (--train-layers) the embeddings and the blocks below are frozen, so the residual
# stream entering the first trained block is the same at every step as in the reference pass: kept from that pass,
# the training forward runs only the top N blocks (SmolLM2, N = 8: 8 of 30 blocks instead of 30).
TRUNK_MODEL_TYPES = ("llama", "mistral", "qwen2")  # whose forward takes that stream as inputs_embeds, unscaled
TRUNK_STATE_BYTES = 512 * 2**20  # above this (many or long pairs) the lower blocks run at every step, as before


def frozen_depth(model, train_layers: int, items: list[Tokenized]) -> int:
    """How many lower blocks are frozen and can be skipped in training (0: none, or not this model, or too large)."""
    base = unwrap(model)
    layers = getattr(base.base_model, "layers", None)
    if train_layers < 0 or hasattr(model, "disable_adapter") or layers is None or \
            base.config.model_type not in TRUNK_MODEL_TYPES:
        return 0
    size = sum(len(x.input_ids) for x in items) * base.config.hidden_size * 4
    return max(len(layers) - train_layers, 0) if size <= TRUNK_STATE_BYTES else 0


@contextlib.contextmanager
def capturing(model, depth: int, sink: list):
    """Appends to ``sink`` the residual stream (B, T, d) entering block ``depth`` at every forward pass."""
    block = unwrap(model).base_model.layers[depth]
    hook = block.register_forward_pre_hook(
        lambda _, args, kwargs: sink.append((args[0] if args else kwargs["hidden_states"]).detach().float()),
        with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


@contextlib.contextmanager
def top_blocks(trunk, depth: int):
    """The trunk with its blocks from ``depth`` up only (the same modules)."""
    layers = trunk.layers
    trunk.layers = torch.nn.ModuleList(list(layers)[depth:])
    try:
        yield
    finally:
        trunk.layers = layers


def collate_trunk(batch: dict, states: list[torch.Tensor], depth: int) -> dict:
    """``batch`` (from :func:`collate`, the same rows) with the kept residual streams right-padded as ``trunk``."""
    trunk = torch.zeros(len(states), batch["input_ids"].shape[1], states[0].shape[-1], device=batch["input_ids"].device)
    for i, h in enumerate(states):
        trunk[i, :len(h)] = h
    return {**batch, "trunk": trunk, "depth": depth}


def reference_off(model):
    """The context in which ``model`` is the reference: LoRA adapters off (the base), else the model as it is."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def cache_key(model_name: str, dtype: str, groups: dict[str, list[Tokenized]]) -> str:
    """What the cached log-probs depend on: the model, the dtype and every token id of every group."""
    h = hashlib.sha256(f"{model_name}\0{dtype}".encode())
    for name in sorted(groups):
        h.update(name.encode())
        for x in groups[name]:
            h.update(b"\1" + ",".join(map(str, x.input_ids)).encode() + b"\2" + str(x.n_targets).encode())
    return h.hexdigest()


def reference_logps(model, groups: dict[str, list[Tokenized]], out_dir: str | Path, model_name: str, dtype: str,
                    batch_size: int, pad_id: int, device, log=print, reuse: bool = True, states: dict | None = None,
                    depth: int = 0, write: bool = True) -> dict[str, torch.Tensor]:
    """{group: (N,) log π_ref} for each group of sequences: with ``reuse`` (a resumed run) read from
    OUTPUT_DIR/ref_logps.safetensors when its key matches, else computed in one pass with ``model`` (the policy before
    any training step; adapters off with LoRA) and written there. A fresh run always computes them: the key names the
    model, not its weights, and a model folder may have been trained again since. ``states`` ({group: list of N}):
    that pass also keeps each sequence's residual stream entering block ``depth`` (so it always runs, resumed or not:
    the same pass, the same figures). ``write``: False on ranks other than the main one (which writes the file
    whole: a temporary file renamed, so another rank reading it never sees half of one)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(out_dir) / REF_CACHE
    key = cache_key(model_name, dtype, groups)
    if reuse and path.is_file() and not states:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return {name: f.get_tensor(name) for name in groups}
        log(f"chatrlhf: {path} was computed for other data or another model: computing the reference log-probs again")
    with reference_off(model):
        ref = {name: all_logps(model, items, batch_size, pad_id, device, dtype, (states or {}).get(name), depth)
               for name, items in groups.items()}
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in ref.items()}, str(path.with_suffix(".tmp")), metadata={"key": key})
        os.replace(path.with_suffix(".tmp"), path)
    return ref
