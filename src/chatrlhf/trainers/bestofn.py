"""Best-of-N rejection-sampling fine-tuning (RAFT, Dong et al. 2023; the Grow/Improve loop of ReST, Gulcehre et al.
2023; Llama 2's rejection sampling, Touvron et al. 2023) on the generation engine and the reward mix.

One round: for each batch of --batch-size prompts, sample N replies per prompt through the engine (as grpo samples
its groups, rollout.generate) → score them with the reward mix (rewards.py: the sources and flags of ppo and grpo) →
keep the best reply (or every reply above --threshold), with its provenance, in round-K/best.jsonl (SFT
conversations) and the best against the worst reply in round-K/pairs.jsonl (preference pairs `chatrlhf dpo` reads);
every sample goes to round-K/samples.jsonl. With --sft, `chatrlhf sft` itself then fine-tunes the round's model on
best.jsonl into round-K/model, which samples round K+1. Each batch of prompts is one step of the run scaffold: its
rows are written, then the checkpoint (the sampling stream, the mix's running moments, the round's tallies), so a
killed run resumed with --resume writes the same files byte for byte.

Departures from the papers, and why:
  * the ranking within a prompt uses the mix's total (each source normalised by its running moments, weighted, minus
    the missing-EOS penalty), as grpo's groups do — monotone in each source, and the sources on one scale;
    --threshold and --min-gap read the raw weighted score (Σ weight × raw value − penalty), whose units the user
    knows (normalised units move with the moments); both scores and every source's raw value are in the provenance;
  * --reward-weights schedules advance per round, not per batch, so all prompts of a round are scored alike;
  * an empty reply is never kept or paired (it teaches SFT nothing and the DPO reader refuses it), and a pair whose
    best and worst tie (or are the same text) is skipped;
  * the fine-tuning is the SFT trainer, handed in by the CLI (trainers never import each other), started from the
    round's own model, so rounds compound as in RAFT (ReST restarts from the base model each round).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from chatrlhf.config import BestOfNConfig, ModelArgs, SFTConfig
from chatrlhf.data.template import is_plain
from chatrlhf.errors import UsageError
from chatrlhf.models import load_model
from chatrlhf.rewards import RewardMix, reward_mix
from chatrlhf.rollout import generate, generator, missing_eos_penalty, read_prompts, rollout_metrics
from chatrlhf.trainers.common import file_hashes
from chatrlhf.trainers.run import Run, Summary, checkpoints

FILES = ("best", "pairs", "samples")  # round-K/NAME.jsonl
SFT_RECORDS = {"checkpoints", "tb", "metrics.jsonl", "run_config.json", "chatrlhf.json"}  # not part of the model


# --------------------------------------------------------------------------- selection (pure)


@dataclass
class Choice:
    """What one prompt's N replies give: ``kept`` (sample indices for best.jsonl), ``pair`` ((best, worst) for
    pairs.jsonl, or None) and ``gap`` (the raw weighted score of the best minus that of the worst)."""
    kept: list[int]
    pair: tuple[int, int] | None
    gap: float


def choose(scores: list[float], raw_scores: list[float], texts: list[str], keep: str = "best",
           threshold: float | None = None, min_gap: float = 0.0) -> Choice:
    """The selection of one prompt. ``scores``: the mix's totals, which rank the replies (the best is the highest, the
    worst the lowest, the first sample on ties); ``raw_scores``: the raw weighted scores that --threshold and
    --min-gap read; ``texts``: the replies — empty ones are never chosen. Below ``min_gap`` (when > 0) nothing is
    kept or paired; a pair needs a strictly higher best and two different texts."""
    live = [i for i, t in enumerate(texts) if t.strip()]
    if not live:
        return Choice([], None, 0.0)
    best = max(live, key=lambda i: (scores[i], -i))
    worst = min(live, key=lambda i: (scores[i], i))
    gap = raw_scores[best] - raw_scores[worst]
    if min_gap > 0 and gap < min_gap:
        return Choice([], None, gap)
    kept = [best] if keep == "best" else [i for i in live if raw_scores[i] >= threshold]
    decided = scores[best] > scores[worst] and texts[best].strip() != texts[worst].strip()
    return Choice(kept, (best, worst) if decided else None, gap)


def raw_weighted(raw: dict[str, list], weights: dict[str, float], ended: list[bool], penalty: float) -> list[float]:
    """Per reply: Σ_source weight × raw value (a source with no opinion adds 0), minus ``penalty`` without EOS."""
    return [sum(weights[name] * float(v[i]) for name, v in raw.items() if v[i] is not None)
            - (0.0 if ended[i] else penalty) for i in range(len(ended))]


# --------------------------------------------------------------------------- settings


def check(cfg: BestOfNConfig, fine_tune) -> None:
    """Settings that cannot work, refused before anything is loaded."""
    for name, value, least in (("--num-samples", cfg.num_samples, 2), ("--batch-size", cfg.batch_size, 1),
                               ("--rounds", cfg.rounds, 1), ("--sft-batch-size", cfg.sft_batch_size, 1)):
        if value < least:
            raise UsageError(f"{name} {value}: must be at least {least}" + (
                " (a best of one reply is no choice)" if name == "--num-samples" else ""), f"e.g. {name} {max(least, 8)}")
    if cfg.temperature <= 0:
        raise UsageError(f"--temperature {cfg.temperature}: best-of-N samples its replies, so it must be > 0",
                         "use e.g. --temperature 1.0")
    if not 0 < cfg.top_p <= 1:
        raise UsageError(f"--top-p {cfg.top_p}: must be in (0, 1]", "e.g. --top-p 0.95, or 1 for off")
    if cfg.rounds > 1 and not cfg.sft:
        raise UsageError(f"--rounds {cfg.rounds} without --sft: each round samples from the previous round's "
                         "fine-tuned model, and without --sft there is none", "add --sft, or use --rounds 1")
    if cfg.keep == "threshold" and cfg.threshold is None:
        raise UsageError("--keep threshold needs --threshold", "give the lowest raw weighted score to keep, e.g. "
                         "--threshold 0.5")
    if cfg.keep == "best" and cfg.threshold is not None:
        raise UsageError("--threshold acts only with --keep threshold", "add --keep threshold, or drop --threshold")
    if cfg.min_gap < 0:
        raise UsageError(f"--min-gap {cfg.min_gap}: must be ≥ 0", "e.g. --min-gap 0.5, or 0 for off")
    if cfg.lora_r > 0 and not cfg.sft:
        raise UsageError("--lora-r acts only with --sft (sampling trains nothing)", "add --sft, or drop --lora-r")
    if cfg.sft and fine_tune is None:
        raise UsageError("--sft: no SFT trainer was handed to bestofn.train", "run it as `chatrlhf bestofn --sft`")


def round_dir(out: Path, k: int) -> Path:
    return Path(out) / f"round-{k}"


def round_model(cfg: BestOfNConfig, k: int) -> str:
    """The model that samples round ``k`` (and that its fine-tuning starts from): --model, then the last round's."""
    return cfg.model if k == 1 else str(round_dir(Path(cfg.output_dir), k - 1) / "model")


