"""Reward-model training: Bradley–Terry on pairs from preferences, ratings and corrections.

Departures from a textbook loop, and why:
  * chosen and rejected replies of a batch go through one forward pass (2B sequences), and the head
    reads each sequence once, at its last non-pad token (or its reply's mean state: --pooling, --layer);
  * one epoch with the learning rate annealed linearly to 0 by default (RL_DETAILS item 11);
  * --freeze-trunk: the trunk's features of every reply are computed once, before the loop, and the head trains
    on them: the trunk is never run again, so epochs cost almost nothing (the small-data recipe); that head starts
    at zero, not N(0, 1/√(d+1)): training it is logistic regression, and a random start reads SmolLM2's few huge
    hidden dimensions as noise that a few epochs do not forget (reward_model._fresh_head);
  * --lora-r N: LoRA adapters on the trunk's linear layers and the whole head train (peft trains a copy of the head,
    modules_to_save); the saved folder has the adapters merged, a plain reward model with the same files as a full
    fine-tune's (the adapter alone, without its head, would be of no use), so every loader and the gate read it;
  * --ensemble K: K heads on that frozen trunk, head k trained on a bootstrap resample of the pairs, written as
    per-pair multiplicities (Poisson-like counts from one multinomial draw) that multiply the pair weights, so all
    heads see each batch and one pass trains them all; each head's loss is its own weighted mean;
  * --patience / --average-checkpoints: the held-out Bradley–Terry loss after every epoch picks the epoch to keep
    (the held-out pairs then choose the model, so the gate's accuracy on them is slightly optimistic);
  * after training, gain and bias are fitted so that scores of reference replies (SFT samples given
    with --norm-data, else the training replies) have mean 0 and std 1 (item 10), and a temperature on the
    held-out pairs calibrates the preference probability (Guo et al. 2017; --calibrate);
  * training ends with the held-out evaluation and the gate verdict that RL checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from chatrlhf import losses
from chatrlhf.config import RewardTrainConfig
from chatrlhf.data.formats import parse_turns
from chatrlhf.data.pairs import split_pairs
from chatrlhf.data.readers import read_rows
from chatrlhf.data.split import group_hash
from chatrlhf.data.template import prompt_format
from chatrlhf.errors import UsageError
from chatrlhf.evaluate.metrics import fit_temperature
from chatrlhf.models import add_lora, autocast, count_parameters, enable_checkpointing, train_top_layers
from chatrlhf.reward_model import batch_head_scores, encode_reply, features, head_scores, load_reward_model, measure, \
    pad_right, pair_raw_scores, reward_head, reward_scores, trunk_of, verdict, write_report
from chatrlhf.rollout import deadline_of, out_of_time
from chatrlhf.trainers.common import StepPlan, file_hashes, make_optimizer
from chatrlhf.trainers.run import Run, Summary, trainable_state


RECIPES = {  # --recipe: the values of the recipe flags left unset (None); measured in docs/benchmarks.md
    "frozen": {"freeze_trunk": True, "pooling": "mean", "lr": 1e-3, "weight_decay": 0.01, "epochs": 30.0,
               "patience": 3, "label_smoothing": 0.1},
    "full": {"freeze_trunk": False, "layer": -1, "pooling": "last", "lr": 1e-5, "weight_decay": 0.0, "epochs": 1.0,
             "patience": 0, "label_smoothing": 0.0},
}
FROZEN_DEPTH = 16 / 30  # the frozen recipe reads the block at this share of the depth: SmolLM2's best (16 of 30)


def resolve_recipe(cfg: RewardTrainConfig, sharded: bool, log=print) -> RewardTrainConfig:
    """``cfg`` with --recipe resolved (auto → frozen or full) and every recipe flag left unset (None) filled from it;
    a flag that was given keeps its value. Continuing from a reward-model folder keeps its read-out layer and
    pooling. The frozen recipe's layer is the block at FROZEN_DEPTH of the trunk."""
    trunk = [flag for flag, on in (("--lora-r", cfg.lora_r > 0), ("--train-layers", cfg.train_layers >= 0),
                                   ("--no-freeze-trunk", cfg.freeze_trunk is False), ("FSDP / DeepSpeed", sharded))
             if on]
    if cfg.recipe == "frozen" and trunk and not sharded:  # sharded: check_sharded says why
        raise UsageError(f"--recipe frozen trains the head alone, {trunk[0]} trains the trunk", "give one of them")
    recipe = cfg.recipe if cfg.recipe != "auto" else "full" if trunk else "frozen"
    blocks, saved = trunk_of(cfg.model)
    values = {**RECIPES[recipe], **({"layer": round(FROZEN_DEPTH * blocks)} if recipe == "frozen" else {}),
              **({"layer": saved["layer"], "pooling": saved["pooling"]} if saved else {})}
    filled = {k: v for k, v in values.items() if getattr(cfg, k) is None}
    why = "" if cfg.recipe != "auto" else f" (auto: {trunk[0]} trains the trunk)" if trunk else \
        " (auto: no flag trains the trunk; --recipe full for the classic fine-tune)"
    log(f"chatrlhf reward: recipe {recipe}{why}: " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                                            for k, v in filled.items()))
    return dataclasses.replace(cfg, recipe=recipe, **filled)


