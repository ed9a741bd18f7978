"""`chatrlhf eval`: a saved model against a baseline on held-out prompts, scored by the independent evaluator
(evaluate/evaluator.py: plain transformers generation, the prompt format recorded in the model folder).

Per reward source (reward model, Python function, ROUGE-L to the human replies): each side's mean, the gain and
the win rate, each with a 95% bootstrap interval over prompts; KL(model ‖ baseline) with its interval — the
baseline is normally the model training started from. Per model: the human replies' likelihood, distinct-1/2,
reply length and EOS rate. Writes eval.json and a one-page report.html with plots (the run's reward and KL curves
when --run is given, score and length distributions, sample replies). --bias adds the bias probe (evaluate/bias/,
docs/bias.md) to both; --bias-only runs the probe alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from chatrlhf.config import EvalConfig, ModelArgs
from chatrlhf.data.records import prompt_key
from chatrlhf.data.template import prompt_format
from chatrlhf.errors import UsageError
from chatrlhf.evaluate.bias.counterfactual import load_terms
from chatrlhf.evaluate.bias.probe import bias_report
from chatrlhf.evaluate.bias.section import bias_html
from chatrlhf.evaluate.evaluator import check_prompt_format, compare, held_out, interval, kl_per_reply, \
    per_prompt_means, reference_nll, reward_sources, sample_replies
from chatrlhf.evaluate.metrics import distinct_n
from chatrlhf.logger import progress_bar, read_metrics
from chatrlhf.models import load_model
from chatrlhf.rewards import SimilarityReward

STYLE = """<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top;font-size:13px}</style>"""


def side(model, tok, pairs, n: int, sources: dict, embed, cfg: EvalConfig, bar, label: str) -> dict:
    """One model's replies, their scores by every source, and descriptive figures."""
    prompts = [p for p, _ in pairs for _ in range(n)]
    task = bar.add_task(f"eval {label}", total=len(prompts), info="")
    replies = sample_replies(model, tok, prompts, max_prompt_length=cfg.max_prompt_length,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                             batch_rows=cfg.batch_size * n, dtype=cfg.dtype, on_batch=lambda k: bar.advance(task, k))
    scores = {}
    for name, source in sources.items():
        scores[name] = list(source(prompts, replies.texts, replies.ended))
        if len(scores[name]) != len(prompts):
            raise UsageError(f"reward source '{name}' returned {len(scores[name])} values for {len(prompts)} replies",
                             "return one float (or None) per reply")
    d = {"length_tokens": float(np.mean(replies.lengths)), "eos_rate": float(np.mean(replies.ended)),
         "distinct_1": distinct_n(replies.texts, 1), "distinct_2": distinct_n(replies.texts, 2)}
    for name, key in (("rm", "rm_score"), ("fn", "fn_reward"), ("similarity", "rouge_l")):
        seen = [x for x in scores.get(name, []) if x is not None]
        if seen:
            d[key] = float(np.mean(seen))
    with_refs = [(p, refs[0]) for p, refs in pairs if refs]
    if with_refs:
        d["human_reply_nll"] = reference_nll(model, tok, with_refs, cfg.max_prompt_length + cfg.max_new_tokens,
                                             cfg.dtype)
    if embed is not None:
        d["embedding_cosine"] = float(np.mean([x for x in embed(prompts, replies.texts) if x is not None]))
    return {"replies": replies, "scores": scores, "metrics": d}


def load_baseline(cfg: EvalConfig, tok, log):
    """The baseline, prompted exactly as the model is (same template) when they share a vocabulary."""
    base, base_tok = load_model(ModelArgs(model=cfg.baseline, device=cfg.device, dtype=cfg.dtype),
                                chat_template=cfg.chat_template)
    same_vocab = base_tok.get_vocab() == tok.get_vocab()
    if same_vocab and base_tok.chat_template != tok.chat_template:
        log(f"chatrlhf eval: the baseline is prompted with the model's {prompt_format(tok)['template']} format, "
            "so both answer the same task")
        base_tok.chat_template = tok.chat_template
    return base, base_tok, same_vocab


