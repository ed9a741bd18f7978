"""Reranking at generation time (issue 19 item 3): sample N candidate replies, score each, keep the best.

    reranker = load_reranker("q:out/qlearn", policy=model, tok=tok, policy_name="smollm2-135m")
    index, scores = reranker.pick(history, candidates)         # argmax of scores(history, candidate)

Two kinds, named by a spec:
  ``q:DIR``   a `chatrlhf qlearn` output folder: Q(h, y) = head(φ(h, y)) (qnet.load_qheads) with φ from the
              frozen trunk named in its qlearn.json, embedded with qnet.reply_features and the saved pooling. When
              that trunk is the model being served, the loaded policy is reused (not loaded twice). Candidates are
              ranked by the online head Q_1: it is the head qlearn acts with and the one its held-out evaluation
              (eval/q, eval/capture) measures, so that figure is what reranking delivers. The min over heads is the
              *target*'s guard against bootstrapped over-estimation; a constant bias does not move an argmax.
  ``rm:DIR``  a `chatrlhf reward train` output folder: best-of-N by the reward model's normalised score.

No CLI here: `chatrlhf generate|chat --rerank` (generation.py) and the chat server use it alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chatrlhf.config import ModelArgs
from chatrlhf.errors import UsageError
from chatrlhf.models import autocast, load_model, resolve_device, resolve_model, unwrap
from chatrlhf.qfeatures import grouped_text_features
from chatrlhf.qnet import FEATURE_SETS, QHEADS_FILE, QLEARN_JSON, load_qheads, q_inputs, reply_features
from chatrlhf.reward_model import check_gate, load_reward_model, reward_scores

KINDS = ("q", "rm")
SPEC_HINT = "write --rerank q:DIR (a `chatrlhf qlearn` output folder) or rm:DIR (a `chatrlhf reward train` folder)"
RUN_JSON = "chatrlhf.json"  # a finished run's record (trainers/run.py Summary): holds the run's config


class Reranker:
    """Scores (history, reply) pairs; higher is better. ``describe`` says what scores, for the run's log line."""
    describe = "reranker"

    def scores(self, histories: list[list[dict]], replies: list[str]) -> list[float]:
        raise NotImplementedError

    def pick_each(self, histories: list[list[dict]], candidates: list[list[str]]) -> list[tuple[int, list[float]]]:
        """(index of the best candidate, the candidates' scores) per history; all pairs scored in one call, so
        they batch together. Ties go to the first candidate."""
        flat_h = [h for h, cs in zip(histories, candidates) for _ in cs]
        flat = self.scores(flat_h, [c for cs in candidates for c in cs])
        out, start = [], 0
        for cs in candidates:
            s = flat[start:start + len(cs)]
            start += len(cs)
            out.append((max(range(len(s)), key=s.__getitem__), s))
        return out

    def pick(self, history: list[dict], candidates: list[str]) -> tuple[int, list[float]]:
        """(index of the highest-scoring candidate, every candidate's score)."""
        if not candidates:
            raise ValueError("pick needs at least one candidate")
        return self.pick_each([history], [candidates])[0]


class QReranker(Reranker):
    """Q_1(h, y) = heads(x(h, y))[0], x as the folder's qlearn.json ``features`` say: φ from ``trunk`` in fp32 as
    qlearn computed it (qnet.reply_features), the text features ψ (qfeatures; the candidates of one history are its
    consensus pool C, as the policy samples of a state were in training), or both. ``trunk`` is None for text."""

    def __init__(self, heads, meta: dict, trunk, tok, describe: str, max_prompt_length: int = 1024,
                 max_reply_length: int = 256, batch_size: int = 16):
        self.heads, self.meta, self.trunk, self.tok, self.describe = heads, meta, trunk, tok, describe
        self.max_prompt_length, self.max_reply_length, self.batch_size = max_prompt_length, max_reply_length, batch_size

    @torch.no_grad()
    def scores(self, histories, replies):
        if not replies:
            return []
        features = self.meta.get("features", "phi")
        phi = psi = None
        if features != "text":
            phi = reply_features(self.trunk, self.tok, histories, replies, pooling=self.meta["pooling"],
                                 batch_size=self.batch_size, max_prompt_length=self.max_prompt_length,
                                 max_reply_length=self.max_reply_length)
        if features != "phi":
            psi = grouped_text_features(histories, replies)
        x = q_inputs(phi, psi)
        return self.heads(x.to(next(self.heads.parameters()).device))[0].float().cpu().tolist()


class RMReranker(Reranker):
    """Best-of-N by a reward model: its normalised score of the whole reply (reward_model.reward_scores)."""

    def __init__(self, model, tok, describe: str, dtype: str = "auto", batch_size: int = 16, max_length: int = 512):
        self.model, self.tok, self.describe, self.dtype = model, tok, describe, dtype
        self.batch_size, self.max_length = batch_size, max_length

    def scores(self, histories, replies):
        if not replies:
            return []
        with autocast(self.dtype, next(self.model.parameters()).device):
            return reward_scores(self.model, self.tok, histories, replies, self.batch_size, self.max_length)


# --------------------------------------------------------------------------- load from a spec


def parse_spec(spec: str) -> tuple[str, Path]:
    """``"q:DIR"`` → ("q", Path(DIR)); names the problem of a bad spec."""
    kind, colon, where = spec.partition(":")
    if not colon or kind not in KINDS or not where.strip():
        raise UsageError(f"--rerank {spec!r}: unknown reranker (the prefix must be one of {', '.join(KINDS)})",
                         SPEC_HINT)
    path = Path(where.strip()).expanduser()
    if not path.is_dir():
        raise UsageError(f"--rerank {spec}: folder {path} not found", SPEC_HINT)
    return kind, path