def check_recipe(cfg: RewardTrainConfig) -> None:
    """Refuse flags that contradict each other or are out of range, before any data or model is loaded."""
    if cfg.ensemble < 1:
        raise UsageError(f"--ensemble {cfg.ensemble}: the number of heads must be at least 1", "1 = one head")
    check_lora(cfg)
    if cfg.ensemble > 1 and not cfg.freeze_trunk:
        raise UsageError(f"--ensemble {cfg.ensemble} needs --freeze-trunk: the heads share one frozen trunk (K "
                         "fine-tuned trunks would cost K times the memory and time)", "add --freeze-trunk")
    if cfg.freeze_trunk and cfg.train_layers >= 0:
        raise UsageError(f"--freeze-trunk trains no block, --train-layers {cfg.train_layers} trains the top ones",
                         "give one of them")
    if not 0 <= (cfg.label_smoothing or 0.0) < 0.5:  # None: set by --recipe (resolve_recipe), in range
        raise UsageError(f"--label-smoothing {cfg.label_smoothing}: must be in [0, 0.5)",
                         "the share of labels believed flipped, e.g. 0.1")
    if not 0 <= cfg.head_dropout < 1:
        raise UsageError(f"--head-dropout {cfg.head_dropout}: must be in [0, 1)", "e.g. 0.1")
    if (cfg.patience or 0) < 0 or cfg.average_checkpoints < 1:
        raise UsageError(f"--patience {cfg.patience} / --average-checkpoints {cfg.average_checkpoints}: need "
                         "patience ≥ 0 and at least 1 checkpoint", "--patience 0 and --average-checkpoints 1 = off")


def check_lora(cfg: RewardTrainConfig) -> None:
    """--lora-r trains adapters on every block of the trunk: refuse the flags that train no block or only some."""
    if cfg.lora_r < 0:
        raise UsageError(f"--lora-r {cfg.lora_r}: the LoRA rank must be at least 1", "0 = no LoRA, e.g. --lora-r 16")
    if cfg.lora_r == 0:
        return
    if cfg.ensemble > 1:
        raise UsageError(f"--lora-r {cfg.lora_r} with --ensemble {cfg.ensemble}: the ensemble's heads share one frozen "
                         "trunk, LoRA trains the trunk",
                         "for LoRA drop --ensemble; for an ensemble drop --lora-r and add --freeze-trunk")
    if cfg.freeze_trunk:
        raise UsageError(f"--lora-r {cfg.lora_r} with --freeze-trunk: LoRA trains adapters on the trunk, --freeze-trunk "
                         "trains the head alone", "give one of them")
    if cfg.train_layers >= 0:
        raise UsageError(f"--lora-r {cfg.lora_r} with --train-layers {cfg.train_layers}: LoRA adapts every block, "
                         "--train-layers fine-tunes the top ones in full", "give one of them")