def check_flags(cfg: EvalConfig) -> None:
    """Refuse settings eval cannot honour before any model is loaded (a bad --bias-terms file included)."""
    if cfg.temperature <= 0:
        raise UsageError(f"--temperature {cfg.temperature}: eval samples its replies, so it must be > 0",
                         "use e.g. --temperature 0.7")
    if cfg.samples_per_prompt < 1:
        raise UsageError(f"--samples-per-prompt {cfg.samples_per_prompt}: must be ≥ 1", "")
    if cfg.bias or cfg.bias_only:
        if cfg.bias_max_sets < 1:
            raise UsageError(f"--bias-max-sets {cfg.bias_max_sets}: must be ≥ 1", "e.g. --bias-max-sets 16")
        load_terms(cfg.bias_terms, cfg.bias_dimensions)


def decoding(cfg: EvalConfig) -> dict:
    return {"engine": "transformers model.generate", "temperature": cfg.temperature, "top_k": 0, "top_p": 1.0,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}


def run_bias_only(cfg: EvalConfig, log=print) -> dict:
    """`chatrlhf eval --bias-only`: the bias probe alone, written as eval.json and report.html."""
    if cfg.baseline:
        log(f"chatrlhf eval: --bias-only: --baseline {cfg.baseline} is not used")
    report = {"model": cfg.model, "data": ",".join(cfg.data), "decoding": decoding(cfg),
              "bias": bias_report(cfg, log=log)}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    e = html.escape
    (out / "report.html").write_text(
        f"""<!doctype html><html><head><meta charset="utf-8"><title>chatrlhf bias probe</title>{STYLE}</head><body>
<h1>chatrlhf eval --bias-only</h1><p>model <code>{e(str(cfg.model))}</code> · held-out prompts from
<code>{e(report['data'])}</code> · T={cfg.temperature}, {cfg.max_new_tokens} new tokens</p>
{bias_html(report['bias'])}</body></html>""", encoding="utf-8")
    return report