def sft_config(cfg: BestOfNConfig, k: int, resume: bool) -> SFTConfig:
    """`chatrlhf sft` on round ``k``'s best.jsonl, from the model that sampled it, into round-K/model; every reply
    kept is trained on (no held-out split: the samples are the policy's own)."""
    folder = round_dir(Path(cfg.output_dir), k)
    return SFTConfig(model=round_model(cfg, k), dtype=cfg.dtype, device=cfg.device, lora_r=cfg.lora_r,
                     lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, chat_template=cfg.chat_template,
                     data=[str(folder / "best.jsonl")], eval_fraction=0.0, lr=cfg.lr, epochs=cfg.epochs,
                     batch_size=cfg.sft_batch_size, max_length=cfg.max_length, seed=cfg.seed,
                     output_dir=str(folder / "model"), resume=resume, tensorboard=cfg.tensorboard, quiet=cfg.quiet)


# --------------------------------------------------------------------------- one batch of prompts


@torch.no_grad()
def score_batch(policy, tok, prompts: list, cfg: BestOfNConfig, mix: RewardMix, k: int,
                gen: torch.Generator) -> tuple[dict, dict]:
    """N replies to each prompt (prompt-major), sampled and scored: {"texts", "ended", "total" (the mix),
    "raw_score" (raw weighted), "raw" ({source: raw values})}, and the batch's metrics. The mix's running moments
    take the batch first; its schedules read the round (``k`` − 1)."""
    batch = [p for p in prompts for _ in range(cfg.num_samples)]
    r, _, gen_s = generate(policy, tok, batch, cfg, gen, top_p=cfg.top_p)
    ended = r.ended.tolist()
    total, metrics = mix(batch, r.texts, ended, k - 1)
    raw = {name: [None if v is None else float(v) for v in metrics.pop(f"_raw/{name}")] for name in mix.sources}
    weights = {name: mix.schedules[name](k - 1) for name in mix.sources}
    r.scores = torch.tensor(total, dtype=torch.float32)
    metrics.update(rollout_metrics(r, gen_s))
    return {"texts": r.texts, "ended": ended, "total": total, "raw_score": raw_weighted(raw, weights, ended, mix.penalty),
            "raw": raw}, metrics