def check_sharded(cfg: RewardTrainConfig) -> None:
    """Under FSDP or DeepSpeed the whole trunk and head train, sharded: refuse the recipes that keep weights outside
    the run's sharded parts (a frozen trunk's feature cache, the epoch keeper's weight snapshots)."""
    for flag, on in (("--freeze-trunk", cfg.freeze_trunk), (f"--ensemble {cfg.ensemble}", cfg.ensemble > 1),
                     (f"--patience {cfg.patience}", cfg.patience > 0),
                     (f"--average-checkpoints {cfg.average_checkpoints}", cfg.average_checkpoints > 1)):
        if on:
            raise UsageError(f"{flag} with FSDP or DeepSpeed: not supported — that recipe keeps whole copies of "
                             "weights (or features) that they shard", f"drop {flag.split()[0]}, or train with data "
                             "parallelism (drop --fsdp / --deepspeed, or use the ddp.yaml accelerate config)")


def trainable_weights(model, cfg: RewardTrainConfig):
    """Leave trainable what the recipe trains: the head alone (--freeze-trunk), LoRA adapters on the trunk and the
    whole head (--lora-r), the top blocks and the head (--train-layers), or everything. With LoRA the adapters go
    into ``model`` in place (it stays the transformers module that features() and head_scores() read) and peft's
    wrapper is returned, whose merge_and_unload() gives the plain model to save; else None."""
    if cfg.freeze_trunk:
        head = {id(p) for p in model.score.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    train_top_layers(model, cfg.train_layers)
    return add_lora(model, cfg, modules_to_save=["score"]) if cfg.lora_r > 0 else None


def fit_normalisation(model, tok, cfg: RewardTrainConfig, train_pairs, cache: tuple | None = None) -> dict:
    """gain, bias so that gain · score + bias has mean 0 and std 1 on the reference replies (the training replies'
    from the frozen trunk's ``cache`` of their features when given: only the head runs)."""
    if not cfg.norm_data and cache is not None:
        idx = sample_index(len(train_pairs), 256, cfg.seed)
        with torch.no_grad():
            s = head_scores(model, torch.cat([cache[0][idx], cache[1][idx]])).mean(1).cpu().numpy()
        std = float(s.std()) or 1.0
        return {"gain": 1.0 / std, "bias": -float(s.mean()) / std, "fitted_on": len(s), "reference": "training replies"}
    if cfg.norm_data:
        rows = [r for _, r in read_rows(cfg.norm_data)]
        prompts = [parse_turns(r.get("prompt") or r.get("messages"), cfg.norm_data, i, "prompt") for i, r in enumerate(rows, 1)]
        replies = [str(r["response"]) for r in rows]
    else:  # 512 replies give the mean to ±0.045 std and the std to ±3%; each costs a forward pass (~0.1 s on a CPU)
        sample = sample_pairs(train_pairs, 256, cfg.seed)
        prompts = [p.prompt for p in sample for _ in (0, 1)]
        replies = [x for p in sample for x in (p.chosen, p.rejected)]
    s = np.array(reward_scores(model, tok, prompts, replies, cfg.batch_size * 2, cfg.max_length, normalise=False))
    std = float(s.std()) or 1.0
    return {"gain": 1.0 / std, "bias": -float(s.mean()) / std, "fitted_on": len(s),
            "reference": cfg.norm_data or "training replies"}


def encode_pairs(tok, pairs, max_length: int) -> list[tuple[tuple[list[int], int], tuple[list[int], int]]]:
    """Per pair, (ids, reply start) of the chosen and of the rejected reply (reward_model.encode_reply)."""
    return [(encode_reply(tok, p.prompt, p.chosen, max_length), encode_reply(tok, p.prompt, p.rejected, max_length))
            for p in pairs]


def sample_index(total: int, n: int, seed: int) -> list[int]:
    """n of range(total) drawn without replacement, sorted (all of them when total ≤ n)."""
    if total <= n:
        return list(range(total))
    return sorted(np.random.default_rng(seed).choice(total, n, replace=False).tolist())


def sample_pairs(pairs: list, n: int, seed: int) -> list:
    return [pairs[i] for i in sample_index(len(pairs), n, seed)]


def pair_batch(encoded, pad_id: int, device) -> dict:
    """Chosen then rejected replies as one right-padded batch of 2B sequences (one forward pass)."""
    seqs = [c for c, _ in encoded] + [r for _, r in encoded]
    return pad_right([ids for ids, _ in seqs], pad_id, device, [start for _, start in seqs])


def pair_labels(pairs, device) -> dict:
    """(B,) margin, tie and weight of the pairs, as the loss reads them."""
    return {"margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32, device=device),
            "tie": torch.tensor([p.tie for p in pairs], dtype=torch.bool, device=device),
            "weight": torch.tensor([p.weight for p in pairs], dtype=torch.float32, device=device)}


@torch.no_grad()
def frozen_features(model, tok, encoded, batch_size: int, device, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) features (N, d) of every pair from the frozen trunk, computed once, batched by length."""
    seqs = [c for c, _ in encoded] + [r for _, r in encoded]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = None
    for k in range(0, len(order), batch_size * 2):
        idx = order[k:k + batch_size * 2]
        batch = pad_right([seqs[i][0] for i in idx], tok.pad_token_id, device, [seqs[i][1] for i in idx])
        with autocast(dtype, device):
            f = features(model, batch).float()
        out = torch.zeros(len(seqs), f.shape[1], device=device) if out is None else out
        out[idx] = f
    return out[:len(encoded)], out[len(encoded):]


def cached_features(model, tok, encoded, batch_size: int, device, dtype: str,
                    cache_dir: str | Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`frozen_features`, kept on disk under ``cache_dir`` (None = not kept) in a file named by a hash of the
    model, its read-out layer and pooling, the dtype and every pair's token ids (so the split and --max-length
    too): recipes that share a frozen trunk and a split extract its features once (benchmarks/reward_recipes.py)."""
    if cache_dir is None:
        return frozen_features(model, tok, encoded, batch_size, device, dtype)
    head = reward_head(model.config)
    key = json.dumps([model.config.name_or_path, head["layer"], head["pooling"], dtype, encoded])
    path = Path(cache_dir) / f"features-{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"
    if path.is_file():
        kept = load_file(path)
        return kept["chosen"].to(device), kept["rejected"].to(device)
    chosen, rejected = frozen_features(model, tok, encoded, batch_size, device, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"chosen": chosen.cpu().contiguous(), "rejected": rejected.cpu().contiguous()}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)  # a run killed mid-write leaves no half file under the real name
    return chosen, rejected