def run_eval(cfg: EvalConfig, log=print) -> dict:
    check_flags(cfg)
    if cfg.bias_only:
        return run_bias_only(cfg, log)
    pairs = held_out(cfg.data)[:cfg.max_prompts]
    n = cfg.samples_per_prompt
    refs = {prompt_key(p): r for p, r in pairs if r}
    sources = reward_sources(cfg, refs)
    embed = SimilarityReward(refs, "embedding") if cfg.embedding and refs else None
    model, tok = load_model(cfg, chat_template=cfg.chat_template)
    check_prompt_format(cfg.model, tok)
    fmt = prompt_format(tok)
    log(f"chatrlhf eval: {len(pairs)} held-out prompts from {','.join(cfg.data)} ({len(refs)} with human replies), "
        f"{n} repl{'y' if n == 1 else 'ies'} each, {fmt['template']} prompts as recorded in the model folder, "
        "transformers model.generate")
    with progress_bar(quiet=False) as bar:
        sides = {"model": side(model, tok, pairs, n, sources, embed, cfg, bar, "model")}
        if cfg.baseline:
            base, base_tok, same_vocab = load_baseline(cfg, tok, log)
            sides["baseline"] = side(base, base_tok, pairs, n, sources, embed, cfg, bar, "baseline")
    report = {"model": cfg.model, "baseline": cfg.baseline or None, "prompts": len(pairs), "samples_per_prompt": n,
              "data": ",".join(cfg.data), "prompt_format": fmt,
              "decoding": decoding(cfg),
              "metrics": {k: v["metrics"] for k, v in sides.items()}}
    if cfg.baseline:
        report["rewards"] = {name: compare(sides["model"]["scores"][name], sides["baseline"]["scores"][name], n,
                                           cfg.seed) for name in sources}
        judge = next((j for j in ("rm", "fn", "similarity") if j in sources), None)
        if judge:
            report["win_rate"] = {**report["rewards"][judge]["win_rate"], "judge": cfg.reward_model if judge == "rm"
                                  else cfg.reward_fn if judge == "fn" else "ROUGE-L to the human replies",
                                  "ci": "bootstrap over prompts"}
        if same_vocab:
            kl = kl_per_reply(model, base, sides["model"]["replies"], cfg.temperature, cfg.dtype)
            report["kl_to_baseline"] = {**interval(per_prompt_means(kl, n), cfg.seed), "median": float(np.median(kl))}
    if cfg.bias:
        report["bias"] = bias_report(cfg, model=model, tok=tok, sources=sources, log=log)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = _curves(cfg.run) if cfg.run else {}
    (out / "eval.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out / "report.html").write_text(render_html(report, sides, curves, pairs, n), encoding="utf-8")
    return report


def _curves(run_dir: str) -> dict[str, list]:
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


def _plots(sides: dict, curves: dict) -> list[str]:
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
    for name, d in sides.items():
        judge = next((j for j in ("rm", "fn", "similarity") if j in d["scores"]), None)
        if judge:
            ax[0].hist([x for x in d["scores"][judge] if x is not None], bins=20, alpha=0.55, label=name)
        ax[1].hist(d["replies"].lengths, bins=20, alpha=0.55, label=name)
    ax[0].set(title="scores of the judge (rm, else fn, else ROUGE-L)", xlabel="score")
    ax[1].set(title="reply length", xlabel="tokens")
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    imgs.append(_png(fig))
    return imgs


def render_html(report: dict, sides: dict, curves: dict, pairs, n: int) -> str:
    e = html.escape
    names = list(report["metrics"])
    keys = sorted({k for m in report["metrics"].values() for k in m})
    rows = "".join(f"<tr><td>{e(k)}</td>" + "".join(f"<td>{report['metrics'][m].get(k, float('nan')):.4g}</td>"
                                                      for m in names) + "</tr>" for k in keys)
    extra = "".join(f"<p><b>{e(name)}</b>: model {c['model']['mean']:.4g}, baseline {c['baseline']['mean']:.4g}, gain "
                    f"{c['gain']['mean']:+.4g} (95% CI {c['gain']['ci95'][0]:+.4g} to {c['gain']['ci95'][1]:+.4g}), "
                    f"win rate {c['win_rate']['mean']:.3f} ({c['win_rate']['ci95'][0]:.3f}–{c['win_rate']['ci95'][1]:.3f})</p>"
                    for name, c in report.get("rewards", {}).items())
    if "win_rate" in report:
        w = report["win_rate"]
        extra += f"<p><b>Win rate</b> of the model against the baseline, judged by {e(str(w['judge']))}: {w['mean']:.3f} " \
                 f"(95% bootstrap CI {w['ci95'][0]:.3f}–{w['ci95'][1]:.3f})</p>"
    if "kl_to_baseline" in report:
        k = report["kl_to_baseline"]
        extra += f"<p><b>KL(model ‖ baseline)</b>: {k['mean']:.3f} nats per reply (95% CI {k['ci95'][0]:.3f}–" \
                 f"{k['ci95'][1]:.3f})</p>"
    sample_rows = "".join(
        f"<tr><td>{e(p[-1]['content'])}</td><td>{e(refs[0] if refs else '')}</td>"
        + "".join(f"<td>{e(sides[m]['replies'].texts[i * n])}</td>" for m in names) + "</tr>"
        for i, (p, refs) in enumerate(pairs[:12]))
    d = report["decoding"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>chatrlhf eval report</title>
{STYLE}</head><body>
<h1>chatrlhf eval</h1><p>model <code>{e(str(report['model']))}</code> · baseline <code>{e(str(report['baseline']))}</code>
· {report['prompts']} held-out prompts from <code>{e(report['data'])}</code> ({report['prompt_format']['template']} prompts)
· {e(d['engine'])}, T={d['temperature']}, {d['max_new_tokens']} new tokens</p>{extra}
<table><tr><th>metric</th>{''.join(f'<th>{e(m)}</th>' for m in names)}</tr>{rows}</table>
{''.join(_plots(sides, curves))}
{bias_html(report['bias']) if 'bias' in report else ''}
<h2>Samples</h2><table><tr><th>prompt</th><th>human reply</th>{''.join(f'<th>{e(m)}</th>' for m in names)}</tr>
{sample_rows}</table></body></html>"""