def batch_rows(step: int, k: int, prompts: list, got: dict, cfg: BestOfNConfig, model: str,
               tallies: list[dict]) -> dict[str, list[dict]]:
    """{"best", "pairs", "samples"}: the rows of one batch (each with its ``step``, which --resume truncates by);
    each tally in ``tallies`` (the round's, the batch's) takes the batch's counts."""
    N = cfg.num_samples
    out: dict[str, list[dict]] = {name: [] for name in FILES}
    for j, prompt in enumerate(prompts):
        at = j * N
        texts, total, raw_score = (got[key][at:at + N] for key in ("texts", "total", "raw_score"))
        choice = choose(total, raw_score, texts, cfg.keep, cfg.threshold, cfg.min_gap)

        def provenance(s: int) -> dict:
            return {"model": model, "round": k, "sample": s, "samples": N, "seed": cfg.seed, "score": total[s],
                    "raw_score": raw_score[s], "scores": {name: v[at + s] for name, v in got["raw"].items()},
                    "ended": got["ended"][at + s]}

        out["best"] += [{"step": step, "messages": [*prompt, {"role": "assistant", "content": texts[s]}],
                         "provenance": provenance(s)} for s in choice.kept]
        if choice.pair:
            b, w = choice.pair
            out["pairs"].append({"step": step, "prompt": prompt, "chosen": texts[b], "rejected": texts[w],
                                 "chosen_score": total[b], "rejected_score": total[w],
                                 "provenance": {"chosen": provenance(b), "rejected": provenance(w)}})
        out["samples"] += [{"step": step, "prompt": prompt, "reply": texts[s], "kept": s in choice.kept,
                            "provenance": provenance(s)} for s in range(N)]
        for tally in tallies:
            tally_add(tally, got, at, choice, N, cfg.min_gap)
    return out


def new_tally(k: int, model: str) -> dict:
    return {"round": k, "model": model, "prompts": 0, "kept": 0, "pairs": 0, "gap_too_small": 0, "sums": {}}


def tally_add(tally: dict, got: dict, at: int, choice: Choice, n: int, min_gap: float) -> None:
    """One prompt's counts, and per source (and the raw weighted score, ``weighted``) [Σ all, n all, Σ kept, n kept]."""
    tally["prompts"] += 1
    tally["kept"] += len(choice.kept)
    tally["pairs"] += choice.pair is not None
    tally["gap_too_small"] += min_gap > 0 and choice.gap < min_gap
    for name, values in {**got["raw"], "weighted": got["raw_score"]}.items():
        sums = tally["sums"].setdefault(name, [0.0, 0, 0.0, 0])
        seen = [v for v in values[at:at + n] if v is not None]
        kept = [values[at + s] for s in choice.kept if values[at + s] is not None]
        sums[0] += sum(seen)
        sums[1] += len(seen)
        sums[2] += sum(kept)
        sums[3] += len(kept)


def gains(tally: dict) -> dict[str, dict]:
    """{source: {"all": mean raw value of every sample, "kept": of the kept replies, "gain": kept − all}}."""
    out = {}
    for name, (s_all, n_all, s_kept, n_kept) in tally["sums"].items():
        mean_all = s_all / n_all if n_all else None
        mean_kept = s_kept / n_kept if n_kept else None
        gain = mean_kept - mean_all if mean_all is not None and mean_kept is not None else None
        out[name] = {"all": mean_all, "kept": mean_kept, "gain": gain}
    return out


# --------------------------------------------------------------------------- the loop