def bootstrap_counts(n: int, heads: int, seed: int) -> torch.Tensor:
    """(n, K) multiplicity of each pair in each head's bootstrap resample of the n pairs (n draws with replacement);
    all ones for one head, which trains on the pairs as they are."""
    if heads == 1:
        return torch.ones(n, 1)
    rng = np.random.default_rng(seed)
    return torch.tensor(np.stack([rng.multinomial(n, np.full(n, 1 / n)) for _ in range(heads)], 1), dtype=torch.float32)


class EpochKeeper:
    """--patience and --average-checkpoints: the trainable weights at the end of the last K epochs, the held-out
    loss of each epoch, the weights to keep (the mean of the K ending at the best epoch) and whether to stop. A
    checkpoint saves it whole, so a resumed run stops and keeps as the uninterrupted one would."""

    def __init__(self, model, patience: int, average: int):
        self.model, self.patience, self.average = model, patience, average
        self.recent: list[dict] = []
        self.kept: dict | None = None
        self.held_out_bt: list[float] = []
        self.best_epoch, self.stopped = 0, False

    @property
    def active(self) -> bool:
        return self.patience > 0 or self.average > 1

    def end_epoch(self, epoch: int, loss: float | None) -> None:
        snapshot = {k: v.clone() for k, v in trainable_state(self.model).items()}  # on a CPU, detach() is no copy
        self.recent = (self.recent + [snapshot])[-self.average:]
        if loss is None:
            return
        self.held_out_bt.append(loss)
        if self.patience and loss < min(self.held_out_bt[:-1], default=math.inf):
            self.best_epoch, self.kept = epoch, self._mean()
        elif self.patience and epoch - self.best_epoch >= self.patience:
            self.stopped = True

    def _mean(self) -> dict:
        return {k: torch.stack([w[k] for w in self.recent]).mean(0) for k in self.recent[-1]}

    def restore(self) -> None:
        """Put the kept weights (with --patience: the best epoch's, else the last epochs' mean) into the model."""
        weights = self.kept if self.patience else (self._mean() if self.average > 1 and self.recent else None)
        if weights:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for k, v in weights.items():
                    params[k].copy_(v)

    def state_dict(self) -> dict:
        return {"recent": self.recent, "kept": self.kept, "held_out_bt": self.held_out_bt,
                "best_epoch": self.best_epoch, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.recent, self.kept, self.held_out_bt = state["recent"], state["kept"], state["held_out_bt"]
        self.best_epoch, self.stopped = state["best_epoch"], state["stopped"]


def train(cfg: RewardTrainConfig, log=print, feature_cache: str | Path | None = None) -> Summary:
    """Train, calibrate, measure and save a reward model; with --freeze-trunk, ``feature_cache`` (a folder) keeps
    the trunk's features on disk for the next run on the same pairs (:func:`cached_features`)."""
    run = Run("reward train", cfg, log)
    given, cfg = cfg, resolve_recipe(cfg, bool(run.fsdp or run.zero), log)
    check_recipe(cfg)
    if run.fsdp or run.zero:
        check_sharded(cfg)
    train_pairs, eval_pairs, counts, split = split_pairs(cfg, "reward", log)
    if cfg.patience and not eval_pairs and given.patience is None:
        log("chatrlhf reward: no held-out pairs, so no early stopping (the recipe's --patience is off)")
        cfg = dataclasses.replace(cfg, patience=0)
    elif cfg.patience and not eval_pairs:
        raise UsageError(f"--patience {cfg.patience} needs held-out pairs to watch", "give --eval-data or --eval-fraction > 0")
    run.cfg = cfg  # the resolved recipe, which run_config.json records
    model, tok = load_reward_model(cfg, trainable=True, head_init="zero" if cfg.freeze_trunk else "normal",
                                   head={"layer": cfg.layer, "pooling": cfg.pooling, "heads": cfg.ensemble})
    lora = trainable_weights(model, cfg)
    if cfg.gradient_checkpointing and not cfg.freeze_trunk:
        enable_checkpointing(model)
    encoded = encode_pairs(tok, train_pairs, cfg.max_length)
    cache = held = None
    watch = eval_pairs if cfg.patience or cfg.average_checkpoints > 1 else []  # held-out loss after every epoch
    if cfg.freeze_trunk:
        n_replies = 2 * (len(train_pairs) + len(eval_pairs))
        log(f"chatrlhf reward: the frozen trunk's features of {n_replies} replies, once")
        cache = cached_features(model, tok, encoded, cfg.batch_size, run.device, cfg.dtype, feature_cache)
        held = cached_features(model, tok, encode_pairs(tok, eval_pairs, cfg.max_length), cfg.batch_size, run.device,
                               cfg.dtype, feature_cache) if eval_pairs else None
    boot = bootstrap_counts(len(train_pairs), cfg.ensemble, cfg.seed).to(run.device)
    plan = StepPlan([max(len(c[0]), len(r[0])) for c, r in encoded], cfg.batch_size * run.world_size, cfg.grad_accum,
                    cfg.seed)  # the global batch; each rank trains on its shard (run.shard)
    n_steps = run.total_steps(plan.steps_per_epoch)
    log(f"chatrlhf reward: {len(train_pairs)} train / {len(eval_pairs)} held-out pairs ({dict(counts)}), "
        f"{n_steps} steps, {count_parameters(model)[1]:,} trainable parameters, device {run.device}")
    model = run.shard_weights(model)  # FSDP: before the optimizer, which then holds this rank's shards
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg.lr, cfg.weight_decay,
                                          warmup_steps=int(cfg.warmup_ratio * n_steps), total_steps=n_steps)
    keeper = EpochKeeper(model, cfg.patience, cfg.average_checkpoints)
    run.begin({"model": (model, optimizer, scheduler)}, objects={"epochs": keeper})
    step = run.step
    deadline = deadline_of(cfg)
    with run.loop(n_steps):
        while run.running(step, n_steps) and not keeper.stopped:
            t0 = time.perf_counter()
            chunks = run.shard(plan[step])
            stats = train_step(model, tok, run, chunks, encoded, train_pairs, boot, cache)
            stats = run.reduce(stats, tuple(stats))  # shares of the step: summed over ranks
            stats["train/lr"] = scheduler.get_last_lr()[0]
            stats["train/grad_norm"] = run.optimizer_step(optimizer, scheduler, params, cfg.max_grad_norm)
            step += 1
            stats["train/pairs_per_s"] = sum(len(c) for c in plan[step - 1]) / (time.perf_counter() - t0)
            n_steps = out_of_time("reward train", run, step, n_steps, deadline, log)
            if keeper.active and (step % plan.steps_per_epoch == 0 or step == n_steps):
                loss = held_out_loss(model, tok, run, watch, held) if watch else None
                keeper.end_epoch(-(-step // plan.steps_per_epoch), loss)
                stats.update({"eval/bt": loss} if loss is not None else {})
            run.log(step, stats)
            run.end_step(step, n_steps, info=f"loss {stats['train/bt']:.3f}  {stats['train/pairs_per_s']:.2f} pairs/s")
    if step < n_steps and not keeper.stopped:
        return run.stopped()
    if keeper.stopped:
        log(f"chatrlhf reward: early stop after epoch {len(keeper.held_out_bt)}: no lower held-out loss for "
            f"{cfg.patience} epochs; keeping epoch {keeper.best_epoch}")
    keeper.restore()
    return _finish(run, model, tok, train_pairs, eval_pairs, counts, split, keeper, cache, held, lora)


def train_step(model, tok, run: Run, chunks: list[list[int]], encoded: list, pairs: list, boot: torch.Tensor,
               cache: tuple | None) -> dict:
    """Forward and backward of this rank's part of one optimizer step's micro-batches. Head k's loss is the mean over
    the step's pairs (on every rank) weighted by pair weight × its bootstrap count; each micro-batch's part is
    weighted by its share of that weight, so micro-batch × accumulation × processes equals one big batch (and the
    step's metrics are their sum over ranks). The heads' losses are summed (each head learns as if
    alone; they share no trained weight) and their metrics averaged."""
    cfg = run.cfg
    heads = boot.shape[1]
    step_pairs = [i for chunk in chunks for i in chunk]
    weight = torch.tensor([pairs[i].weight for i in step_pairs], dtype=torch.float32, device=boot.device)
    totals = run.total((weight[:, None] * boot[step_pairs]).sum(0).tolist())  # (K,) the step's weight per head
    stats = {"loss/bt": 0.0, "reward/accuracy": 0.0, "reward/margin": 0.0}
    for chunk in chunks:
        n = len(chunk)
        labels = pair_labels([pairs[i] for i in chunk], run.device)
        with run.autocast():  # (2n, K)
            if cache is not None:
                scores = head_scores(model, torch.cat([cache[0][chunk], cache[1][chunk]]), cfg.head_dropout)
            else:
                scores = batch_head_scores(model, pair_batch([encoded[i] for i in chunk], tok.pad_token_id, run.device),
                                           cfg.head_dropout)
        loss = scores.new_zeros(())
        for k in range(heads):
            w = labels["weight"] * boot[chunk, k]
            if totals[k] == 0 or float(w.sum()) == 0:  # no pair of this micro-batch is in head k's resample
                continue
            loss_k, m = losses.bradley_terry_loss(scores[:n, k], scores[n:, k], labels["margin"] if cfg.margin else None,
                                                  labels["tie"], w, cfg.label_smoothing)
            share = float(w.sum()) / totals[k]
            loss = loss + loss_k * share
            for key in stats:
                stats[key] += float(m[key]) * share / heads
        run.backward(loss)
    return {f"train/{k.split('/')[-1]}": v for k, v in stats.items()}


@torch.no_grad()
def held_out_loss(model, tok, run: Run, eval_pairs: list, held: tuple | None) -> float:
    """The Bradley–Terry loss (no label smoothing) of the heads' mean score on the held-out pairs."""
    cfg = run.cfg
    with run.autocast():
        if held is not None:
            chosen, rejected = head_scores(model, held[0]).mean(1), head_scores(model, held[1]).mean(1)
        else:
            c, r = pair_raw_scores(model, tok, eval_pairs, cfg.batch_size, cfg.max_length)
            chosen, rejected = (torch.tensor(x.mean(1), dtype=torch.float32, device=run.device) for x in (c, r))
    labels = pair_labels(eval_pairs, run.device)
    loss, _ = losses.bradley_terry_loss(chosen, rejected, labels["margin"] if cfg.margin else None, labels["tie"],
                                        labels["weight"])
    return float(loss)


def _finish(run: Run, model, tok, train_pairs, eval_pairs, counts, split: str, keeper: EpochKeeper,
            cache: tuple | None, held: tuple | None, lora=None) -> Summary:
    """Normalise, calibrate and measure on the held-out pairs, decide the gate, save the model with what it was
    trained on (with LoRA, peft's wrapper ``lora``: the adapters merged in). With a frozen trunk the features of the
    training (``cache``) and held-out (``held``) pairs are at hand, so only the head runs."""
    cfg = run.cfg
    model.eval()
    model.config.chatrlhf_reward_norm = {**fit_normalisation(model, tok, cfg, train_pairs, cache),
                                         "margin_loss": cfg.margin}
    model.config.chatrlhf_reward_calibration = None  # a model trained further is calibrated afresh, or not at all
    if not eval_pairs:
        split = "training pairs: no held-out pairs"
    pairs = eval_pairs or sample_pairs(train_pairs, 256, cfg.seed)
    if cache is not None:
        feats = held if eval_pairs else [x[sample_index(len(train_pairs), 256, cfg.seed)] for x in cache]
        with torch.no_grad(), run.autocast():
            chosen, rejected = (head_scores(model, f).cpu().numpy() for f in feats)
    else:
        with run.autocast():
            chosen, rejected = pair_raw_scores(model, tok, pairs, cfg.batch_size, cfg.max_length)
    metrics = measure(model, tok, pairs, chosen, rejected)
    if cfg.calibrate and eval_pairs:
        logits = metrics["_logits"]
        model.config.chatrlhf_reward_calibration = {"temperature": fit_temperature(logits), "fitted_on": len(logits)}
        metrics = measure(model, tok, pairs, chosen, rejected)
    elif cfg.calibrate:
        run.print("chatrlhf reward: no held-out pairs, so no temperature is fitted (--calibrate)")
    metrics["split"] = split
    gate = verdict(metrics, cfg.min_accuracy, cfg.max_length_corr)
    run.log(run.step, {"eval/accuracy": metrics["accuracy"], "eval/ece": metrics["ece"],
                       "eval/length_corr": metrics["length_corr"]})
    run.save_model(lora.merge_and_unload() if lora is not None else model, tok)
    if run.is_main:
        write_report(run.out, metrics, gate)
    extra = {k: metrics[k] for k in ("ensemble",) if k in metrics}
    if keeper.held_out_bt:
        extra["epochs"] = {"held_out_bt": keeper.held_out_bt, "kept_epoch": keeper.best_epoch or None,
                           "stopped_early": keeper.stopped}
    return run.finish({"recipe": cfg.recipe, "pairs": dict(counts), "held_out_pairs": len(eval_pairs),
                       "accuracy": metrics["accuracy"], "ece": metrics["ece"], "ece_uncalibrated": metrics["ece_uncalibrated"],
                       "temperature": metrics["temperature"], "split": split, "gate": gate, **extra,
                       "stopped_by_time": run.state.get("stopped_at") == run.step,
                       "training": {"files": file_hashes(cfg.data),
                                    "prompt_groups": sorted({group_hash(p) for p in train_pairs})},
                       "prompt_format": prompt_format(tok)})
