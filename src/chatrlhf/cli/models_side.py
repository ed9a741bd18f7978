"""The parts of `feedback queue` and `feedback simulate` that import torch: the reward model's scorer and the
oracle's loader (rewards.load_callable, the --reward-fn loader). cli/active.py imports this module only when a
--reward-model or an --oracle is given."""

from __future__ import annotations

import os

from chatrlhf.config import ModelArgs
from chatrlhf.errors import UsageError
from chatrlhf.reward_model import load_reward_model, reward_head, scored_heads
from chatrlhf.rewards import load_callable  # noqa: F401 - cli/active.py takes it from here


def reward_scorer(path: str, strategy: str):
    """scorer(prompts, responses) → (N, K) per-head scores of the reward model in ``path``; checked first to have
    an ensemble when ``strategy`` is disagreement."""
    if not os.path.isdir(path):
        raise UsageError(f"--reward-model {path}: no such folder", "give a folder written by `chatrlhf reward train`")
    model, tok = load_reward_model(ModelArgs(model=path))
    if strategy == "disagreement" and reward_head(model.config)["heads"] < 2:
        raise UsageError(f"--strategy disagreement: the reward model {path} has one head, no ensemble to disagree",
                         "train one with `chatrlhf reward train --freeze-trunk --ensemble 5`, or use "
                         "--strategy uncertainty")
    return lambda prompts, responses: scored_heads(model, tok, prompts, responses)