def train(cfg: BestOfNConfig, fine_tune=None, log=print) -> Summary:
    """Every round: sample, score, select and write; with --sft ``fine_tune(SFTConfig)`` (the SFT trainer's
    ``train``) on the round's best.jsonl."""
    check(cfg, fine_tune)
    run = Run("bestofn", cfg, log)
    prompts = read_prompts(cfg.data, cfg.format)
    mix = reward_mix(cfg, "bestofn", log=log)
    per_round = -(-len(prompts) // cfg.batch_size)
    gen = generator(cfg.seed, run.device)
    state = run.begin({}, {"sample": gen}, {"moments": {}, "rounds": []})
    mix.load_state(state["moments"])
    log(f"chatrlhf bestofn: {len(prompts)} prompts × {cfg.num_samples} samples in {per_round} batch(es) per round, "
        f"{cfg.rounds} round(s), keep {cfg.keep}" + (f" ≥ {cfg.threshold:g}" if cfg.keep == "threshold" else "")
        + (f", min gap {cfg.min_gap:g}" if cfg.min_gap > 0 else "") + f", reward sources {', '.join(mix.sources)}, "
        + ("fine-tuning each round (--sft)" if cfg.sft else "no fine-tuning") + f", device {run.device}")
    for k in range(1, cfg.rounds + 1):
        if run.step < k * per_round and not sample_round(run, k, prompts, mix, gen, per_round, log):
            return run.stopped()
        if cfg.sft and not fine_tune_round(run, k, fine_tune, log):
            return run.stopped()
    return _finish(run, state)


def sample_round(run: Run, k: int, prompts: list, mix: RewardMix, gen: torch.Generator, per_round: int,
                 log=print) -> bool:
    """Round ``k``'s sampling from the checkpointed step on, one batch of prompts per step; False when Ctrl-C
    stopped it."""
    cfg, state = run.cfg, run.state
    model = round_model(cfg, k)
    policy, tok = load_model(ModelArgs(model=model, dtype=cfg.dtype, device=cfg.device), chat_template=cfg.chat_template)
    mix.penalty = missing_eos_penalty(cfg, tok)
    if len(state["rounds"]) < k:
        state["rounds"].append(new_tally(k, model))
    log(f"chatrlhf bestofn: round {k} samples from {model} ({'plain-text' if is_plain(tok) else 'chat'} prompts, "
        f"missing-EOS penalty {mix.penalty:g})")
    round_dir(run.out, k).mkdir(parents=True, exist_ok=True)
    files = {name: run.open_rows(f"round-{k}/{name}.jsonl") for name in FILES}
    step, end = run.step, k * per_round
    with run.loop(cfg.rounds * per_round):
        while run.running(step, end):
            first = (step - (k - 1) * per_round) * cfg.batch_size
            chunk = prompts[first:first + cfg.batch_size]
            got, metrics = score_batch(policy, tok, chunk, cfg, mix, k, gen)
            step += 1
            batch = new_tally(k, model)
            rows = batch_rows(step, k, chunk, got, cfg, model, [state["rounds"][k - 1], batch])
            for name, f in files.items():
                f.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows[name]))
                f.flush()
            state["moments"] = mix.state()
            metrics.update({"bestofn/round": k, "bestofn/kept": batch["kept"], "bestofn/pairs": batch["pairs"]})
            metrics.update({f"reward/{n}_kept_mean": g["kept"] for n, g in gains(batch).items() if g["kept"] is not None})
            run.log(step, metrics)
            tally = state["rounds"][k - 1]
            run.end_step(step, end, info=f"round {k}: {tally['prompts']} prompts, {tally['kept']} kept")
    for f in files.values():
        f.close()
    return step == end


def fine_tune_round(run: Run, k: int, fine_tune, log=print) -> bool:
    """`chatrlhf sft` on round ``k``'s best.jsonl into round-K/model (a resumed run skips a finished one and resumes
    an interrupted one); False when Ctrl-C stopped it."""
    cfg = run.cfg
    folder = round_dir(run.out, k) / "model"
    if cfg.resume and (folder / "chatrlhf.json").is_file():
        log(f"chatrlhf bestofn: round {k}'s model is already trained ({folder})")
        return True
    tally = run.state["rounds"][k - 1]
    if not tally["kept"]:
        raise UsageError(f"round {k} kept no reply of {tally['prompts']} prompts: nothing to fine-tune on",
                         "lower --min-gap or --threshold, or sample more replies (--num-samples)")
    log(f"chatrlhf bestofn: round {k}: fine-tuning {round_model(cfg, k)} on {tally['kept']} kept replies")
    summary = fine_tune(sft_config(cfg, k, resume=cfg.resume and bool(checkpoints(folder))))
    return not summary.interrupted


def publish_model(folder: Path, out: Path) -> None:
    """The last round's model files (not the SFT run's records or checkpoints) into --output-dir."""
    for p in folder.iterdir():
        if p.name in SFT_RECORDS:
            continue
        if p.is_dir():
            shutil.copytree(p, out / p.name, dirs_exist_ok=True)
        else:
            shutil.copy2(p, out / p.name)


def _finish(run: Run, state: dict) -> Summary:
    cfg = run.cfg
    if cfg.sft:
        publish_model(round_dir(run.out, cfg.rounds) / "model", run.out)
    rounds = [{k: v for k, v in t.items() if k != "sums"} | {"by_source": gains(t)} for t in state["rounds"]]
    return run.finish({"rounds": rounds, "final_model": str(run.out) if cfg.sft else None,
                       "files": {f"round-{t['round']}": [f"{name}.jsonl" for name in FILES] for t in state["rounds"]},
                       "data": file_hashes(cfg.data)})