def run_config(folder: Path) -> dict:
    """The config a finished run recorded in FOLDER/chatrlhf.json ({} when there is none)."""
    try:
        return json.loads((folder / RUN_JSON).read_text()).get("config") or {}
    except (OSError, ValueError):
        return {}


def same_model(a: str, b: str) -> bool:
    """Whether two --model values name the same model (a name, or folders that resolve to one path)."""
    if not a or not b:
        return False
    if a == b:
        return True
    try:
        ra, rb = resolve_model(a), resolve_model(b)
    except UsageError:
        return False
    return isinstance(ra, Path) and isinstance(rb, Path) and ra.resolve() == rb.resolve()


def load_reranker(spec: str, policy=None, tok=None, policy_name: str = "", chat_template: bool = True,
                  device: str = "auto", dtype: str = "auto", max_reply_length: int = 256, log=print) -> Reranker:
    """The reranker of ``spec`` (q:DIR or rm:DIR) on ``device``. ``policy``/``tok``/``policy_name``: the model
    being served, reused as the φ trunk when qlearn.json names it (``chat_template``: how it renders)."""
    kind, folder = parse_spec(spec)
    if kind == "q":
        return load_q(spec, folder, policy, tok, policy_name, chat_template, device, max_reply_length)
    return load_rm(spec, folder, device, dtype, log)


def check_q_folder(spec: str, folder: Path) -> None:
    for name in (QLEARN_JSON, QHEADS_FILE):
        if not (folder / name).is_file():
            looks = " (it looks like a reward model folder: use rm:DIR)" if (folder / "config.json").is_file() else ""
            raise UsageError(f"--rerank {spec}: {folder / name} not found: not a finished `chatrlhf qlearn` output "
                             f"folder{looks}", f"make one with `chatrlhf qlearn --output-dir {folder}`")


def load_q(spec, folder, policy, tok, policy_name, chat_template, device, max_reply_length) -> QReranker:
    """Heads and the φ trunk of a qlearn folder; the served policy itself when it is that trunk."""
    check_q_folder(spec, folder)
    where = resolve_device(device) if policy is None else next(policy.parameters()).device
    try:
        heads, meta = load_qheads(folder, device=where)
    except (KeyError, RuntimeError, ValueError) as e:
        raise UsageError(f"--rerank {spec}: cannot read {folder / QHEADS_FILE} with {folder / QLEARN_JSON} ({e})",
                         f"re-run `chatrlhf qlearn --output-dir {folder}`") from None
    trained = run_config(folder)
    if meta.get("features", "phi") not in FEATURE_SETS:
        raise UsageError(f"--rerank {spec}: {folder / QLEARN_JSON} names features {meta['features']!r}, not one of "
                         f"{', '.join(FEATURE_SETS)}", f"re-run `chatrlhf qlearn --output-dir {folder}`")
    if meta.get("features", "phi") == "text":  # no trunk: the heads read text features of the candidates alone
        describe = f"q:{folder} (Q_1 of {meta['heads']} heads on the text features of the candidates)"
        return QReranker(heads, meta, None, None, describe)
    template = trained.get("chat_template", chat_template)  # φ must be computed as qlearn computed it
    reused = policy is not None and same_model(meta["q_model"], policy_name) and template == chat_template
    if reused:
        trunk, qtok = policy, tok
    else:
        trunk, qtok = load_model(ModelArgs(model=meta["q_model"], device=str(where.type)), chat_template=template)
        trunk.eval().requires_grad_(False)
    d = unwrap(trunk).config.hidden_size + (len(meta.get("text_features", [])) if meta.get("features") == "both" else 0)
    if d != meta["dims"]:
        raise UsageError(f"--rerank {spec}: the heads read {meta['dims']}-d features but the trunk {meta['q_model']} "
                         f"has hidden size {d}", f"{folder / QLEARN_JSON} names the wrong trunk: re-run qlearn")
    how = "the served policy's own trunk, reused" if reused else f"trunk {meta['q_model']} loaded for it"
    plus = " + the text features" if meta.get("features") == "both" else ""
    describe = f"q:{folder} (Q_1 of {meta['heads']} heads on φ = {meta['pooling']} state of {how}{plus})"
    return QReranker(heads, meta, trunk, qtok, describe, trained.get("max_prompt_length", 1024),
                     max(max_reply_length, trained.get("max_new_tokens", 0) + 1))


def load_rm(spec: str, folder: Path, device: str, dtype: str, log) -> RMReranker:
    """A reward model folder; one that failed its gate is used with a warning (best-of-N at generation time moves
    no weights, unlike RL, which refuses it)."""
    config = folder / "config.json"
    if not config.is_file():
        looks = " (it looks like a qlearn folder: use q:DIR)" if (folder / QLEARN_JSON).is_file() else ""
        raise UsageError(f"--rerank {spec}: {config} not found: not a reward model folder{looks}",
                         f"make one with `chatrlhf reward train --output-dir {folder}`")
    archs = json.loads(config.read_text()).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UsageError(f"--rerank {spec}: {folder} holds a {', '.join(archs) or 'model'}, not a reward model",
                         f"give a `chatrlhf reward train` output folder, or q:DIR for a qlearn folder")
    for reason in check_gate(folder):
        log(f"chatrlhf: warning: reranking with reward model {folder} despite its gate: {reason}")
    model, tok = load_reward_model(ModelArgs(model=str(folder), device=device, dtype=dtype))
    return RMReranker(model.eval(), tok, f"rm:{folder} (best-of-N by the reward model's normalised score)", dtype)
