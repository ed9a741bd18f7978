"""`chatrlhf eval`: a model against a baseline on held-out prompts with human reference replies.

Per model: reward-model score, similarity to the human replies (ROUGE-L, optionally embedding
cosine), distinct-1/2, reply length and EOS rate; between them: the win rate judged by the reward
model with a bootstrap confidence interval, and KL(model ‖ baseline) — the baseline is normally the
reference policy (the SFT model). Writes eval.json and a one-page report.html with plots (the run's
reward and KL curves when --run is given, score and length distributions, sample replies).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import torch

from chatrlhf import losses
from chatrlhf.config import EvalConfig, ModelArgs
from chatrlhf.errors import UsageError
from chatrlhf.evaluate.metrics import bootstrap_ci, distinct_n, prompt_win_rates
from chatrlhf.models import autocast, load_model
from chatrlhf.rewards import ModelReward, SimilarityReward, prompts_with_references
from chatrlhf.rollout import Rollout, decode_replies, encode_prompts, ended_with_eos, generator, policy_forward, sample


@torch.no_grad()
def replies_of(model, tok, prompts, cfg: EvalConfig) -> tuple[list[Rollout], list[str]]:
    """Sampled replies (fixed seed, so model and baseline see the same random stream), in batches."""
    device = next(model.parameters()).device
    model.eval()
    batches, texts = [], []
    gen = generator(cfg.seed, device)  # a stream of its own: the global one is never touched
    rows = cfg.batch_size * cfg.samples_per_prompt  # whole prompts per batch: each prompt's KV cache is shared
    for i in range(0, len(prompts), rows):
        q, qm = encode_prompts(tok, prompts[i:i + rows], cfg.max_prompt_length, device)
        ids, mask, _ = sample(model, q, qm, cfg.max_new_tokens, cfg.temperature, tok.eos_token_id,
                              tok.pad_token_id, cfg.dtype, generator=gen)
        r = Rollout(q, qm, ids, mask, *[None] * 7, ended=ended_with_eos(ids, tok.eos_token_id))
        batches.append(r)
        texts += decode_replies(tok, ids, mask)
    return batches, texts


@torch.no_grad()
def kl_per_reply(model, ref, batches: list[Rollout], cfg: EvalConfig) -> list[float]:
    """Σ_t k1 over each reply of ``model``: log π(y|x) − log π_ref(y|x) at the sampling temperature."""
    out = []
    for r in batches:
        with autocast(cfg.dtype, r.query_ids.device):
            lp, _, _ = policy_forward(model, r, cfg.temperature)
            ref_lp, _, _ = policy_forward(ref, r, cfg.temperature)
        out += (losses.kl_estimates(lp, ref_lp)["k1"] * r.response_mask).sum(1).tolist()
    return out


def describe(texts, batches, tok, prompts, refs, rm, embed) -> dict:
    lengths = [int(m.sum()) for r in batches for m in r.response_mask]
    d = {"length_tokens": float(np.mean(lengths)), "eos_rate": float(torch.cat([r.ended for r in batches]).float().mean()),
         "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
         "rouge_l": float(np.mean(SimilarityReward(refs, "rouge")(prompts, texts))), "_lengths": lengths}
    if embed is not None:
        d["embedding_cosine"] = float(np.mean(embed(prompts, texts)))
    if rm is not None:
        d["_scores"] = rm(prompts, texts, torch.cat([r.ended for r in batches]).tolist())
        d["rm_score"] = float(np.mean(d["_scores"]))
    return d


def run_eval(cfg: EvalConfig, log=print) -> dict:
    from chatrlhf.data.records import prompt_key

    if cfg.temperature <= 0:
        raise UsageError(f"--temperature {cfg.temperature}: eval samples its replies, so it must be > 0",
                         "use e.g. --temperature 0.7")
    if cfg.samples_per_prompt < 1:
        raise UsageError(f"--samples-per-prompt {cfg.samples_per_prompt}: must be ≥ 1", "")
    pairs = prompts_with_references(cfg.data)[:cfg.max_prompts]
    n = cfg.samples_per_prompt
    prompts = [p for p, _ in pairs for _ in range(n)]  # n replies to each prompt, side by side
    refs = {prompt_key(p): r for p, r in pairs}
    rm = ModelReward(cfg.reward_model, force=True, device=cfg.device, dtype=cfg.dtype,
                     log=lambda m: None) if cfg.reward_model else None
    embed = SimilarityReward(refs, "embedding") if cfg.embedding else None
    model, tok = load_model(cfg, chat_template=cfg.chat_template)
    log(f"chatrlhf eval: {len(pairs)} held-out prompts with human replies from {','.join(cfg.data)}, {n} "
        f"repl{'y' if n == 1 else 'ies'} each")
    batches, texts = replies_of(model, tok, prompts, cfg)
    report = {"model": cfg.model, "baseline": cfg.baseline or None, "prompts": len(pairs), "samples_per_prompt": n,
              "data": ",".join(cfg.data),
              "decoding": {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed},
              "metrics": {"model": describe(texts, batches, tok, prompts, refs, rm, embed)}}
    samples = {"model": texts}
    if cfg.baseline:
        base, base_tok = load_model(ModelArgs(model=cfg.baseline, device=cfg.device, dtype=cfg.dtype),
                                    chat_template=cfg.chat_template)
        base_batches, base_texts = replies_of(base, base_tok, prompts, cfg)
        report["metrics"]["baseline"] = describe(base_texts, base_batches, base_tok, prompts, refs, rm, embed)
        samples["baseline"] = base_texts
        if base_tok.get_vocab() == tok.get_vocab():
            kl = kl_per_reply(model, base, batches, cfg)
            report["kl_to_baseline"] = {"mean": float(np.mean(kl)), "median": float(np.median(kl))}
        if rm is not None:
            mean, lo, hi = bootstrap_ci(prompt_win_rates(report["metrics"]["model"]["_scores"],
                                                         report["metrics"]["baseline"]["_scores"], n), seed=cfg.seed)
            report["win_rate"] = {"mean": mean, "ci95": [lo, hi], "judge": cfg.reward_model,
                                  "ci": "bootstrap over prompts"}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = _curves(cfg.run) if cfg.run else {}
    public = json.loads(json.dumps(report, default=float))
    for m in public["metrics"].values():
        for k in [k for k in m if k.startswith("_")]:
            del m[k]
    (out / "eval.json").write_text(json.dumps(public, indent=2) + "\n")
    (out / "report.html").write_text(render_html(public, report, curves, prompts[::n], refs,
                                                 {k: v[::n] for k, v in samples.items()}), encoding="utf-8")
    return public


def _curves(run_dir: str) -> dict[str, list]:
    from chatrlhf.logger import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"--run {run_dir}: no metrics.jsonl there", "point at the output folder of a training run")
    rows = read_metrics(run_dir)
    keys = ("reward/total_mean", "objective/kl", "eval/reward", "eval/kl", "rollout/length", "policy/entropy")
    return {k: [(m["step"], m[k]) for m in rows if isinstance(m.get(k), (int, float))] for k in keys}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=85)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "<img src='data:image/png;base64," + base64.b64encode(buf.getvalue()).decode() + "'>"


def _plots(report: dict, curves: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = []
    if any(curves.values()):
        fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
        for a, keys, title in ((ax[0], ("reward/total_mean", "eval/reward"), "reward"),
                               (ax[1], ("objective/kl", "eval/kl"), "KL to reference (nats / reply)"),
                               (ax[2], ("rollout/length", "policy/entropy"), "length and entropy")):
            for k in keys:
                if curves.get(k):
                    s, v = zip(*curves[k])
                    a.plot(s, v, marker="." if k.startswith("eval") else None, label=k)
            a.set(title=title, xlabel="step")
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
        fig.tight_layout()
        imgs.append(_png(fig))
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, m in report["metrics"].items():
        if "_scores" in m:
            ax[0].hist(m["_scores"], bins=20, alpha=0.55, label=name)
        ax[1].hist(m["_lengths"], bins=20, alpha=0.55, label=name)
    ax[0].set(title="reward-model scores", xlabel="score")
    ax[1].set(title="reply length", xlabel="tokens")
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    imgs.append(_png(fig))
    return imgs


def render_html(public: dict, report: dict, curves: dict, prompts, refs, samples) -> str:
    from chatrlhf.data.records import prompt_key

    e = html.escape
    names = list(public["metrics"])
    keys = sorted({k for m in public["metrics"].values() for k in m})
    rows = "".join(f"<tr><td>{e(k)}</td>" + "".join(f"<td>{public['metrics'][n].get(k, float('nan')):.4g}</td>"
                                                      for n in names) + "</tr>" for k in keys)
    extra = ""
    if "win_rate" in public:
        w = public["win_rate"]
        extra += f"<p><b>Win rate</b> of the model against the baseline, judged by the reward model: {w['mean']:.3f} " \
                 f"(95% bootstrap CI {w['ci95'][0]:.3f}–{w['ci95'][1]:.3f})</p>"
    if "kl_to_baseline" in public:
        extra += f"<p><b>KL(model ‖ baseline)</b>: {public['kl_to_baseline']['mean']:.3f} nats per reply (mean)</p>"
    sample_rows = "".join(
        f"<tr><td>{e(p[-1]['content'])}</td><td>{e(refs[prompt_key(p)][0])}</td>"
        + "".join(f"<td>{e(samples[n][i])}</td>" for n in names) + "</tr>" for i, p in enumerate(prompts[:12]))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>chatrlhf eval report</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;vertical-align:top;font-size:13px}}</style></head><body>
<h1>chatrlhf eval</h1><p>model <code>{e(str(public['model']))}</code> · baseline <code>{e(str(public['baseline']))}</code>
· {public['prompts']} held-out prompts from <code>{e(public['data'])}</code> · sampling T={public['decoding']['temperature']},
{public['decoding']['max_new_tokens']} new tokens</p>{extra}
<table><tr><th>metric</th>{''.join(f'<th>{e(n)}</th>' for n in names)}</tr>{rows}</table>
{''.join(_plots(report, curves))}
<h2>Samples</h2><table><tr><th>prompt</th><th>human reply</th>{''.join(f'<th>{e(n)}</th>' for n in names)}</tr>
{sample_rows}</table></body></html>"""
